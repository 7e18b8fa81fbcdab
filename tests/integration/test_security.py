"""Security: API keys on every endpoint but /health, admin key on /admin, loads confined to the store,
trust_remote_code off unless set, body-size limit. Real uvicorn on 127.0.0.1, tiny random Llama."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

pytestmark = pytest.mark.slow

API_KEY = "sk-test-key"
ADMIN_KEY = "admin-test-key"


def _evil_model(store: Path, src: Path, marker: Path) -> str:
    """A copy of `src` whose config asks for remote code: importing that code would create `marker`."""
    d = store / "evil-remote-code"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["EvilForCausalLM"]
    cfg["model_type"] = "evil"
    cfg["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
    }
    (d / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    payload = f"from pathlib import Path\nPath({str(marker)!r}).write_text('remote code ran')\n"
    for mod in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (d / mod).write_text(payload + "raise ImportError('evil')\n")
    return d.name


def test_trust_remote_code_never_on_by_default(tmp_path, tiny_llama_dir, monkeypatch):
    """Loading a model that ships its own code, with default Settings, never runs that code and never calls a
    transformers/jetserve loader with trust_remote_code=True; the load fails with a clear ModelLoadError."""
    import transformers

    import models.loader
    from server.config import Settings
    from server.manager import ModelLoadError, ModelManager

    store = tmp_path / "store"
    store.mkdir()
    shutil.copytree(tiny_llama_dir, store / "tiny")
    marker = tmp_path / "REMOTE_CODE_RAN"
    evil = _evil_model(store, tiny_llama_dir, marker)

    seen = []

    def spy(owner, attr):
        orig = getattr(owner, attr)

        def wrapper(*a, **kw):
            seen.append((f"{getattr(owner, '__name__', owner)}.{attr}", kw.get("trust_remote_code", False)))
            return orig(*a, **kw)

        if isinstance(getattr(owner, "__dict__", {}).get(attr), classmethod):
            monkeypatch.setattr(owner, attr, classmethod(lambda cls, *a, **kw: wrapper(*a, **kw)))
        else:
            monkeypatch.setattr(owner, attr, wrapper)

    spy(models.loader, "load_runner")
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        spy(cls, "from_pretrained")

    settings = Settings(
        model_store=store, model="tiny", device="cpu", memory_budget="4GiB", max_context=64, max_batch_size=2
    )
    assert settings.trust_remote_code is False

    async def go():
        mgr = ModelManager(settings)
        try:
            good = await mgr.load("tiny")
            assert good.runner is not None
            with pytest.raises(ModelLoadError) as ei:
                await mgr.load(evil)
            return str(ei.value)
        finally:
            await mgr.close()

    msg = asyncio.run(go())
    assert evil in msg
    assert not marker.exists(), "remote code from the model folder was executed"
    assert any(name.endswith("load_runner") for name, _ in seen)
    assert all(trc is False for _, trc in seen), seen


@pytest.fixture(scope="module")
def secure(start_server, tmp_path_factory, tiny_llama_dir):
    """Server with API keys, an admin key, /metrics behind the key and a 64 KiB body limit; the store holds the
    tiny model, a remote-code model, and a symlink to a model outside the store. `outside` is a valid model
    folder outside the store."""
    root = tmp_path_factory.mktemp("security")
    store = root / "store"
    store.mkdir()
    shutil.copytree(tiny_llama_dir, store / "tiny")
    outside = root / "outside-model"
    shutil.copytree(tiny_llama_dir, outside)
    (store / "escape-link").symlink_to(outside, target_is_directory=True)
    marker = root / "REMOTE_CODE_RAN"
    evil = _evil_model(store, tiny_llama_dir, marker)
    with start_server(
        model_store=store,
        model="tiny",
        max_context=64,
        api_keys=[API_KEY, "second-key"],
        admin_key=ADMIN_KEY,
        metrics_require_key=True,
        max_body_bytes=65536,
    ) as srv:
        srv.extra = {"outside": outside, "marker": marker, "evil": evil, "store": store}
        yield srv


def _routes(app):
    """(method, path) of every HTTP route the app serves (included routers too), path parameters = 'tiny'."""
    import re

    def walk(routes):
        for r in routes:
            if hasattr(r, "original_router"):  # FastAPI's wrapper of an included router
                yield from walk(r.original_router.routes)
            elif hasattr(r, "routes") and not hasattr(r, "methods"):
                yield from walk(r.routes)
            else:
                yield r

    out = []
    for r in walk(app.routes):
        for m in sorted(getattr(r, "methods", None) or ()):
            if m not in ("HEAD", "OPTIONS"):
                out.append((m, re.sub(r"\{[^}]+\}", "tiny", r.path)))
    return out


def _shaped_401(r):
    assert r.status_code == 401, (r.request.url, r.status_code, r.text[:200])
    err = r.json()["error"]
    assert err["type"] and err["message"] and err["code"] in ("invalid_api_key", "invalid_admin_key")


def test_every_endpoint_but_health_needs_the_key(secure):
    routes = _routes(secure.app)
    paths = {p for _, p in routes}
    assert {"/health", "/v1/models", "/v1/chat/completions", "/v1/completions", "/metrics", "/openapi.json"} <= paths
    checked = 0
    with httpx.Client(base_url=secure.base_url, timeout=30, trust_env=False) as c:
        for method, path in routes:
            if path == "/health":
                assert c.request(method, path).status_code == 200
                continue
            if path == "/ready":  # readiness probe: open by design (docs/reliability.md), says only ready/not
                r = c.request(method, path)
                assert r.status_code == 200 and set(r.json()) <= {"status", "model"}
                continue
            for headers in (
                {},
                {"authorization": "Bearer wrong"},
                {"authorization": f"Basic {API_KEY}"},
                {"authorization": "Bearer"},
                {"authorization": f"Bearer {API_KEY}x"},
            ):
                _shaped_401(c.request(method, path, headers=headers, json={} if method == "POST" else None))
            good = {"authorization": f"Bearer {API_KEY}"}
            r = c.request(method, path, headers=good, json={} if method == "POST" else None)
            if path.startswith("/admin"):
                _shaped_401(r)  # an API key is not the admin key
                r = c.request(method, path, headers={"authorization": f"Bearer {ADMIN_KEY}"})
                assert r.status_code in (200, 404, 409, 422), (path, r.status_code, r.text[:200])
            else:
                assert r.status_code != 401, (path, r.text[:200])
                assert r.status_code < 500, (path, r.status_code, r.text[:200])
            checked += 1
        r = c.post(
            "/v1/chat/completions",
            headers={"authorization": "Bearer second-key"},
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert r.status_code == 200, r.text
    assert checked >= 6


def test_admin_key_is_not_an_api_key(secure):
    with httpx.Client(base_url=secure.base_url, timeout=30, trust_env=False) as c:
        _shaped_401(c.get("/v1/models", headers={"authorization": f"Bearer {ADMIN_KEY}"}))


def test_admin_disabled_without_admin_key(start_server, tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "tiny")
    with start_server(model_store=tmp_path, model="tiny", max_context=64) as srv:
        assert srv.settings.admin_key is None
        with httpx.Client(base_url=srv.base_url, timeout=30, trust_env=False) as c:
            for path in ("/admin/models", "/admin/models/tiny/load", "/admin/models/tiny/unload"):
                r = c.request(
                    "GET" if path == "/admin/models" else "POST", path, headers={"authorization": "Bearer anything"}
                )
                assert r.status_code == 404, (path, r.status_code)


@pytest.mark.parametrize("how", ["admin", "request"])
def test_loading_outside_the_store_is_refused(secure, how):
    outside = secure.extra["outside"]
    names = [
        str(outside),
        "../outside-model",
        "escape-link",
        "/etc",
        "../../etc",
        "tiny/../../outside-model",
        str(outside) + "/",
        "./tiny/../escape-link",
    ]
    with httpx.Client(base_url=secure.base_url, timeout=60, trust_env=False) as c:
        for name in names:
            if how == "admin":  # percent-encoded, so the client does not normalise the dot segments away
                r = c.post(
                    f"/admin/models/{quote(name, safe='')}/load", headers={"authorization": f"Bearer {ADMIN_KEY}"}
                )
            else:
                r = c.post(
                    "/v1/chat/completions",
                    headers={"authorization": f"Bearer {API_KEY}"},
                    json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                )
            assert r.status_code in (400, 404), (name, r.status_code, r.text[:200])
            assert r.json()["error"]["message"]
        loaded = c.get("/admin/models", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    assert all(str(outside) not in json.dumps(e) for e in loaded if e.get("state") == "loaded")


def test_remote_code_model_over_http_never_runs_its_code(secure):
    evil, marker = secure.extra["evil"], secure.extra["marker"]
    with httpx.Client(base_url=secure.base_url, timeout=120, trust_env=False) as c:
        r = c.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {API_KEY}"},
            json={"model": evil, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert 400 <= r.status_code < 600 and r.status_code != 500, (r.status_code, r.text[:300])
        assert r.json()["error"]["message"]
        r = c.post(f"/admin/models/{evil}/load", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code in (422, 503), (r.status_code, r.text[:300])
        assert not marker.exists()
        ok = c.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {API_KEY}"},
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert ok.status_code == 200


def test_body_limit_enforced(secure):
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a" * 70000}], "max_tokens": 2})
    with httpx.Client(base_url=secure.base_url, timeout=30, trust_env=False) as c:
        r = c.post("/v1/chat/completions", content=body.encode(), headers=headers)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:200]

        def chunks():
            data = body.encode()
            for i in range(0, len(data), 8192):
                yield data[i : i + 8192]

        r = c.post("/v1/chat/completions", content=chunks(), headers=headers)
        assert r.status_code == 413, r.text[:200]
        # without a key, the big body is refused too (401 or 413), never read into a handler
        r = c.post("/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code in (401, 413)
        # a small body whose chat still fits the 64-token context (the tiny tokenizer has no "aaaa" merges)
        small = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a" * 20}], "max_tokens": 2})
        assert c.post("/v1/chat/completions", content=small.encode(), headers=headers).status_code == 200
