"""Continuous-batching scheduler: pure Python, never touches tensors.

Each engine step the scheduler looks at the running sequences (holding a KV slot), the FIFO of waiting
requests and the free slots, and returns a `StepPlan`:

- every running sequence whose prompt is fully prefilled decodes one token;
- waiting requests are admitted in FIFO order while slots are free (they join at this step boundary); with a
  `reusable(seq, slot)` function (prefix caching) each takes the free slot that already holds the longest prefix
  of its prompt, and its prefill starts after that prefix;
- an n > 1 group (consecutive waiting sequences sharing one `.group`) is admitted only as a whole, when enough
  slots are free for all its waiting members; until then it blocks the queue (nothing behind it jumps ahead).
  Its leader takes a slot as above; its followers (`.leader` set) take free slots without a lookup
  (`plan.cached` 0) and are not prefilled while their leader's prompt is not fully prefilled. Once it is, the
  plan copies the leader's KV of the first prompt_len - 1 positions into each follower's slot
  (`plan.copy`, executed by the engine before the step's prefills) and prefills only the follower's last prompt
  token, so each member samples its first token from its own fresh logits;
- prompt tokens are prefilled in chunks, at most `prefill_chunk` tokens per step in total, oldest first, so
  the decoding streams stall for at most one chunk per step. Copies are not counted against the budget.

Sequences are duck-typed (see `server.engine.request.SequenceState`): `.slot`, `.num_prefilled`,
`.prompt_len`, `.prefill_done`, `.output_ids`, `.order`, and optionally `.group` / `.leader` (default None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


@dataclass
class StepPlan:
    admit: List[Tuple[Any, int]] = field(default_factory=list)  # (sequence, slot) joining this step
    prefill: List[Tuple[Any, int, int]] = field(default_factory=list)  # (sequence, start_pos, num_tokens)
    decode: List[Any] = field(default_factory=list)  # sequences decoding one token
    cached: Dict[int, int] = field(default_factory=dict)  # slot -> prompt tokens reused by the seq admitted to it
    # (follower, src_slot, dst_slot, num_tokens): copy the leader's prompt KV [0, num_tokens) before prefilling
    copy: List[Tuple[Any, int, int, int]] = field(default_factory=list)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for _, _, n in self.prefill)


class Scheduler:
    """FIFO admission + chunked prefill + decode-everyone. Stateless between steps."""

    def __init__(self, prefill_chunk: int):
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.prefill_chunk = prefill_chunk

    def plan(
        self,
        running: Sequence[Any],
        waiting: Sequence[Any],
        free_slots: Sequence[int],
        reusable: Optional[Callable[[Any, int], int]] = None,
    ) -> StepPlan:
        """Plan one step. `waiting` is in arrival order; `free_slots` are KV slot indices not in use.

        `reusable(seq, slot)` (optional) is how many of seq's first prompt tokens already have valid KV in
        `slot`, at most prompt_len - 1. Without it slots are taken in `free_slots` order and nothing is reused;
        with it each admitted seq takes the free slot with the most reusable tokens (ties: the first listed),
        `plan.cached[slot]` records that count and the seq's first prefill chunk starts there. Group followers
        never look up (`plan.cached` 0); see the module docstring for groups and `plan.copy`.
        """
        plan = StepPlan()
        slots = list(free_slots)
        i = 0
        while i < len(waiting) and slots:
            unit = [waiting[i]]  # a lone request, or the waiting members of one group
            group = getattr(waiting[i], "group", None)
            while group is not None and i + len(unit) < len(waiting):
                if getattr(waiting[i + len(unit)], "group", None) is not group:
                    break
                unit.append(waiting[i + len(unit)])
            if len(unit) > len(slots):
                break  # all or nothing, and FIFO: the head waits and nobody overtakes it
            i += len(unit)
            for seq in unit:
                slot, n = slots[0], 0
                if reusable is not None and getattr(seq, "leader", None) is None:
                    for s in slots:
                        m = reusable(seq, s)
                        if m > n:
                            slot, n = s, m
                slots.remove(slot)
                plan.admit.append((seq, slot))
                plan.cached[slot] = n

        plan.decode = [s for s in running if s.prefill_done and s.output_ids]

        admitted = {id(s) for s, _ in plan.admit}
        candidates = []
        for seq in sorted((s for s in running if not s.prefill_done), key=lambda s: s.order):
            start = seq.num_prefilled
            leader = getattr(seq, "leader", None)
            if leader is not None and seq.prompt_len > 1:
                if not leader.prefill_done or id(leader) in admitted:
                    continue  # the leader's prompt KV is not resident yet
                start = seq.prompt_len - 1
                plan.copy.append((seq, leader.slot, seq.slot, start))
            candidates.append((seq, start))
        for seq, slot in plan.admit:
            if getattr(seq, "leader", None) is None or seq.prompt_len == 1:
                candidates.append((seq, plan.cached[slot]))

        budget = self.prefill_chunk
        for seq, start in candidates:
            if budget <= 0:
                break
            n = min(seq.prompt_len - start, budget)
            if n > 0:
                plan.prefill.append((seq, start, n))
                budget -= n
        return plan
