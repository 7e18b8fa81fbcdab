"""Decode attention over the static KV cache: which implementation a model's decode step runs.

- "inplace" (CPU): our C++ kernel (models/csrc/decode_attention.cpp, built into the W4A8 extension by
  models/w4a8.py). Row b reads its own slot's keys and values where they lie in the cache, exactly
  positions[b] + 1 of them: no gathered copy, no mask, no padding to the length bucket.
- "sdpa": `reference`: gather the rows' slots out of the cache (index_select copies), then torch's
  scaled_dot_product_attention with a mask over the attention-length bucket. CUDA runs it (inside its CUDA
  graphs), and it is the plain-PyTorch reference the kernel's parity tests hold it to.

`CPU_ATTENTION_CHOICES` is the `cpu_attention` load option: "auto" takes "inplace" where the extension builds
with SIMD (AVX-512 or AVX2) and "sdpa" otherwise, with the reason logged; asking for "inplace" where it cannot
build is an error. Speed: docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .kv_cache import from_cache

logger = logging.getLogger(__name__)

CPU_ATTENTION_CHOICES = ("auto", "inplace", "sdpa")
# the kernel's bounds (kMaxGroup, kMaxHead in models/csrc/decode_attention.cpp)
MAX_GROUP = 16  # query heads per KV head
MAX_HEAD_DIM = 256

# the attention op's signature: (q (B, H, D), kc, vc (S, T, KVH, D) in q's dtype or int8 rows of D + 4 bytes
# (models.kv_cache), slots (B,), positions (B,), scale) -> (B, H, D)
AttentionOp = Callable[..., torch.Tensor]


def reference(
    q: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor,
    kv_len: int,
) -> torch.Tensor:
    """q (B, H, D) against the first `kv_len` positions of cache slots `slots` of kc, vc (S, T, KVH, D; an int8
    cache's rows of D + 4 bytes are dequantized), with
    mask (B, 1, 1, kv_len) (True: visible) -> (B, H, D). Grouped-query heads share their KV head without
    repeating it: the H / KVH query heads of one KV head form a query block of that length."""
    B, H, D = q.shape
    kvh = kc.shape[2]
    kk = from_cache(kc[:, :kv_len].index_select(0, slots), q.dtype).transpose(1, 2)  # (B, KVH, kv_len, D)
    vv = from_cache(vc[:, :kv_len].index_select(0, slots), q.dtype).transpose(1, 2)
    qq = q.reshape(B, kvh, H // kvh, D)
    return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).reshape(B, H, D)


def decode_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B, 1, 1, kv_len) bool: key j is visible to row b iff j <= positions[b]."""
    return (torch.arange(kv_len, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]


@functools.lru_cache(maxsize=None)
def _log_once(choice: str, reason: str) -> None:
    logger.info("CPU decode attention: %s (%s)", choice, reason)


def cpu_attention_op(choice: str = "auto") -> Tuple[Optional[AttentionOp], str]:
    """(the in-place kernel, reason) or (None, reason) for the `cpu_attention` option `choice` (logged once)."""
    if choice not in CPU_ATTENTION_CHOICES:
        raise ValueError(f"unknown cpu_attention {choice!r}: choose one of {CPU_ATTENTION_CHOICES}")
    if choice == "sdpa":
        _log_once("sdpa", "requested")
        return None, "requested"
    from . import w4a8

    ops, built = w4a8.load_for(requested=choice == "inplace")
    if ops is not None:
        reason = f"in-place C++ kernel, {built} build"
        _log_once("inplace", reason)
        return ops.decode_attention.default, reason
    why = f"in-place kernel: {built}"
    if choice == "inplace":
        raise RuntimeError(f"cpu_attention='inplace' requested but {why}")
    _log_once("sdpa", why)
    return None, why


def decode_attention_for(choice: str, heads: int, kv_heads: int, head_dim: int) -> Tuple[Optional[AttentionOp], str]:
    """`cpu_attention_op(choice)` for a model with these attention shapes: SDPA (logged) where the kernel's bounds
    (MAX_GROUP query heads per KV head, MAX_HEAD_DIM) exclude them under "auto", an error under "inplace"."""
    op, reason = cpu_attention_op(choice)
    if op is None or (heads // kv_heads <= MAX_GROUP and head_dim <= MAX_HEAD_DIM):
        return op, reason
    why = (
        f"in-place kernel takes at most {MAX_GROUP} query heads per KV head and head_dim {MAX_HEAD_DIM}; "
        f"this model has {heads // kv_heads} and {head_dim}"
    )
    if choice == "inplace":
        raise ValueError(f"cpu_attention='inplace' requested but the {why}")
    _log_once("sdpa", why)
    return None, why
