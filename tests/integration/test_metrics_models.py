"""Real uvicorn + real runtime on a store of tiny random Llamas under a tight memory budget.

Covers: /metrics values from real requests (tokens, TTFT, success, memory gauges), on-demand loads picked by
the request's `model`, LRU eviction that skips the pinned model, a refusal with numbers (503), the admin
endpoints (key required; 404 when no admin key is configured), /v1/models states, and occupancy gauges that
return to 0 after a storm of client disconnects with no further traffic.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.config import Settings
from models.loader import inspect_checkpoint, predict_footprint


def _root_conftest():
    """tests/conftest.py (its module name clashes with this folder's conftest)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_jetserve_root_conftest", Path(__file__).parents[1] / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


write_tiny_llama = _root_conftest().write_tiny_llama

pytestmark = pytest.mark.slow
ADMIN = "admin-secret"
SETTINGS = dict(max_context=128, max_batch_size=2, prefill_chunk=32)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, smollm2_dir: Path):
    store = tmp_path_factory.mktemp("tiny-store")
    for i, name in enumerate(("tiny-a", "tiny-b", "tiny-c")):
        write_tiny_llama(store / name, smollm2_dir, seed=i)
    write_tiny_llama(store / "tiny-big", smollm2_dir, seed=9, num_hidden_layers=16, intermediate_size=4096)
    cfg = store.parent / "models.json"
    cfg.write_text(json.dumps({"models": {"tiny-a": {"pinned": True}}, "aliases": {"gpt-4o-mini": "tiny-b"}}))
    return store, cfg


def footprint(store: Path, name: str) -> int:
    return predict_footprint(
        inspect_checkpoint(store / name),
        max_batch_size=SETTINGS["max_batch_size"],
        max_seq=SETTINGS["max_context"],
        prefill_chunk=SETTINGS["prefill_chunk"],
        lm_head=Settings.model_fields["lm_head_dtype"].default,  # what the server budgets (the default head)
    ).total_bytes


@pytest.fixture(scope="module")
def srv(start_server, tiny_store):
    store, cfg = tiny_store
    fa, fb, fc, fbig = (footprint(store, n) for n in ("tiny-a", "tiny-b", "tiny-c", "tiny-big"))
    # a model counts max(predicted, measured), and what a tiny model's load measures in a long test process
    # varies (20% to 65% over its prediction seen, heap and thread state; a probe server's measure of the pinned a
    # once differed from the next server's by 13 MB): so the server starts with room to spare and, once it has
    # loaded the pinned a, gets its budget from what a counts there, plus room for one more model (b or c by
    # prediction), never two, never the big
    with start_server(
        model_store=store,
        model="tiny-a",
        models_config=cfg,
        memory_budget=str(int(10 * max(fa, fb, fc))),
        admin_key=ADMIN,
        **SETTINGS,
    ) as s:
        mgr = s.app.state.manager
        a_counted = mgr.used_bytes()
        budget = a_counted + int(1.5 * max(fb, fc))
        assert fbig > budget - a_counted and a_counted + fb + fc > budget
        mgr.budget_bytes = budget
        mgr.metrics.set_memory_budget(budget)
        yield s


def scrape(srv) -> dict:
    r = httpx.get(srv.base_url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def states(srv) -> dict:
    data = httpx.get(srv.base_url + "/v1/models", timeout=30).json()["data"]
    return {m["id"]: m["state"] for m in data}


def chat(srv, model: str, n: int = 4):
    return srv.openai().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi there"}], max_tokens=n, temperature=0
    )


def test_metrics_follow_real_requests(srv):
    mgr = srv.app.state.manager
    s0 = scrape(srv)
    assert val(s0, "jetserve:memory_budget_bytes") == mgr.budget_bytes
    assert val(s0, "jetserve:model_loads_total", model="tiny-a") == 1
    lm = mgr.get_loaded("tiny-a")
    assert val(s0, "jetserve:model_memory_bytes", model="tiny-a", kind="predicted") == lm.predicted.total_bytes
    # a tiny model's load may fit in heap pages this shared test process already holds, so its measured growth
    # can be 0; tests/integration/test_manager_real.py checks the measurement on the real model
    assert val(s0, "jetserve:model_memory_bytes", model="tiny-a", kind="measured") == lm.measured_bytes >= 0
    before_gen = val(s0, "jetserve:generation_tokens_total", model="tiny-a") or 0
    before_prompt = val(s0, "jetserve:prompt_tokens_total", model="tiny-a") or 0
    before_ttft = val(s0, "jetserve:time_to_first_token_seconds_count", model="tiny-a") or 0
    usages = [chat(srv, "tiny-a").usage for _ in range(2)]
    s1 = scrape(srv)
    assert val(s1, "jetserve:generation_tokens_total", model="tiny-a") - before_gen == sum(
        u.completion_tokens for u in usages
    )
    assert val(s1, "jetserve:prompt_tokens_total", model="tiny-a") - before_prompt == sum(
        u.prompt_tokens for u in usages
    )
    assert val(s1, "jetserve:time_to_first_token_seconds_count", model="tiny-a") - before_ttft == 2
    assert (val(s1, "jetserve:request_success_total", model="tiny-a", finish_reason="length") or 0) + (
        val(s1, "jetserve:request_success_total", model="tiny-a", finish_reason="stop") or 0
    ) >= 2
    assert val(s1, "jetserve:num_requests_running", model="tiny-a") == 0
    assert val(s1, "jetserve:weight_bandwidth_bytes_per_second", model="tiny-a") > 0
    assert val(s1, "jetserve:memory_used_bytes") == mgr.used_bytes()


def test_on_demand_load_eviction_skips_pinned_and_refusal(srv):
    chat(srv, "gpt-4o-mini")  # alias of tiny-b: loads on demand
    assert states(srv) == {"tiny-a": "loaded", "tiny-b": "loaded", "tiny-c": "available", "tiny-big": "available"}
    chat(srv, "tiny-a")  # a is now the most recent; it is pinned anyway
    chat(srv, "tiny-c")  # no room: evicts b (LRU idle unpinned), never pinned a
    assert states(srv)["tiny-b"] == "available" and states(srv)["tiny-c"] == "loaded"
    s = scrape(srv)
    assert val(s, "jetserve:model_evictions_total", model="tiny-b") == 1
    assert val(s, "jetserve:model_memory_bytes", model="tiny-b", kind="predicted") is None
    with pytest.raises(openai.APIStatusError) as ei:
        chat(srv, "tiny-big")
    assert ei.value.status_code == 503
    err = ei.value.body
    assert err["code"] == "insufficient_memory"
    assert "needs" in err["message"] and "budget" in err["message"] and "evictable" in err["message"]
    assert states(srv)["tiny-c"] == "loaded"  # the refusal evicted nothing
    with pytest.raises(openai.NotFoundError):
        chat(srv, "../tiny-a")


def test_admin_endpoints(srv):
    base = srv.base_url + "/admin/models"
    assert httpx.get(base, timeout=30).status_code == 401
    assert httpx.get(base, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    h = {"Authorization": f"Bearer {ADMIN}"}
    rows = httpx.get(base, headers=h, timeout=30).json()
    by_name = {r["name"]: r for r in rows["data"]}
    lm = srv.app.state.manager.get_loaded("tiny-a")
    assert by_name["tiny-a"]["pinned"] is True and by_name["tiny-a"]["measured_bytes"] == lm.measured_bytes
    assert rows["memory_budget_bytes"] == srv.app.state.manager.budget_bytes
    r = httpx.post(f"{base}/tiny-c/unload", headers=h, timeout=30)
    assert r.status_code == 200 and r.json() == {"name": "tiny-c", "unloaded": True}
    r = httpx.post(f"{base}/tiny-b/load", headers=h, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["predicted"]["total_bytes"] == footprint(Path(srv.settings.model_store), "tiny-b")
    assert states(srv)["tiny-b"] == "loaded"
    r = httpx.post(f"{base}/nope/load", headers=h, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{base}/tiny-big/load", headers=h, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory"


def test_admin_routes_absent_without_admin_key(start_server, tiny_store):
    store, _ = tiny_store
    with start_server(model_store=store, model="tiny-c", **SETTINGS) as s:
        for method, path in (("GET", "/admin/models"), ("POST", "/admin/models/tiny-a/load")):
            r = httpx.request(method, s.base_url + path, headers={"Authorization": "Bearer anything"}, timeout=30)
            assert r.status_code == 404


OCCUPANCY = ("jetserve:num_requests_running", "jetserve:num_requests_waiting", "jetserve:kv_cache_usage_ratio")


def test_gauges_return_to_zero_after_a_disconnect_storm(start_server, tiny_llama_dir):
    """20 streams (max_tokens 400, batch 4: most wait for a slot) each closed after its first data chunk. With no
    request after the storm, /metrics must show running, waiting and KV usage at 0 within 2 s. They used to
    keep the last step's values until the next request: nothing steps once the last abort empties the engine."""
    n = 20
    model = tiny_llama_dir.name
    with start_server(
        model_store=tiny_llama_dir.parent, model=model, max_context=512, max_batch_size=4, max_queue=n, prefill_chunk=64
    ) as s:
        chat(s, model)
        before = val(scrape(s), "jetserve:request_success_total", model=model, finish_reason="abort") or 0
        body = {
            "model": model,
            "prompt": "Once upon a time",
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }

        async def one(client: httpx.AsyncClient) -> None:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return  # leaving the block closes the connection mid-stream

        async def storm() -> None:
            async with httpx.AsyncClient(
                base_url=s.base_url, timeout=60, limits=httpx.Limits(max_connections=n)
            ) as client:
                await asyncio.gather(*(one(client) for _ in range(n)))

        asyncio.run(storm())
        t0 = time.monotonic()
        while True:
            samples = scrape(s)
            gauges = {g: val(samples, g, model=model) for g in OCCUPANCY}
            if all(v == 0 for v in gauges.values()):
                break
            assert time.monotonic() - t0 < 2.0, f"2 s after the storm, with no traffic, the gauges read {gauges}"
            time.sleep(0.05)
        # every stream was cut by its client (none ran to 400 tokens), so the engine emptied through aborts
        assert val(samples, "jetserve:request_success_total", model=model, finish_reason="abort") - before == n
