"""Static KV cache: allocated once, written in place; positions and slot ids are always arguments.

Layout: k and v are each one tensor (layers, max_batch_size + 1, max_seq, kv_heads, head_dim). The extra
slot (index `max_batch_size`, `scratch_slot`) absorbs the writes of padding rows when a decode batch is padded
to a captured bucket size. `k[i]` / `v[i]` are per-layer views (slots + 1, max_seq, kv_heads, head_dim).
The storage behind those views is head-major, (layers, slots + 1, kv_heads, max_seq, head_dim): one KV head's
positions of a slot are contiguous, so decode attention reads each head as one stream (docs/benchmarks.md).
Indexing is by the logical layout everywhere; only strides show the difference.

`copy_prefix(src, dst, n)` copies positions [0, n) of one slot into another in place (shared prefill of an
n > 1 request group): a slice copy into the same storage, so captured CUDA graphs stay valid.
"""

from __future__ import annotations

from typing import List

import torch


class KVCache:
    def __init__(
        self,
        layers: int,
        max_batch_size: int,
        max_seq: int,
        kv_heads: int,
        head_dim: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.layers, self.max_batch_size, self.max_seq = layers, max_batch_size, max_seq
        self.kv_heads, self.head_dim = kv_heads, head_dim
        stored = (layers, max_batch_size + 1, kv_heads, max_seq, head_dim)
        self.k_all = torch.zeros(stored, device=device, dtype=dtype).transpose(2, 3)  # (L, S, T, KVH, D) view
        self.v_all = torch.zeros(stored, device=device, dtype=dtype).transpose(2, 3)
        self.k: List[torch.Tensor] = list(self.k_all.unbind(0))
        self.v: List[torch.Tensor] = list(self.v_all.unbind(0))

    @property
    def scratch_slot(self) -> int:
        return self.max_batch_size

    def nbytes(self) -> int:
        return 2 * self.k_all.numel() * self.k_all.element_size()

    @staticmethod
    def predict_bytes(
        layers: int, max_batch_size: int, max_seq: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * layers * (max_batch_size + 1) * max_seq * kv_heads * head_dim * elem

    def copy_prefix(self, src_slot: int, dst_slot: int, num_tokens: int) -> None:
        """Copy K and V of positions [0, num_tokens) of `src_slot` into `dst_slot`, all layers, in place.

        The caller checks the bounds (`Runner.copy_kv`); the two slots' ranges never overlap (distinct slots).
        """
        n = num_tokens
        self.k_all[:, dst_slot, :n].copy_(self.k_all[:, src_slot, :n])
        self.v_all[:, dst_slot, :n].copy_(self.v_all[:, src_slot, :n])

    def data_ptrs(self) -> tuple:
        """Identity of the storage (tests check the cache is never reallocated)."""
        return (self.k_all.data_ptr(), self.v_all.data_ptr())
