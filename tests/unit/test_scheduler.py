"""Scheduler: pure-Python planning (FIFO admission, chunked prefill budget, decode everyone)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.engine.scheduler import Scheduler


def seq(order, prompt_len, prefilled=0, outputs=0, slot=None):
    s = SimpleNamespace(
        order=order, prompt_len=prompt_len, num_prefilled=prefilled, output_ids=[7] * outputs, slot=slot
    )
    s.prefill_done = prefilled >= prompt_len
    return s


def test_fifo_admission_limited_by_free_slots():
    waiting = [seq(i, 4) for i in range(5)]
    plan = Scheduler(64).plan([], waiting, [2, 0, 3])
    assert [(s.order, slot) for s, slot in plan.admit] == [(0, 2), (1, 0), (2, 3)]
    assert [(s.order, start, n) for s, start, n in plan.prefill] == [(0, 0, 4), (1, 0, 4), (2, 0, 4)]
    assert plan.decode == []


def test_no_free_slots_admits_nobody():
    running = [seq(0, 4, 4, 1, slot=0)]
    plan = Scheduler(64).plan(running, [seq(1, 4)], [])
    assert plan.admit == [] and plan.prefill == [] and plan.decode == running


def test_prefill_budget_is_one_chunk_per_step_and_decoders_keep_going():
    decoding = [seq(0, 3, 3, 5, slot=0), seq(1, 3, 3, 2, slot=1)]
    long = seq(2, 1000, 0, 0, slot=2)
    sched = Scheduler(256)
    plan = sched.plan(decoding + [long], [seq(3, 10)], [3])
    assert plan.decode == decoding
    assert [(s.order, st, n) for s, st, n in plan.prefill] == [(2, 0, 256)]
    assert plan.num_prefill_tokens == 256
    # the newcomer is admitted (slot taken) but waits for the prefill budget
    assert [s.order for s, _ in plan.admit] == [3]


def test_chunked_prefill_resumes_and_spills_budget_to_next():
    a = seq(0, 300, 256, 0, slot=0)
    b = seq(1, 100, 0, 0, slot=1)
    plan = Scheduler(256).plan([b, a], [], [])
    assert [(s.order, st, n) for s, st, n in plan.prefill] == [(0, 256, 44), (1, 0, 100)]


def test_sequence_without_a_token_yet_is_not_decoded():
    s = seq(0, 4, 4, 0, slot=0)  # prefilled but first token not sampled (mid-step state)
    assert Scheduler(16).plan([s], [], []).decode == []


def test_bad_chunk():
    with pytest.raises(ValueError):
        Scheduler(0)


def test_reusable_prefix_picks_the_best_free_slot_and_starts_prefill_there():
    held = {0: 3, 1: 40, 2: 40}  # tokens of the waiting prompts reusable per slot
    waiting = [seq(0, 64), seq(1, 64), seq(2, 64)]
    plan = Scheduler(256).plan([], waiting, [0, 1, 2], lambda s, slot: held[slot] if s.order < 2 else 0)
    # ties go to the first listed free slot; a seq with nothing to reuse takes what is left
    assert [(s.order, slot) for s, slot in plan.admit] == [(0, 1), (1, 2), (2, 0)]
    assert plan.cached == {1: 40, 2: 40, 0: 0}
    assert [(s.order, st, n) for s, st, n in plan.prefill] == [(0, 40, 24), (1, 40, 24), (2, 0, 64)]


def group(first_order, n, prompt_len, shared=True):
    """n waiting sequences of one group; with `shared` the followers wait for the first one's KV."""
    members = [seq(first_order + i, prompt_len) for i in range(n)]
    for s in members:
        s.group, s.leader = members, None
    if shared:
        for s in members[1:]:
            s.leader = members[0]
    return members


def test_group_is_admitted_whole_and_only_its_leader_prefills():
    g = group(0, 3, 20)
    plan = Scheduler(64).plan([], g + [seq(3, 4)], [0, 1, 2, 3])
    assert [(s.order, slot) for s, slot in plan.admit] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    # followers wait for the leader's KV; the lone request behind the group prefills normally
    assert [(s.order, st, n) for s, st, n in plan.prefill] == [(0, 0, 20), (3, 0, 4)]
    assert plan.copy == []


def test_group_waits_at_the_head_until_all_its_members_fit_and_nobody_overtakes_it():
    running = [seq(0, 4, 4, 1, slot=0)]
    g = group(1, 3, 8)
    plan = Scheduler(64).plan(running, g + [seq(4, 4)], [1, 2])
    assert plan.admit == [] and plan.prefill == [] and plan.decode == running
    plan = Scheduler(64).plan([], g + [seq(4, 4)], [1, 2, 3])
    assert [s.order for s, _ in plan.admit] == [1, 2, 3]


def test_a_group_can_shrink_while_waiting():
    g = group(0, 3, 8)
    del g[0]  # the engine removes a finished member from the waiting queue (and promotes a new leader)
    g[0].leader = None
    g[1].leader = g[0]
    plan = Scheduler(64).plan([], g, [5, 6])
    assert [(s.order, slot) for s, slot in plan.admit] == [(1, 5), (2, 6)]
    assert [(s.order, st, n) for s, st, n in plan.prefill] == [(1, 0, 8)]


def test_followers_copy_the_leaders_kv_and_prefill_their_last_token_once_the_leader_is_done():
    leader, f1, f2 = group(0, 3, 20)
    for s, slot in ((leader, 2), (f1, 0), (f2, 3)):
        s.slot = slot
    leader.num_prefilled, leader.prefill_done = 16, False
    plan = Scheduler(16).plan([leader, f1, f2], [], [])
    assert [(s.order, st, n) for s, st, n in plan.prefill] == [(0, 16, 4)] and plan.copy == []
    leader.num_prefilled, leader.prefill_done, leader.output_ids = 20, True, [7]
    plan = Scheduler(1).plan([leader, f1, f2], [seq(3, 4)], [1])
    assert plan.decode == [leader]
    # copies are not limited by the prefill budget; the 1-token prefills are
    assert [(s.order, src, dst, n) for s, src, dst, n in plan.copy] == [(1, 2, 0, 19), (2, 2, 3, 19)]
    assert [(s.order, st, n) for s, st, n in plan.prefill] == [(1, 19, 1)]


def test_followers_take_free_slots_without_a_prefix_lookup():
    held = {0: 5, 1: 9, 2: 0}
    g = group(0, 2, 12)
    plan = Scheduler(64).plan([], g, [2, 0, 1], lambda s, slot: held[slot])
    assert [(s.order, slot) for s, slot in plan.admit] == [(0, 1), (1, 2)]
    assert plan.cached == {1: 9, 2: 0}
    assert [(s.order, st, n) for s, st, n in plan.prefill] == [(0, 9, 3)]


def test_one_token_prompt_followers_and_unshared_groups_prefill_on_their_own():
    plan = Scheduler(64).plan([], group(0, 2, 1), [0, 1])
    assert [(s.order, st, n) for s, st, n in plan.prefill] == [(0, 0, 1), (1, 0, 1)] and plan.copy == []
    plan = Scheduler(64).plan([], group(0, 2, 6, shared=False), [0, 1])
    assert [(s.order, st, n) for s, st, n in plan.prefill] == [(0, 0, 6), (1, 0, 6)]
