"""Fused CPU ops for the eager steps (prefill, the final norm, eager decode): RMSNorm (with the residual add), RoPE
and the gated activation, one pass over memory each (models/csrc/fused_ops.cpp, built into the W4A8 extension by
models/w4a8.py).

The compiled decode graphs fuse these ops themselves (models/compile.py); prefill runs eagerly, a different token
count each call, and there torch's own ops take several passes each: at 512 tokens on SmolLM2 about a quarter of
the prefill time went to them, and eager decode ran 1.27-1.33x faster with the kernels (docs/benchmarks.md). The kernels take bfloat16 activations on CPU and round where
transformers' bfloat16 ops round; the functions here ending in `_reference` are their plain-PyTorch definitions,
held to the kernels by the parity tests.

`CPU_FUSED_CHOICES` is the `cpu_fused` load option: "auto" takes the kernels where the extension builds with
AVX2 or AVX-512 (logged once, with the reason when it does not), "fused" asks for them (an error where they cannot
run), "torch" keeps torch's ops.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CPU_FUSED_CHOICES = ("auto", "fused", "torch")


@dataclass(frozen=True)
class FusedOps:
    """The fused ops a model runs (all on bfloat16, 2-D activations with contiguous rows):

    - `rms_norm(x (T, H), weight (H,), eps) -> (T, H)`;
    - `add_rms_norm_(x (T, H), delta (T, H), weight, eps) -> (T, H)`: x += delta in place, then rms_norm(x);
    - `rope_(qkv (T, C), cos (T, D/2), sin (T, D/2), heads, D)`: RoPE in place on qkv's first `heads` heads;
    - `silu_mul(gu (T, 2I)) -> (T, I)`: silu(gate) * up for gu = [gate | up];
    - `kv_rows(x (T, KVH, D)) -> (T, KVH, D + 4)` int8: an int8 KV cache's rows (`kv_cache.quantize_rows`);
    - `kv_values(rows (T, KVH, D + 4)) -> (T, KVH, D)`: their values (`kv_cache.dequantize_rows`)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm_: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    rope_: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], None]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]
    kv_rows: Callable[[torch.Tensor], torch.Tensor]
    kv_values: Callable[[torch.Tensor], torch.Tensor]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: float32 statistics, the normalized row rounded to x's dtype, then times weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_reference_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x.add_(delta)
    return rms_norm_reference(x, weight, eps)


def rope_reference_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """Rotate-half RoPE (transformers' convention) on the first `heads` heads of each row, in place."""
    t = qkv.shape[0]
    x = qkv[:, : heads * head_dim].view(t, heads, head_dim)
    x1, x2 = x.chunk(2, -1)
    c, s = cos[:, None], sin[:, None]  # (T, 1, D/2)
    x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1))


def silu_mul_reference(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, -1)
    return F.silu(g) * u


def kernels(ops) -> FusedOps:
    """The C++ kernels of one build of the extension (`ops`: its op namespace, from `w4a8.load`)."""
    return FusedOps(
        ops.rms_norm.default,
        ops.add_rms_norm_.default,
        ops.rope_.default,
        ops.silu_mul.default,
        ops.kv_rows.default,
        ops.kv_values.default,
    )


@functools.lru_cache(maxsize=None)
def _log_once(choice: str, reason: str) -> None:
    logger.info("CPU fused ops: %s (%s)", choice, reason)


def cpu_fused_ops(choice: str = "auto", dtype: torch.dtype = torch.bfloat16) -> Tuple[Optional[FusedOps], str]:
    """(the C++ kernels, reason) or (None, reason) for the `cpu_fused` option `choice` and the activation dtype
    (logged once). "fused" raises where they cannot run; "auto" returns None with the reason."""
    if choice not in CPU_FUSED_CHOICES:
        raise ValueError(f"unknown cpu_fused {choice!r}: choose one of {CPU_FUSED_CHOICES}")
    if choice == "torch":
        _log_once("torch", "requested")
        return None, "requested"
    if dtype != torch.bfloat16:
        why = f"the kernels take bfloat16 activations, this model runs {dtype}"
    else:
        from . import w4a8

        ops, built = w4a8.load_for(requested=choice == "fused")
        if ops is not None:
            reason = f"C++ kernels, {built} build"
            _log_once("fused", reason)
            return kernels(ops), reason
        why = f"C++ kernels: {built}"
    if choice == "fused":
        raise RuntimeError(f"cpu_fused='fused' requested but {why}")
    _log_once("torch", why)
    return None, why
