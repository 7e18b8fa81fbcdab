"""Metrics fed from StepStats/RequestStats and the manager; exposition parsed and checked by promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.engine.stats import RequestStats, StepStats
from server.metrics import Metrics

ORIN = Path(__file__).resolve().parents[1] / "fixtures" / "jetson" / "orin-agx-r36"


def feed(m: Metrics) -> None:
    m.model_loaded("smol", predicted_bytes=1000, measured_bytes=990, load_seconds=1.5, weight_bytes=100_000_000)
    m.set_memory_budget(4000)
    m.set_memory_used(1000)
    m.on_step(
        StepStats(
            model="smol",
            batch_size=2,
            num_prefill_tokens=10,
            num_decode_tokens=1,
            step_duration_s=0.05,
            running=2,
            waiting=3,
            slots_used=2,
            max_batch_size=8,
            kv_tokens_used=512,
            kv_tokens_total=2048,
        )
    )
    m.on_step(
        StepStats(
            model="smol",
            batch_size=2,
            num_prefill_tokens=0,
            num_decode_tokens=2,
            step_duration_s=0.05,
            running=2,
            waiting=1,
            slots_used=2,
            max_batch_size=8,
        )
    )
    m.on_request_finished(
        RequestStats(
            model="smol",
            request_id="a",
            prompt_tokens=10,
            generation_tokens=5,
            finish_reason="stop",
            queue_time_s=0.002,
            ttft_s=0.2,
            e2e_latency_s=0.6,
            inter_token_latencies_s=(0.1, 0.1, 0.1, 0.1),
            cached_tokens=4,
        )
    )
    m.on_request_finished(
        RequestStats(
            model="smol",
            request_id="b",
            prompt_tokens=7,
            generation_tokens=0,
            finish_reason="error",
            queue_time_s=0.0,
            ttft_s=None,
            e2e_latency_s=0.01,
            error_code="internal_error",
        )
    )
    m.on_error("429", "smol")


def test_request_series_exist_at_zero_from_the_load():
    # a counter born at its final value reads as flat to rate(); the live Prometheus test depends on this
    m = Metrics(telemetry=None)
    g = m.registry.get_sample_value
    assert g("jetserve:generation_tokens_total", {"model": "smol"}) is None
    m.model_loaded("smol", predicted_bytes=1, measured_bytes=1, load_seconds=0.1)
    assert g("jetserve:generation_tokens_total", {"model": "smol"}) == 0
    assert g("jetserve:prompt_tokens_total", {"model": "smol"}) == 0
    assert g("jetserve:prefix_cache_queries_total", {"model": "smol"}) == 0
    assert g("jetserve:prefix_cache_hits_total", {"model": "smol"}) == 0
    assert g("jetserve:time_to_first_token_seconds_count", {"model": "smol"}) == 0
    for gauge in ("jetserve:num_requests_running", "jetserve:num_requests_waiting", "jetserve:kv_cache_usage_ratio"):
        assert g(gauge, {"model": "smol"}) == 0, gauge


def test_occupancy_report_without_a_step_zeroes_gauges_and_streams_no_weights():
    # the engine reports batch_size 0 when aborts emptied it: gauges follow, bandwidth ignores the non-step
    m = Metrics(telemetry=None)
    feed(m)
    g = m.registry.get_sample_value
    m.on_step(
        StepStats(
            model="smol",
            batch_size=0,
            num_prefill_tokens=0,
            num_decode_tokens=0,
            step_duration_s=0.0,
            running=0,
            waiting=0,
            slots_used=0,
            max_batch_size=8,
            kv_tokens_used=0,
            kv_tokens_total=2048,
        )
    )
    assert g("jetserve:num_requests_running", {"model": "smol"}) == 0
    assert g("jetserve:num_requests_waiting", {"model": "smol"}) == 0
    assert g("jetserve:kv_cache_usage_ratio", {"model": "smol"}) == 0
    assert m.take_weight_bandwidth() == pytest.approx(2e9)  # feed's two steps alone


def test_values_from_stats():
    m = Metrics(telemetry=None)
    feed(m)
    g = m.registry.get_sample_value
    assert g("jetserve:prompt_tokens_total", {"model": "smol"}) == 17
    assert g("jetserve:generation_tokens_total", {"model": "smol"}) == 5
    # only "a" was looked up in the prefix cache ("b" has cached_tokens None)
    assert g("jetserve:prefix_cache_queries_total", {"model": "smol"}) == 10
    assert g("jetserve:prefix_cache_hits_total", {"model": "smol"}) == 4
    assert g("jetserve:request_success_total", {"model": "smol", "finish_reason": "stop"}) == 1
    assert g("jetserve:request_errors_total", {"model": "smol", "code": "internal_error"}) == 1
    assert g("jetserve:request_errors_total", {"model": "smol", "code": "429"}) == 1
    assert g("jetserve:time_to_first_token_seconds_count", {"model": "smol"}) == 1
    assert g("jetserve:time_to_first_token_seconds_bucket", {"model": "smol", "le": "0.2"}) == 1
    assert g("jetserve:time_to_first_token_seconds_bucket", {"model": "smol", "le": "0.1"}) == 0
    assert g("jetserve:inter_token_latency_seconds_count", {"model": "smol"}) == 4
    assert g("jetserve:e2e_request_latency_seconds_count", {"model": "smol"}) == 2
    assert g("jetserve:request_queue_time_seconds_sum", {"model": "smol"}) == pytest.approx(0.002)
    # (5 - 1) tokens over (0.6 - 0.2) s = 10 tok/s
    assert g("jetserve:decode_tokens_per_second_sum", {"model": "smol"}) == pytest.approx(10.0)
    assert g("jetserve:num_requests_running", {"model": "smol"}) == 2
    assert g("jetserve:num_requests_waiting", {"model": "smol"}) == 1
    assert g("jetserve:kv_cache_usage_ratio", {"model": "smol"}) == pytest.approx(2 / 8)  # 2nd step: slots only
    assert g("jetserve:model_memory_bytes", {"model": "smol", "kind": "predicted"}) == 1000
    assert g("jetserve:model_memory_bytes", {"model": "smol", "kind": "measured"}) == 990
    assert g("jetserve:memory_budget_bytes") == 4000 and g("jetserve:memory_used_bytes") == 1000
    assert g("jetserve:model_load_seconds", {"model": "smol"}) == 1.5
    assert g("jetserve:model_loads_total", {"model": "smol"}) == 1
    # two steps each stream 100 MB of weights in 0.1 s of step time -> 2 GB/s
    assert m.take_weight_bandwidth() == pytest.approx(2e9)
    assert g("jetserve:weight_bandwidth_bytes_per_second", {"model": "smol"}) == pytest.approx(2e9)
    m.model_unloaded("smol", evicted=True)
    assert g("jetserve:model_memory_bytes", {"model": "smol", "kind": "predicted"}) is None
    assert g("jetserve:num_requests_running", {"model": "smol"}) is None
    assert g("jetserve:model_evictions_total", {"model": "smol"}) == 1


def test_registries_are_per_instance():
    a, b = Metrics(telemetry=None), Metrics(telemetry=None)
    feed(a)
    assert a.registry is not b.registry
    assert b.registry.get_sample_value("jetserve:prompt_tokens_total", {"model": "smol"}) is None


def test_exposition_parses_with_prefix_and_types():
    m = Metrics(jetson_root=ORIN, use_jtop=False)
    feed(m)
    fams = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    assert all(name.startswith("jetserve:") for name in fams)
    types = {n: f.type for n, f in fams.items()}
    assert not [n for n in fams if n.endswith("_created")], "prometheus-client's _created series must be off"
    for h in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "decode_tokens_per_second",
    ):
        assert types["jetserve:" + h] == "histogram"
    for c in (
        "prompt_tokens",
        "generation_tokens",
        "request_success",
        "request_errors",
        "model_loads",
        "model_evictions",
    ):
        assert types["jetserve:" + c] == "counter"
    assert types["jetserve:jetson_power_watts"] == "gauge"
    assert types["jetserve:bandwidth_efficiency_ratio"] == "gauge"


def promtool(text: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: apt-get install prometheus")
def test_promtool_check_metrics_is_clean():
    """promtool 2.42 lints ':' in names ("reserved for recording rules") although the exposition format and
    the server accept them (vLLM's `vllm:` names get the same lint). So: the only complaint on our raw output
    may be that one, for every name; with ':' mapped to '_' the output must be fully clean (units, _total,
    HELP/TYPE, naming conventions)."""
    m = Metrics(jetson_root=ORIN, use_jtop=False)
    feed(m)
    text = m.exposition()
    raw = promtool(text)
    lines = [ln for ln in (raw.stdout + raw.stderr).decode().splitlines() if ln.strip()]
    assert lines, "expected promtool's ':' lint on jetserve: names"
    assert all(ln.endswith("metric names should not contain ':'") for ln in lines), "\n".join(lines)
    body = b"\n".join(
        ln
        if ln.startswith(b"#") and not ln.startswith((b"# HELP", b"# TYPE"))
        else ln.replace(b"jetserve:", b"jetserve_")
        for ln in text.split(b"\n")
    )
    r = promtool(body)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (r.stdout + r.stderr).decode()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: apt-get install prometheus")
def test_promtool_catches_a_broken_exposition():
    # the check above can fail: promtool rejects a counter without _total and a duplicated HELP
    bad = b"# HELP x_requests c\n# TYPE x_requests counter\nx_requests 1\n# HELP x_requests c\n"
    r = promtool(bad)
    assert r.returncode != 0 and r.stderr.strip()


def test_exposition_drops_created_series_only():
    """`_created` samples are in the registry (prometheus-client adds them) but not in GET /metrics; every other
    sample of the registry is exposed, and other registries are untouched (no process-wide switch)."""
    m = Metrics(telemetry=None)
    feed(m)
    text = m.exposition().decode()
    assert m.registry.get_sample_value("jetserve:prompt_tokens_created", {"model": "smol"}) is not None
    assert "_created" not in text
    exposed = {
        (s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(text) for s in f.samples
    }
    registry = {
        (s.name, tuple(sorted(s.labels.items())))
        for f in m.registry.collect()
        for s in f.samples
        if not s.name.endswith("_created")
    }
    assert exposed == registry
    assert "jetserve:prompt_tokens_total" in {name for name, _ in exposed}
    other = CollectorRegistry()
    Counter("other_events", "An unrelated counter.", registry=other).inc()
    assert b"other_events_created" in generate_latest(other)
