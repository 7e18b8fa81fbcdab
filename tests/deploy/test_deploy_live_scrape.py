"""A real Prometheus scrapes a real `jetserve serve` with deploy/prometheus.yml and the alert rules, and the
dashboard's queries return data.

The server is the installed CLI in a subprocess serving the tiny random Llama (fast on CPU); Prometheus is
the Debian `prometheus` binary (same package as promtool). Only the target address and the scrape/eval
intervals of the shipped config are changed. Panels that need CUDA or a Jetson (and the error/eviction
counters, which this traffic does not produce) may be empty; every other panel must return a series.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "jetserve-dashboard.json"
MAY_BE_EMPTY_ON_CPU = (
    "jetserve:gpu_",
    "jetserve:jetson_",
    "jetserve:joules",
    "jetserve:bandwidth_efficiency",
    "jetserve:request_errors",
    "jetserve:model_evictions",
)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} not ready after {timeout}s")


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus binary not installed (Debian package `prometheus`, scripts/system-deps.sh)")
    tmp = tmp_path_factory.mktemp("live-scrape")
    jport, pport = _free_port(), _free_port()
    jetserve = Path(sys.executable).parent / "jetserve"
    server = subprocess.Popen(
        [
            str(jetserve),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(jport),
            "--device",
            "cpu",
            "--model-store",
            str(tiny_llama_dir.parent),
            "--model",
            tiny_llama_dir.name,
            "--max-context",
            "128",
            "--max-batch-size",
            "2",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "jetserve.log", "wb"),
        cwd=tmp,
    )
    cfg = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["scrape_configs"] = [j for j in cfg["scrape_configs"] if j["job_name"] == "jetserve"]
    cfg["scrape_configs"][0]["scrape_interval"] = "1s"
    cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{jport}"]
    shutil.copytree(REPO / "deploy" / "rules", tmp / "rules")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{pport}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "prometheus.log", "wb"),
        cwd=tmp,
    )
    try:
        _wait(f"http://127.0.0.1:{jport}/ready", 120, server)
        _wait(f"http://127.0.0.1:{pport}/-/ready", 30, prom)
        base = f"http://127.0.0.1:{pport}"
        # a scrape must happen before the traffic, or rate() sees one value and stays 0
        deadline = time.monotonic() + 30
        while not _query(base, 'up{job="jetserve"} == 1'):
            assert time.monotonic() < deadline, "Prometheus never scraped jetserve"
            time.sleep(0.5)
        time.sleep(1.5)
        for i in range(4):
            r = httpx.post(
                f"http://127.0.0.1:{jport}/v1/completions",
                timeout=60,
                json={"model": tiny_llama_dir.name, "prompt": f"Hello {i}", "max_tokens": 8},
            )
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while not _query(base, "sum(rate(jetserve:generation_tokens_total[30s])) > 0"):  # scrapes after the traffic
            assert time.monotonic() < deadline, "generation_tokens_total never rose in Prometheus"
            time.sleep(0.5)
        time.sleep(2)  # one more scrape so gauges set after the last request are in too
        yield base
    finally:
        for proc in (prom, server):
            proc.terminate()
        for proc in (prom, server):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _query(base: str, expr: str) -> list:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_target_up_and_rules_healthy(stack):
    targets = httpx.get(f"{stack}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("jetserve", "up")], targets
    rules = [r for g in httpx.get(f"{stack}/api/v1/rules", timeout=10).json()["data"]["groups"] for r in g["rules"]]
    assert len(rules) >= 7 and all(r["health"] == "ok" for r in rules), rules
    firing = [
        a["labels"]["alertname"] for a in httpx.get(f"{stack}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    ]
    assert "JetserveInstanceDown" not in firing


def test_dashboard_queries_return_data(stack):
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    empty = []
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "30s").replace("$__range", "5m").replace("$instance", ".*")
            result = _query(stack, expr)
            if not result and not any(p in expr for p in MAY_BE_EMPTY_ON_CPU):
                empty.append(f"{panel['title']}: {t['expr']}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    tps = float(_query(stack, "sum(rate(jetserve:generation_tokens_total[5m]))")[0]["value"][1])
    assert tps > 0
