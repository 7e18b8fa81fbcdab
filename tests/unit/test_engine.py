"""Engine thread with a small deterministic fake runner: batching, chunked prefill, abort, queue, faults.

The fake runner's model is "next token = last token + 1 (mod vocab)", so greedy outputs are known exactly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import List

import pytest
import torch

from benchmarks.fault_runner import FaultyRunner, marker
from models.sampling import SamplingParams, apply_penalties
from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import EngineStoppedError, GenerationRequest, QueueFullError

VOCAB = 64
EOS = 63
GREEDY = SamplingParams(temperature=0.0)


class FakeRunner:
    def __init__(self, max_batch_size=4, max_seq=128, decode_delay=0.0, fail_decode_once=False, flat=False):
        self.flat = flat  # uniform logits (for sampling tests)
        self.max_batch_size, self.max_seq, self.vocab_size = max_batch_size, max_seq, VOCAB
        self.device = torch.device("cpu")
        self.eos_token_ids = (EOS,)
        self.decode_delay = decode_delay
        self.fail_decode_once = fail_decode_once
        self.prefills: List[tuple] = []
        self.decode_batches: List[int] = []
        self.released: List[int] = []
        self.lock = threading.Lock()

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        out = torch.full((last.numel(), VOCAB), -10.0)
        if self.flat:
            return out
        out[torch.arange(last.numel()), (last + 1) % VOCAB] = 10.0
        return out

    def prefill(self, tokens, slot, start_pos):
        assert 0 <= slot < self.max_batch_size and start_pos + tokens.numel() <= self.max_seq
        self.prefills.append((slot, start_pos, tokens.numel()))
        return self._logits(tokens[-1:])[0]

    def decode(self, tokens, positions, slots):
        if self.fail_decode_once:
            self.fail_decode_once = False
            raise RuntimeError("boom")
        if self.decode_delay:
            time.sleep(self.decode_delay)
        assert len(set(slots.tolist())) == slots.numel()
        self.decode_batches.append(tokens.numel())
        return self._logits(tokens)

    def release(self, slot):
        self.released.append(slot)


def settings(**kw):
    base = dict(max_queue=8, prefill_chunk=16, request_timeout_s=30.0)
    base.update(kw)
    return Settings(**base)


def make(runner=None, **kw):
    steps, reqs = [], []
    eng = Engine(runner or FakeRunner(), settings(**kw), name="fake", on_step=steps.append, on_request=reqs.append)
    return eng.start(), steps, reqs


async def collect(handle):
    return [ev async for ev in handle]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_greedy_tokens_length_and_stats():
    eng, steps, reqs = make()

    async def go():
        h = eng.submit(GenerationRequest([1, 2, 3], GREEDY, max_tokens=5))
        return await collect(h)

    evs = run(go())
    eng.stop()
    assert [e.token_id for e in evs] == [4, 5, 6, 7, 8]
    assert [e.finish_reason for e in evs] == [None] * 4 + ["length"]
    assert eng.runner.released == [0]
    (rs,) = reqs
    assert (rs.prompt_tokens, rs.generation_tokens, rs.finish_reason) == (3, 5, "length")
    assert rs.ttft_s is not None and len(rs.inter_token_latencies_s) == 4
    assert steps[0].num_prefill_tokens == 3 and steps[-1].num_decode_tokens == 1
    assert eng.num_active == 0


def test_eos_finishes_with_stop_and_counts_eos():
    eng, _, reqs = make()
    evs = run(collect_submit(eng, [EOS - 3], 50))
    eng.stop()
    assert [e.token_id for e in evs] == [EOS - 2, EOS - 1, EOS]
    assert evs[-1].finish_reason == "stop" and reqs[0].generation_tokens == 3


def test_context_limit_finishes_with_length():
    eng, _, _ = make(FakeRunner(max_seq=20))
    evs = run(collect_submit(eng, list(range(15)), 100))
    eng.stop()
    assert len(evs) == 5 and evs[-1].finish_reason == "length"


async def collect_submit(eng, prompt, max_tokens, **kw):
    return await collect(eng.submit(GenerationRequest(prompt, GREEDY, max_tokens=max_tokens, **kw)))


def test_chunked_prefill_and_decoders_not_stalled():
    runner = FakeRunner(decode_delay=0.002)
    eng, steps, _ = make(runner, prefill_chunk=16)

    async def go():
        short = eng.submit(GenerationRequest([1], GREEDY, max_tokens=30))
        first = await short.__anext__()  # the short one is decoding before the long one arrives
        long = eng.submit(GenerationRequest([5] * 50, GREEDY, max_tokens=2))
        rest = await asyncio.gather(collect(short), collect(long))
        return first, rest

    first, (short_evs, long_evs) = run(go())
    eng.stop()
    long_chunks = [(st, n) for slot, st, n in runner.prefills if n > 1]
    assert long_chunks == [(0, 16), (16, 16), (32, 16), (48, 2)]
    # every step that prefilled a chunk of the long prompt also decoded the short stream
    chunk_steps = [s for s in steps if s.num_prefill_tokens >= 2]
    assert len(chunk_steps) == 4 and all(s.num_decode_tokens == 1 for s in chunk_steps)
    assert all(s.num_prefill_tokens <= 16 for s in steps)
    assert [e.token_id for e in long_evs] == [6, 7]
    assert 1 + len(short_evs) == 30


def test_concurrent_requests_are_batched():
    runner = FakeRunner(decode_delay=0.002)
    eng, steps, _ = make(runner)

    async def go():
        hs = [eng.submit(GenerationRequest([i + 1], GREEDY, max_tokens=10)) for i in range(4)]
        return await asyncio.gather(*(collect(h) for h in hs))

    outs = run(go())
    eng.stop()
    for i, evs in enumerate(outs):
        assert [e.token_id for e in evs] == [i + 2 + k for k in range(10)]
    assert max(runner.decode_batches) == 4 and eng.max_batch_seen == 4
    assert max(s.batch_size for s in steps) == 4


def test_queue_full_raises_and_fifo():
    runner = FakeRunner(max_batch_size=1, decode_delay=0.005)
    eng, _, _ = make(runner, max_queue=1)

    async def go():
        a = eng.submit(GenerationRequest([1], GREEDY, max_tokens=20))
        b = eng.submit(GenerationRequest([10], GREEDY, max_tokens=2))
        with pytest.raises(QueueFullError):
            eng.submit(GenerationRequest([20], GREEDY, max_tokens=2))
        ra, rb = await asyncio.gather(collect(a), collect(b))
        # capacity is back once both finished
        rc = await collect_submit(eng, [30], 1)
        return ra, rb, rc

    ra, rb, rc = run(go())
    eng.stop()
    assert len(ra) == 20 and [e.token_id for e in rb] == [11, 12] and rc[0].token_id == 31
    assert runner.released == [0, 0, 0]


def test_abort_frees_slot_within_a_step():
    runner = FakeRunner(max_batch_size=1, decode_delay=0.005)
    eng, _, reqs = make(runner, stream_interval_ms=0.0)  # every step handed over: the abort shows within a step

    async def go():
        h = eng.submit(GenerationRequest([1], GREEDY, max_tokens=10_000 // 100))
        await h.__anext__()
        await h.__anext__()
        h.abort()
        evs = await collect(h)
        return evs

    evs = run(go())
    time.sleep(0.05)
    eng.stop()
    assert evs[-1].finish_reason == "abort" and evs[-1].token_id == -1
    assert len(evs) < 10
    assert runner.released == [0] and eng.num_active == 0
    assert reqs[0].finish_reason == "abort"


def test_aborts_that_empty_the_engine_are_reported():
    """No step follows the last abort, yet on_step gets the new occupancy (running = waiting = KV = 0, batch 0),
    so the gauges fed from it follow state instead of the last step."""
    runner = FakeRunner(max_batch_size=1, decode_delay=0.005)
    eng, steps, reqs = make(runner)

    async def go():
        a = eng.submit(GenerationRequest([1], GREEDY, max_tokens=100))
        b = eng.submit(GenerationRequest([2], GREEDY, max_tokens=100))  # waits for the only slot
        await a.__anext__()
        a.abort()
        b.abort()
        return await collect(a), await collect(b)

    evs_a, evs_b = run(go())  # the report precedes the final events, so no wait is needed
    assert evs_a[-1].finish_reason == evs_b[-1].finish_reason == "abort"
    assert any(s.running > 0 for s in steps)
    last = steps[-1]
    assert (last.running, last.waiting, last.slots_used, last.kv_tokens_used) == (0, 0, 0, 0)
    assert (last.batch_size, last.num_prefill_tokens, last.num_decode_tokens) == (0, 0, 0)
    assert (eng.stats()["running"], eng.stats()["waiting"]) == (0, 0)
    assert eng.steps == sum(1 for s in steps if s.batch_size > 0)  # the report is not counted as a step
    n = len(steps)
    eng.stop()
    assert len(steps) == n  # stopping an idle engine changes nothing, so it reports nothing
    assert sorted(r.finish_reason for r in reqs) == ["abort", "abort"]


def test_abort_with_stop_reason_is_recorded_as_stop():
    """The edge ends a request on a stop string with abort("stop"): its stats say "stop", as the client saw."""
    eng, _, reqs = make(FakeRunner(decode_delay=0.005))

    async def go():
        h = eng.submit(GenerationRequest([1], GREEDY, max_tokens=100))
        await h.__anext__()
        h.abort("stop")
        h.abort()  # the route's cleanup may abort again: the first reason wins
        return await collect(h)

    evs = run(go())
    with pytest.raises(ValueError, match="abort reason"):
        eng.abort("cmpl-x", "length")
    eng.stop()
    assert evs[-1].finish_reason == "stop" and evs[-1].token_id == -1 and evs[-1].error is None
    assert len(evs) < 100
    assert [r.finish_reason for r in reqs] == ["stop"] and eng.num_active == 0


def _chars(text):
    """Prompt ids for `FaultyRunner` with the detokenizer `_text` (one id per character)."""
    return [ord(c) for c in text]


def _text(ids):
    return "".join(chr(i) for i in ids)


def test_prefill_fault_fails_one_request_only():
    eng, _, reqs = make(FaultyRunner(FakeRunner(), _text))

    async def go():
        bad = eng.submit(GenerationRequest(_chars("a " + marker("prefill")), GREEDY, max_tokens=3))
        good = eng.submit(GenerationRequest([1, 2], GREEDY, max_tokens=3))
        return await asyncio.gather(collect(bad), collect(good))

    bad, good = run(go())
    eng.stop()
    assert len(bad) == 1 and bad[0].finish_reason == "error" and "injected prefill fault" in bad[0].error
    assert [e.token_id for e in good] == [3, 4, 5]
    assert sorted(r.finish_reason for r in reqs) == ["error", "length"]


def test_decode_fault_errors_after_first_token_and_slot_is_reusable():
    eng, _, _ = make(FaultyRunner(FakeRunner(max_batch_size=1), _text))
    bad = run(collect_submit(eng, _chars(marker("decode") + "a"), 5))  # "a": first token is not EOS
    after = run(collect_submit(eng, [1], 3))  # same slot, new prompt: no fault
    eng.stop()
    assert bad[0].token_id >= 0 and bad[0].finish_reason is None
    assert bad[-1].finish_reason == "error" and "injected decode fault" in bad[-1].error and len(bad) == 2
    assert [e.token_id for e in after] == [2, 3, 4]


def test_runner_decode_failure_errors_batch_and_engine_survives():
    eng, _, _ = make(FakeRunner(fail_decode_once=True))
    first = run(collect_submit(eng, [1], 5))
    second = run(collect_submit(eng, [1], 3))
    eng.stop()
    assert first[0].token_id == 2 and first[-1].finish_reason == "error" and first[-1].error_code == "internal_error"
    assert [e.token_id for e in second] == [2, 3, 4]


def test_timeout():
    eng, _, reqs = make(FakeRunner(decode_delay=0.01))
    evs = run(collect_submit(eng, [1], 10_000 // 100, timeout_s=0.1))
    eng.stop()
    assert evs[-1].finish_reason == "timeout" and evs[-1].error_code == "request_timeout"
    assert reqs[0].finish_reason == "timeout"


def test_validation_and_stop():
    eng, _, _ = make(FakeRunner(max_seq=32))

    async def go():
        with pytest.raises(ValueError, match="32"):
            eng.submit(GenerationRequest(list(range(32)), GREEDY, max_tokens=1))
        with pytest.raises(ValueError):
            eng.submit(GenerationRequest([], GREEDY, max_tokens=1))
        eng.stop_accepting()
        with pytest.raises(EngineStoppedError):
            eng.submit(GenerationRequest([1], GREEDY, max_tokens=1))

    run(go())
    eng.stop()
    assert not eng.alive


def test_stop_aborts_in_flight():
    eng, _, _ = make(FakeRunner(decode_delay=0.01))

    async def go():
        h = eng.submit(GenerationRequest([1], GREEDY, max_tokens=100))
        await h.__anext__()
        await asyncio.to_thread(eng.stop)
        return await collect(h)

    evs = run(go())
    assert evs[-1].finish_reason == "abort" and evs[-1].error_code == "engine_stopped"


def test_seeded_sampling_is_reproducible_across_batches():
    eng, _, _ = make(FakeRunner(flat=True))
    p = SamplingParams(temperature=1.0, seed=1234)

    async def go():
        solo = await collect(eng.submit(GenerationRequest([1], p, max_tokens=8)))
        hs = [
            eng.submit(GenerationRequest([1], p if i == 0 else SamplingParams(temperature=1.0), max_tokens=8))
            for i in range(3)
        ]
        batched = await asyncio.gather(*(collect(h) for h in hs))
        return solo, batched[0]

    solo, batched = run(go())
    eng.stop()
    assert [e.token_id for e in solo] == [e.token_id for e in batched]
    assert len({e.token_id for e in solo}) > 2  # really random: uniform over 64 ids


class ScriptConstraint:
    """A TokenConstraint that allows exactly `script[i]` as the i-th token; terminated after the last one.
    `allow_nothing`: the mask allows no token (and every token is rejected)."""

    def __init__(self, script, allow_nothing=False):
        self.script, self.i, self.allow_nothing = list(script), 0, allow_nothing

    def fill_mask(self, row):
        row.zero_()
        if not self.allow_nothing:
            t = self.script[self.i]
            row[t // 32] = (1 << (t % 32)) - (1 << 32 if t % 32 == 31 else 0)  # int32 two's complement

    def accept(self, token_id):
        ok = not self.allow_nothing and token_id == self.script[self.i]
        self.i += 1
        return ok

    def is_terminated(self):
        return self.i >= len(self.script)


def test_constraint_masks_its_row_only_and_stops_when_terminated():
    eng, _, reqs = make()
    script = [10, 31, 40, 63 - 1]

    async def go():
        c = eng.submit(GenerationRequest([1, 2], GREEDY, max_tokens=50, constraint=ScriptConstraint(script)))
        free = eng.submit(GenerationRequest([1, 2], GREEDY, max_tokens=6))
        return await asyncio.gather(collect(c), collect(free))

    constrained, free = run(go())
    eng.stop()
    assert [e.token_id for e in constrained] == script and constrained[-1].finish_reason == "stop"
    assert [e.token_id for e in free] == [3, 4, 5, 6, 7, 8]  # the neighbour's row is unmasked
    assert sorted(r.finish_reason for r in reqs) == ["length", "stop"]


def test_constraint_cut_by_max_tokens_is_length():
    eng, _, _ = make()
    evs = run(collect_submit(eng, [1], 2, constraint=ScriptConstraint([5, 6, 7, 8])))
    eng.stop()
    assert [e.token_id for e in evs] == [5, 6] and evs[-1].finish_reason == "length"


def test_constraint_that_allows_nothing_errors_that_request_only():
    eng, _, _ = make()

    async def go():
        bad = eng.submit(GenerationRequest([1], GREEDY, max_tokens=5, constraint=ScriptConstraint([3], True)))
        ok = eng.submit(GenerationRequest([1], GREEDY, max_tokens=3))
        return await asyncio.gather(collect(bad), collect(ok))

    bad, ok = run(go())
    eng.stop()
    assert [(e.token_id, e.finish_reason, e.error_code) for e in bad] == [(-1, "error", "internal_error")]
    assert "grammar" in bad[0].error
    assert [e.token_id for e in ok] == [2, 3, 4]


class KVRunner(FakeRunner):
    """A fake runner whose output depends on the KV it holds: next token = sum of the slot's cached tokens at
    positions [0, pos] (mod EOS), so reusing stale KV changes the output. Nothing is cleared on release."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.kv = [[-1] * self.max_seq for _ in range(self.max_batch_size)]

    def _next(self, slot, pos):
        assert all(t >= 0 for t in self.kv[slot][: pos + 1]), "attended to a position never written"
        return sum(self.kv[slot][: pos + 1]) % EOS

    def prefill(self, tokens, slot, start_pos):
        super().prefill(tokens, slot, start_pos)
        self.kv[slot][start_pos : start_pos + tokens.numel()] = tokens.tolist()
        return self._logits(torch.tensor([self._next(slot, start_pos + tokens.numel() - 1) - 1]))[0]

    def decode(self, tokens, positions, slots):
        super().decode(tokens, positions, slots)
        nxt = []
        for t, p, s in zip(tokens.tolist(), positions.tolist(), slots.tolist()):
            self.kv[s][p] = t
            nxt.append(self._next(s, p) - 1)
        return self._logits(torch.tensor(nxt))


def _serial(eng, prompts, max_tokens=4):
    """Run prompts one after another; return each one's events."""

    async def go():
        return [
            await collect(eng.submit(GenerationRequest(p, GREEDY, max_tokens=max_tokens, ignore_eos=True)))
            for p in prompts
        ]

    return run(go())


def test_prefix_cache_takes_the_slot_with_the_longest_prefix_and_starts_after_it():
    runner = FakeRunner(max_batch_size=3)
    eng, _, reqs = make(runner, prefill_chunk=16)
    a, b, c = [1] * 40, [2] * 40, [3] * 5
    outs = _serial(eng, [a, b, c, b[:30] + [9] * 10, [3] * 5])
    eng.stop()
    # distinct prompts spread over the empty slots; the 4th shares 30 tokens with b (slot 1) and starts there
    assert [p for p in runner.prefills if p[1] == 0] == [(0, 0, 16), (1, 0, 16), (2, 0, 5)]
    assert runner.prefills[-2] == (1, 30, 10)
    # an identical prompt reuses all but its last token, which is prefilled for fresh logits
    assert runner.prefills[-1] == (2, 4, 1)
    assert [o[0].cached_tokens for o in outs] == [0, 0, 0, 30, 4]
    assert all(e.cached_tokens is None for o in outs for e in o[1:])  # first token event only
    assert [r.cached_tokens for r in reqs] == [0, 0, 0, 30, 4]
    assert [e.token_id for e in outs[3]] == [10, 11, 12, 13]


def test_prefix_cache_resumes_chunked_prefill_after_the_cached_prefix():
    runner = FakeRunner(max_batch_size=1)
    eng, _, _ = make(runner, prefill_chunk=16)
    _serial(eng, [list(range(1, 41)), list(range(1, 41)) + list(range(41, 61))])
    eng.stop()
    # the second prompt's first 43 tokens (its 40 + 3 generated-and-written) are reused; 17 left in 2 chunks
    assert runner.prefills[-2:] == [(0, 43, 16), (0, 59, 1)]


def test_prefix_cache_never_serves_stale_kv_after_the_slot_is_reused():
    prompt_a = list(range(1, 31))
    prompt_b = prompt_a[:10] + [50] * 20  # shares 10 tokens with a, then overwrites the rest of slot 0
    prompts = [prompt_a, prompt_b, prompt_a]
    cached_on = KVRunner(max_batch_size=1)
    eng, _, reqs = make(cached_on)
    on = _serial(eng, prompts, max_tokens=6)
    eng.stop()
    eng, _, _ = make(KVRunner(max_batch_size=1), prefix_caching=False)
    off = _serial(eng, prompts, max_tokens=6)
    eng.stop()
    assert [r.cached_tokens for r in reqs] == [0, 10, 10]  # the third gets the true common prefix only
    assert [(st, n) for _, st, n in cached_on.prefills] == [(0, 16), (16, 14), (10, 16), (26, 4), (10, 16), (26, 4)]
    assert [[e.token_id for e in o] for o in on] == [[e.token_id for e in o] for o in off]
    assert on[0][0].token_id != on[1][0].token_id  # the model really depends on the KV


def test_prefix_cache_forgets_a_slot_whose_write_failed():
    runner = FakeRunner(max_batch_size=1, fail_decode_once=True)
    eng, _, reqs = make(runner)
    first, second = _serial(eng, [[1, 2, 3, 4], [1, 2, 3, 4]])
    eng.stop()
    assert first[-1].finish_reason == "error"
    assert second[0].cached_tokens == 0 and runner.prefills[-1] == (0, 0, 4)
    assert [e.token_id for e in second] == [5, 6, 7, 8]


def test_prefix_cache_off_by_setting_or_for_the_fallback_runner():
    runner = FakeRunner(max_batch_size=1)
    eng, _, reqs = make(runner, prefix_caching=False)
    outs = _serial(eng, [[1, 2, 3], [1, 2, 3]])
    eng.stop()
    assert runner.prefills == [(0, 0, 3), (0, 0, 3)]
    assert outs[1][0].cached_tokens is None and [r.cached_tokens for r in reqs] == [None, None]
    fallback = FakeRunner(max_batch_size=1)
    fallback.fallback = True
    eng, _, _ = make(fallback)
    _serial(eng, [[1, 2, 3], [1, 2, 3]])
    eng.stop()
    assert not eng.prefix_caching and fallback.prefills == [(0, 0, 3), (0, 0, 3)]


# ---- sampling work per step: penalties kept across steps, logprobs only when asked ----


class TableRunner(FakeRunner):
    """Logits are a fixed random row per last token, so penalties change the greedy path in many ways."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(7)) * 2.0

    def _logits(self, last):
        return self.table[last.reshape(-1)].clone()


def _reference_greedy(table, prompt, params, max_tokens):
    """The engine's former per-step behaviour: penalties from the full history rebuilt each step, then argmax."""
    out = []
    for _ in range(max_tokens):
        hist = torch.tensor([prompt + out])
        logits = apply_penalties(table[(prompt + out)[-1]][None], [params], hist, [len(prompt)])
        out.append(int(logits.argmax(-1)))
    return out


def test_penalties_with_kept_statistics_match_the_rebuilt_history_across_slot_reuse():
    runner = TableRunner(max_batch_size=2)
    eng, _, _ = make(runner)
    variants = [
        SamplingParams(temperature=0.0, repetition_penalty=1.8),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7),
        SamplingParams(temperature=0.0, repetition_penalty=0.6, frequency_penalty=-0.4, logprobs=1),
        SamplingParams(temperature=0.0, presence_penalty=2.0),
    ]
    prompts = [[5, 9, 5], [1], [9, 2, 2, 9], [3, 4], [5, 9, 5]]  # the last reuses the first's cached prefix

    async def go():
        hs = [eng.submit(GenerationRequest(pr, p, max_tokens=12, ignore_eos=True)) for pr, p in zip(prompts, variants)]
        return await asyncio.gather(*(collect(h) for h in hs))

    outs = run(go())
    eng.stop()
    for pr, p, evs in zip(prompts, variants, outs):
        assert [e.token_id for e in evs] == _reference_greedy(runner.table, pr, p, 12)
    assert max(runner.decode_batches) == 2  # slots were shared and reused by later requests


def test_logprobs_only_for_rows_that_ask():
    runner = TableRunner()
    eng, _, _ = make(runner)

    async def go():
        asks = eng.submit(GenerationRequest([3], SamplingParams(temperature=0.0, logprobs=2), max_tokens=4))
        plain = eng.submit(GenerationRequest([3], GREEDY, max_tokens=4))
        return await asyncio.gather(collect(asks), collect(plain))

    asks, plain = run(go())
    eng.stop()
    assert [e.token_id for e in asks] == [e.token_id for e in plain]
    assert all(e.logprob is None and e.top == () for e in plain)
    last = 3
    for e in asks:
        raw = runner.table[last].log_softmax(-1)
        assert e.logprob == pytest.approx(float(raw[e.token_id]), abs=1e-5)
        assert [t for t, _ in e.top] == raw.topk(2).indices.tolist()
        last = e.token_id


def test_penalty_statistics_of_a_slot_are_not_inherited_by_its_next_occupant():
    """The first occupant fails at its first token (no id generated, as the next one at its first sample), so only
    the owner check, not the token count, tells the kept statistics are someone else's."""
    runner = TableRunner(max_batch_size=1)
    eng, _, _ = make(runner)
    pen = SamplingParams(temperature=0.0, repetition_penalty=3.0)
    expected = _reference_greedy(runner.table, [12], pen, 6)
    first = GenerationRequest(expected + [12], pen, max_tokens=4, constraint=ScriptConstraint([0], allow_nothing=True))
    second = GenerationRequest([12], pen, max_tokens=6, ignore_eos=True)

    async def go():
        a = await collect(eng.submit(first))
        return a, await collect(eng.submit(second))

    a, b = run(go())
    eng.stop()
    assert a[-1].finish_reason == "error"
    assert [e.token_id for e in b] == expected  # stale statistics would penalise every one of them


async def bursts(handle):
    """The events as the event loop gets them: one list per wake-up (what the SSE edge turns into one chunk)."""
    out = []
    async for ev in handle:
        out.append([ev] + handle.ready_events())
    return out


@pytest.mark.parametrize("interval_ms", [0.0, 60.0])
def test_stream_interval_groups_tokens_but_never_holds_the_first_or_the_finish(interval_ms):
    eng, _, reqs = make(FakeRunner(decode_delay=0.01), stream_interval_ms=interval_ms)

    async def go():
        t0 = time.perf_counter()
        got = await bursts(eng.submit(GenerationRequest([1], GREEDY, max_tokens=24)))
        return got, time.perf_counter() - t0

    got, wall = run(go())
    eng.stop()
    events = [e for b in got for e in b]
    assert [e.token_id for e in events] == list(range(2, 26))
    assert events[-1].finish_reason == "length" and reqs[0].generation_tokens == 24
    if interval_ms:
        # the first token alone, then a burst per interval (each step takes 10 ms), the finish flushed at once
        assert len(got[0]) == 1
        assert len(got) <= 2 + int(wall * 1000 / interval_ms)
        assert max(len(b) for b in got) >= 3
    else:
        assert len(got) >= 12  # a hand-over per step (a slow loop may take two at once)
    assert eng.num_active == 0 and not eng._last_sent


def test_stream_interval_holds_each_request_on_its_own_clock():
    """Two requests of different lengths in one batch: each gets its first token alone and its finish at once,
    neither finish waits for the interval (500 ms, longer than both requests), and nothing is left in the outbox."""
    eng, _, reqs = make(FakeRunner(decode_delay=0.01), stream_interval_ms=500.0)

    async def timed(handle):
        got = await bursts(handle)
        return got, time.perf_counter()

    async def go():
        a = eng.submit(GenerationRequest([1], GREEDY, max_tokens=30))
        b = eng.submit(GenerationRequest([5], GREEDY, max_tokens=7))
        return await asyncio.gather(timed(a), timed(b))

    (got_a, end_a), (got_b, end_b) = run(go())
    eng.stop()
    for got, first, n in ((got_a, 2, 30), (got_b, 6, 7)):
        events = [e for b in got for e in b]
        assert [e.token_id for e in events] == list(range(first, first + n))
        assert len(got) == 2 and len(got[0]) == 1  # the first token alone, the rest with the finish
        assert events[-1].finish_reason == "length"
    # the short request's finish went out while the long one still had 23 steps (10 ms each) to run
    assert end_a - end_b >= 0.15
    assert eng.num_active == 0 and not eng._outbox and not eng._last_sent
