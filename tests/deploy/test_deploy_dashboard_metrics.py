"""Every metric the Grafana dashboard and the alert rules query exists in jetserve's real exposition.

The exposition comes from the real `server.metrics.Metrics`, fed with real `StepStats` / `RequestStats`
and manager calls, with the real Jetson telemetry collector reading the telemetry helper's fixture
trees (a Jetson's /proc and sysfs captured as files) so the Jetson series exist on this x86 CPU box.
torch.cuda is faked only to make the GPU-allocator collector emit its two gauges.
Also: dashboard PromQL parses (promtool), labels used in legends/`by` exist on the metrics,
the dashboard JSON matches its generator, and docs/metrics.md documents every metric family.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "jetserve-dashboard.json"
RULES = sorted((REPO / "deploy" / "rules").glob("*.yml"))
METRICS_DOC = REPO / "docs" / "metrics.md"

# Labels Prometheus attaches at scrape time, not present in the exposition itself.
TARGET_LABELS = {"instance", "job", "le"}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def _fake_torch_with_cuda():
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 1,
        memory_allocated=lambda i: 3 << 20,
        memory_reserved=lambda i: 4 << 20,
    )
    return types.SimpleNamespace(cuda=cuda)


JETSON_FIXTURES = REPO / "tests" / "fixtures" / "jetson"


def _feed(metrics) -> None:
    from server.engine.stats import RequestStats, StepStats

    metrics.set_memory_budget(6 << 30)
    metrics.set_memory_used(1 << 30)
    metrics.model_loaded(
        "smollm2", predicted_bytes=500 << 20, measured_bytes=480 << 20, load_seconds=3.5, weight_bytes=100 << 20
    )
    metrics.model_loaded("other", predicted_bytes=1, measured_bytes=1, load_seconds=1.0)
    metrics.model_unloaded("other", evicted=True)
    metrics.on_step(
        StepStats(
            model="smollm2",
            batch_size=2,
            num_prefill_tokens=0,
            num_decode_tokens=2,
            step_duration_s=0.02,
            running=2,
            waiting=1,
            slots_used=2,
            max_batch_size=8,
            kv_tokens_used=300,
            kv_tokens_total=16384,
        )
    )
    metrics.on_request_finished(
        RequestStats(
            model="smollm2",
            request_id="r1",
            prompt_tokens=12,
            generation_tokens=20,
            finish_reason="stop",
            queue_time_s=0.01,
            ttft_s=0.2,
            e2e_latency_s=1.0,
            inter_token_latencies_s=(0.04, 0.05),
        )
    )
    metrics.on_request_finished(
        RequestStats(
            model="smollm2",
            request_id="r2",
            prompt_tokens=5,
            generation_tokens=0,
            finish_reason="error",
            queue_time_s=0.0,
            ttft_s=None,
            e2e_latency_s=0.1,
            error_code="internal_error",
        )
    )
    metrics.on_error("rate_limit_exceeded", "smollm2")


def _exposition(board: str) -> str:
    """What GET /metrics returns after some traffic on the Jetson fixture tree `board` (sysfs reader), with
    CUDA faked for the allocator gauges. Two scrapes, traffic between them, as joules/token and bandwidth
    efficiency are computed between scrapes."""
    from prometheus_client import CollectorRegistry

    from server.metrics import Metrics

    metrics = Metrics(CollectorRegistry(), telemetry="auto", jetson_root=JETSON_FIXTURES / board, use_jtop=False)
    assert metrics.telemetry is not None, f"{board} fixture not recognised as a Jetson"
    metrics.exposition()
    _feed(metrics)
    saved = sys.modules.get("torch")
    sys.modules["torch"] = _fake_torch_with_cuda()
    try:
        text = metrics.exposition().decode()
    finally:
        if saved is None:
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = saved
    return text


BOARDS = ("orin-nano-r36", "orin-agx-r36", "thor-r38")


@pytest.fixture(scope="module")
def board_expositions() -> dict[str, str]:
    return {board: _exposition(board) for board in BOARDS}


@pytest.fixture(scope="module")
def exposition(board_expositions) -> dict[str, set[str]]:
    """{sample name: label names} over the three boards (all sample names: _bucket, _total, ...).

    Boards expose different subsets (e.g. Orin's EMC clock needs root-only debugfs; Thor has no NvMap line),
    so a queried metric must exist on at least one board layout."""
    out: dict[str, set[str]] = {}
    for text in board_expositions.values():
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, set()).update(s.labels)
    return out


@pytest.fixture(scope="module")
def families(board_expositions) -> set[str]:
    return {f.name for text in board_expositions.values() for f in text_string_to_metric_families(text)}


def test_every_board_exposes_the_serving_metrics(board_expositions):
    """Off the Jetson rows, nothing depends on the board: each board's exposition has all of it."""
    serving = set().union(*(_metric_names(_grafana_to_promql(e)) for _, e, _ in _dashboard_exprs()))
    serving = {n for n in serving if not n.startswith(("jetserve:jetson_", "jetserve:joules", "jetserve:bandwidth"))}
    for board, text in board_expositions.items():
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert not serving - names, (board, serving - names)
        assert "jetserve:jetson_temperature_celsius" in names and "jetserve:jetson_power_watts" in names, board


def _dashboard_exprs() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every dashboard target, plus template-variable queries."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = [(p["title"], t["expr"], t.get("legendFormat", "")) for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            m = re.match(r"label_values\((\S+),\s*(\w+)\)", q["query"])
            out.append((f"variable {var['name']}", m.group(1), "{{%s}}" % m.group(2)))
    return out


def _rule_exprs() -> list[tuple[str, str, str]]:
    out = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for r in group["rules"]:
                out.append((r.get("alert") or r.get("record"), r["expr"], ""))
    return out


def _recorded() -> set[str]:
    return {name for name, expr, _ in _rule_exprs() if ":" in name and not name[0].isupper()}


def _grafana_to_promql(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$__interval", "15s")
        .replace("$instance", ".*")
    )


def _metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels, durations removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        word, is_call = m.group(1), m.group(2)
        if not is_call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def _used_labels(expr: str, legend: str) -> set[str]:
    labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in clause.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return labels - TARGET_LABELS


def test_metric_name_extraction():
    assert _metric_names('histogram_quantile(0.95, sum by (le, model) (rate(a:b_bucket{x="y"}[5m]))) > 2') == {
        "a:b_bucket"
    }
    assert _metric_names("x:used / x:budget > 0.9 and up == 0") == {"x:used", "x:budget", "up"}


def test_dashboard_json_is_generated():
    proc = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "grafana" / "make_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_dashboard_has_the_promised_panels():
    titles = " | ".join(t for t, _, _ in _dashboard_exprs()).lower()
    for word in (
        "tokens/s",
        "time to first token",
        "inter-token latency",
        "queue",
        "memory vs budget",
        "nvmap",
        "emc",
        "power",
        "per generated token",
    ):
        assert word in titles, word


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_queried_metric_exists_in_the_exposition(source, exposition):
    exprs = _dashboard_exprs() if source == "dashboard" else _rule_exprs()
    known = set(exposition) | _recorded() | {"up"}
    missing = {}
    for title, expr, _ in exprs:
        for name in _metric_names(_grafana_to_promql(expr)) - known:
            missing.setdefault(name, title)
    assert not missing, f"queried but not exposed: {missing}"
    queried = set().union(*(_metric_names(e) for _, e, _ in exprs))
    assert len(queried & set(exposition)) >= (10 if source == "dashboard" else 4)


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_labels_used_exist_on_the_queried_metrics(source, exposition):
    exprs = _dashboard_exprs() if source == "dashboard" else _rule_exprs()
    problems = []
    for title, expr, legend in exprs:
        names = [n for n in _metric_names(_grafana_to_promql(expr)) if n in exposition]
        if not names:
            continue
        available = set().union(*(exposition[n] for n in names))
        for label in _used_labels(expr, legend) - available:
            problems.append(f"{title}: label {label!r} not on {names}")
    assert not problems, "\n".join(problems)


def test_dashboard_promql_parses(tmp_path):
    """promtool parses each dashboard query as a recording rule (Grafana variables substituted)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run scripts/system-deps.sh (make test does)")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _grafana_to_promql(expr)}
        for i, (_, expr, _) in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metrics_doc_covers_every_family(families):
    doc = METRICS_DOC.read_text(encoding="utf-8")
    documented = set(re.findall(r"`(jetserve:[\w:]+?)(?:_total|\{[^`]*)?`", doc))
    assert not [f for f in families if f.endswith("_created")], "prometheus-client's _created series must be off"
    undocumented = sorted(f for f in families if f.startswith("jetserve:") and f not in documented)
    assert not undocumented, f"add to docs/metrics.md: {undocumented}"
    stale = sorted(d for d in documented if d not in families and d not in _recorded())
    assert not stale, f"documented but not exposed: {stale}"


def test_dashboard_layout_is_consistent():
    """Grafana is not available offline; check what it would reject or render badly."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        if p["type"] != "row":
            assert p["targets"] and p["fieldConfig"]["defaults"]["unit"], p["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps(board["panels"]))) - {"__rate_interval", "__range", "__interval"}
    assert used <= variables, used - variables
