"""W4A8 on CPU: 4-bit weight codes times int8 activations, the C++ kernel in models/csrc/w4a8.cpp.

Activations are quantized to int8 per row and per block of `act_block` inputs inside a weight group (round half
to even, scale = max|x| / 127), as llama.cpp does with its Q8 activations; the products and their sums per block
are exact integers, so the only difference from a dense matmul on the dequantized weight is that rounding. `reference` computes the same thing
in plain PyTorch; the parity tests hold the kernel to it.

The kernel is compiled on first use for the instruction set torch runs with (`torch.backends.cpu`; AVX-512 VNNI,
AVX2 or plain C++) into torch's extension cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions),
and loaded from there afterwards. Without a C++ compiler or ninja, `load` says why and the caller falls back.
This module owns the build of the whole extension: it also holds the int8 head's `w8a8_mm` and the in-place
decode attention (models/attention.py, models/csrc/decode_attention.cpp).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Tuple

import torch

logger = logging.getLogger(__name__)

COLS = 16  # output columns per packed block
BLOCK_K = 8  # k per 64-byte packed block
FP16_MIN_NORMAL = 2.0**-14
ACT_BLOCK = 8  # activation quantization block (inputs), capped at the weight group size; docs/benchmarks.md
HEAD_ACT_BLOCK = 64  # the W8A8 head's activation block where it divides the input width; docs/benchmarks.md
# one extension: the W4A8/W8A8 matmuls and the in-place decode attention (models/attention.py)
SOURCES = tuple(Path(__file__).parent / "csrc" / f for f in ("w4a8.cpp", "decode_attention.cpp", "fused_ops.cpp"))
ISA_FLAGS = {
    "avx512_vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read), read once per process."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_isa() -> str:
    """The kernel build for this CPU and torch's CPU capability (which $ATEN_CPU_CAPABILITY can lower)."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    flags = cpu_flags()
    if cap.startswith("avx512") and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        return "avx512_vnni"
    if cap.startswith(("avx512", "avx2")) and {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "scalar"


def _namespace(isa: str) -> str:
    return f"jetserve_w4a8_{isa}"


def build_unavailable() -> Optional[str]:
    """Why the kernel cannot be built here, or None."""
    cxx = os.environ.get("CXX")
    if not any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++"]):
        return "no C++ compiler (g++ or c++ on PATH, or $CXX)"
    try:
        import ninja  # noqa: F401
    except ImportError:
        return "ninja is not installed (torch builds C++ extensions with it)"
    return None


def load(isa: Optional[str] = None) -> Tuple[Optional[object], str]:
    """(the op namespace, "isa") for `isa` (default `native_isa()`), building it on first use; (None, why) if
    it cannot be built or loaded. Cached per process."""
    return _load(isa or native_isa())


def load_for(requested: bool) -> Tuple[Optional[object], str]:
    """The build a kernel choice takes: `load()` when the kernel was asked for by name (`requested`, where even the
    plain C++ build serves), else (an "auto" choice) only where torch and the CPU run AVX2 or AVX-512 VNNI;
    (None, why) otherwise."""
    isa = native_isa()
    if isa == "scalar" and not requested:
        return None, "no AVX2 or AVX-512 VNNI on this CPU / torch capability"
    ops, built = load(isa)
    return (ops, built) if ops is not None else (None, f"unavailable: {built}")


def loaded() -> Optional[object]:
    """The op namespace of a build this process has already loaded, else None; never builds (for callers that take
    the extension only where it is there anyway, such as `sampling.argmax_rows`)."""
    return next(iter(_LOADED.values()), None)


_LOADED: dict = {}  # isa -> op namespace, filled by `_load`


@functools.lru_cache(maxsize=None)
def _load(isa: str) -> Tuple[Optional[object], str]:
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown W4A8 build {isa!r}: choose one of {tuple(ISA_FLAGS)}")
    why = build_unavailable()
    if why is not None:
        return None, why
    ns = _namespace(isa)
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=ns,
            sources=[str(p) for p in SOURCES],
            # no FP traps are ever enabled: -fno-trapping-math lets GCC vectorize clamps and floor (vec_math.h)
            extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", f"-DJETSERVE_W4A8_NS={ns}"] + ISA_FLAGS[isa],
            extra_ldflags=["-lgomp"],  # torch's own libgomp.so.1 (already loaded): one OpenMP pool
            is_python_module=False,
            verbose=False,
        )
        ops = getattr(torch.ops, ns)
        torch.library.register_fake(f"{ns}::w4a8_mm")(_fake_mm)
        torch.library.register_fake(f"{ns}::w8a8_mm")(_fake_mm8)
        torch.library.register_fake(f"{ns}::decode_attention")(_fake_attention)
        torch.library.register_fake(f"{ns}::w4a8_dequant")(_fake_dequant)
        torch.library.register_fake(f"{ns}::w4_amx_mm")(_fake_amx)
        torch.library.register_fake(f"{ns}::w8_amx_mm")(_fake_mm8)
    except Exception as e:  # compiler or loader errors: the caller falls back and logs why
        first = str(e).splitlines()[0] if str(e) else ""
        return None, f"building the W4A8 kernel failed ({type(e).__name__}: {first})"
    built = ops.isa()
    if built != isa:
        return None, f"the W4A8 build for {isa} compiled the {built} path (compiler flags ignored?)"
    _LOADED[isa] = ops
    return ops, isa


def head_act_block(in_features: int) -> int:
    """The activation block of the W8A8 head (`w8a8_mm`) for this input width."""
    return HEAD_ACT_BLOCK if in_features % HEAD_ACT_BLOCK == 0 else ACT_BLOCK


def act_block(group_size: int) -> int:
    """The activation block a layer with this weight group size uses."""
    return min(ACT_BLOCK, group_size)


def _fake_mm(x, packed, scales, zeros, group_size, act_block):
    return x.new_empty(x.shape[0], packed.shape[0] * COLS)


def _fake_mm8(x, packed, scales, act_block, float_out=False):
    return x.new_empty(x.shape[0], packed.shape[0] * COLS, dtype=torch.float32 if float_out else x.dtype)


def _fake_amx(x, packed, scales, zeros, group_size):
    return x.new_empty(x.shape[0], packed.shape[0] * COLS)


def _fake_dequant(packed, scales, zeros, group_size):
    return packed.new_empty(packed.shape[0] * COLS, packed.shape[1] * BLOCK_K, dtype=torch.bfloat16)


def _fake_attention(q, kc, vc, slots, positions, scale):
    return q.new_empty(q.shape)


def pack_int8(codes: torch.Tensor, scales: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel int8 weight codes (N, K) in -127..127 and scales (N,) -> (packed (N'/16, K/4, 64) uint8 holding
    code + 128, byte j of a 64-byte block = column j // 4, input j % 4; scales (N'/16, 16) float32), N' = N rounded
    up to 16 with zero columns. The `w8a8_mm` op's layout (the int8 lm_head)."""
    n, k = codes.shape
    if k % 4:
        raise ValueError(f"W8A8 needs K % 4 == 0, got K={k}")
    pad = -n % COLS
    c = codes.to(torch.int16) + 128
    s = scales.float()
    if pad:
        c = torch.cat([c, c.new_full((pad, k), 128)])
        s = torch.cat([s, s.new_zeros(pad)])
    blocks = (n + pad) // COLS
    c = c.to(torch.uint8).reshape(blocks, COLS, k // 4, 4).permute(0, 2, 1, 3)  # (block, quad, col, k in quad)
    return c.reshape(blocks, k // 4, 64).contiguous(), s.reshape(blocks, COLS).contiguous()


def reference_w8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """Plain-PyTorch W8A8: x (M, K), int8 codes (N, K), scales (N,), activation blocks of `block` -> (M, N) float64."""
    xq, dx = quantize_activations(x, block)
    m, k = x.shape
    xq = xq.double().reshape(m, k // block, block)
    dots = torch.einsum("mbk,nbk->mbn", xq, codes.double().reshape(codes.shape[0], k // block, block))
    return (dots * dx.double()[..., None]).sum(1) * scales.double()


def pack(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes (N, K) in 0..15 with sequential groups of `group_size` along K, scales (G, N) float, zeros (G, N)
    in 0..15 -> (packed (N'/16, K/8, 64) uint8, scales (N'/16, G, 16) float16, zeros (N'/16, G, 16) uint8),
    N' = N rounded up to 16 (zero columns, sliced off by the caller). Scales are rounded to float16 (GPTQ and AWQ
    store float16: exact); raises ValueError where that would leave float16's normal range (then torch's kernel,
    with bfloat16 scales, is the better choice) or the shapes do not fit the kernel."""
    n, k = codes.shape
    if group_size % BLOCK_K or k % group_size:
        raise ValueError(f"W4A8 needs group_size % {BLOCK_K} == 0 and K % group_size == 0 (K={k}, g={group_size})")
    groups = k // group_size
    if tuple(scales.shape) != (groups, n) or tuple(zeros.shape) != (groups, n):
        raise ValueError(f"scales/zeros must be ({groups}, {n})")
    s16 = scales.to(torch.float16)
    inexact = (s16.float() != scales.float()) & (scales.float().abs() < FP16_MIN_NORMAL)
    if not torch.isfinite(s16).all() or inexact.any():
        raise ValueError("scales outside float16's normal range")
    pad = -n % COLS
    q = codes.to(torch.uint8)
    z = zeros.to(torch.uint8)
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        s16 = torch.cat([s16, s16.new_zeros(groups, pad)], dim=1)
        z = torch.cat([z, z.new_zeros(groups, pad)], dim=1)
    blocks = (n + pad) // COLS
    q = q.reshape(blocks, COLS, k // BLOCK_K, 2, 4)  # (block, col, kb, lo/hi half, k in quad)
    q = q.permute(0, 2, 1, 4, 3)  # (block, kb, col, k in quad, lo/hi half)
    packed = (q[..., 0] | (q[..., 1] << 4)).reshape(blocks, k // BLOCK_K, 64).contiguous()
    s16 = s16.reshape(groups, blocks, COLS).permute(1, 0, 2).contiguous()  # (block, G, 16)
    z = z.reshape(groups, blocks, COLS).permute(1, 0, 2).contiguous()
    return packed, s16, z


def unpack(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack`: (codes (N', K) uint8, scales (G, N') float32, zeros (G, N') uint8), padding included."""
    blocks, kbs, _ = packed.shape
    nib = torch.stack([packed & 15, packed >> 4], -1)  # (block, kb, 64, lo/hi)
    nib = nib.reshape(blocks, kbs, COLS, 4, 2).permute(0, 2, 1, 4, 3)  # (block, col, kb, lo/hi, k in quad)
    codes = nib.reshape(blocks * COLS, kbs * BLOCK_K)
    groups = scales.shape[1]
    s = scales.permute(1, 0, 2).reshape(groups, blocks * COLS).float()
    z = zeros.permute(1, 0, 2).reshape(groups, blocks * COLS)
    return codes.contiguous(), s, z.contiguous()


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The (N', K) float32 weight s * (q - z) of a packed layer, padding rows included (exact in float32)."""
    codes, s, z = unpack(packed, scales, zeros)
    g = torch.arange(codes.shape[1], device=codes.device) // (codes.shape[1] // s.shape[0])  # group of each input
    return (codes.float() - z.float()[g].t()) * s[g].t()


def dequant_reference(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch `w4a8_dequant`: `dequantize` rounded once to bfloat16."""
    return dequantize(packed, scales, zeros).to(torch.bfloat16)


def amx_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch `w4_amx_mm`: x (M, K) rounded to bfloat16 times the exact weight (`dequantize`), in float64
    -> (M, N'). The kernel sums the same products in float32 and rounds its output once to bfloat16."""
    return x.to(torch.bfloat16).double() @ dequantize(packed, scales, zeros).double().t()


def has_amx(ops) -> bool:
    """This build has `w4_amx_mm`'s AMX path and torch runs AMX tiles on this CPU (models.kernels.cpu_has_amx)."""
    from . import kernels

    return bool(ops.has_amx()) and kernels.cpu_has_amx()


def quantize_activations(x: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (xq (M, K) int8 values as float32, dx (M, K / block) float32): the kernel's rounding."""
    m, k = x.shape
    xg = x.float().reshape(m, k // block, block)  # (M, blocks, block)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xg * inv[..., None])  # torch.round: half to even, as nearbyint
    return xq.reshape(m, k), amax / 127.0


def reference(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, block: int
) -> torch.Tensor:
    """Plain-PyTorch W4A8: x (M, K), codes (N, K), scales/zeros (G, N), activation blocks of `block` inputs
    -> (M, N) float64."""
    xq, dx = quantize_activations(x, block)
    m, k = x.shape
    nb = k // block
    xq = xq.double().reshape(m, nb, block)
    q = codes.double().reshape(codes.shape[0], nb, block)  # (N, blocks, block)
    dots = torch.einsum("mbk,nbk->mbn", xq, q)  # exact integer sums
    sums = xq.sum(-1)  # (M, blocks)
    g = torch.arange(nb) * block // group_size  # weight group of each block
    z, s = zeros.double()[g], scales.double()[g]  # (blocks, N)
    t = dots - z[None] * sums[..., None]  # (M, blocks, N)
    return (t * s[None] * dx.double()[..., None]).sum(1)
