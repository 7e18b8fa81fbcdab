"""The HTTP edge over a real Engine with the fake runner (fast): timeouts, chunked prefill through HTTP,
readiness and draining. The tokenizer is the tiny one (tests/conftest.py): SmolLM2's id layout, so the fake
runner's ids (< 64) are single ASCII characters (35 -> "3")."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from server.api.app import create_app
from server.config import Settings
from server.engine.engine import Engine

from test_engine import FakeRunner  # same folder (rootdir-relative test modules)


class FakeManager:
    """Just enough of ModelManager for the routes: one model, loaded by start()."""

    def __init__(self, settings, runner, tokenizer, gate: asyncio.Event | None = None, on_request=None):
        self.settings, self.runner, self.tokenizer, self.gate = settings, runner, tokenizer, gate
        self.on_request = on_request
        self.lm = None

    async def start(self, preload=True):
        if self.gate is not None:
            await self.gate.wait()
        engine = Engine(self.runner, self.settings, name="fake", on_request=self.on_request).start()
        self.lm = SimpleNamespace(name="fake", runner=self.runner, tokenizer=self.tokenizer, engine=engine)

    def get_loaded(self, name):
        return self.lm if name == "fake" else None

    def list_models(self):
        return [SimpleNamespace(name="fake", aliases=(), state="loaded" if self.lm else "available", loaded_at=None)]

    @asynccontextmanager
    async def acquire(self, name):
        from server.store import ModelNotFoundError

        if name != "fake" or self.lm is None:
            raise ModelNotFoundError(name)
        yield self.lm

    async def close(self):
        if self.lm is not None:
            await asyncio.to_thread(self.lm.engine.stop)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from models.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_tokenizer_dir)


def client(tokenizer, runner=None, **kw):
    settings = Settings(**{"model": "fake", "prefill_chunk": 16, "max_queue": 4, **kw})
    mgr = FakeManager(settings, runner or FakeRunner(), tokenizer)
    return TestClient(create_app(settings, manager=mgr, metrics=None)), mgr


def sse_data(text: str):
    return [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]


def test_timeout_is_504_and_sse_error_after_start(tokenizer):
    c, mgr = client(tokenizer, FakeRunner(decode_delay=0.02), request_timeout_s=0.3)
    with c:
        r = c.post("/v1/completions", json={"prompt": [17, 18], "max_tokens": 40, "temperature": 0})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        r = c.post("/v1/completions", json={"prompt": [17, 18], "max_tokens": 40, "temperature": 0, "stream": True})
        data = sse_data(r.text)
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["error"]["code"] == "request_timeout"
        assert "choices" in json.loads(data[0])  # the prefill token streamed before the timeout
        assert mgr.lm.engine.num_active == 0


def test_long_prompt_prefilled_in_chunks_through_http(tokenizer):
    runner = FakeRunner(max_seq=256)
    c, _ = client(tokenizer, runner, max_context=256)
    with c:
        r = c.post("/v1/completions", json={"prompt": [5] * 100, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["usage"] == {
            "prompt_tokens": 100,
            "completion_tokens": 3,
            "total_tokens": 103,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
    assert [n for _, _, n in runner.prefills] == [16] * 6 + [4]
    assert [st for _, st, _ in runner.prefills] == list(range(0, 100, 16))


def test_ready_only_after_load_and_503_while_draining(tokenizer):
    settings = Settings(model="fake")
    gate = asyncio.Event()
    mgr = FakeManager(settings, FakeRunner(), tokenizer, gate)
    app = create_app(settings, manager=mgr, metrics=None)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        c.portal.call(gate.set)
        for _ in range(100):
            if c.get("/ready").status_code == 200:
                break
            c.portal.call(asyncio.sleep, 0.02)
        assert c.get("/ready").status_code == 200
        app.state.jetserve.draining = True
        assert c.get("/ready").status_code == 503
        r = c.post("/v1/completions", json={"prompt": [1], "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"]
        assert c.get("/health").status_code == 200


def test_stop_token_text_and_usage_with_fake_model(tokenizer):
    c, _ = client(tokenizer)
    with c:
        ids = [30, 31, 32, 33, 34]
        expected = tokenizer.decode([35, 36, 37, 38])  # "3456"
        r = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0})
        body = r.json()
        assert body["choices"][0]["text"] == expected and body["choices"][0]["finish_reason"] == "length"
        assert expected == "3456"
        stop = tokenizer.decode([37])
        r = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0, "stop": stop})
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["choices"][0]["text"] == expected[: expected.index(stop)]
        assert body["usage"]["completion_tokens"] == 3


def test_stop_string_is_recorded_as_stop_in_request_stats(tokenizer):
    """The client gets finish_reason "stop" for a stop string, and so does the engine's RequestStats (which
    feeds jetserve:request_success_total): the edge ends the request with reason "stop", not as an abort."""
    reqs = []
    settings = Settings(model="fake", prefill_chunk=16, max_queue=4)
    # slow decode and a long budget: the engine is still generating when the stop string shows up
    mgr = FakeManager(settings, FakeRunner(decode_delay=0.005), tokenizer, on_request=reqs.append)
    ids = [30, 31, 32, 33, 34]
    stop = tokenizer.decode([37])  # the fake model continues 35, 36, 37, ...
    with TestClient(create_app(settings, manager=mgr, metrics=None)) as c:
        r = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 100, "temperature": 0, "stop": stop})
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        r = c.post(
            "/v1/completions", json={"prompt": ids, "max_tokens": 100, "temperature": 0, "stop": stop, "stream": True}
        )
        chunks = [json.loads(d) for d in sse_data(r.text) if d != "[DONE]"]
        assert [ch["choices"][0]["finish_reason"] for ch in chunks][-1] == "stop"
        deadline = time.monotonic() + 5
        while len(reqs) < 2 and time.monotonic() < deadline:  # stats come from the engine thread
            time.sleep(0.01)
    assert [(x.finish_reason, x.generation_tokens < 100) for x in reqs] == [("stop", True)] * 2


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": [1], "temperature": NaN}',
        b'{"prompt": [1], "top_p": Infinity}',
        b'{"prompt": [1], "max_tokens": 1e400}',
        b'{"prompt": [-1]}',
        b'{"prompt": [1], "max_tokens": 99999999999999999999}',
        b'{"prompt": [1], "seed": "x"}',
        b'{"prompt": [[1], [2]]}',
        b'{"prompt": {"a": 1}}',
        b'{"prompt": [1], "stop": [null]}',
        b"null",
        b'"text"',
        b'{"messages": "hi"}',
        b"\xff\xfe",
        b'{"prompt": "\\ud800"}',
    ],
)
def test_hostile_bodies_get_clean_4xx(tokenizer, raw):
    c, mgr = client(tokenizer)
    with c:
        path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        r = c.post(path, content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        ok = c.post("/v1/completions", json={"prompt": [20], "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200
