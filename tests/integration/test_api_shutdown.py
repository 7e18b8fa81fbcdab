"""`jetserve serve` as a real process: SIGTERM drains (503 for new work, in-flight stream finishes), exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_stream_then_exits(model_store, serve_model, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETSERVE_")}
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--port",
        str(port),
        "--model-store",
        str(model_store),
        "--model",
        serve_model,
        "--device",
        "cpu",
        "--max-context",
        "256",
        "--max-batch-size",
        "2",
        "--shutdown-grace-s",
        "60",
        "--log-level",
        "info",
    ]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as c:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if c.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server never became ready"
                time.sleep(0.2)

            lines, first = [], threading.Event()

            def stream():
                body = {
                    "model": serve_model,
                    "prompt": "Once upon a time",
                    "max_tokens": 240,  # in flight for over a second at 200 tok/s: the drain checks below run during it
                    "temperature": 0,
                    "stream": True,
                    "ignore_eos": True,
                }
                with httpx.Client(base_url=base, timeout=120) as s, s.stream("POST", "/v1/completions", json=body) as r:
                    for ln in r.iter_lines():
                        if ln.startswith("data: "):
                            lines.append(ln[6:])
                            first.set()

            t = threading.Thread(target=stream)
            t.start()
            assert first.wait(60)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            r = c.get("/ready")
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            r = c.post("/v1/completions", json={"model": serve_model, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert c.get("/health").status_code == 200
            t.join(120)
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(x) for x in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        out = log.read()
        log.close()
    assert "draining" in out
