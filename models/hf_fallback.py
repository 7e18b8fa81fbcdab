"""Transformers fallback runner for architectures without a fused table: batch 1, one dynamic cache per slot.

Same interface as `models.runner.Runner`, but slow: `max_batch_size` is 1 so the engine never batches, and
`decode` runs each row on its own. The loader logs a warning whenever this runner is chosen. It has no
`copy_kv` (no shared KV between slots): the engine prefills every member of an n > 1 group on its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

logger = logging.getLogger(__name__)


class HFFallbackRunner:
    fallback = True

    def __init__(
        self,
        model_dir: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_seq: int,
        eos_token_ids: Tuple[int, ...] = (),
        trust_remote_code: bool = False,
        info=None,
    ):
        from transformers import AutoModelForCausalLM

        self.info = info
        self.device, self.dtype = torch.device(device), dtype
        self.model = (
            AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code)
            .to(self.device)
            .eval()
        )
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_batch_size, self.max_seq = 1, max_seq
        self.eos_token_ids = tuple(eos_token_ids)
        self._caches: Dict[int, Tuple[object, int]] = {}  # slot -> (past_key_values, next position)

    @torch.inference_mode()
    def _forward(self, tokens: torch.Tensor, slot: int, start_pos: int) -> torch.Tensor:
        from transformers import DynamicCache

        if not 0 <= slot < self.max_batch_size:
            raise ValueError(f"slot {slot} out of range [0, {self.max_batch_size})")
        if start_pos + tokens.numel() > self.max_seq:
            raise ValueError(f"positions exceed max_seq={self.max_seq}")
        if start_pos == 0:
            cache: Optional[object] = DynamicCache()
        else:
            cache, expected = self._caches.get(slot, (None, 0))
            if cache is None or expected != start_pos:
                raise ValueError(f"fallback runner: slot {slot} holds {expected} positions, got start_pos={start_pos}")
        ids = tokens.to(self.device, torch.long)[None]
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        self._caches[slot] = (out.past_key_values, start_pos + tokens.numel())
        return out.logits[0].float()

    def prefill(self, tokens: torch.Tensor, slot: int, start_pos: int = 0) -> torch.Tensor:
        return self._forward(tokens, slot, start_pos)[-1]

    def prefill_logits(
        self, tokens: torch.Tensor, slot: int, start_pos: int = 0, last: Optional[int] = None
    ) -> torch.Tensor:
        out = self._forward(tokens, slot, start_pos)
        return out if last is None else out[-last:]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        rows = [self._forward(tokens[i : i + 1], int(slots[i]), int(positions[i]))[-1] for i in range(tokens.shape[0])]
        return torch.stack(rows)

    def release(self, slot: int) -> None:
        self._caches.pop(slot, None)

    def warmup(self) -> None:
        self.prefill(torch.zeros(2, dtype=torch.long), 0, 0)
        self.release(0)

    def memory_report(self) -> Dict[str, int]:
        w = sum(p.numel() * p.element_size() for p in self.model.parameters())
        w += sum(b.numel() * b.element_size() for b in self.model.buffers())
        return {"weights_bytes": int(w), "kv_cache_bytes": 0, "workspace_bytes": 0}
