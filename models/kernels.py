"""The one place that decides which int4 kernel runs on a device, and logs that choice once.

Kernels:
- "cpu_w4a8": our C++ W4A8 kernel (models/w4a8.py, models/csrc/w4a8.cpp): int4 codes x activations rounded
  to int8 per row and block of w4a8.ACT_BLOCK inputs, exact int32 sums (AVX-512 VNNI or AVX2). The CPU default
  where it builds (perplexity +0.04% over int4pack on the demo, docs/benchmarks.md).
- "cpu_int4pack": aten._weight_int4pack_mm_for_cpu (bf16 activations), weights repacked with
  _convert_weight_to_int4pack_for_cpu (out_features padded to a multiple of 64).
- "cuda_tinygemm": aten._weight_int4pack_mm (sm80+), weights repacked with _convert_weight_to_int4pack.
- "cuda_triton": our split-K W4A16 Triton kernel (models/triton_int4.py) for decode (<= 16 tokens),
  dequantize + cuBLAS for prefill. Chosen per call site with `cuda_kernel=`; see docs/benchmarks.md.
- "reference": dequantize to the activation dtype, then a dense matmul (2/3/8-bit, odd group sizes,
  devices without an int4 kernel).
- int8 per-channel (the `lm_head="int8"` option): `int8_linear`, aten._weight_int8pack_mm on CPU, with
  `int8_linear_reference` as its plain-PyTorch reference; where the int4 layers run CPU_W4A8, `Int8Linear` runs
  the same C++ kernel's W8A8 path instead (`w4a8_mm`'s twin `w8a8_mm`, reference `w4a8.reference_w8`).

Prefill policy: `KernelPlan.dense_min_tokens` is the token count from which dequantize-then-dense beats the
int4 kernel. Where torch runs AMX tiles (Intel Xeon since Sapphire Rapids), oneDNN's bf16 matmul is several times
faster than W4A8 at prefill sizes, so from CPU_DENSE_MIN_TOKENS tokens on the W4A8 plan dequantizes
(`w4a8_dequant`, exact to bf16) and multiplies dense, and from CPU_AMX_MIN_TOKENS up to there it runs `w4_amx_mm`
(AMX-BF16 tiles on the packed weight), which beat W4A8 from 4-5 rows on in one-layer timings. Without AMX but with
AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake), the dense path wins from about 192 tokens on
(a layer's int4 linears at 256 tokens: 2.59 against 2.84 ms), so it starts at CPU_BF16_DENSE_MIN_TOKENS. Elsewhere
(AVX2-only CPUs) W4A8 won at every size measured (1..512 tokens) and the CPU plan never switches to dense
(docs/benchmarks.md).
On an H100 (torch 2.11) tinygemm was 13-20x slower than dequantize + cuBLAS at 512 tokens on Llama-2-7B shapes,
so CUDA prefill dequantizes from CUDA_DENSE_MIN_TOKENS tokens on; the exact crossover between 8 and 512 tokens is
unmeasured. The dequantized weight is a per-call temporary on both devices.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

logger = logging.getLogger(__name__)

CPU_INT4PACK = "cpu_int4pack"
CPU_W4A8 = "cpu_w4a8"
# the `cpu_int4` load option: "auto" is CPU_W4A8 where its kernel builds with SIMD, else CPU_INT4PACK (logged)
CPU_INT4_CHOICES = ("auto", "w4a8", "int4pack")
CUDA_TINYGEMM = "cuda_tinygemm"
CUDA_TRITON = "cuda_triton"
CUDA_KERNELS = (CUDA_TINYGEMM, CUDA_TRITON)
CUDA_DENSE_MIN_TOKENS = 64  # tinygemm below, dequantize + cuBLAS from here (see module docstring)
CPU_DENSE_MIN_TOKENS = 64  # with AMX: dequantize + oneDNN bf16 from here (see module docstring)
CPU_BF16_DENSE_MIN_TOKENS = 256  # without AMX, with AVX512-BF16: the same from here (see module docstring)
CPU_AMX_MIN_TOKENS = 4  # with AMX: W4A8 below, w4_amx_mm from here to CPU_DENSE_MIN_TOKENS (see module docstring)
TRITON_MAX_TOKENS = 16  # the Triton kernel tiles M by 16: decode; prefill dequantizes + cuBLAS
REFERENCE = "reference"

INT4_GROUP_SIZES = (32, 64, 128, 256)
CPU_N_BLOCK = 64  # CPU int4pack rows are padded to this: its layout blocks 64 rows (AVX-512) or fewer
W4A8_N_BLOCK = 16  # W4A8 rows are padded to this


@dataclass(frozen=True)
class KernelPlan:
    """What QuantLinear runs: kernel name, and from how many tokens it should dequantize + dense matmul (and, on
    the W4A8 plan with AMX, from how many tokens it runs `w4_amx_mm` below that)."""

    name: str
    dense_min_tokens: Optional[int]  # None: never switch to dense
    reason: str
    amx_min_tokens: Optional[int] = None  # None: never the AMX kernel


@functools.lru_cache(maxsize=None)
def log_once(device_type: str, name: str, reason: str) -> None:
    logger.info("int4 kernel for %s: %s (%s)", device_type, name, reason)


def _has_cpu_int4() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def _has_cuda_int4(device: torch.device) -> bool:
    if not (torch.cuda.is_available() and hasattr(torch.ops.aten, "_weight_int4pack_mm")):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_has_amx() -> bool:
    """torch can run AMX tiles here (CPU and OS), where its oneDNN bf16 matmul uses them."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe() and torch.backends.mkldnn.is_available())


def cpu_has_avx512_bf16() -> bool:
    """oneDNN's bf16 matmul runs AVX512-BF16 dot products here: the CPU has them and torch runs AVX-512 (False
    under ATEN_CPU_CAPABILITY=avx2, as on a CPU without them, although oneDNN itself would still use them)."""
    from . import w4a8

    cap = torch.backends.cpu.get_cpu_capability().lower()
    return cap.startswith("avx512") and "avx512_bf16" in w4a8.cpu_flags() and torch.backends.mkldnn.is_available()


def w4a8_amx_min_tokens(ops) -> Optional[int]:
    """From how many rows the W4A8 build `ops` runs its AMX tile kernels (`w4_amx_mm`, and `w8_amx_mm` for the
    W8A8 head), or None where the CPU, the OS or the build has no AMX tiles."""
    from . import w4a8

    return CPU_AMX_MIN_TOKENS if w4a8.has_amx(ops) else None


def _cpu_plan(cpu_int4: str) -> KernelPlan:
    if cpu_int4 not in CPU_INT4_CHOICES:
        raise ValueError(f"unknown cpu_int4 kernel {cpu_int4!r}: choose one of {CPU_INT4_CHOICES}")
    why = None
    if cpu_int4 in ("auto", "w4a8"):
        from . import w4a8

        ops, built = w4a8.load_for(requested=cpu_int4 == "w4a8")
        if ops is not None:
            reason = f"W4A8 C++ kernel, {built} build (int8 activation blocks)"
            if cpu_has_amx():
                amx_from = w4a8_amx_min_tokens(ops)
                tiles = f"W4 x bf16 tiles from {amx_from} tokens, " if amx_from else ""
                return KernelPlan(
                    CPU_W4A8,
                    CPU_DENSE_MIN_TOKENS,
                    f"{reason}; AMX: {tiles}dequantize + oneDNN bf16 matmul from {CPU_DENSE_MIN_TOKENS}",
                    amx_from,
                )
            if cpu_has_avx512_bf16():
                return KernelPlan(
                    CPU_W4A8,
                    CPU_BF16_DENSE_MIN_TOKENS,
                    f"{reason}; AVX512-BF16: dequantize + oneDNN bf16 matmul from {CPU_BF16_DENSE_MIN_TOKENS}",
                )
            return KernelPlan(CPU_W4A8, None, reason)
        why = f"W4A8 kernel: {built}"
        if cpu_int4 == "w4a8":
            raise RuntimeError(f"cpu_int4='w4a8' requested but {why}")
    if _has_cpu_int4():
        reason = "int4pack_mm_for_cpu measured faster than dense bf16 at 1..512 tokens"
        return KernelPlan(CPU_INT4PACK, None, reason if why is None else f"{why}; {reason}")
    if cpu_int4 == "int4pack":
        raise RuntimeError("cpu_int4='int4pack' requested but this torch has no _weight_int4pack_mm_for_cpu")
    return KernelPlan(REFERENCE, 0, f"{why}; no torch int4 kernel on cpu: dequantize + dense matmul")


def device_kernel(device: torch.device, cuda_kernel: Optional[str] = None, cpu_int4: str = "auto") -> KernelPlan:
    """The int4 kernel this device would use for a well-shaped 4-bit layer (logged once per device type).

    cuda_kernel picks between CUDA_TINYGEMM (default) and CUDA_TRITON; cpu_int4 (CPU_INT4_CHOICES) between
    CPU_W4A8 and CPU_INT4PACK. Asking for a kernel that is not available is an error, never a silent fallback;
    "auto" falls back with the reason logged.
    """
    device = torch.device(device)
    if cuda_kernel not in (None,) + CUDA_KERNELS:
        raise ValueError(f"unknown CUDA int4 kernel {cuda_kernel!r}: choose one of {CUDA_KERNELS}")
    if device.type == "cpu":
        plan = _cpu_plan(cpu_int4)
    elif device.type == "cuda" and cuda_kernel == CUDA_TRITON:
        from . import triton_int4

        if not triton_int4.available():
            raise RuntimeError("cuda_kernel='cuda_triton' requested but triton is not installed")
        plan = KernelPlan(
            CUDA_TRITON, TRITON_MAX_TOKENS + 1, "Triton split-K W4 kernel for decode, dequantize + cuBLAS for prefill"
        )
    elif device.type == "cuda" and _has_cuda_int4(device):
        if cuda_layout_ok(device.index if device.index is not None else torch.cuda.current_device()):
            plan = KernelPlan(
                CUDA_TINYGEMM,
                CUDA_DENSE_MIN_TOKENS,
                f"tinygemm on sm80+ for < {CUDA_DENSE_MIN_TOKENS} tokens, dequantize + cuBLAS for prefill",
            )
        else:
            plan = KernelPlan(CUDA_TINYGEMM, None, "tinygemm on sm80+ (layout probe failed: no dense prefill)")
    else:
        plan = KernelPlan(REFERENCE, 0, f"no torch int4 kernel on {device.type}: dequantize + dense matmul")
    log_once(device.type, plan.name, plan.reason)
    return plan


def select_kernel(
    device: torch.device,
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
    cuda_kernel: Optional[str] = None,
    cpu_int4: str = "auto",
) -> KernelPlan:
    """Kernel for one layer: the device's int4 kernel when the layer's shape allows, else reference.

    A layer that cannot use the int4 kernel is logged once per (device, reason) -- never silently.
    """
    plan = device_kernel(device, cuda_kernel, cpu_int4)
    if plan.name == REFERENCE:
        return plan
    why = None
    if bits != 4:
        why = f"{bits}-bit weights"
    elif group_size not in INT4_GROUP_SIZES:
        why = f"group_size={group_size} (int4 kernels take {INT4_GROUP_SIZES})"
    elif in_features % group_size:
        why = f"in_features={in_features} not a multiple of group_size={group_size}"
    elif plan.name == CUDA_TINYGEMM and (in_features % 32 or out_features % 8):
        why = f"shape ({out_features}, {in_features}) not tinygemm-aligned"
    elif plan.name == CUDA_TRITON and (group_size % 16 or in_features % 8):
        why = f"shape ({out_features}, {in_features}) / group_size={group_size} not Triton-kernel aligned"
    elif plan.name == CPU_INT4PACK and out_features % 16:
        why = f"out_features={out_features} not a multiple of 16"
    if why is None:
        return plan
    ref = KernelPlan(REFERENCE, 0, f"{why}: dequantize + dense matmul")
    log_once(torch.device(device).type, ref.name, ref.reason)
    return ref


def cuda_inner_k_tiles(in_features: int) -> int:
    """Largest tinygemm inner_k_tiles in (8, 4, 2) with in_features % (16 * tiles) == 0."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"in_features={in_features} is not a multiple of 32")


def int4_mm(
    name: str, x2d: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """x2d (M, in) bf16 contiguous -> (M, out_padded) bf16 with the named int4 kernel (not CPU_W4A8, whose
    scales and zeros are two tensors: QuantLinear calls it directly)."""
    if name == CPU_INT4PACK:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, group_size, scales_and_zeros)
    if name == CUDA_TINYGEMM:
        return torch.ops.aten._weight_int4pack_mm(x2d, packed, group_size, scales_and_zeros)
    if name == CUDA_TRITON:
        from . import triton_int4

        cfg = triton_int4.tuned_config(x2d, packed, scales_and_zeros, group_size)
        return triton_int4.w4_matmul(x2d, packed, scales_and_zeros, group_size, config=cfg)
    raise ValueError(f"not an int4 kernel: {name}")


def cuda_tinygemm_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack _convert_weight_to_int4pack (CUDA) output -> codes (N, in) uint8, in plain PyTorch.

    packed (N/8, in/(tiles*16), 32, tiles/2) int32. Lane t of n-tile nt holds row nt*8 + t//4; word i2 holds
    bytes i2*16 + i*4 + t%4 (i = 0..3) of its k super-tile, high nibbles (even k) in bits 0-15, low nibbles
    (odd k) in bits 16-31 (aten/src/ATen/native/cuda/int4mm.cu, matrix_to_m16n8k16_Bint4_layout).
    """
    nt, ks, _, half = packed.shape
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF  # (nt, ks, 32, half, 8)
    nib = nib.reshape(nt, ks, 8, 4, half, 2, 4)  # (nt, ks, r, c, i2, hi/lo, i)
    codes = nib.permute(0, 2, 1, 4, 6, 3, 5)  # (nt, r, ks, i2, i, c, hi/lo)
    return codes.reshape(nt * 8, in_features).to(torch.uint8)


def pack_int4(name: str, codes: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """codes (N, K) integers in 0..15 -> the named kernel's packed weight on `device`.

    For CPU_INT4PACK, N must already be a multiple of CPU_N_BLOCK (QuantLinear pads with zero rows).
    """
    if name == CPU_INT4PACK:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.cpu().to(torch.int32).contiguous(), 1)
    if name == CUDA_TRITON:
        from . import triton_int4

        return triton_int4.pack_qweight_t(codes.to(device))  # (K/8, N) int32
    if name == CUDA_TINYGEMM:
        q = codes.to(device=device, dtype=torch.uint8)
        tiles = cuda_inner_k_tiles(q.shape[1])
        return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), tiles)
    raise ValueError(f"not an int4 kernel: {name}")


def packed_rows(name: str, packed: torch.Tensor) -> int:
    """Output rows N (padding included) that a packed weight of the named kernel holds."""
    if name == CPU_INT4PACK:
        return packed.shape[0]  # (N, K/2) uint8
    if name == CUDA_TINYGEMM:
        return packed.shape[0] * 8  # (N/8, K/(tiles*16), 32, tiles/2) int32
    if name == CUDA_TRITON:
        return packed.shape[1]  # (K/8, N) int32
    raise ValueError(f"not an int4 kernel: {name}")


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit field of a packed tensor in memory order, low nibble of each byte first -> (numel_bytes*2,)."""
    b = packed.contiguous().reshape(-1).view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1)


def nibble_order(
    pack: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """Learn a packing's layout from the packer itself: int32 (N*K,) with codes.flatten() == nibbles[order].

    Packs ceil(log16(N*K)) probe matrices whose codes are the base-16 digits of each position's flat index,
    so every output nibble names the (n, k) it came from. Raises if the packer is not a permutation of its
    input's nibbles (then no layout can be read back).
    """
    count = n * k
    positions = torch.arange(count, dtype=torch.int64, device=device)
    source = torch.zeros(count, dtype=torch.int64, device=device)
    digits = max(1, math.ceil(math.log2(max(count, 2)) / 4))
    for d in range(digits):
        nib = _nibbles(pack(((positions >> (4 * d)) & 0xF).reshape(n, k)))  # nibble j holds digit d of its source
        if nib.numel() != count:
            raise RuntimeError(f"int4 packer returned {nib.numel()} nibbles for a ({n}, {k}) weight")
        source |= nib.to(device=device, dtype=torch.int64) << (4 * d)
    if not torch.equal(torch.sort(source).values, positions):
        raise RuntimeError(f"int4 packer is not a nibble permutation at shape ({n}, {k}): cannot unpack its layout")
    order = torch.empty_like(source)
    order[source] = positions  # order[p]: the nibble that holds position p
    return order.to(torch.int32)


@functools.lru_cache(maxsize=16)
def _kernel_nibble_order(name: str, n: int, k: int, device: str) -> torch.Tensor:
    order = nibble_order(lambda codes: pack_int4(name, codes, device), n, k, device)
    logger.debug("probed the %s layout at (%d, %d) on %s", name, n, k, device)
    return order


def int4pack_codes(name: str, packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The codes (N, in) uint8 that a packed weight holds (N includes padding rows), on packed's device.

    Reads the layout the running build and ISA actually produce (probed once per shape), except where a
    hand-written unpacker is verified against the converter (CUDA tinygemm, when cuda_layout_ok) or the layout
    is our own (Triton).
    """
    if name == CUDA_TRITON:
        from . import triton_int4

        return triton_int4.unpack_qweight_t(packed)
    if name == CUDA_TINYGEMM and cuda_layout_ok(packed.device.index or 0):
        return cuda_tinygemm_codes(packed, in_features)
    n = packed_rows(name, packed)
    order = _kernel_nibble_order(name, n, in_features, str(packed.device))
    return _nibbles(packed).index_select(0, order).reshape(n, in_features)


def dequant_t(
    name: str,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W^T (in, N) in `dtype` from any int4 layout: the dense-prefill weight, built per call, never cached."""
    if name == CUDA_TRITON:
        from . import triton_int4

        return triton_int4.dequant_t(packed, scales_and_zeros, group_size, dtype)
    codes_t = int4pack_codes(name, packed, in_features).t()  # (in, N)
    sz = scales_and_zeros.to(dtype).repeat_interleave(group_size, dim=0)  # (in, N, 2)
    return (codes_t.to(dtype) - 8) * sz[..., 0] + sz[..., 1]


@functools.lru_cache(maxsize=None)
def cuda_layout_ok(device_index: int) -> bool:
    """Probe once per GPU that cuda_tinygemm_codes inverts this torch build's tinygemm converter."""
    dev = torch.device("cuda", device_index)
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(0, 16, (64, 256), generator=gen, dtype=torch.uint8).to(dev)
    ok = torch.equal(cuda_tinygemm_codes(pack_int4(CUDA_TINYGEMM, w, dev), 256), w)
    if not ok:
        logger.warning(
            "torch CUDA tinygemm layout differs from the hand-written one: dense prefill off, reference unpacks by probe"
        )
    return ok


# ---------------------------------------------------------------- int8 per-channel (the quantized lm_head)

# aten._weight_int8pack_mm on CPU reads K in blocks of 16: with other K it returned wrong values or crashed
# (torch 2.13, measured), so the kernel runs only where in_features % INT8_K_MULTIPLE == 0.
INT8_K_MULTIPLE = 16


def quantize_int8_per_channel(weight: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """Symmetric int8, one scale per output row: (codes int8 (out, in) in [-127, 127], scales float32 (out,)).

    scale = max|row| / 127 (an all-zero row gets scale 1 so its codes stay 0); weight ~= codes * scale[:, None].
    """
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def has_cpu_int8_mm() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_mm_fast_ok(x2d: torch.Tensor, in_features: int) -> bool:
    """Whether `int8_linear` may use aten._weight_int8pack_mm for this input (CPU, a float dtype, K % 16 == 0)."""
    return (
        x2d.device.type == "cpu"
        and x2d.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and in_features % INT8_K_MULTIPLE == 0
        and has_cpu_int8_mm()
    )


def int8_linear_reference(x2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch y = x @ (codes * scales[:, None]).T in float32, cast to x's dtype: the parity reference."""
    return ((x2d.float() @ codes.float().t()) * scales.float()).to(x2d.dtype)


def int8_linear(x2d: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = x @ (codes * scales[:, None]).T in x's dtype. x2d (N, in), codes int8 (out, in), scales (out,).

    CPU: aten._weight_int8pack_mm (x's dtype activations, int8 weights, per-row scales in x's dtype) when
    `int8_mm_fast_ok`; elsewhere the rows are dequantized to x's dtype and multiplied densely. One row under
    torch.compile: a dequantize-and-reduce expression that inductor fuses into one loop streaming the codes
    (faster than the library kernel at one row; eager it would materialize the float codes, so never eager).
    """
    if x2d.shape[0] == 1 and x2d.device.type == "cpu" and torch.compiler.is_compiling():
        y = (codes.to(torch.float32) * x2d.to(torch.float32)).sum(-1) * scales.to(torch.float32)  # (out,)
        return y[None].to(x2d.dtype)
    if int8_mm_fast_ok(x2d, codes.shape[1]):
        return torch.ops.aten._weight_int8pack_mm(x2d.contiguous(), codes, scales.to(x2d.dtype))
    return torch.nn.functional.linear(x2d, codes.to(x2d.dtype)) * scales.to(x2d.dtype)
