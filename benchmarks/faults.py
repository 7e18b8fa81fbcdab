"""Fault scenarios against a real `jetserve serve`, with the figures for docs/reliability.md.

Each scenario is an async function over a base URL that returns a dict of measured figures plus `ok`
(the scenario's pass condition). tests/integration/test_faults.py runs CI-sized versions of the same
functions; this script runs the full sizes, each against its own `jetserve serve` child process:

    .venv/bin/python benchmarks/faults.py --out bench-out/faults            # all scenarios
    .venv/bin/python benchmarks/faults.py --only disconnects --clients 200

Scenarios: disconnects (clients vanish mid-stream: slots, KV and running requests back to 0, RSS back to
baseline, still serving), overflow (only 200/429, each 429 with Retry-After, never 5xx), bad_loads (truncated
/ corrupt safetensors, unsupported quantization, over-budget model: clear errors, the loaded model keeps
serving), injected_fault (the runner fails one request: at prefill it alone errors and the others finish; at
decode the batch holding it errors, every stream still ends, and the server keeps serving), sigterm (in-flight
streams finish within the grace period, new requests get 503), restart (time to ready).

injected_fault serves through `benchmarks.fault_runner` (a test double of the runner), never production code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: benchmarks.* is importable from the repository root
    sys.path.insert(0, str(REPO))

from benchmarks.fault_runner import marker  # noqa: E402
from benchmarks.loadtest import ServerProcess, scrape_metrics  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct-gptq-g64"
PROMPT = "Count from one to one hundred, separated by commas."


def chat_body(model: str, max_tokens: int, stream: bool = True, **kw) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": kw.pop("prompt", PROMPT)}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
        "ignore_eos": True,
    }
    body.update(kw)
    return body


def is_openai_error(resp: httpx.Response) -> bool:
    """True when the body is `{"error": {"message": str, "type": str, ...}}`."""
    try:
        err = resp.json().get("error")
    except ValueError:
        return False
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    *,
    headers: Optional[dict] = None,
    stop_after_tokens: Optional[int] = None,
    timeout_s: float = 120.0,
    first_token: Optional[asyncio.Event] = None,
) -> dict:
    """Stream one chat completion. Returns status, content chunks seen, whether [DONE] came, finish_reason,
    an in-stream error if any, and the first/last chunk times. `stop_after_tokens` closes the connection early;
    `first_token` is set when the first content chunk arrives."""
    out = {
        "status": None,
        "chunks": 0,
        "done": False,
        "finish_reason": None,
        "error": None,
        "t_first": None,
        "t_end": None,
        "headers": {},
    }
    t0 = time.perf_counter()

    async def go():
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=timeout_s
        ) as r:
            out["status"] = r.status_code
            out["headers"] = dict(r.headers)
            if r.status_code != 200:
                raw = await r.aread()
                try:
                    out["error"] = json.loads(raw)
                except ValueError:
                    out["error"] = raw[:200].decode("utf-8", "replace")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    out["done"] = True
                    return
                msg = json.loads(data)
                if "error" in msg:
                    out["error"] = msg
                    continue
                for ch in msg.get("choices") or []:
                    if (ch.get("delta") or {}).get("content"):
                        out["chunks"] += 1
                        out["t_first"] = out["t_first"] or time.perf_counter() - t0
                        if first_token is not None:
                            first_token.set()
                    if ch.get("finish_reason"):
                        out["finish_reason"] = ch["finish_reason"]
                if stop_after_tokens is not None and out["chunks"] >= stop_after_tokens:
                    return  # leaving the context closes the connection mid-stream

    try:
        await asyncio.wait_for(go(), timeout_s)
    except asyncio.TimeoutError:
        out["status"] = out["status"] or "timeout"
        out["error"] = out["error"] or "client timeout"
        out["timed_out"] = True
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["t_end"] = time.perf_counter() - t0
    return out


def engine_gauges(url: str, api_key: Optional[str] = None) -> Dict[str, float]:
    """Running requests, waiting requests and KV usage summed over models, from /metrics."""
    m = scrape_metrics(url, api_key)

    def total(prefix: str) -> float:
        return sum(v for k, v in m.items() if k.split("{")[0] == prefix)

    return {
        "running": total("jetserve_num_requests_running"),
        "waiting": total("jetserve_num_requests_waiting"),
        "kv_usage": total("jetserve_kv_cache_usage_ratio"),
    }


async def wait_idle(url: str, timeout_s: float = 60.0, api_key: Optional[str] = None) -> Dict[str, float]:
    """Poll /metrics until running, waiting and KV usage are all 0; returns the last gauges + seconds waited."""
    t0 = time.perf_counter()
    g = {}
    while time.perf_counter() - t0 < timeout_s:
        g = await asyncio.to_thread(engine_gauges, url, api_key)
        if g["running"] == 0 and g["waiting"] == 0 and g["kv_usage"] == 0:
            break
        await asyncio.sleep(0.1)
    g["idle_after_s"] = time.perf_counter() - t0
    return g


async def check_serving(client: httpx.AsyncClient, url: str, model: str, headers: Optional[dict] = None) -> bool:
    """One short streamed completion that must end with [DONE] and no error."""
    r = await stream_chat(client, url, chat_body(model, 4), headers=headers, timeout_s=120)
    return r["status"] == 200 and r["done"] and r["error"] is None and r["chunks"] >= 1


# --------------------------------------------------------------------------------------------- scenarios
async def scenario_disconnects(
    url: str,
    model: str,
    rss,
    *,
    clients: int = 200,
    max_tokens: int = 64,
    warmup: int = 16,
    seed: int = 0,
    first_token_timeout_s: float = 900.0,
) -> dict:
    """`clients` streams at once; each vanishes mid-stream (after 1 or 3 tokens) or while queued (after a
    short random delay). Then: running/waiting/KV usage back to 0, RSS within 2 % of the post-warm-up
    baseline, and a fresh request still streams to [DONE]. `rss` is a callable returning the server RSS."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=8)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        # warm-up: the same request mix run to completion, so allocator pools exist before the baseline
        warm = await asyncio.gather(*(stream_chat(client, url, chat_body(model, max_tokens)) for _ in range(warmup)))
        warm_ok = sum(1 for w in warm if w["status"] == 200 and w["done"])
        await wait_idle(url)
        await asyncio.sleep(1.0)
        rss_base = rss()

        async def vanish(i: int):
            kind = i % 4
            if kind == 3:  # disconnect while (probably) still queued
                try:
                    return await asyncio.wait_for(
                        stream_chat(client, url, chat_body(model, max_tokens)), rng.uniform(0.05, 1.0)
                    )
                except asyncio.TimeoutError:
                    return {"status": "client_cancelled", "chunks": 0}
            return await stream_chat(
                client,
                url,
                chat_body(model, max_tokens),
                stop_after_tokens=1 if kind < 2 else 3,
                timeout_s=first_token_timeout_s,
            )

        t0 = time.perf_counter()
        res = await asyncio.gather(*(vanish(i) for i in range(clients)))
        storm_s = time.perf_counter() - t0
        statuses: Dict[str, int] = {}
        for r in res:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        mid_stream = sum(1 for r in res if r.get("chunks", 0) >= 1 and not r.get("done"))
        before_first = sum(1 for r in res if r.get("chunks", 0) == 0)
        idle = await wait_idle(url)
        await asyncio.sleep(2.0)
        rss_after = rss()
        serving = await check_serving(client, url, model)
        idle2 = await wait_idle(url)
    growth = 100.0 * (rss_after - rss_base) / rss_base
    fivexx = sum(v for k, v in statuses.items() if k.isdigit() and int(k) >= 500)
    return {
        "clients": clients,
        "max_tokens": max_tokens,
        "warmup_ok": warm_ok,
        "statuses": statuses,
        "disconnected_mid_stream": mid_stream,
        "disconnected_before_first_token": before_first,
        "client_timeouts": sum(1 for r in res if r.get("timed_out")),
        "storm_s": storm_s,
        "idle_after_s": idle["idle_after_s"],
        "running_after": idle["running"],
        "waiting_after": idle["waiting"],
        "kv_usage_after": idle["kv_usage"],
        "rss_baseline_bytes": rss_base,
        "rss_after_bytes": rss_after,
        "rss_growth_pct": growth,
        "still_serving": serving,
        "kv_usage_after_check": idle2["kv_usage"],
        "ok": (
            idle["running"] == 0
            and idle["waiting"] == 0
            and idle["kv_usage"] == 0
            and abs(growth) < 2.0
            and serving
            and fivexx == 0
            and idle2["kv_usage"] == 0
        ),
    }


async def scenario_overflow(url: str, model: str, *, requests: int = 100, max_tokens: int = 16) -> dict:
    """`requests` at once (half streaming) against a small queue: every answer is 200 or 429, every 429 has
    a Retry-After of whole seconds and an OpenAI-shaped body, never a 5xx."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=requests + 8), trust_env=False) as client:

        async def plain():
            r = await client.post(
                f"{url}/v1/chat/completions", json=chat_body(model, max_tokens, stream=False), timeout=300
            )
            return {
                "status": r.status_code,
                "retry_after": r.headers.get("retry-after"),
                "shaped": is_openai_error(r) if r.status_code != 200 else True,
            }

        async def streamed():
            r = await stream_chat(client, url, chat_body(model, max_tokens), timeout_s=300)
            shaped = r["status"] == 200 and r["done"] or isinstance(r["error"], dict) and "error" in r["error"]
            return {"status": r["status"], "retry_after": r["headers"].get("retry-after"), "shaped": bool(shaped)}

        res = await asyncio.gather(*((plain() if i % 2 else streamed()) for i in range(requests)))
        serving = await check_serving(client, url, model)
    statuses: Dict[str, int] = {}
    for r in res:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    r429 = [r for r in res if r["status"] == 429]
    retry_ok = all(
        r["retry_after"] is not None and r["retry_after"].isdigit() and int(r["retry_after"]) >= 1 for r in r429
    )
    return {
        "requests": requests,
        "statuses": statuses,
        "n429": len(r429),
        "all_429_have_retry_after": retry_ok,
        "all_shaped": all(r["shaped"] for r in res),
        "still_serving": serving,
        "ok": set(statuses) <= {"200", "429"}
        and len(r429) > 0
        and retry_ok
        and serving
        and all(r["shaped"] for r in res),
    }


def make_bad_models(store: Path, good_src: Path, *, big_src: Optional[Path] = None) -> Dict[str, str]:
    """Copy `good_src` into `store` as broken variants; returns {scenario: model name}.

    truncated: model.safetensors cut to half its size; corrupt: its header bytes overwritten with junk;
    unsupported: config.json declares an unsupported quantization (bitsandbytes 4-bit); overbudget: `big_src`
    copied as is (the caller sets a memory budget below its footprint)."""
    names = {}

    def clone(name: str, src: Path) -> Path:
        d = store / name
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(src, d)
        return d

    d = clone("bad-truncated", good_src)
    st = d / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    names["truncated"] = d.name
    d = clone("bad-corrupt", good_src)
    st = d / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:72] = b"\xff\xfe{not json at all" + b"\x00" * 46
    st.write_bytes(bytes(data))
    names["corrupt"] = d.name
    d = clone("bad-unsupported-quant", good_src)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (d / "config.json").write_text(json.dumps(cfg))
    names["unsupported"] = d.name
    if big_src is not None:
        clone("bad-overbudget", big_src)
        names["overbudget"] = "bad-overbudget"
    return names


async def scenario_bad_loads(
    url: str, good_model: str, bad: Dict[str, str], *, admin_key: Optional[str] = None
) -> dict:
    """Ask for each broken model (request `model` field, and the admin load endpoint when `admin_key`):
    each answer is a 4xx/5xx with an OpenAI-shaped message, the server never crashes, and `good_model` keeps
    serving after each one."""
    out: Dict[str, dict] = {}
    ok = True
    async with httpx.AsyncClient(trust_env=False, timeout=300) as client:
        assert await check_serving(client, url, good_model), "good model must serve before the bad loads"
        for kind, name in bad.items():
            r = await client.post(f"{url}/v1/chat/completions", json=chat_body(name, 4, stream=False))
            entry = {
                "status": r.status_code,
                "shaped": is_openai_error(r),
                "message": (r.json().get("error") or {}).get("message") if is_openai_error(r) else r.text[:200],
            }
            if admin_key:
                a = await client.post(
                    f"{url}/admin/models/{name}/load", headers={"authorization": f"Bearer {admin_key}"}
                )
                entry["admin_status"] = a.status_code
                entry["admin_shaped"] = is_openai_error(a)
                entry["admin_message"] = (
                    (a.json().get("error") or {}).get("message") if is_openai_error(a) else a.text[:200]
                )
            entry["good_still_serving"] = await check_serving(client, url, good_model)
            entry["ok"] = (
                400 <= r.status_code < 600
                and r.status_code != 500
                and entry["shaped"]
                and entry["good_still_serving"]
                and (not admin_key or (400 <= entry["admin_status"] < 600 and entry["admin_shaped"]))
            )
            ok &= entry["ok"]
            out[kind] = entry
    return {"cases": out, "ok": ok}


async def scenario_injected_fault(
    url: str, model: str, *, others: int = 4, max_tokens: int = 16, stage: str = "prefill"
) -> dict:
    """One request carries the `benchmarks.fault_runner` marker for `stage` (the server must run through
    `python -m benchmarks.fault_runner serve`); it must fail with an error. At prefill the `others` concurrent
    requests finish normally; at decode the ones that shared its batch may fail with it, but every stream
    must end with [DONE]. Either way the server keeps serving and the KV cache ends empty."""
    async with httpx.AsyncClient(trust_env=False) as client:
        tasks = [stream_chat(client, url, chat_body(model, max_tokens)) for _ in range(others)]
        tasks.insert(
            others // 2, stream_chat(client, url, chat_body(model, max_tokens, prompt=f"{PROMPT} {marker(stage)}"))
        )
        res = await asyncio.gather(*tasks)
        bad = res[others // 2]
        good = [r for i, r in enumerate(res) if i != others // 2]
        serving = await check_serving(client, url, model)
        idle = await wait_idle(url)
    faulted_errored = bad["error"] is not None or (bad["status"] != 200)
    if stage == "prefill":
        others_ok = all(r["status"] == 200 and r["done"] and r["error"] is None and r["chunks"] >= 1 for r in good)
    else:
        others_ok = all(r["status"] == 200 and r["done"] for r in good)
    return {
        "stage": stage,
        "faulted": {"status": bad["status"], "error": bad["error"], "done": bad["done"]},
        "others_finished": sum(1 for r in good if r["done"] and r["error"] is None),
        "others": others,
        "others_ended": sum(1 for r in good if r["status"] == 200 and r["done"]),
        "still_serving": serving,
        "kv_usage_after": idle["kv_usage"],
        "ok": faulted_errored and others_ok and serving and idle["kv_usage"] == 0,
    }


async def scenario_sigterm(
    srv: ServerProcess, model: str, *, streams: int = 4, max_tokens: int = 48, grace_s: float = 20.0
) -> dict:
    """Start `streams` streams; after their first token send SIGTERM. In-flight streams must end with [DONE]
    within the grace period, a new request during the drain gets 503, and the process exits by itself."""
    url = srv.url
    async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=streams + 8)) as client:
        firsts = [asyncio.Event() for _ in range(streams)]
        tasks = [
            asyncio.ensure_future(
                stream_chat(client, url, chat_body(model, max_tokens), timeout_s=grace_s + 120, first_token=ev)
            )
            for ev in firsts
        ]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in firsts)), 120)
        t_sig = time.perf_counter()
        srv.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        new = {"status": None}
        try:
            r = await client.post(f"{url}/v1/chat/completions", json=chat_body(model, 4, stream=False), timeout=10)
            new = {"status": r.status_code, "shaped": is_openai_error(r), "retry_after": r.headers.get("retry-after")}
        except httpx.HTTPError as e:
            new = {"status": f"{type(e).__name__}"}
        res = await asyncio.gather(*tasks)
        streams_done_s = time.perf_counter() - t_sig
    rc = await asyncio.to_thread(srv.wait, grace_s + 30)
    exit_s = time.perf_counter() - t_sig
    finished = sum(1 for r in res if r["status"] == 200 and r["done"] and r["error"] is None)
    return {
        "streams": streams,
        "finished_with_done": finished,
        "streams_done_after_sigterm_s": streams_done_s,
        "new_request_during_drain": new,
        "exit_code": rc,
        "exit_after_sigterm_s": exit_s,
        "grace_s": grace_s,
        "ok": finished == streams and new.get("status") == 503 and rc is not None and exit_s <= grace_s + 10,
    }


def scenario_restart(serve_args: Sequence[str], model: str, *, runs: int = 3, log_dir: Optional[Path] = None) -> dict:
    """Cold start `jetserve serve` `runs` times: seconds from process start to /health 200 (listening), to
    /ready 200 (default model loaded and warmed) and to the end of a first 1-token completion."""
    health, ready, first = [], [], []
    for i in range(runs):
        with ServerProcess(serve_args, cwd=REPO, log_path=(log_dir / f"restart-{i}.log") if log_dir else None) as srv:
            health.append(srv.wait_ready(path="/health"))
            ready.append(srv.wait_ready(path="/ready"))
            t = time.perf_counter()
            with httpx.Client(trust_env=False, timeout=120) as c:
                r = c.post(f"{srv.url}/v1/chat/completions", json=chat_body(model, 1, stream=False))
            first.append(ready[-1] + time.perf_counter() - t if r.status_code == 200 else float("nan"))
    return {
        "runs": runs,
        "time_to_health_s": health,
        "time_to_ready_s": ready,
        "time_to_first_token_s": first,
        "median_ready_s": sorted(ready)[len(ready) // 2],
        "median_first_token_s": sorted(first)[len(first) // 2],
        "ok": all(f == f for f in first),
    }


# --------------------------------------------------------------------------------------------- script
def _write_tiny(out: Path, tokenizer_src: Path, **cfg) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=49152,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    base.update(cfg)
    LlamaForCausalLM(LlamaConfig(**base)).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        if (tokenizer_src / f).is_file() and not (out / f).exists():
            shutil.copy2(tokenizer_src / f, out / f)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="jetserve fault scenarios (full sizes)")
    p.add_argument("--model-store", type=Path, default=REPO / "model-store")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--only",
        action="append",
        default=None,
        choices=["disconnects", "overflow", "bad_loads", "injected_fault", "sigterm", "restart"],
    )
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--overflow-requests", type=int, default=200)
    p.add_argument("--restart-runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "faults")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    only = set(a.only or ["disconnects", "overflow", "bad_loads", "injected_fault", "sigterm", "restart"])
    base = ["--model-store", str(a.model_store), "--model", a.model, "--device", "cpu", "--max-context", "512"]
    results: Dict[str, dict] = {}

    def served(extra: List[str], name: str, module: str = "server.cli"):
        return ServerProcess([*base, *extra], cwd=REPO, log_path=a.out / f"serve-{name}.log", module=module)

    if "disconnects" in only:
        with served(["--max-batch-size", "8", "--max-queue", str(a.clients + 16)], "disconnects") as srv:
            srv.wait_ready()
            results["disconnects"] = asyncio.run(scenario_disconnects(srv.url, a.model, srv.rss, clients=a.clients))
    if "overflow" in only:
        with served(["--max-batch-size", "2", "--max-queue", "4"], "overflow") as srv:
            srv.wait_ready()
            results["overflow"] = asyncio.run(scenario_overflow(srv.url, a.model, requests=a.overflow_requests))
    if "injected_fault" in only:
        with served(["--max-batch-size", "8"], "injected_fault", module="benchmarks.fault_runner") as srv:
            srv.wait_ready()
            results["injected_fault"] = {
                stage: asyncio.run(scenario_injected_fault(srv.url, a.model, others=6, stage=stage))
                for stage in ("prefill", "decode")
            }
            results["injected_fault"]["ok"] = all(v["ok"] for v in results["injected_fault"].values())
    if "bad_loads" in only:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="jetserve-badstore-") as td:
            store = Path(td)
            src = a.model_store / "smollm2-135m-instruct"
            _write_tiny(store / "tiny-good", src)
            _write_tiny(
                store / "tiny-big",
                src,
                hidden_size=1024,
                intermediate_size=1024,
                num_hidden_layers=1,
                num_attention_heads=16,
                num_key_value_heads=4,
                head_dim=64,
            )
            bad = make_bad_models(store, store / "tiny-good", big_src=store / "tiny-big")
            shutil.rmtree(store / "tiny-big")
            with ServerProcess(
                [
                    "--model-store",
                    str(store),
                    "--model",
                    "tiny-good",
                    "--memory-budget",
                    "80MB",
                    "--device",
                    "cpu",
                    "--max-context",
                    "256",
                    "--admin-key",
                    "adm",
                ],
                cwd=REPO,
                log_path=a.out / "serve-bad_loads.log",
            ) as srv:
                srv.wait_ready()
                results["bad_loads"] = asyncio.run(scenario_bad_loads(srv.url, "tiny-good", bad, admin_key="adm"))
    if "sigterm" in only:
        with served(["--shutdown-grace-s", "20", "--max-batch-size", "4"], "sigterm") as srv:
            srv.wait_ready()
            results["sigterm"] = asyncio.run(scenario_sigterm(srv, a.model, streams=4, grace_s=20.0))
    if "restart" in only:
        results["restart"] = scenario_restart(base, a.model, runs=a.restart_runs, log_dir=a.out)
    results["command"] = " ".join(
        [".venv/bin/python", "benchmarks/faults.py", *(argv if argv is not None else sys.argv[1:])]
    )
    (a.out / "faults.json").write_text(json.dumps(results, indent=2, default=str))
    for k, v in results.items():
        if isinstance(v, dict):
            print(f"{k:12s} {'PASS' if v.get('ok') else 'FAIL'}  {json.dumps(v, default=str)[:600]}")
    print(f"wrote {a.out / 'faults.json'}")
    return 0 if all(v.get("ok") for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
