"""A real Prometheus server (Debian `prometheus`) on loopback scrapes a running jetserve; its HTTP query API
returns our series. Bounded in time (Prometheus start + a few 1 s scrapes)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus binary missing: apt-get install prometheus"
    ),
]


def _root_conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_jetserve_root_conftest", Path(__file__).parents[1] / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(prom: str, q: str) -> list:
    r = httpx.get(prom + "/api/v1/query", params={"query": q}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_jetserve(tmp_path, start_server, smollm2_dir):
    store = tmp_path / "store"
    _root_conftest().write_tiny_llama(store / "tiny-a", smollm2_dir, seed=0)
    with start_server(model_store=store, model="tiny-a", max_context=128, max_batch_size=2, prefill_chunk=32) as srv:
        out = srv.openai().completions.create(model="tiny-a", prompt="Hello", max_tokens=6, temperature=0)
        target = srv.base_url.removeprefix("http://")
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
            f"  - job_name: jetserve\n    static_configs:\n      - targets: ['{target}']\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={cfg}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        prom = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            result = []
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
                try:
                    result = query(prom, 'jetserve:generation_tokens_total{job="jetserve",model="tiny-a"}')
                except (httpx.TransportError, httpx.HTTPStatusError):  # not listening yet, or 503 while starting
                    result = []
                if result:
                    break
                time.sleep(0.5)
            assert result, (
                "Prometheus never returned jetserve:generation_tokens_total: "
                + (tmp_path / "prometheus.log").read_text()[-3000:]
            )
            assert float(result[0]["value"][1]) == out.usage.completion_tokens
            assert query(prom, 'up{job="jetserve"}')[0]["value"][1] == "1"
            mem = query(prom, 'jetserve:model_memory_bytes{model="tiny-a"}')
            kinds = {r["metric"]["kind"]: float(r["value"][1]) for r in mem}
            lm = srv.app.state.manager.get_loaded("tiny-a")
            # what the manager holds, scraped end to end (measured is an RSS delta: 0 when the load reused heap
            # that earlier tests in this process freed)
            assert kinds == {"predicted": lm.predicted.total_bytes, "measured": lm.measured_bytes}
            assert kinds["predicted"] > 0
            ttft = query(prom, 'jetserve:time_to_first_token_seconds_count{model="tiny-a"}')
            assert float(ttft[0]["value"][1]) == 1
            assert (
                float(query(prom, "jetserve:memory_budget_bytes")[0]["value"][1]) == srv.app.state.manager.budget_bytes
            )
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
