"""Plain records the engine emits; `server.metrics.Metrics` is fed only from these.

The engine thread builds one `StepStats` per engine step (plus one with `batch_size == 0` when finishes alone
changed the occupancy, so gauges follow state without waiting for a step) and one `RequestStats` per
finished request (any outcome) and hands them to the `on_step` / `on_request` callbacks given to `Engine`.
Callbacks run on the engine thread and must be cheap and thread-safe (prometheus-client metrics are).
All times are seconds (floats from `time.perf_counter()` / `time.monotonic()` differences).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple


@dataclass(frozen=True)
class StepStats:
    """One engine step (one scheduler plan executed), or, with `batch_size == 0` and no tokens, a loop turn
    that ran no step but whose finishes (abort, stop, timeout, engine stop) changed running/waiting/KV use."""

    model: str  # served model name ("" if the engine was built without one)
    batch_size: int  # sequences that got a token computed this step (prefill chunks + decodes); 0: no step
    num_prefill_tokens: int  # prompt tokens prefilled this step (sum over chunks)
    num_decode_tokens: int  # decode tokens computed this step (= decoding sequences)
    step_duration_s: float  # wall time of the step (plan + runner calls + sampling + hand-off)
    running: int  # sequences holding a KV slot after the step
    waiting: int  # requests waiting for a slot after the step
    slots_used: int  # = running
    max_batch_size: int  # runner.max_batch_size
    kv_tokens_used: int = 0  # tokens resident in the KV cache (sum of sequence lengths)
    kv_tokens_total: int = 0  # max_batch_size * max_seq
    num_copied_tokens: int = 0  # prompt KV positions copied from a group leader's slot this step (not prefilled)


@dataclass(frozen=True)
class RequestStats:
    """One finished request."""

    model: str
    request_id: str
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str  # "stop" | "length" | "abort" | "timeout" | "error"
    queue_time_s: float  # submit -> slot assigned (0 if never admitted: see finish_reason)
    ttft_s: Optional[float]  # submit -> first generated token (None if none was produced)
    e2e_latency_s: float  # submit -> finish
    inter_token_latencies_s: Tuple[float, ...] = field(default_factory=tuple)  # gaps between successive tokens
    error_code: Optional[str] = None  # e.g. "internal_error", "request_timeout" when finish_reason is error/timeout
    cached_tokens: Optional[int] = None  # prompt tokens whose KV was reused; None: no prefix-cache lookup made
    # a follower of an n > 1 group whose prompt KV was copied from its leader: those tokens (cached_tokens is
    # then None, so the prefix-cache counters count the group's prompt once, through the leader)
    kv_copied_tokens: int = 0
