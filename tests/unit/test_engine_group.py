"""n > 1 groups (`Engine.submit_group`): one shared prefill, the leader's KV copied into the followers' slots.

Fake runners from test_engine: `KVRunner`'s next token depends on the whole KV of its slot, so a missing,
wrong or stale copy changes the output; `flat` logits make sampled tokens depend on the generator only. The
runner-level copy and an engine over a real tiny Llama (float32, CPU) check `Runner.copy_kv` itself.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import torch

from models.sampling import SamplingParams
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, QueueFullError
from server.metrics import Metrics
from test_engine import GREEDY, FakeRunner, KVRunner, collect, make, run  # same folder

PROMPT = list(range(1, 21))  # 20 tokens: with prefill_chunk 16 the leader prefills in two chunks


class CopyRunner(KVRunner):
    """KVRunner with `copy_kv`; `prefill_delay` slows prefills down, `fail_copy` makes every copy raise."""

    def __init__(self, prefill_delay=0.0, fail_copy=False, **kw):
        super().__init__(**kw)
        self.copies = []
        self.prefill_delay = prefill_delay
        self.fail_copy = fail_copy

    def prefill(self, tokens, slot, start_pos):
        if self.prefill_delay:
            time.sleep(self.prefill_delay)
        return super().prefill(tokens, slot, start_pos)

    def copy_kv(self, src_slot, dst_slot, num_tokens):
        if self.fail_copy:
            raise RuntimeError("copy boom")
        self.copies.append((src_slot, dst_slot, num_tokens))
        self.kv[dst_slot][:num_tokens] = self.kv[src_slot][:num_tokens]


class FlatCopyRunner(FakeRunner):
    def __init__(self, **kw):
        super().__init__(flat=True, **kw)
        self.copies = []

    def copy_kv(self, src_slot, dst_slot, num_tokens):
        self.copies.append((src_slot, dst_slot, num_tokens))


def req(prompt=PROMPT, max_tokens=6, params=GREEDY, **kw):
    return GenerationRequest(list(prompt), params, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(evs):
    return [e.token_id for e in evs]


def lone_outputs(runner, reqs, **kw):
    """Each request alone, one after another, on a fresh engine: the reference outputs."""
    eng, _, _ = make(runner, **kw)

    async def go():
        return [tokens(await collect(eng.submit(r))) for r in reqs]

    out = run(go())
    eng.stop()
    return out


def group_events(eng, reqs):
    async def go():
        return await asyncio.gather(*(collect(h) for h in eng.submit_group(reqs)))

    return run(go())


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_group_matches_lone_requests_and_prefills_the_prompt_once(prefix_caching):
    runner = CopyRunner(max_batch_size=4)
    eng, steps, stats = make(runner, prefill_chunk=16, prefix_caching=prefix_caching)
    reqs = [req(max_tokens=6 + i) for i in range(3)]
    outs = group_events(eng, reqs)
    eng.stop()
    assert [tokens(o) for o in outs] == lone_outputs(CopyRunner(max_batch_size=4), reqs)
    assert len({tokens(o)[0] for o in outs}) == 1
    leader_slot = runner.prefills[0][0]
    by_slot = {}
    for slot, start, n in runner.prefills:
        by_slot.setdefault(slot, []).append((start, n))
    followers = sorted(s for s in by_slot if s != leader_slot)
    assert by_slot[leader_slot] == [(0, 16), (16, 4)]  # the prompt, once
    assert len(followers) == 2 and all(by_slot[s] == [(19, 1)] for s in followers)  # the last token each
    assert sorted(runner.copies) == [(leader_slot, s, 19) for s in followers]
    assert sum(s.num_prefill_tokens for s in steps) == 20 + 2
    assert sum(s.num_copied_tokens for s in steps) == 2 * 19
    cached = 0 if prefix_caching else None
    assert [o[0].cached_tokens for o in outs] == [cached] * 3
    by_id = {r.request_id: r for r in stats}
    leader, *rest = (by_id[r.request_id] for r in reqs)
    assert (leader.cached_tokens, leader.kv_copied_tokens) == (cached, 0)
    assert all((r.cached_tokens, r.kv_copied_tokens) == (None, 19) for r in rest)
    assert [by_id[r.request_id].generation_tokens for r in reqs] == [6, 7, 8]
    assert eng.num_active == 0


def test_followers_report_the_leaders_prefix_hit_but_do_not_count_in_the_prefix_cache_metrics():
    runner = CopyRunner(max_batch_size=3)
    eng, _, stats = make(runner)
    first = group_events(eng, [req()])  # leaves the prompt's KV in a slot
    outs = group_events(eng, [req(), req(), req()])
    eng.stop()
    assert first[0][0].cached_tokens == 0
    assert [o[0].cached_tokens for o in outs] == [19, 19, 19]  # the followers report the leader's hit
    assert [tokens(o) for o in outs] == [tokens(first[0])] * 3
    metrics = Metrics(telemetry=None)
    for r in stats:
        metrics.on_request_finished(r)
    g = metrics.registry.get_sample_value
    # queries: the lone request's and the leader's prompts; hits: the leader's 19 only
    assert g("jetserve:prefix_cache_queries_total", {"model": "fake"}) == 2 * 20
    assert g("jetserve:prefix_cache_hits_total", {"model": "fake"}) == 19


def test_seeded_members_equal_lone_requests_with_seed_plus_i():
    seed = 1234
    reqs = [
        req(prompt=[1, 2, 3], max_tokens=8, params=SamplingParams(temperature=1.0, seed=seed + i)) for i in range(3)
    ]
    runner = FlatCopyRunner(max_batch_size=4)
    eng, _, _ = make(runner)
    outs = [tokens(o) for o in group_events(eng, reqs)]
    eng.stop()
    assert outs == lone_outputs(FlatCopyRunner(max_batch_size=4), reqs)
    assert len({tuple(o) for o in outs}) == 3  # independent seeds, independent samples
    assert len(runner.copies) == 2


def test_group_admission_is_all_or_nothing_and_fifo():
    runner = CopyRunner(max_batch_size=3, decode_delay=0.002)
    eng, _, _ = make(runner)

    async def go():
        a = eng.submit(req(prompt=[5], max_tokens=8))
        await a.__anext__()  # a holds one of the 3 slots
        hs = eng.submit_group([req(max_tokens=3) for _ in range(3)])  # needs all 3
        b = eng.submit(req(prompt=[7], max_tokens=2))  # would fit in a free slot, but must not overtake
        return await asyncio.gather(collect(a), collect(b), *(collect(h) for h in hs))

    ra, rb, *group = run(go())
    eng.stop()
    one_token = [i for i, (_, st, n) in enumerate(runner.prefills) if (st, n) == (0, 1)]  # a's, then b's
    group_start = [i for i, (_, st, n) in enumerate(runner.prefills) if (st, n) == (0, 16)]
    assert len(one_token) == 2 and group_start[0] < one_token[1]  # b was admitted after the group
    assert len(ra) == 7 and len(rb) == 2 and all(len(o) == 3 for o in group)  # a: its first was read above
    assert len(runner.copies) == 2


def test_capacity_and_validation_errors():
    runner = CopyRunner(max_batch_size=2, decode_delay=0.01)
    eng, _, _ = make(runner, max_queue=1)  # room for 3 requests

    async def go():
        with pytest.raises(ValueError, match="batch size"):
            eng.submit_group([req() for _ in range(3)])
        with pytest.raises(ValueError, match="batch size"):
            eng.submit_group([])
        with pytest.raises(ValueError, match="identical prompt_ids"):
            eng.submit_group([req(), req(prompt=PROMPT[:-1] + [99])])
        with pytest.raises(ValueError, match="distinct request ids"):
            eng.submit_group([req(request_id="x"), req(request_id="x")])
        with pytest.raises(ValueError, match="max_tokens"):
            eng.submit_group([req(), req(max_tokens=0)])
        with pytest.raises(ValueError, match="empty"):
            eng.submit_group([req(prompt=[]), req(prompt=[])])
        assert eng.num_active == 0
        a = eng.submit(req(max_tokens=50))
        b = eng.submit(req(max_tokens=50))
        with pytest.raises(QueueFullError, match="group of 2"):
            eng.submit_group([req(), req()])  # 2 + 2 > 3: nothing of it is queued
        assert eng.num_active == 2
        hs = eng.submit_group([req(max_tokens=1)])  # a group of one still fits
        a.abort()
        b.abort()
        return await asyncio.gather(collect(a), collect(b), *(collect(h) for h in hs))

    *_, last = run(go())
    eng.stop()
    assert len(last) == 1 and last[0].finish_reason == "length"
    assert eng.num_active == 0


def test_aborting_a_follower_mid_stream_leaves_the_others_running():
    runner = CopyRunner(max_batch_size=3, decode_delay=0.002)
    eng, _, stats = make(runner, stream_interval_ms=0.0)  # every step handed over: the abort shows within a step
    reqs = [req(max_tokens=20) for _ in range(3)]

    async def go():
        hs = eng.submit_group(reqs)
        await hs[1].__anext__()
        await hs[1].__anext__()
        hs[1].abort()
        return await asyncio.gather(*(collect(h) for h in hs))

    lead, aborted, other = run(go())
    eng.stop()
    (expected,) = lone_outputs(CopyRunner(max_batch_size=3), reqs[:1])
    assert tokens(lead) == tokens(other) == expected
    assert aborted[-1].finish_reason == "abort" and len(aborted) < 18
    assert sorted(r.finish_reason for r in stats) == ["abort", "length", "length"]


def test_leader_aborted_during_its_prefill_hands_the_group_to_a_follower():
    runner = CopyRunner(max_batch_size=3, prefill_delay=0.05)
    eng, _, stats = make(runner, prefill_chunk=16)
    prompt = list(range(1, 65))  # 4 chunks for whoever prefills it
    reqs = [req(prompt=prompt, max_tokens=4) for _ in range(3)]

    async def go():
        hs = eng.submit_group(reqs)
        while not runner.prefills:
            await asyncio.sleep(0.001)
        hs[0].abort()
        return await asyncio.gather(*(collect(h) for h in hs))

    lead, f1, f2 = run(go())
    eng.stop()
    (expected,) = lone_outputs(CopyRunner(max_batch_size=3), reqs[:1])
    assert lead[-1].finish_reason == "abort"
    assert tokens(f1) == tokens(f2) == expected
    leader_slot = runner.prefills[0][0]
    (new_leader,) = {slot for slot, st, n in runner.prefills if st == 0 and slot != leader_slot}
    assert [(st, n) for slot, st, n in runner.prefills if slot == new_leader] == [(0, 16), (16, 16), (32, 16), (48, 16)]
    (copy,) = runner.copies
    assert copy[0] == new_leader and copy[2] == 63
    assert f1[0].cached_tokens == f2[0].cached_tokens == 0
    assert sorted(r.kv_copied_tokens for r in stats) == [0, 0, 63]


def test_leader_aborted_while_waiting_hands_the_group_to_a_follower():
    runner = CopyRunner(max_batch_size=3, decode_delay=0.005)
    eng, _, _ = make(runner)
    reqs = [req(max_tokens=4) for _ in range(3)]

    async def go():
        a = eng.submit(req(prompt=[5], max_tokens=10))
        await a.__anext__()
        hs = eng.submit_group(reqs)  # waits: a holds a slot
        hs[0].abort()
        return await asyncio.gather(collect(a), *(collect(h) for h in hs))

    _, lead, f1, f2 = run(go())
    eng.stop()
    (expected,) = lone_outputs(CopyRunner(max_batch_size=3), reqs[:1])
    assert tokens(lead) == [-1] and lead[0].finish_reason == "abort"
    assert tokens(f1) == tokens(f2) == expected
    assert [n for _, _, n in runner.copies] == [19]  # the new leader prefilled, the other follower copied
    assert f2[0].cached_tokens == f1[0].cached_tokens == 0


def test_followers_copy_from_a_finished_leader_even_when_its_slot_is_taken_in_the_same_step():
    runner = CopyRunner(max_batch_size=3)
    eng, _, _ = make(runner)
    reqs = [req(max_tokens=1)] + [req(max_tokens=5) for _ in range(2)]
    other = req(prompt=[40] * 8, max_tokens=3)

    async def go():
        hs = eng.submit_group(reqs)
        c = eng.submit(other)  # waits for the leader's slot, admitted with the followers' copies
        return await asyncio.gather(*(collect(h) for h in hs), collect(c))

    lead, f1, f2, c = run(go())
    eng.stop()
    ref = lone_outputs(CopyRunner(max_batch_size=3), [reqs[1], other])
    assert len(lead) == 1 and tokens(f1) == tokens(f2) == ref[0] and tokens(c) == ref[1]
    leader_slot = runner.prefills[0][0]
    assert [src for src, _, _ in runner.copies] == [leader_slot, leader_slot]
    assert any(slot == leader_slot and n == 8 for slot, _, n in runner.prefills)  # c took the leader's slot


def test_a_failed_copy_makes_the_follower_prefill_its_whole_prompt():
    runner = CopyRunner(max_batch_size=2, fail_copy=True)
    eng, _, stats = make(runner)
    outs = group_events(eng, [req(), req()])
    eng.stop()
    assert tokens(outs[0]) == tokens(outs[1])
    assert sorted((st, n) for _, st, n in runner.prefills) == [(0, 16), (0, 16), (16, 4), (16, 4)]
    assert all(r.kv_copied_tokens == 0 and r.finish_reason == "length" for r in stats)


@pytest.mark.parametrize("kind", ["fallback", "no_copy_kv"])
def test_runners_without_shared_kv_prefill_every_member(kind, caplog):
    runner = CopyRunner(max_batch_size=3) if kind == "fallback" else KVRunner(max_batch_size=3)
    if kind == "fallback":
        runner.fallback = True
    eng, _, _ = make(runner, prefill_chunk=64)
    with caplog.at_level(logging.INFO, logger="server.engine.engine"):
        outs = group_events(eng, [req(), req(), req()])
        group_events(eng, [req(), req()])
    eng.stop()
    assert len({tuple(tokens(o)) for o in outs}) == 1
    assert getattr(runner, "copies", []) == []
    assert [(st, n) for _, st, n in runner.prefills[:3]] == [(0, 20)] * 3
    assert sum("groups prefill every member" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------ the real runtime (tiny Llama)
@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.loader import load_runner

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return load_runner(path, dtype=torch.float32, max_batch_size=4, max_seq=128)


def test_runner_copy_kv_copies_the_prefix_in_place(tiny_runner):
    r = tiny_runner
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 256, (30,), generator=g)
    ptrs = r.cache.data_ptrs()
    r.prefill(torch.randint(0, 256, (60,), generator=g), 2, 0)  # stale KV in the destination
    ref = r.prefill(prompt, 0, 0)
    before_tail = r.cache.k_all[:, 2, 29:60].clone()
    r.copy_kv(0, 2, 29)
    assert r.cache.data_ptrs() == ptrs
    assert torch.equal(r.cache.k_all[:, 2, :29], r.cache.k_all[:, 0, :29])
    assert torch.equal(r.cache.v_all[:, 2, :29], r.cache.v_all[:, 0, :29])
    assert torch.equal(r.cache.k_all[:, 2, 29:60], before_tail)  # nothing past num_tokens is touched
    torch.testing.assert_close(r.prefill(prompt[29:], 2, 29), ref, atol=1e-4, rtol=0)
    r.copy_kv(1, 1, 10)  # no-op
    r.copy_kv(0, 1, 0)  # no-op
    with pytest.raises(ValueError, match="dst_slot"):
        r.copy_kv(0, 4, 3)  # the scratch slot is not a sequence slot
    with pytest.raises(ValueError, match="num_tokens"):
        r.copy_kv(0, 1, 129)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_real_runner_group_matches_lone_requests(tiny_runner, prefix_caching):
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    greedy = [req(prompt=prompt, max_tokens=8) for _ in range(3)]
    seeded = [req(prompt=prompt, max_tokens=8, params=SamplingParams(temperature=0.8, seed=7 + i)) for i in range(3)]

    def serve(groups):
        eng = Engine(tiny_runner, _settings(prefix_caching), name="tiny")
        eng.start()

        async def go():
            out = []
            for reqs in groups:
                hs = eng.submit_group(reqs)
                out.append([tokens(await collect(h)) for h in hs])
            return out

        try:
            return run(go())
        finally:
            eng.stop()

    grouped = serve([greedy, seeded])
    lone = serve([[r] for r in greedy + seeded])
    assert grouped[0] == [o[0] for o in lone[:3]]
    assert grouped[1] == [o[0] for o in lone[3:]]
    assert len({tuple(o) for o in grouped[1]}) == 3


def _settings(prefix_caching):
    from test_engine import settings

    return settings(prefix_caching=prefix_caching, prefill_chunk=16)
