"""Prometheus metrics with vLLM-style `jetserve:` names, on a per-app CollectorRegistry.

Fed from the engine's `StepStats` / `RequestStats` (`on_step`, `on_request_finished`, called on the engine
thread; the engine reports occupancy after every step and after any finish that changed it, so the running,
waiting and KV gauges follow state), from the ModelManager (`model_loaded`, `model_unloaded`, memory gauges)
and from the generation routes (`server/api/routes.py` calls `on_error(code)` for requests refused before the
engine saw them, e.g. 429). GET /metrics (`server/api/metrics_route.py`) calls `exposition()`.
prometheus-client metrics are thread-safe.

Names contain ':' (legal, recording-rule style, as vLLM's `vllm:`); `promtool check metrics` accepts them.
The exposition leaves out prometheus-client's `<name>_created` series (as vLLM does): per registry, without
the process-wide `prometheus_client.disable_created_metrics()` or its import-time environment variable.
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
from pathlib import Path
from typing import Dict, Optional, Union

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.stats import RequestStats, StepStats

logger = logging.getLogger(__name__)

PREFIX = "jetserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets sized for edge devices: small models decode in tens of ms per token, big ones in hundreds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0)


class _GpuMemoryCollector(Collector):
    """torch.cuda allocated/reserved bytes; absent when torch is not loaded or has no CUDA device."""

    def collect(self):
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        alloc = GaugeMetricFamily(
            PREFIX + "gpu_memory_allocated_bytes", "torch.cuda.memory_allocated per device", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            PREFIX + "gpu_memory_reserved_bytes", "torch.cuda.memory_reserved per device", labels=["device"]
        )
        for i in range(torch.cuda.device_count()):
            alloc.add_metric([str(i)], float(torch.cuda.memory_allocated(i)))
            reserved.add_metric([str(i)], float(torch.cuda.memory_reserved(i)))
        yield alloc
        yield reserved


class _WithoutCreated(Collector):
    """Read-only view of a registry without the `<name>_created` samples of counters, histograms and summaries."""

    _TYPES = ("counter", "histogram", "summary")

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self):
        for fam in self._registry.collect():
            if fam.type in self._TYPES:
                created = fam.name + "_created"
                fam = copy.copy(fam)  # collectors may hand out cached families: never edit them in place
                fam.samples = [s for s in fam.samples if s.name != created]
            yield fam


class Metrics:
    """All jetserve metrics on one registry. Create one per app."""

    def __init__(
        self,
        registry: Optional[CollectorRegistry] = None,
        *,
        telemetry: Union[Collector, None, str] = "auto",
        jetson_root: Union[str, Path] = "/",
        use_jtop: bool = True,
    ):
        """`telemetry="auto"` adds the Jetson collector when `jetson_root` is a Jetson (jtop, else sysfs);
        None adds none; a Collector is registered as is."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self._exposed = _WithoutCreated(self.registry)
        r = self.registry
        m = ["model"]
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from submit to the first generated token.",
            m,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Gap between successive generated tokens.",
            m,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from submit to the request's end.",
            m,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            PREFIX + "request_queue_time_seconds",
            "Time a request waited for a KV slot.",
            m,
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.decode_tps = Histogram(
            PREFIX + "decode_tokens_per_second",
            "Per-request decode speed: (generated tokens - 1) / (e2e - ttft).",
            m,
            buckets=TPS_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", m, registry=r)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens of finished requests.", m, registry=r
        )
        self.prefix_queries = Counter(
            PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", m, registry=r
        )
        self.prefix_hits = Counter(
            PREFIX + "prefix_cache_hits", "Prompt tokens served from the prefix cache (KV reused).", m, registry=r
        )
        self.success = Counter(
            PREFIX + "request_success",
            "Requests that finished with a finish_reason.",
            ["model", "finish_reason"],
            registry=r,
        )
        self.errors = Counter(
            PREFIX + "request_errors", "Requests that failed, by error code.", ["model", "code"], registry=r
        )
        self.loads = Counter(PREFIX + "model_loads", "Model loads.", m, registry=r)
        self.evictions = Counter(PREFIX + "model_evictions", "Models evicted to make room for another.", m, registry=r)
        self.running = Gauge(PREFIX + "num_requests_running", "Sequences holding a KV slot.", m, registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a KV slot.", m, registry=r)
        self.kv_usage = Gauge(
            PREFIX + "kv_cache_usage_ratio", "Fraction of KV cache tokens (or slots) in use.", m, registry=r
        )
        self.model_memory = Gauge(
            PREFIX + "model_memory_bytes",
            "Memory of a loaded model: predicted before the "
            "load, measured after it (RSS delta on CPU, memory_allocated delta on GPU).",
            ["model", "kind"],
            registry=r,
        )
        self.budget = Gauge(PREFIX + "memory_budget_bytes", "Memory budget for models.", registry=r)
        self.used = Gauge(PREFIX + "memory_used_bytes", "Memory accounted to loaded (and loading) models.", registry=r)
        self.load_seconds = Gauge(
            PREFIX + "model_load_seconds", "Duration of the model's last load (incl. warmup).", m, registry=r
        )
        self.weight_bw = Gauge(
            PREFIX + "weight_bandwidth_bytes_per_second",
            "Weight bytes read per second of engine step time, over the steps between two scrapes.",
            m,
            registry=r,
        )
        r.register(_GpuMemoryCollector())
        self._lock = threading.Lock()
        self._weight_bytes: Dict[str, int] = {}
        self._step_weight_bytes: Dict[str, float] = {}  # model -> weight bytes read by steps since last scrape
        self._step_seconds: Dict[str, float] = {}
        self._generated_total = 0
        self.last_weight_bandwidth = 0.0  # bytes/s over the steps between the last two scrapes (all models)
        if telemetry == "auto":
            from server.telemetry.jetson import jetson_collector

            telemetry = jetson_collector(
                Path(jetson_root),
                use_jtop=use_jtop,
                tokens_fn=self.generated_tokens_total,
                bandwidth_fn=lambda: self.last_weight_bandwidth,
            )
        self.telemetry = telemetry
        if telemetry is not None:
            r.register(telemetry)

    # ---------------------------------------------------------------- engine feed

    def on_step(self, s: StepStats) -> None:
        """One engine step, or an occupancy change without one (`batch_size == 0`): queue/slot gauges, KV
        usage, and (real steps only) weight bytes streamed."""
        self.running.labels(s.model).set(s.running)
        self.waiting.labels(s.model).set(s.waiting)
        if s.kv_tokens_total > 0:
            self.kv_usage.labels(s.model).set(s.kv_tokens_used / s.kv_tokens_total)
        elif s.max_batch_size > 0:
            self.kv_usage.labels(s.model).set(s.slots_used / s.max_batch_size)
        if s.batch_size > 0:
            with self._lock:
                # every forward pass streams all weights once, whatever the batch
                self._step_weight_bytes[s.model] = self._step_weight_bytes.get(s.model, 0.0) + self._weight_bytes.get(
                    s.model, 0
                )
                self._step_seconds[s.model] = self._step_seconds.get(s.model, 0.0) + s.step_duration_s

    def on_request_finished(self, r: RequestStats) -> None:
        """One finished request (any outcome)."""
        m = r.model
        self.prompt_tokens.labels(m).inc(r.prompt_tokens)
        self.generation_tokens.labels(m).inc(r.generation_tokens)
        if r.cached_tokens is not None:  # the request was admitted with prefix caching on
            self.prefix_queries.labels(m).inc(r.prompt_tokens)
            self.prefix_hits.labels(m).inc(r.cached_tokens)
        with self._lock:
            self._generated_total += r.generation_tokens
        if r.finish_reason in ("error", "timeout"):
            self.errors.labels(m, r.error_code or r.finish_reason).inc()
        else:
            self.success.labels(m, r.finish_reason).inc()
        if r.queue_time_s is not None and r.queue_time_s >= 0:
            self.queue.labels(m).observe(r.queue_time_s)
        self.e2e.labels(m).observe(r.e2e_latency_s)
        if r.ttft_s is not None:
            self.ttft.labels(m).observe(r.ttft_s)
            decode_s = r.e2e_latency_s - r.ttft_s
            if r.generation_tokens > 1 and decode_s > 0:
                self.decode_tps.labels(m).observe((r.generation_tokens - 1) / decode_s)
        for gap in r.inter_token_latencies_s:
            self.itl.labels(m).observe(gap)

    on_request = on_request_finished

    def on_error(self, code: str, model: str = "") -> None:
        """A request refused before the engine produced RequestStats (429 queue full, 404 model, 400...)."""
        self.errors.labels(model, code).inc()

    # ---------------------------------------------------------------- manager feed

    def set_memory_budget(self, budget_bytes: int) -> None:
        self.budget.set(budget_bytes)

    def set_memory_used(self, used_bytes: int) -> None:
        self.used.set(used_bytes)

    def model_loaded(
        self, model: str, *, predicted_bytes: int, measured_bytes: int, load_seconds: float, weight_bytes: int = 0
    ) -> None:
        self.loads.labels(model).inc()
        # series exist at 0 from the load on, so rate()/increase() see the first requests (a series born at its
        # final value reads as flat)
        for metric in (
            self.prompt_tokens,
            self.generation_tokens,
            self.prefix_queries,
            self.prefix_hits,
            self.ttft,
            self.itl,
            self.e2e,
            self.queue,
            self.decode_tps,
        ):
            metric.labels(model)
        for gauge in (self.running, self.waiting, self.kv_usage):  # a freshly loaded model is idle
            gauge.labels(model).set(0)
        self.model_memory.labels(model, "predicted").set(predicted_bytes)
        self.model_memory.labels(model, "measured").set(measured_bytes)
        self.load_seconds.labels(model).set(load_seconds)
        with self._lock:
            self._weight_bytes[model] = weight_bytes

    def model_unloaded(self, model: str, *, evicted: bool = False) -> None:
        """Drop the model's gauges (they describe loaded models only); count an eviction."""
        if evicted:
            self.evictions.labels(model).inc()
        for g, labelsets in (
            (self.model_memory, [(model, "predicted"), (model, "measured")]),
            (self.running, [(model,)]),
            (self.waiting, [(model,)]),
            (self.kv_usage, [(model,)]),
            (self.load_seconds, [(model,)]),
            (self.weight_bw, [(model,)]),
        ):
            for ls in labelsets:
                try:
                    g.remove(*ls)
                except KeyError:
                    pass
        with self._lock:
            self._weight_bytes.pop(model, None)

    # ---------------------------------------------------------------- derived figures

    def generated_tokens_total(self) -> int:
        """All tokens generated so far (for energy per token)."""
        with self._lock:
            return self._generated_total

    def take_weight_bandwidth(self) -> float:
        """Achieved weight bytes/s over step time since the last call (all models); updates the per-model gauge."""
        with self._lock:
            bytes_by_model, secs_by_model = self._step_weight_bytes, self._step_seconds
            self._step_weight_bytes, self._step_seconds = {}, {}
        for model, secs in secs_by_model.items():
            if secs > 0:
                self.weight_bw.labels(model).set(bytes_by_model.get(model, 0.0) / secs)
        total_s = sum(secs_by_model.values())
        if total_s > 0:
            self.last_weight_bandwidth = sum(bytes_by_model.values()) / total_s
        return self.last_weight_bandwidth

    def exposition(self) -> bytes:
        """Text exposition of the registry without `_created` series (what GET /metrics returns)."""
        self.take_weight_bandwidth()
        return generate_latest(self._exposed)
