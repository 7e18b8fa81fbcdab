"""QuantLinear: a GPTQ/AWQ linear layer with a plain-PyTorch reference forward and a fast int4 path.

The fast path and its shape rules are chosen by models.kernels.select_kernel (logged once per device).
4-bit layers hold only torch's int4 layout + bf16 scales_and_zeros (+ an act-order input permutation);
other layers hold the unpacked codes and dequantize per call (the reference path).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import kernels
from .formats import (
    QuantConfig,
    QuantizedWeight,
    UnsupportedFormatError,
    dequantize,
    int4_codes_grouped,
    int4pack_scales_and_zeros,
    regroup,
    unpack_awq,
    unpack_compressed,
    unpack_gptq,
)

logger = logging.getLogger(__name__)


def unpack_linear(
    tensors: Dict[str, torch.Tensor], prefix: str, qcfg: QuantConfig, in_features: int, out_features: int
) -> QuantizedWeight:
    """Read one quantized linear's checkpoint tensors into a QuantizedWeight (validating shapes)."""

    def get(name: str, required: bool = True) -> Optional[torch.Tensor]:
        key = f"{prefix}.{name}"
        if key in tensors:
            return tensors[key]
        if required:
            raise UnsupportedFormatError(f"{qcfg.method.upper()} checkpoint lacks tensor {key!r}")
        return None

    if qcfg.method == "gptq":
        qw = unpack_gptq(
            get("qweight"),
            get("qzeros"),
            get("scales"),
            get("g_idx", required=False),
            qcfg.bits,
            group_size=qcfg.group_size,
            checkpoint_format=qcfg.checkpoint_format,
            in_features=in_features,
        )
    elif qcfg.method == "awq":
        qw = unpack_awq(
            get("qweight"),
            get("qzeros", required=qcfg.zero_point),
            get("scales"),
            qcfg.bits,
            group_size=qcfg.group_size,
        )
    elif qcfg.method == "compressed_tensors":
        shape = get("weight_shape", required=False)
        if shape is not None and tuple(int(v) for v in shape) != (out_features, in_features):
            raise UnsupportedFormatError(
                f"{prefix}: weight_shape {shape.tolist()}, expected [{out_features}, {in_features}]"
            )
        qw = unpack_compressed(
            get("weight_packed"),
            get("weight_scale"),
            get("weight_zero_point", required=qcfg.zero_point),
            get("weight_g_idx", required=False),
            qcfg.bits,
            group_size=qcfg.group_size,
            in_features=in_features,
        )
    else:
        raise UnsupportedFormatError(f"QuantLinear needs a quantized config, got method={qcfg.method!r}")
    if tuple(qw.qweight.shape) != (out_features, in_features):
        raise UnsupportedFormatError(
            f"{prefix}: unpacked weight is {tuple(qw.qweight.shape)}, expected ({out_features}, {in_features})"
        )
    groups = -(-in_features // qw.group_size)
    if tuple(qw.scales.shape) != (groups, out_features):
        raise UnsupportedFormatError(f"{prefix}: scales {tuple(qw.scales.shape)}, expected ({groups}, {out_features})")
    return qw


def _int4_friendly_groups(qw: QuantizedWeight) -> QuantizedWeight:
    """4-bit sequential groups the int4 kernels can't take split exactly into ones they can: per-channel,
    512/1024-wide, or a partial last group (in_features 576 with group_size 128 -> 9 groups of 64)."""
    if qw.bits != 4 or qw.g_idx is not None:
        return qw
    if qw.group_size in kernels.INT4_GROUP_SIZES and qw.in_features % qw.group_size == 0:
        return qw
    for g in sorted(kernels.INT4_GROUP_SIZES, reverse=True):
        if qw.group_size % g == 0 and qw.in_features % g == 0:
            return regroup(qw, g)
    return qw


def repack_int4(qw: QuantizedWeight, kernel: str, device) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A 4-bit weight in the named int4 kernel's layout: (packed, scales_and_zeros (groups, out_padded, 2) bf16,
    input permutation or None). CPU_INT4PACK rows are padded with zeros to a multiple of CPU_N_BLOCK."""
    q, perm = int4_codes_grouped(qw)  # (out, in) codes, groups contiguous along in
    sz = int4pack_scales_and_zeros(qw)  # (groups, out, 2)
    if kernel == kernels.CPU_INT4PACK:
        pad = -qw.out_features % kernels.CPU_N_BLOCK
        if pad:  # zero rows; sliced off the output
            q = torch.cat([q, q.new_zeros(pad, q.shape[1])])
            sz = torch.cat([sz, sz.new_zeros(sz.shape[0], pad, 2)], dim=1)
    return kernels.pack_int4(kernel, q, device), sz, perm


# clipping ratios `quantize_int4_rtn` tries per group (1.0 = the group's own min/max)
RTN_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)


def quantize_int4_rtn(
    weight: torch.Tensor, group_size: int, clip_ratios: Sequence[float] = RTN_CLIP_RATIOS, rows_per_chunk: int = 4096
) -> QuantizedWeight:
    """Asymmetric round-to-nearest 4-bit quantization of a dense weight (out, in), sequential groups of
    `group_size` along in; for each group the range [min, max] scaled by the clipping ratio with the least
    squared error. weight ~= (codes - zeros) * scales per group (the GPTQ/AWQ convention of `dequantize`)."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    groups = in_f // group_size
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    zeros = torch.empty(groups, out_f, dtype=torch.uint8)
    scales = torch.empty(groups, out_f, dtype=torch.float32)
    for r0 in range(0, out_f, rows_per_chunk):
        w = weight[r0 : r0 + rows_per_chunk].float().reshape(-1, groups, group_size)  # (rows, groups, gs)
        lo, hi = w.amin(-1).clamp(max=0.0), w.amax(-1).clamp(min=0.0)
        best_err = best_q = best_s = best_z = None
        for ratio in clip_ratios:
            s = ((hi - lo) * ratio / 15.0).clamp_min(1e-10)
            z = torch.round(-lo * ratio / s).clamp(0, 15)
            q = torch.round(w / s[..., None] + z[..., None]).clamp(0, 15)
            err = ((q - z[..., None]) * s[..., None] - w).pow(2).sum(-1)  # (rows, groups)
            if best_err is None:
                best_err, best_q, best_s, best_z = err, q, s, z
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_q = torch.where(better[..., None], q, best_q)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        n = w.shape[0]
        codes[r0 : r0 + n] = best_q.reshape(n, in_f).to(torch.uint8)
        scales[:, r0 : r0 + n] = best_s.t()
        zeros[:, r0 : r0 + n] = best_z.t().to(torch.uint8)
    return QuantizedWeight(codes, zeros, scales, None, 4, group_size)


class QuantLinear(torch.nn.Module):
    """y = x @ W.T + b for a quantized W (out, in). x (..., in) -> (..., out) in the activation dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        plan: kernels.KernelPlan,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.plan = plan
        self.dtype = dtype
        self.split_sizes: List[int] = [out_features]  # output widths of the fused parts, in order
        self._reference: Optional[QuantizedWeight] = None
        # int4 op called straight from forward (decode is Python-overhead bound); None: general path
        self._w4a8 = plan.name == kernels.CPU_W4A8
        if self._w4a8:
            from . import w4a8

            ops = w4a8.load()[0]
            self._aten_int4 = ops.w4a8_mm.default
            self._w4a8_dequant = ops.w4a8_dequant.default
            self.act_block = w4a8.act_block(group_size)
            amx = plan.amx_min_tokens is not None and group_size in kernels.INT4_GROUP_SIZES
            self._amx = ops.w4_amx_mm.default if amx else None
        elif plan.name == kernels.CPU_INT4PACK:
            self._aten_int4 = torch.ops.aten._weight_int4pack_mm_for_cpu.default
        elif plan.name == kernels.CUDA_TINYGEMM:
            self._aten_int4 = torch.ops.aten._weight_int4pack_mm.default
        else:
            self._aten_int4 = None

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_tensors(
        cls,
        tensors: Dict[str, torch.Tensor],
        prefix: str,
        qcfg: QuantConfig,
        in_features: int,
        out_features: int,
        *,
        device,
        dtype: torch.dtype = torch.bfloat16,
        keep_reference: bool = False,
        cpu_int4: str = "auto",
    ) -> "QuantLinear":
        """Build from checkpoint tensors (name -> tensor, e.g. mmap'd safetensors); uses prefix.bias if present.

        keep_reference keeps the unpacked QuantizedWeight (CPU) so forward_reference uses the checkpoint's own
        fp16 scales rather than the bf16 ones the kernel holds (tests only). cpu_int4: kernels.CPU_INT4_CHOICES.
        """
        qw = unpack_linear(tensors, prefix, qcfg, in_features, out_features)
        bias = tensors.get(f"{prefix}.bias")
        return cls.from_quantized(
            qw, bias, device=device, dtype=dtype, keep_reference=keep_reference, cpu_int4=cpu_int4
        )

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: Optional[torch.Tensor] = None,
        *,
        device,
        dtype: torch.dtype = torch.bfloat16,
        keep_reference: bool = False,
        cuda_kernel: Optional[str] = None,
        cpu_int4: str = "auto",
    ) -> "QuantLinear":
        device = torch.device(device)
        qw = _int4_friendly_groups(qw)
        plan = kernels.select_kernel(
            device, qw.bits, qw.group_size, qw.in_features, qw.out_features, cuda_kernel, cpu_int4
        )
        w4a8_layout = None
        if plan.name == kernels.CPU_W4A8:
            from . import w4a8

            q, perm = int4_codes_grouped(qw)
            try:
                w4a8_layout = w4a8.pack(q, qw.scales, qw.zeros, qw.group_size) + (perm,)
            except ValueError as e:
                if cpu_int4 == "w4a8":
                    raise
                plan = kernels.select_kernel(
                    device, qw.bits, qw.group_size, qw.in_features, qw.out_features, None, "int4pack"
                )
                kernels.log_once("cpu", plan.name, f"W4A8 cannot take this layer ({e})")
        self = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size, plan, dtype)
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype))
        if plan.name == kernels.REFERENCE:
            self.register_buffer("qweight", qw.qweight.to(device))
            self.register_buffer("zeros", qw.zeros.to(device))
            self.register_buffer("scales", qw.scales.to(device=device, dtype=torch.float32))
            self.register_buffer("g_idx", None if qw.g_idx is None else qw.g_idx.to(device))
            return self
        if w4a8_layout is not None:
            packed, w4a8_scales, w4a8_zeros, perm = w4a8_layout
            self.register_buffer("packed", packed)
            self.register_buffer("w4a8_scales", w4a8_scales)
            self.register_buffer("w4a8_zeros", w4a8_zeros)
            self.register_buffer("perm", None if perm is None else perm.to(dtype=torch.int32))
            self.out_padded = packed.shape[0] * kernels.W4A8_N_BLOCK
            if keep_reference:
                self._reference = qw
            return self
        packed, sz, perm = repack_int4(qw, plan.name, device)
        self.register_buffer("packed", packed.to(device))
        self.register_buffer("scales_and_zeros", sz.to(device).contiguous())
        # int32 halves the bytes; index_select takes it
        self.register_buffer("perm", None if perm is None else perm.to(device=device, dtype=torch.int32))
        self.out_padded = sz.shape[1]
        if keep_reference:
            self._reference = qw
        return self

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        *,
        group_size: int,
        device,
        dtype: torch.dtype = torch.bfloat16,
    ) -> "QuantLinear":
        """A 4-bit layer from a dense weight (out, in), quantized at load by `quantize_int4_rtn` (the int4 lm_head).
        On CPU it runs torch's int4pack kernel: its float32 scales may leave float16's range (see w4a8.pack)."""
        qw = quantize_int4_rtn(weight, group_size)
        return cls.from_quantized(qw, bias, device=device, dtype=dtype, cpu_int4="int4pack")

    @classmethod
    def fuse(cls, parts: Sequence["QuantLinear"]) -> Optional["QuantLinear"]:
        """Concatenate layers sharing an input along the output dim (QKV, gate/up), or None if they can't be.

        Requires the same kernel, bits, group size, in_features, act-order permutation and device; for the
        CPU int4 layout each part's out_features must be a multiple of 64 (no padding rows inside).
        The fused layer's `split_sizes` lists the parts' widths.
        """
        first = parts[0]
        if len(parts) < 2:
            return None
        for p in parts:
            if (
                p.plan != first.plan
                or p.bits != first.bits
                or p.group_size != first.group_size
                or p.in_features != first.in_features
                or p.dtype != first.dtype
                or (p.bias is None) != (first.bias is None)
            ):
                return None
        name = first.plan.name
        if name == kernels.REFERENCE:
            if any(p.g_idx is not None for p in parts):
                if not all(p.g_idx is not None and torch.equal(p.g_idx, first.g_idx) for p in parts):
                    return None
        else:
            if first.packed.device != parts[-1].packed.device:
                return None
            if any(p.perm is not None for p in parts):
                if not all(p.perm is not None and torch.equal(p.perm, first.perm) for p in parts):
                    return None
            if name == kernels.CPU_INT4PACK and any(p.out_features % kernels.CPU_N_BLOCK for p in parts):
                return None
            if name == kernels.CPU_W4A8 and any(p.out_features % kernels.W4A8_N_BLOCK for p in parts):
                return None
        out = sum(p.out_features for p in parts)
        fused = cls(first.in_features, out, first.bits, first.group_size, first.plan, first.dtype)
        fused.split_sizes = [s for p in parts for s in p.split_sizes]
        fused.register_buffer("bias", None if first.bias is None else torch.cat([p.bias for p in parts]))
        if name == kernels.REFERENCE:
            fused.register_buffer("qweight", torch.cat([p.qweight for p in parts]))
            fused.register_buffer("zeros", torch.cat([p.zeros for p in parts], dim=1))
            fused.register_buffer("scales", torch.cat([p.scales for p in parts], dim=1))
            fused.register_buffer("g_idx", first.g_idx)
            return fused
        out_dim = 1 if name == kernels.CUDA_TRITON else 0  # (in/8, out) vs layouts blocked along out
        fused.register_buffer("packed", torch.cat([p.packed for p in parts], dim=out_dim))
        if name == kernels.CPU_W4A8:  # (out/16, ...) blocks
            fused.register_buffer("w4a8_scales", torch.cat([p.w4a8_scales for p in parts]))
            fused.register_buffer("w4a8_zeros", torch.cat([p.w4a8_zeros for p in parts]))
        else:
            fused.register_buffer("scales_and_zeros", torch.cat([p.scales_and_zeros for p in parts], dim=1))
        fused.register_buffer("perm", first.perm)
        fused.out_padded = out
        if all(p._reference is not None for p in parts):
            refs = [p._reference for p in parts]
            fused._reference = QuantizedWeight(
                torch.cat([r.qweight for r in refs]),
                torch.cat([r.zeros for r in refs], dim=1),
                torch.cat([r.scales for r in refs], dim=1),
                refs[0].g_idx,
                first.bits,
                first.group_size,
            )
        return fused

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out). int4 kernel unless the plan says dense from this many tokens on."""
        op = self._aten_int4
        x2d = x.reshape(-1, self.in_features)  # (M, in)
        dense_from = self.plan.dense_min_tokens
        if op is None or (dense_from is not None and x2d.shape[0] >= dense_from):
            return self._forward_general(x)
        bufs = self._buffers  # direct dict access: nn.Module.__getattr__ costs ~1 us per buffer
        perm = bufs["perm"]
        if perm is not None:
            x2d = x2d.index_select(-1, perm)
        if x2d.dtype != torch.bfloat16 and not (self._w4a8 and x2d.dtype == torch.float32):
            x2d = x2d.to(torch.bfloat16)
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        if self._w4a8:
            amx, amx_from = self._amx, self.plan.amx_min_tokens
            if amx is not None and amx_from is not None and x2d.shape[0] >= amx_from:
                y = amx(
                    x2d.to(torch.bfloat16), bufs["packed"], bufs["w4a8_scales"], bufs["w4a8_zeros"], self.group_size
                )
            else:
                y = op(x2d, bufs["packed"], bufs["w4a8_scales"], bufs["w4a8_zeros"], self.group_size, self.act_block)
        else:
            y = op(x2d, bufs["packed"], self.group_size, bufs["scales_and_zeros"])  # (M, out_padded)
        if self.out_padded != self.out_features:
            y = y[:, : self.out_features]
        if y.dtype != self.dtype:
            y = y.to(self.dtype)
        bias = bufs["bias"]
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _forward_general(self, x: torch.Tensor) -> torch.Tensor:
        """Every kernel and the dense-prefill switch, through models.kernels."""
        shape = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (M, in)
        m = x2d.shape[0]
        if self.plan.name == kernels.REFERENCE:
            y = x2d.to(self.dtype) @ self._dequant_reference().to(self.dtype).t()
        else:
            if self.perm is not None:
                x2d = x2d.index_select(-1, self.perm)
            x2d = x2d.to(torch.bfloat16).contiguous()
            dense_from = self.plan.dense_min_tokens
            if self._w4a8 and dense_from is not None and m >= dense_from:
                w = self._w4a8_dequant(self.packed, self.w4a8_scales, self.w4a8_zeros, self.group_size)  # (N', in)
                y = torch.nn.functional.linear(x2d, w)
            elif (
                self._w4a8
                and self._amx is not None
                and self.plan.amx_min_tokens is not None
                and m >= self.plan.amx_min_tokens
            ):
                y = self._amx(x2d, self.packed, self.w4a8_scales, self.w4a8_zeros, self.group_size)
            elif self._w4a8:
                y = self._aten_int4(
                    x2d, self.packed, self.w4a8_scales, self.w4a8_zeros, self.group_size, self.act_block
                )
            elif dense_from is not None and m >= dense_from:
                y = x2d @ kernels.dequant_t(
                    self.plan.name, self.packed, self.scales_and_zeros, self.group_size, self.in_features
                )
            else:
                y = kernels.int4_mm(self.plan.name, x2d, self.packed, self.group_size, self.scales_and_zeros)
            if self.out_padded != self.out_features:
                y = y[:, : self.out_features]
            y = y.to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain PyTorch: dequantize (float32), matmul in float32, return in x's dtype."""
        w = self.reference_weight()  # (out, in) float32
        y = x.float() @ w.to(x.device).t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def reference_weight(self) -> torch.Tensor:
        """The dequantized (out, in) float32 weight in the checkpoint's input order."""
        if self.plan.name == kernels.REFERENCE:
            return self._dequant_reference()
        if self._reference is not None:
            return dequantize(self._reference)
        if self._w4a8:
            from . import w4a8

            w = w4a8.dequantize(self.packed, self.w4a8_scales, self.w4a8_zeros)[: self.out_features]
            if self.perm is not None:
                w = torch.empty_like(w).index_copy_(1, self.perm.long(), w)
            return w
        codes = kernels.int4pack_codes(self.plan.name, self.packed, self.in_features)
        codes = codes[: self.out_features]  # (out, in)
        sz = self.scales_and_zeros[:, : self.out_features].float()  # (groups, out, 2)
        g = torch.arange(self.in_features, device=codes.device) // self.group_size
        w = (codes.float() - 8) * sz[g, :, 0].t() + sz[g, :, 1].t()  # grouped input order
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm.long(), w)
        return w

    def _dequant_reference(self) -> torch.Tensor:
        return dequantize(
            QuantizedWeight(self.qweight, self.zeros, self.scales, self.g_idx, self.bits, self.group_size)
        )

    def weight_bytes(self) -> int:
        """Bytes held by this layer's buffers (packed weights, scales, zeros, permutation, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, kernel={self.plan.name}, splits={self.split_sizes}"
        )


class Int8Linear(torch.nn.Module):
    """A dense linear quantized at load time to symmetric int8, one scale per output row (the `lm_head="int8"`
    option); forward_reference is the plain-PyTorch float32 product. The source weight is not kept.

    Two CPU kernels: `w8a8=False` holds the codes (out, in) for `kernels.int8_linear` (aten._weight_int8pack_mm,
    bf16 activations); `w8a8=True` holds them only in `w4a8.pack_int8`'s layout for the W8A8 op (activations
    rounded to int8 per row and block of `w4a8.head_act_block` inputs, exact int32 sums; models/csrc/w4a8.cpp)."""

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None, w8a8: bool = False
    ):
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2 or scales.shape != (codes.shape[0],):
            raise ValueError(
                f"Int8Linear needs int8 codes (out, in) and scales (out,), got {codes.dtype} "
                f"{tuple(codes.shape)} and {tuple(scales.shape)}"
            )
        self.out_features, self.in_features = codes.shape
        self.w8a8 = w8a8
        if w8a8:
            from . import w4a8

            ops, why = w4a8.load()
            if ops is None:
                raise RuntimeError(f"the W8A8 head needs the W4A8 kernel build: {why}")
            packed, block_scales = w4a8.pack_int8(codes, scales)
            self.register_buffer("w8a8_packed", packed)
            self.register_buffer("w8a8_scales", block_scales)
            self._op = ops.w8a8_mm.default
            self.act_block = w4a8.head_act_block(self.in_features)
            # from this many rows the AMX-INT8 twin (same results bit for bit; activation blocks of 64 only)
            amx_from = kernels.w4a8_amx_min_tokens(ops)
            self._amx, self.amx_min_tokens = None, None
            if amx_from is not None and self.act_block == 64:
                self._amx, self.amx_min_tokens = ops.w8_amx_mm.default, amx_from
        else:
            self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.float())
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        # the kernel takes scales in the activation dtype: one cast at load, not one per call
        self._scales_cast: Dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, w8a8: bool = False) -> "Int8Linear":
        codes, scales = kernels.quantize_int8_per_channel(weight)
        return cls(codes.to(weight.device), scales.to(weight.device), bias, w8a8=w8a8)

    def int8_codes(self) -> torch.Tensor:
        """The (out, in) int8 codes, whichever layout holds them."""
        if not self.w8a8:
            return self.codes
        blocks, quads, _ = self.w8a8_packed.shape
        c = self.w8a8_packed.reshape(blocks, quads, 16, 4).permute(0, 2, 1, 3)  # (block, col, quad, k in quad)
        c = c.reshape(blocks * 16, quads * 4)[: self.out_features]
        return (c.to(torch.int16) - 128).to(torch.int8)

    def _scales_for(self, dtype: torch.dtype) -> torch.Tensor:
        s = self._scales_cast.get(dtype)
        if s is None or s.device != self.scales.device:
            s = self._scales_cast[dtype] = self.scales.to(dtype)
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, False)

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` with float32 output (logits): the W8A8 kernel writes float32 itself, no cast of the output."""
        return self._forward(x, True)

    def _forward(self, x: torch.Tensor, float_out: bool) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.w8a8:
            xk = x2d if x2d.dtype in (torch.bfloat16, torch.float32) else x2d.to(torch.bfloat16)
            bufs = self._buffers
            amx = self._amx
            op = amx if amx is not None and xk.shape[0] >= self.amx_min_tokens else self._op
            y = op(xk.contiguous(), bufs["w8a8_packed"], bufs["w8a8_scales"], self.act_block, float_out)
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]
            y = y.to(torch.float32 if float_out else x2d.dtype)
        else:
            y = kernels.int8_linear(x2d, self.codes, self._scales_for(x2d.dtype))
            if float_out:
                y = y.float()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        y = kernels.int8_linear_reference(x2d, self.int8_codes(), self.scales)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers()) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        )

    def extra_repr(self) -> str:
        kernel = "W8A8" if self.w8a8 else "int8pack"
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, {kernel}"
