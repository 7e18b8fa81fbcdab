"""Request objects shared by the HTTP edge and the engine thread.

- `GenerationRequest`: what the edge submits (token ids + sampling params + an optional opaque
  `TokenConstraint`; never text).
- `TokenEvent`: what the engine hands back, one per generated token (or a final error/abort event).
- `RequestHandle`: the edge's async iterator over a request's events, fed from the engine thread with
  `loop.call_soon_threadsafe`.
- `SequenceState`: the engine's private per-request state (slot, progress, timings). Only the engine
  thread mutates it; the scheduler reads it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Tuple

if TYPE_CHECKING:  # SamplingParams lives in models/ (no torch needed to describe a request)
    from models.sampling import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_TIMEOUT = "timeout"
FINISH_ERROR = "error"


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStoppedError(RuntimeError):
    """The engine no longer accepts requests (shutting down / unloaded; HTTP 503)."""


def new_request_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class TokenConstraint(Protocol):
    """Per-request grammar state (structured output) that the engine drives without seeing text or grammar.

    Called on the engine thread only, once per generated token, in this order: `fill_mask(row)` writes the
    tokens allowed next into `row`, a contiguous CPU int32 tensor of ceil(V/32) words (bit j of word w allows
    token 32 * w + j); `accept(token_id)` advances by the sampled token and returns False when the grammar
    rejects it; `is_terminated()` is True once the grammar admits no further token (the request then finishes
    with "stop").
    """

    def fill_mask(self, row: Any) -> None: ...

    def accept(self, token_id: int) -> bool: ...

    def is_terminated(self) -> bool: ...


@dataclass
class GenerationRequest:
    """A tokenized request. `max_tokens` is already bounded by the context (the edge checks)."""

    prompt_ids: List[int]
    params: "SamplingParams"
    max_tokens: int
    request_id: str = field(default_factory=new_request_id)
    stop_token_ids: Tuple[int, ...] = ()  # extra ids that end generation with finish_reason "stop"
    ignore_eos: bool = False
    timeout_s: Optional[float] = None  # wall-clock limit from submit; None = Settings.request_timeout_s
    constraint: Optional[TokenConstraint] = None  # structured output: masks each token of this request


@dataclass(frozen=True)
class TokenEvent:
    """One event of a request's stream.

    A token event has `token_id >= 0`. The last event of every stream has `finish_reason` set; it may also
    carry a token (the one that finished it: EOS or the max_tokens-th) or none (`token_id == -1`: abort,
    timeout, error, or a stop the edge asked for with `RequestHandle.abort(FINISH_STOP)`). `error` /
    `error_code` are set when finish_reason is "error" or "timeout". `cached_tokens` is set on the first token
    event only: how many prompt tokens were served from the prefix cache instead of prefilled.
    """

    token_id: int
    logprob: Optional[float] = None
    top: Tuple[Tuple[int, float], ...] = ()
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    error_code: Optional[str] = None
    cached_tokens: Optional[int] = None


class RequestHandle:
    """Async iterator of `TokenEvent`s for one request; created on the event loop by `Engine.submit`.

    Iteration ends after the event whose `finish_reason` is set. `abort(reason)` asks the engine to stop the
    request and free its slot at the next step boundary (safe to call more than once or after finishing).
    """

    def __init__(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, abort_fn: Callable[[str, str], None]
    ):
        self.request = request
        self.request_id = request.request_id
        self._loop = loop
        self._queue: "asyncio.Queue[TokenEvent]" = asyncio.Queue()
        self._abort_fn = abort_fn
        self.finished = False

    # Engine thread side.
    @staticmethod
    def push_many(items: "List[Tuple[RequestHandle, TokenEvent]]") -> None:
        """Hand many events over with one wake-up per event loop (one per engine step, not one per token)."""
        by_loop: Dict[asyncio.AbstractEventLoop, list] = {}
        for h, ev in items:
            by_loop.setdefault(h._loop, []).append((h._queue, ev))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # loop closed: nobody is listening any more
                pass

    # Event loop side.
    def abort(self, reason: str = FINISH_ABORT) -> None:
        """End the request early; `reason` ("abort", or "stop" for a stop string) is what its stats record."""
        if not self.finished:
            self._abort_fn(self.request_id, reason)

    def ready_events(self) -> List[TokenEvent]:
        """Events already delivered and not yet consumed (lets the edge coalesce a backlog into one chunk)."""
        out: List[TokenEvent] = []
        while not self.finished and not self._queue.empty():
            ev = self._queue.get_nowait()
            out.append(ev)
            if ev.finish_reason is not None:
                self.finished = True
        return out

    def __aiter__(self) -> "RequestHandle":
        return self

    async def __anext__(self) -> TokenEvent:
        if self.finished:
            raise StopAsyncIteration
        ev = await self._queue.get()
        if ev.finish_reason is not None:
            self.finished = True
        return ev


def _deliver(batch) -> None:
    for q, ev in batch:
        q.put_nowait(ev)


_seq_counter = itertools.count()


class SequenceState:
    """Engine-private state of one request (mutated only on the engine thread)."""

    __slots__ = (
        "request",
        "handle",
        "order",
        "slot",
        "num_prefilled",
        "output_ids",
        "submit_time",
        "admit_time",
        "first_token_time",
        "last_token_time",
        "itl",
        "deadline",
        "generator",
        "finished",
        "cached_tokens",
        "group",
        "leader",
        "copied_tokens",
        "shared_cached_tokens",
    )

    def __init__(self, request: GenerationRequest, handle: Any, timeout_s: float):
        self.request = request
        self.handle = handle
        self.order = next(_seq_counter)  # FIFO tiebreak
        self.slot: Optional[int] = None
        self.num_prefilled = 0  # prompt tokens already in the KV cache
        self.output_ids: List[int] = []
        self.submit_time = time.perf_counter()
        self.admit_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.itl: List[float] = []
        self.deadline = self.submit_time + timeout_s
        self.generator: Any = None
        self.finished = False
        self.cached_tokens: Optional[int] = None  # prompt tokens reused at admission (None: no lookup made)
        # n > 1 groups (Engine.submit_group): the members, in order, shared by all of them (None: alone)
        self.group: Optional[List["SequenceState"]] = None
        # a follower waiting for the KV of its leader's prompt; None once served (or for leaders / lone requests)
        self.leader: Optional["SequenceState"] = None
        self.copied_tokens = 0  # prompt tokens whose KV was copied from the leader's slot instead of prefilled
        self.shared_cached_tokens: Optional[int] = None  # the leader's cached_tokens, reported by a follower

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled >= self.prompt_len

    @property
    def seq_len(self) -> int:
        """Tokens whose KV is (or after this step will be) resident."""
        return self.num_prefilled + max(0, len(self.output_ids) - 1)

    @property
    def reported_cached_tokens(self) -> Optional[int]:
        """`TokenEvent.cached_tokens` of the first token: a follower served by a KV copy reports its leader's."""
        return self.shared_cached_tokens if self.copied_tokens else self.cached_tokens
