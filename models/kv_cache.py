"""Static KV cache: allocated once, written in place; positions and slot ids are always arguments.

Layout: k and v are each one tensor (layers, max_batch_size + 1, max_seq, kv_heads, head_dim). The extra
slot (index `max_batch_size`, `scratch_slot`) absorbs the writes of padding rows when a decode batch is padded
to a captured bucket size. `k[i]` / `v[i]` are per-layer views (slots + 1, max_seq, kv_heads, head_dim).
The storage behind those views is head-major, (layers, slots + 1, kv_heads, max_seq, head_dim): one KV head's
positions of a slot are contiguous, so decode attention reads each head as one stream (docs/benchmarks.md).
Indexing is by the logical layout everywhere; only strides show the difference.

`copy_prefix(src, dst, n)` copies positions [0, n) of one slot into another in place (shared prefill of an
n > 1 request group): a slice copy into the same storage, so captured CUDA graphs stay valid.

An int8 cache (`kv_dtype="int8"`, half the bytes of bfloat16) stores each (position, KV head) row as D int8 codes
followed by its float32 scale: rows of D + 4 bytes (`quantize_rows`, `dequantize_rows`), so a row and its scale
are read together and the cache stays one tensor per layer for K and one for V.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

KV_CACHE_DTYPES = ("auto", "int8")  # "auto": the activation dtype
SCALE_BYTES = 4  # an int8 row's float32 scale, after its codes


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) -> (..., D + 4) int8: codes round(x / s) in -127..127 (half to even) and the bytes of the float32
    scale s = max|x| / 127 of the row; an all-zero row has s = 0 and codes 0. D % 4 == 0."""
    d = x.shape[-1]
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True) / 127  # (..., 1)
    # one pointwise expression over the row's D + 4 bytes (no cat, no byte view of s: a compiled graph fuses it
    # into a single loop): codes, then the little-endian bytes of s's bits as int8
    j = torch.arange(d + SCALE_BYTES, device=x.device)
    codes = torch.where(s > 0, F.pad(xf, (0, SCALE_BYTES)) / s, 0.0).round().clamp(-127, 127)  # (..., D + 4)
    byte = (s.view(torch.int32) >> ((j - d).clamp(min=0) * 8).to(torch.int32)) & 0xFF
    return torch.where(j < d, codes.to(torch.int32), byte - ((byte >> 7) << 8)).to(torch.int8)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quantize_rows`'s (..., D + 4) int8 rows -> (..., D) codes * scale in `dtype`."""
    s = rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)  # (..., 1)
    return (rows[..., :-SCALE_BYTES].float() * s).to(dtype)


def to_cache(cache: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rows x (..., D) as `cache` (a layer's K or V) stores them: quantized where it is an int8 cache."""
    return quantize_rows(x) if cache.dtype == torch.int8 else x


def from_cache(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows read from a cache (..., D or D + 4) -> (..., D) values in `dtype`."""
    return dequantize_rows(rows, dtype) if rows.dtype == torch.int8 else rows


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
        kv_dtype: str = "auto",
    ):
        """dtype: the activations'; kv_dtype: one of KV_CACHE_DTYPES ("auto": store in `dtype`)."""
        if kv_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_dtype!r}")
        self.quantized = kv_dtype == "int8"
        if self.quantized and head_dim % SCALE_BYTES:
            raise ValueError(f"an int8 KV cache needs head_dim % {SCALE_BYTES} == 0, got {head_dim}")
        self.layers, self.max_batch_size, self.max_seq = layers, max_batch_size, max_seq
        self.kv_heads, self.head_dim = kv_heads, head_dim
        row = head_dim + SCALE_BYTES if self.quantized else head_dim
        stored = (layers, max_batch_size + 1, kv_heads, max_seq, row)
        store_dtype = torch.int8 if self.quantized else dtype
        self.k_all = torch.zeros(stored, device=device, dtype=store_dtype).transpose(2, 3)  # (L, S, T, KVH, row) view
        self.v_all = torch.zeros(stored, device=device, dtype=store_dtype).transpose(2, 3)
        self.k: List[torch.Tensor] = list(self.k_all.unbind(0))
        self.v: List[torch.Tensor] = list(self.v_all.unbind(0))

    @property
    def scratch_slot(self) -> int:
        return self.max_batch_size

    def nbytes(self) -> int:
        return 2 * self.k_all.numel() * self.k_all.element_size()

    @staticmethod
    def predict_bytes(
        layers: int,
        max_batch_size: int,
        max_seq: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        kv_dtype: str = "auto",
    ) -> int:
        row = head_dim + SCALE_BYTES if kv_dtype == "int8" else head_dim * torch.empty((), dtype=dtype).element_size()
        return 2 * layers * (max_batch_size + 1) * max_seq * kv_heads * row

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
