"""Continuous-batching scheduler: pure Python, never touches tensors.

Each engine step the scheduler looks at the running sequences (holding a KV slot), the FIFO of waiting
requests and the free slots, and returns a `StepPlan`:

- every running sequence whose prompt is fully prefilled decodes one token;
- waiting requests are admitted in FIFO order while slots are free (they join at this step boundary); with a
  `reusable(seq, slot)` function (prefix caching) each takes the free slot that already holds the longest prefix
  of its prompt, and its prefill starts after that prefix;
- prompt tokens are prefilled in chunks, at most `prefill_chunk` tokens per step in total, oldest first, so
  the decoding streams stall for at most one chunk per step.

Sequences are duck-typed (see `server.engine.request.SequenceState`): `.slot`, `.num_prefilled`,
`.prompt_len`, `.prefill_done`, `.output_ids`, `.order`.
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
        `plan.cached[slot]` records that count and the seq's first prefill chunk starts there.
        """
        plan = StepPlan()
        slots = list(free_slots)
        for seq in waiting:
            if not slots:
                break
            slot, n = slots[0], 0
            if reusable is not None:
                for s in slots:
                    m = reusable(seq, s)
                    if m > n:
                        slot, n = s, m
            slots.remove(slot)
            plan.admit.append((seq, slot))
            plan.cached[slot] = n

        plan.decode = [s for s in running if s.prefill_done and s.output_ids]

        budget = self.prefill_chunk
        candidates = sorted((s for s in running if not s.prefill_done), key=lambda s: s.order)
        candidates = [(s, s.num_prefilled) for s in candidates]
        candidates += [(s, plan.cached[slot]) for s, slot in plan.admit]
        for seq, start in candidates:
            if budget <= 0:
                break
            n = min(seq.prompt_len - start, budget)
            if n > 0:
                plan.prefill.append((seq, start, n))
                budget -= n
        return plan
