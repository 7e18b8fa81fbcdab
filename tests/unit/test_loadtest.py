"""Unit tests of benchmarks/loadtest.py against a fake OpenAI SSE server on real uvicorn (127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks.loadtest import (
    LoadConfig,
    LoadtestError,
    check_loopback,
    percentile,
    run_closed_loop,
    run_open_loop,
    run_sweep,
)
from benchmarks.loadtest import main as cli_main


class FakeState:
    """Knobs and counters of the fake server (changed by tests between runs)."""

    def __init__(self):
        self.n_tokens = 5
        self.token_delay = 0.01
        self.first_delay = 0.03
        self.reject_every = 0  # every Nth request gets a 429 (0 = never)
        self.hang = False  # never send a byte of body
        self.drop = False  # end the stream without [DONE]
        self.count = 0
        self.inflight = 0
        self.max_inflight = 0
        self.bodies = []


def make_fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": "other-model", "object": "model", "state": "available"},
                {"id": "fake-model", "object": "model", "state": "loaded"},
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.bodies.append(body)
        state.count += 1
        if state.reject_every and state.count % state.reject_every == 0:
            return JSONResponse(
                {"error": {"message": "queue full", "type": "rate_limit_error", "code": 429}},
                status_code=429,
                headers={"retry-after": "1"},
            )

        async def gen():
            state.inflight += 1
            state.max_inflight = max(state.max_inflight, state.inflight)
            try:
                if state.hang:
                    await asyncio.sleep(3600)
                await asyncio.sleep(state.first_delay)
                for i in range(state.n_tokens):
                    if i:
                        await asyncio.sleep(state.token_delay)
                    chunk = {
                        "id": "x",
                        "object": "chat.completion.chunk",
                        "model": body["model"],
                        "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                if state.drop:
                    return
                yield (
                    "data: "
                    + json.dumps(
                        {
                            "id": "x",
                            "choices": [],
                            "usage": {
                                "prompt_tokens": 3,
                                "completion_tokens": state.n_tokens,
                                "total_tokens": 3 + state.n_tokens,
                            },
                        }
                    )
                    + "\n\n"
                )
                yield "data: [DONE]\n\n"
            finally:
                state.inflight -= 1

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    state = FakeState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_fake_app(state), log_level="warning", lifespan="off"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    th.join(timeout=5)


@pytest.fixture
def fake(fake_server):
    url, state = fake_server
    state.__init__()
    return url, state


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "http://127.9.8.7:1/", "http://localhost:8000", "http://[::1]:8000", "https://LOCALHOST"],
)
def test_loopback_accepted(url):
    assert check_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8000",
        "http://0.0.0.0:8000",
        "http://example.com",
        "http://192.168.1.5",
        "http://[::2]:80",
        "ftp://127.0.0.1",
        "127.0.0.1:8000",
        "http://localhost.evil.com",
        "http://128.0.0.1",
    ],
)
def test_non_loopback_refused(url):
    with pytest.raises(LoadtestError):
        check_loopback(url)


def test_cli_refuses_non_loopback(capsys, tmp_path):
    t0 = time.perf_counter()
    rc = cli_main(["--url", "http://10.255.255.1:8000", "--duration", "1", "--out", str(tmp_path)])
    assert rc == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "loopback" in err and "10.255.255.1" in err
    assert not (tmp_path / "loadtest.json").exists()


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    xs = rng.exponential(size=101).tolist()
    for q in (0, 50, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None
    assert percentile([2.0], 99) == 2.0


def test_closed_loop_measures_and_respects_concurrency(fake):
    url, state = fake
    state.n_tokens, state.first_delay, state.token_delay = 6, 0.05, 0.02
    cfg = LoadConfig(url=url, max_tokens=6, duration_s=1.0, max_requests=200, request_timeout_s=10)
    lv = asyncio.run(run_closed_loop(cfg, 3))
    assert lv["errors"] == {}
    assert lv["requests"] == lv["ok"] >= 3
    assert state.max_inflight == 3
    assert lv["output_tokens"] == 6 * lv["ok"]
    # TTFT is the fake's first delay; ITL its token delay (asyncio sleep overshoots, never undershoots;
    # upper bounds are loose because the CI machine's 2 cores are shared)
    assert 0.05 <= lv["ttft_s"]["p50"] < 3.0
    assert 0.02 <= lv["itl_s"]["p50"] < 1.0
    assert lv["ttft_s"]["p50"] <= lv["ttft_s"]["p95"] <= lv["ttft_s"]["p99"]
    assert lv["throughput_tok_s"] == pytest.approx(lv["output_tokens"] / lv["wall_s"])
    assert 1.0 <= lv["wall_s"] < 6.0  # the duration, plus the requests in flight at the deadline
    assert state.bodies[0]["stream"] is True and state.bodies[0]["model"] == "fake-model"


def test_closed_loop_bounded_by_max_requests(fake):
    url, state = fake
    cfg = LoadConfig(url=url, duration_s=60.0, max_requests=5, request_timeout_s=10)
    t0 = time.perf_counter()
    lv = asyncio.run(run_closed_loop(cfg, 4))
    assert lv["requests"] == 5 == state.count
    assert time.perf_counter() - t0 < 15  # far below the 60 s duration


def test_errors_counted_by_status_code(fake):
    url, state = fake
    state.reject_every = 3
    cfg = LoadConfig(url=url, duration_s=60.0, max_requests=9, request_timeout_s=10)
    lv = asyncio.run(run_closed_loop(cfg, 1))
    assert lv["requests"] == 9 and lv["ok"] == 6
    assert lv["errors"] == {"429": 3}


def test_stream_without_done_is_an_error(fake):
    url, state = fake
    state.drop = True
    cfg = LoadConfig(url=url, duration_s=60.0, max_requests=2, request_timeout_s=10)
    lv = asyncio.run(run_closed_loop(cfg, 1))
    assert lv["ok"] == 0 and lv["errors"] == {"stream_error": 2}


def test_request_timeout_bounds_a_hung_server(fake):
    url, state = fake
    state.hang = True
    cfg = LoadConfig(url=url, duration_s=60.0, max_requests=2, request_timeout_s=0.5)
    t0 = time.perf_counter()
    lv = asyncio.run(run_closed_loop(cfg, 2))
    assert time.perf_counter() - t0 < 10
    assert lv["errors"] == {"timeout": 2}


def test_open_loop_poisson(fake):
    url, state = fake
    cfg = LoadConfig(url=url, duration_s=1.5, max_requests=1000, request_timeout_s=10, seed=1)
    lv = asyncio.run(run_open_loop(cfg, 20.0))
    # seeded exponential gaps at 20/s over 1.5 s: the same arrivals as replaying the generator
    import random

    rng, t, expected = random.Random(1), 0.0, 0
    while True:
        t += rng.expovariate(20.0)
        if t >= 1.5:
            break
        expected += 1
    assert lv["arrivals"] == expected == lv["requests"] == state.count
    assert lv["errors"] == {} and lv["mode"] == "open"


def test_open_loop_overflow_is_bounded(fake):
    url, state = fake
    state.hang = True
    cfg = LoadConfig(
        url=url, duration_s=1.0, max_requests=30, request_timeout_s=1.0, max_inflight=2, drain_timeout_s=2.0
    )
    lv = asyncio.run(run_open_loop(cfg, 100.0))
    assert lv["requests"] == lv["arrivals"] == 30
    assert lv["errors"]["client_overflow"] >= 20
    assert state.max_inflight <= 2


def test_sweep_validates():
    with pytest.raises(LoadtestError):
        asyncio.run(run_sweep(LoadConfig(url="http://8.8.8.8"), [1]))
    with pytest.raises(LoadtestError):
        asyncio.run(run_sweep(LoadConfig(url="http://127.0.0.1:1", max_tokens=0), [1]))


def test_cli_writes_json_and_png(fake, tmp_path, capsys):
    url, state = fake
    out = tmp_path / "out"
    rc = cli_main(
        [
            "--url",
            url,
            "--concurrency",
            "1,2",
            "--rate",
            "10",
            "--duration",
            "0.5",
            "--max-requests",
            "20",
            "--max-tokens",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "loadtest.json").read_text())
    assert [lv["level"] for lv in report["levels"]] == ["c=1", "c=2", "rate=10"]
    assert report["config"]["model"] == "fake-model"
    assert all(lv["requests"] <= 20 for lv in report["levels"])
    assert (out / "loadtest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "c=2" in capsys.readouterr().out
