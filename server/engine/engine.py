"""The engine: one dedicated thread per model that owns the runner and runs the step loop.

The event loop only calls `submit()` / `abort()` (cheap, thread-safe) and consumes `RequestHandle`s; all
tensor work happens on the engine thread. Tokens go back through `loop.call_soon_threadsafe`.

Step loop: take new requests and aborts -> expire timeouts -> `Scheduler.plan` -> prefill chunks (one
`runner.prefill` per chunk) -> one batched `runner.decode` -> one batched `sample` (rows with a
structured-output `TokenConstraint` get its allowed-token mask; a request whose grammar is complete finishes
with "stop") -> hand tokens to the requests -> `StepStats`. A failure inside one request's prefill finishes
only that request with an error; a failing batched decode or sample finishes the sequences of that batch with
an error and the engine keeps serving.

Prefix caching (`settings.prefix_caching`, as llama.cpp's server with cache_prompt): the engine remembers, per
KV slot, the token ids whose KV is valid there (the last occupant's prompt and generated tokens that were
written). A new request takes the free slot sharing the longest prefix with its prompt and prefills from there
(always at least its last prompt token, so the first token is sampled from fresh logits). The remembered tokens
are cut to the reused prefix at admission, extended only after a runner call succeeded, and forgotten when a
runner call on that slot fails, so stale KV is never reused. Off for runners with `fallback = True`.

n > 1 with one shared prefill (`submit_group`): the n requests (same prompt, each with its own params, seed,
generator, handle and stats) are queued as one group, admitted together and only when n slots are free (FIFO:
a waiting group blocks the queue behind it). The leader (first request) is prefilled as any request (with prefix
reuse). Each follower takes a slot without a prefix lookup, waits until the leader's prompt is fully prefilled,
then gets the leader's KV of the first prompt_len - 1 positions copied into its slot (`runner.copy_kv`, in place,
run before the step's prefills) and prefills only its last prompt token, so it samples its first token from fresh
logits with its own generator: with the same params and seed a member's tokens equal those of a lone request.
Copying only from a slot whose remembered tokens still hold that prompt prefix keeps stale KV out; the follower's
remembered tokens become the copied prefix and grow as any slot's. If the leader finishes (abort, timeout,
error) before its prompt is fully prefilled, the first follower still waiting becomes the leader (prefilling the
whole prompt itself) and the others wait for it; a failed copy makes that follower prefill its whole prompt.
A follower served by a copy reports its leader's `cached_tokens` on its first `TokenEvent` (what the client sees
as cached prompt tokens) but records `cached_tokens=None` (no lookup made) and `kv_copied_tokens` in its
`RequestStats`, so the prefix-cache counters count the group's prompt once. Runners with `fallback = True` or
without `copy_kv` share nothing: each member is prefilled like a lone request (still admitted as a group).

Occupancy (running, waiting, KV use) is reported through `on_step` after every step and after every loop
turn whose finishes (abort, stop, timeout, engine stop or crash) changed it without a step following, so the
gauges fed from it follow state: they read 0 as soon as the last request is gone, with no further traffic.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch

from models.sampling import TokenCountsBuffer, has_penalty, make_generator, sample
from server.engine.request import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_TIMEOUT,
    EngineStoppedError,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    SequenceState,
    TokenEvent,
)
from server.engine.scheduler import Scheduler
from server.engine.stats import RequestStats, StepStats

logger = logging.getLogger(__name__)


class Engine:
    """Continuous-batching engine over a `models.runner.Runner`.

    `settings` supplies max_queue, prefill_chunk, request_timeout_s and prefix_caching (default on). Batch size
    is the runner's `max_batch_size`; context is the runner's `max_seq`. `on_step(StepStats)` /
    `on_request(RequestStats)` run on the engine thread; `on_step` also gets a `batch_size == 0` record when
    finishes alone changed occupancy.
    """

    def __init__(
        self,
        runner: Any,
        settings: Any,
        *,
        name: str = "",
        on_step: Optional[Callable[[StepStats], None]] = None,
        on_request: Optional[Callable[[RequestStats], None]] = None,
    ):
        self.runner = runner
        self.name = name
        self.max_batch_size = int(runner.max_batch_size)
        self.max_seq = int(runner.max_seq)
        self.max_queue = int(settings.max_queue)
        self.request_timeout_s = float(settings.request_timeout_s)
        self.stream_interval_s = float(settings.stream_interval_ms) / 1000.0
        self._last_sent: Dict[Any, float] = {}  # handle -> when its events last went out (stream_interval_s > 0)
        self.scheduler = Scheduler(int(settings.prefill_chunk))
        self.eos_ids = frozenset(int(t) for t in getattr(runner, "eos_token_ids", ()) or ())
        self.device = getattr(runner, "device", torch.device("cpu"))
        self.on_step = on_step
        self.on_request = on_request
        self.prefix_caching = bool(getattr(settings, "prefix_caching", True))
        if self.prefix_caching and getattr(runner, "fallback", False):
            logger.info("engine %s: prefix caching is off (the transformers fallback runner cannot reuse KV)", name)
            self.prefix_caching = False
        # n > 1 groups copy the leader's prompt KV into the followers' slots (module docstring)
        self.shared_prefill = not getattr(runner, "fallback", False) and callable(getattr(runner, "copy_kv", None))
        self._logged_unshared = False

        self._cv = threading.Condition()
        self._inbox: Deque[SequenceState] = deque()
        self._aborts: Dict[str, str] = {}  # request_id -> finish reason to record (abort or stop)
        self._num_active = 0  # submitted and not yet finished (guarded by _cv)
        self._accepting = True
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

        # Engine-thread state.
        # handle -> its events not yet handed over (in order); flushed at the end of each loop turn
        self._outbox: Dict[Any, List[TokenEvent]] = {}
        self._running: List[SequenceState] = []
        self._waiting: Deque[SequenceState] = deque()
        self._slot_tokens: List[List[int]] = [[] for _ in range(self.max_batch_size)]  # valid KV per slot
        # penalty statistics per slot, kept across steps (`_penalty_counts`); allocated on first use
        self._pen_buf: Optional[TokenCountsBuffer] = None
        self._pen_rows: Dict[int, Tuple[int, int]] = {}  # slot -> (seq.order, generated ids counted)

        # Counters readable from any thread (plain ints; torn reads are harmless).
        self.steps = 0
        self.max_batch_seen = 0
        self.tokens_generated = 0
        self.recent_batch_sizes: Deque[int] = deque(maxlen=4096)
        self.last_running = 0
        self.last_waiting = 0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"jetserve-engine-{self.name or 'model'}", daemon=True
            )
            self._thread.start()
        return self

    def stop_accepting(self) -> None:
        """New submits raise `EngineStoppedError`; in-flight requests continue."""
        with self._cv:
            self._accepting = False

    def stop(self, timeout: Optional[float] = 10.0) -> None:
        """Abort everything still in flight and join the thread."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine thread %s did not stop within %.1fs", self.name, timeout or 0.0)

    close = stop  # ModelManager disposes engines with close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_active(self) -> int:
        return self._num_active

    # ----------------------------------------------------------------- event-loop side
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; call from a running event loop. Raises QueueFullError / EngineStoppedError / ValueError."""
        return self.submit_group([request])[0]

    def submit_group(self, requests: Sequence[GenerationRequest]) -> List[RequestHandle]:
        """Queue n requests with identical prompt_ids as one group; call from a running event loop.

        Returns one `RequestHandle` per request, in order; each request keeps its own params (the caller sets
        distinct seeds, e.g. seed + i), generator, stream, abort and `RequestStats`. The prompt is prefilled once
        (by the first request, the leader) and its KV copied to the others (module docstring). Raises:
        ValueError when the group is empty or larger than `max_batch_size`, the prompts differ, request ids
        repeat, or a request fails `submit`'s checks (empty prompt, prompt not shorter than the context,
        max_tokens < 1); EngineStoppedError when not accepting; QueueFullError when the whole group does not fit
        in max_batch_size + max_queue (nothing is queued then). A group of one is exactly `submit`.
        """
        reqs = list(requests)
        if not 1 <= len(reqs) <= self.max_batch_size:
            raise ValueError(f"a group holds 1 to {self.max_batch_size} requests (the batch size), got {len(reqs)}")
        prompt = list(reqs[0].prompt_ids)
        if any(list(r.prompt_ids) != prompt for r in reqs[1:]):
            raise ValueError("all requests of a group must have identical prompt_ids")
        if len({r.request_id for r in reqs}) != len(reqs):
            raise ValueError("the requests of a group must have distinct request ids")
        for r in reqs:
            self._check(r)
        loop = asyncio.get_running_loop()
        seqs = []
        for r in reqs:
            timeout = r.timeout_s if r.timeout_s is not None else self.request_timeout_s
            seq = SequenceState(r, RequestHandle(r, loop, self.abort), timeout)
            seq.generator = make_generator(r.params.seed, self.device)
            seqs.append(seq)
        if len(seqs) > 1:
            for seq in seqs:
                seq.group = seqs
            if self.shared_prefill and len(prompt) > 1:  # a 1-token prompt has no KV to share
                for seq in seqs[1:]:
                    seq.leader = seqs[0]
            elif not self._logged_unshared:
                self._logged_unshared = True
                logger.info("engine %s: n > 1 groups prefill every member (the runner cannot copy KV)", self.name)
        n = len(seqs)
        with self._cv:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down or the model is unloading")
            if self._num_active + n > self.max_batch_size + self.max_queue:
                raise QueueFullError(
                    f"server is at capacity: {self.max_batch_size} running and {self.max_queue} waiting requests"
                    + (f" (a group of {n} needs {n} places)" if n > 1 else ""),
                    retry_after_s=1.0,
                )
            self._num_active += n
            self._inbox.extend(seqs)
            self._cv.notify()
        return [seq.handle for seq in seqs]

    def _check(self, request: GenerationRequest) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        if n >= self.max_seq:
            raise ValueError(f"prompt has {n} tokens; the context holds {self.max_seq} (prompt + at least 1 generated)")
        if request.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")

    def abort(self, request_id: str, reason: str = FINISH_ABORT) -> None:
        """Stop a request; its slot is freed at the next step boundary. Unknown or finished ids are ignored.

        `reason` is the finish reason its `RequestStats` records: "abort" (client gone), or "stop" when the
        edge ended it on a stop string. The first call for an id wins.
        """
        if reason not in (FINISH_ABORT, FINISH_STOP):
            raise ValueError(f"abort reason must be {FINISH_ABORT!r} or {FINISH_STOP!r}, got {reason!r}")
        with self._cv:
            self._aborts.setdefault(request_id, reason)
            self._cv.notify()

    def stats(self) -> Dict[str, Any]:
        return {
            "model": self.name,
            "steps": self.steps,
            "running": self.last_running,
            "waiting": self.last_waiting,
            "active": self._num_active,
            "max_batch_size": self.max_batch_size,
            "max_batch_seen": self.max_batch_seen,
            "tokens_generated": self.tokens_generated,
        }

    def reset_stats(self) -> None:
        self.max_batch_seen = 0
        self.recent_batch_sizes.clear()

    # ----------------------------------------------------------------- engine thread
    def _run(self) -> None:
        logger.info(
            "engine %s started (slots=%d, max_seq=%d, prefill_chunk=%d, max_queue=%d, prefix_caching=%s)",
            self.name,
            self.max_batch_size,
            self.max_seq,
            self.scheduler.prefill_chunk,
            self.max_queue,
            self.prefix_caching,
        )
        try:
            while True:
                with self._cv:
                    while not (self._inbox or self._aborts or self._running or self._waiting or self._stopping):
                        self._cv.wait()
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                    aborts, self._aborts = self._aborts, {}
                    stopping = self._stopping
                if aborts:  # before a stop, so a stop string that raced the shutdown is still recorded as "stop"
                    for seq in [s for s in list(self._running) + list(self._waiting) if s.request.request_id in aborts]:
                        self._finish(seq, aborts[seq.request.request_id])
                if stopping:
                    for seq in list(self._running) + list(self._waiting):
                        self._finish(seq, FINISH_ABORT, error="engine stopped", error_code="engine_stopped")
                    self._report_if_changed()
                    self._flush()
                    return
                now = time.perf_counter()
                for seq in [s for s in list(self._running) + list(self._waiting) if now > s.deadline]:
                    self._finish(seq, FINISH_TIMEOUT, error="request timed out", error_code="request_timeout")
                if self._running or self._waiting:
                    self._step()
                else:
                    self._report_if_changed()  # finishes emptied the engine: no step follows to report it
                self._flush()
        except Exception:  # a bug in the loop itself: fail everything loudly rather than hang clients
            logger.exception("engine %s loop crashed", self.name)
            for seq in list(self._running) + list(self._waiting):
                self._finish(seq, FINISH_ERROR, error="engine failure", error_code="internal_error")
            self._report_if_changed()
            self._flush()
            with self._cv:
                self._accepting = False
            raise

    def _flush(self) -> None:
        """Hand the due events to the requests' event loops (one wake-up per loop). Without a stream interval
        every request's events are due; with one, a request's are due when they hold its first token or its
        finish, or its last hand-over is at least the interval old; the others wait in the outbox. Work is
        O(requests with events), however long events wait."""
        if not self._outbox:
            return
        iv = self.stream_interval_s
        now = time.perf_counter()
        last = self._last_sent
        items: List[Tuple[Any, TokenEvent]] = []
        for h in list(self._outbox):
            evs = self._outbox[h]
            finished = evs[-1].finish_reason is not None  # a finish is a request's last event
            if iv > 0 and not finished and h in last and now - last[h] < iv:
                continue
            del self._outbox[h]
            items.extend((h, ev) for ev in evs)
            if finished:
                last.pop(h, None)
            elif iv > 0:
                last[h] = now
        if items:
            RequestHandle.push_many(items)

    def _step(self) -> None:
        t0 = time.perf_counter()
        used = {s.slot for s in self._running}
        free = [i for i in range(self.max_batch_size) if i not in used]
        reusable = None
        if self.prefix_caching:
            free.sort(key=lambda i: len(self._slot_tokens[i]))  # ties go to the slot caching least
            reusable = self._reusable
        plan = self.scheduler.plan(self._running, list(self._waiting), free, reusable)
        # copies first: a finished leader's slot may be admitted to below, its KV is still intact until prefills
        copied_tokens = sum(self._copy(seq, src, dst, n) for seq, src, dst, n in plan.copy)
        for seq, slot in plan.admit:
            self._waiting.remove(seq)
            seq.slot = slot
            seq.admit_time = t0
            n = plan.cached.get(slot, 0)
            del self._slot_tokens[slot][n:]  # eviction: only the reused prefix stays valid
            seq.num_prefilled = n
            if seq.leader is None:  # a follower makes no lookup: its KV comes from the leader (cached_tokens None)
                seq.cached_tokens = n if self.prefix_caching else None
            self._running.append(seq)

        to_sample: List[SequenceState] = []
        logits_parts: List[torch.Tensor] = []
        prefill_tokens = 0
        prefill_seqs = 0
        for seq, start, n in plan.prefill:
            if seq.finished or start != seq.num_prefilled:  # a follower whose copy was refused: next step, from 0
                continue
            try:
                chunk = seq.request.prompt_ids[start : start + n]
                logits = self.runner.prefill(torch.tensor(chunk, dtype=torch.long), seq.slot, start)
            except Exception as e:
                logger.warning("request %s failed in prefill: %s", seq.request.request_id, e, exc_info=True)
                self._slot_tokens[seq.slot].clear()  # unknown what was written
                self._finish(seq, FINISH_ERROR, error=f"prefill failed: {e}", error_code="internal_error")
                continue
            self._slot_tokens[seq.slot].extend(chunk)
            seq.num_prefilled += n
            prefill_tokens += n
            prefill_seqs += 1
            if seq.prefill_done:
                to_sample.append(seq)
                logits_parts.append(logits.reshape(1, -1))  # (1, vocab)

        decode = [seq for seq in plan.decode if not seq.finished]
        if decode:
            # host tensors: the runner copies them (non-blocking) and sizes attention from host positions
            tokens = torch.tensor([s.output_ids[-1] for s in decode], dtype=torch.long)
            positions = torch.tensor([s.prompt_len + len(s.output_ids) - 1 for s in decode], dtype=torch.long)
            slots = torch.tensor([s.slot for s in decode], dtype=torch.long)
            try:
                logits_parts.append(self.runner.decode(tokens, positions, slots))  # (B, vocab)
                to_sample.extend(decode)
                for seq in decode:
                    self._slot_tokens[seq.slot].append(seq.output_ids[-1])
            except Exception as e:
                logger.exception("batched decode failed for %d sequences", len(decode))
                for seq in decode:
                    self._slot_tokens[seq.slot].clear()  # unknown what was written
                    self._finish(seq, FINISH_ERROR, error=f"decode failed: {e}", error_code="internal_error")

        if to_sample:
            try:
                logits = logits_parts[0] if len(logits_parts) == 1 else torch.cat(logits_parts, dim=0)
                self._sample_and_emit(to_sample, logits)
            except Exception as e:
                logger.exception("sampling failed for %d sequences", len(to_sample))
                for seq in to_sample:
                    if not seq.finished:
                        self._finish(seq, FINISH_ERROR, error=f"sampling failed: {e}", error_code="internal_error")

        batch = prefill_seqs + len(decode)
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, batch)
        self.recent_batch_sizes.append(batch)
        self._report(batch, prefill_tokens, len(decode), time.perf_counter() - t0, copied_tokens)

    def _copy(self, seq: SequenceState, src: int, dst: int, n: int) -> int:
        """Serve follower `seq` the leader's prompt KV [0, n) from slot `src`; tokens copied (0: it will prefill
        its whole prompt itself instead)."""
        leader, prompt = seq.leader, seq.request.prompt_ids
        if self._slot_tokens[src][:n] != list(prompt[:n]):  # the leader's KV is gone: never copy stale KV
            logger.warning("request %s: the leader's KV is no longer resident; prefilling", seq.request.request_id)
            self._detach(seq)
            return 0
        try:
            self.runner.copy_kv(src, dst, n)
        except Exception as e:
            logger.warning("request %s: KV copy failed (%s); prefilling", seq.request.request_id, e, exc_info=True)
            self._slot_tokens[dst].clear()  # unknown what was written
            self._detach(seq)
            return 0
        self._slot_tokens[dst][:] = prompt[:n]
        seq.num_prefilled = seq.copied_tokens = n
        seq.shared_cached_tokens = leader.cached_tokens if leader is not None else None
        seq.leader = None
        return n

    def _detach(self, seq: SequenceState) -> None:
        """A follower holding a slot stops waiting for a leader and prefills its whole prompt from position 0."""
        seq.leader = None
        seq.cached_tokens = 0 if self.prefix_caching else None

    def _reusable(self, seq: SequenceState, slot: int) -> int:
        """Prompt tokens of `seq` whose KV is valid in `slot`: the common prefix, at most prompt_len - 1."""
        cached, prompt = self._slot_tokens[slot], seq.request.prompt_ids
        limit = min(len(cached), len(prompt) - 1)
        n = 0
        while n < limit and cached[n] == prompt[n]:
            n += 1
        return n

    def _report(
        self, batch: int, prefill_tokens: int, decode_tokens: int, duration_s: float, copied_tokens: int = 0
    ) -> None:
        """Record the occupancy now (`last_running` / `last_waiting`) and hand a `StepStats` to `on_step`."""
        self.last_running = len(self._running)
        self.last_waiting = len(self._waiting)
        if self.on_step is not None:
            kv_tokens = sum(s.seq_len for s in self._running)
            self._safe_callback(
                self.on_step,
                StepStats(
                    model=self.name,
                    batch_size=batch,
                    num_prefill_tokens=prefill_tokens,
                    num_decode_tokens=decode_tokens,
                    step_duration_s=duration_s,
                    running=len(self._running),
                    waiting=len(self._waiting),
                    slots_used=len(self._running),
                    max_batch_size=self.max_batch_size,
                    kv_tokens_used=kv_tokens,
                    kv_tokens_total=self.max_batch_size * self.max_seq,
                    num_copied_tokens=copied_tokens,
                ),
            )

    def _report_if_changed(self) -> None:
        """After a loop turn without a step: report if finishes changed the occupancy (batch_size 0)."""
        if (len(self._running), len(self._waiting)) != (self.last_running, self.last_waiting):
            self._report(0, 0, 0, 0.0)

    def _penalty_counts(self, seqs: List[SequenceState], penalised: List[bool], logits: torch.Tensor):
        """The batch's `TokenCounts`, from per-slot statistics kept across steps: a row is rebuilt from the
        prompt and generated ids only when its slot changed owner or missed a token (first sample, a failed
        step), so a decode step does no O(history) host work. Rows without penalties may hold stale statistics:
        their neutral penalties leave their logits unchanged whatever the statistics."""
        vocab = logits.shape[-1]
        buf = self._pen_buf
        if buf is None or buf.vocab != vocab or buf.device != logits.device:
            buf = self._pen_buf = TokenCountsBuffer(self.max_batch_size, vocab, logits.device)
            self._pen_rows.clear()
        for s, pen in zip(seqs, penalised):
            state = (s.order, len(s.output_ids))
            if pen and self._pen_rows.get(s.slot) != state:
                buf.reset(s.slot, s.request.prompt_ids, s.output_ids)
                self._pen_rows[s.slot] = state
        return buf.select([s.slot for s in seqs])

    def _sample_and_emit(self, seqs: List[SequenceState], logits: torch.Tensor) -> None:
        """Sample one token per sequence from `logits` (B, V), hand them out and finish the sequences that end.
        Per-step host work is O(batch), plus the mask of each structured-output row and a one-off rebuild of
        the penalty statistics of a sequence's first sample (`_penalty_counts`)."""
        params = [s.request.params for s in seqs]
        penalised = [has_penalty(p) for p in params]
        counts = self._penalty_counts(seqs, penalised, logits) if any(penalised) else None
        allowed = None
        if any(s.request.constraint is not None for s in seqs):  # structured output: unconstrained rows allow all
            allowed = torch.full((len(seqs), (logits.shape[-1] + 31) // 32), -1, dtype=torch.int32)
            for i, s in enumerate(seqs):
                if s.request.constraint is not None:
                    s.request.constraint.fill_mask(allowed[i])
        out = sample(logits, params, generators=[s.generator for s in seqs], allowed=allowed, counts=counts)
        tokens = out.tokens.tolist()  # the one host sync per step: tokens must reach the clients
        want_lp = any(p.logprobs is not None for p in params)
        if want_lp:
            lps = out.logprobs.tolist()
            top_ids = out.top_ids.tolist() if out.top_ids is not None else [[] for _ in seqs]
            top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else [[] for _ in seqs]
        now = time.perf_counter()
        counted: List[SequenceState] = []  # penalised rows whose statistics take this step's token
        for i, seq in enumerate(seqs):
            tok = int(tokens[i])
            constraint = seq.request.constraint
            if constraint is not None and not constraint.accept(tok):  # the mask allowed nothing: never emit it
                self._finish(
                    seq,
                    FINISH_ERROR,
                    error="structured output: no token satisfies the grammar",
                    error_code="internal_error",
                )
                continue
            seq.output_ids.append(tok)
            if penalised[i]:
                counted.append(seq)
            self.tokens_generated += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            else:
                seq.itl.append(now - seq.last_token_time)
            seq.last_token_time = now
            lp, top = None, ()
            if want_lp and seq.request.params.logprobs is not None:
                k = int(seq.request.params.logprobs)
                lp = float(lps[i])
                top = tuple((int(a), float(b)) for a, b in zip(top_ids[i][:k], top_lps[i][:k]))
            finish = None
            if not seq.request.ignore_eos and (tok in self.eos_ids or tok in seq.request.stop_token_ids):
                finish = FINISH_STOP
            elif constraint is not None and constraint.is_terminated():  # the document is complete
                finish = FINISH_STOP
            elif len(seq.output_ids) >= seq.request.max_tokens or seq.prompt_len + len(seq.output_ids) >= self.max_seq:
                finish = FINISH_LENGTH
            cached = seq.reported_cached_tokens if len(seq.output_ids) == 1 else None
            ev = TokenEvent(token_id=tok, logprob=lp, top=top, finish_reason=finish, cached_tokens=cached)
            if finish is None:
                self._outbox.setdefault(seq.handle, []).append(ev)
            else:
                self._finish(seq, finish, event=ev)
        if counted:  # after the buffer took the tokens: a row marked current is current
            self._pen_buf.add([s.slot for s in counted], [s.output_ids[-1] for s in counted])
            for s in counted:
                self._pen_rows[s.slot] = (s.order, len(s.output_ids))

    def _finish(
        self,
        seq: SequenceState,
        reason: str,
        *,
        event: Optional[TokenEvent] = None,
        error: Optional[str] = None,
        error_code: Optional[str] = None,
    ) -> None:
        """Release the slot, send the final event, emit RequestStats. Idempotent."""
        if seq.finished:
            return
        seq.finished = True
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        if seq.group is not None and not seq.prefill_done:
            self._promote(seq)
        if seq.slot is not None:
            try:
                self.runner.release(seq.slot)
            except Exception:
                logger.exception("runner.release(%d) failed", seq.slot)
        if event is None:
            event = TokenEvent(token_id=-1, finish_reason=reason, error=error, error_code=error_code)
        self._outbox.setdefault(seq.handle, []).append(event)
        with self._cv:
            self._num_active -= 1
        if self.on_request is not None:
            now = time.perf_counter()
            self._safe_callback(
                self.on_request,
                RequestStats(
                    model=self.name,
                    request_id=seq.request.request_id,
                    prompt_tokens=seq.prompt_len,
                    generation_tokens=len(seq.output_ids),
                    finish_reason=reason,
                    queue_time_s=(seq.admit_time - seq.submit_time) if seq.admit_time is not None else 0.0,
                    ttft_s=(seq.first_token_time - seq.submit_time) if seq.first_token_time is not None else None,
                    e2e_latency_s=now - seq.submit_time,
                    inter_token_latencies_s=tuple(seq.itl),
                    error_code=error_code,
                    cached_tokens=seq.cached_tokens,
                    kv_copied_tokens=seq.copied_tokens,
                ),
            )

    def _promote(self, leader: SequenceState) -> None:
        """`leader` finished before its prompt KV was complete: its first waiting follower becomes the leader."""
        pending = [f for f in leader.group or () if f.leader is leader and not f.finished]
        if not pending:
            return
        new = pending[0]
        if new.slot is not None:  # admitted: prefills its whole prompt in its own slot
            self._detach(new)
        else:  # still waiting: admitted as a leader, with a prefix lookup
            new.leader = None
        for f in pending[1:]:
            f.leader = new
        logger.debug("request %s leads its group instead of %s", new.request.request_id, leader.request.request_id)

    @staticmethod
    def _safe_callback(fn: Callable[[Any], None], arg: Any) -> None:
        try:
            fn(arg)
        except Exception:
            logger.exception("stats callback failed")


def make_engine(
    runner: Any,
    settings: Any,
    *,
    name: str = "",
    on_step: Optional[Callable[[StepStats], None]] = None,
    on_request: Optional[Callable[[RequestStats], None]] = None,
) -> Engine:
    """`ModelManager` engine_factory: build and start an engine for an already warmed-up runner."""
    return Engine(runner, settings, name=name, on_step=on_step, on_request=on_request).start()
