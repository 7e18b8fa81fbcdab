"""Checkpoint quantization formats: read the config, unpack/pack GPTQ, AWQ, compressed-tensors; torch int4 repack.

Everything here is a pure function of tensors (no modules, no devices chosen for you). The reference
semantics of every format is `dequantize(unpack_*(...))`: w[o, i] = scale[g(i), o] * (q[o, i] - zero[g(i), o]).

Layouts (int32 words, little-endian bit stream inside a word, values crossing words for 3-bit):
- GPTQ: qweight (in*bits/32, out) packs the *input* axis; qzeros (groups, out*bits/32) packs the output axis;
  scales (groups, out) fp16; g_idx (in,) int32 (act-order makes it non-monotonic).
  Checkpoint format "gptq" (v1) stores z-1 (GPTQModel subtracts a per-word constant for 2/4/8 bits and
  shifts each field for 3 bits); "gptq_v2" stores z.
- AWQ GEMM: qweight (in, out*bits/32) packs the *output* axis; 4-bit words use the interleave
  [0, 2, 4, 6, 1, 3, 5, 7]; qzeros (groups, out*bits/32) likewise; scales (groups, out).
- compressed-tensors "pack-quantized" (llm-compressor W4A16/W8A16): weight_packed (out, in*bits/32) packs the
  input axis; codes are the signed values + 2**(bits-1); weight_scale (out, groups); weight_zero_point
  (out*bits/32, groups) packed along out (asymmetric only, symmetric means zero = 2**(bits-1));
  weight_g_idx (in,) with actorder "group"; weight_shape (2,).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "UnsupportedFormatError",
    "QuantConfig",
    "QuantizedWeight",
    "read_quant_config",
    "parse_quant_config",
    "linear_tensor_names",
    "CorruptCheckpointError",
    "safetensors_header",
    "unpack_gptq",
    "pack_gptq",
    "unpack_awq",
    "pack_awq",
    "unpack_compressed",
    "dequantize",
    "regroup",
    "act_order_perm",
    "int4_codes_grouped",
    "int4pack_scales_and_zeros",
    "SUPPORTED_BITS",
    "INT4PACK_GROUP_SIZES",
]

SUPPORTED_BITS = (2, 3, 4, 8)
# Group sizes the torch int4 kernels accept (tinygemm and the CPU kernel).
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # position j of a word holds logical column AWQ_ORDER[j]
_V1_WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


class UnsupportedFormatError(ValueError):
    """The checkpoint uses a quantization format jetserve cannot run; the message names what was found."""


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "gptq" | "awq" | "compressed_tensors" | "none"
    bits: int
    group_size: int  # -1: one group spanning all input features
    sym: bool
    desc_act: bool
    zero_point: bool
    checkpoint_format: str  # "gptq" (v1) | "gptq_v2" | "awq_gemm" | "pack_quantized" | "none"
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    lm_head: bool = False  # GPTQModel `"lm_head": true`: the checkpoint stores lm_head quantized too

    @property
    def is_quantized(self) -> bool:
        return self.method != "none"


NO_QUANT = QuantConfig("none", 16, -1, True, False, False, "none", {})


@dataclass
class QuantizedWeight:
    """Unpacked integer weights: the canonical in-memory form of every format.

    qweight (out, in) uint8 codes in [0, 2**bits); zeros (groups, out) uint8 codes; scales (groups, out)
    float; g_idx (in,) int32 group of each input column, or None for sequential groups of `group_size`.
    """

    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: Optional[torch.Tensor]
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    def group_index(self) -> torch.Tensor:
        """(in,) long: the group of each input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        gs = self.group_size if self.group_size > 0 else self.in_features
        return torch.arange(self.in_features, device=self.qweight.device) // gs


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def _load_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_quant_config(model_dir: Union[str, Path]) -> QuantConfig:
    """Read the quantization format from the checkpoint's own config files (never from file names).

    Looks at config.json `quantization_config`, then quantize_config.json, then quant_config.json.
    Returns a "none" config for an unquantized checkpoint. Raises UnsupportedFormatError naming what it
    found for anything we cannot run (EXL2, Marlin-packed, bitsandbytes, fp8, unsupported bits/groups ...).
    """
    model_dir = Path(model_dir)
    cfg = _load_json(model_dir / "config.json") or {}
    q = cfg.get("quantization_config")
    source = "config.json quantization_config"
    if q is None:
        for name in ("quantize_config.json", "quant_config.json"):
            q = _load_json(model_dir / name)
            if q is not None:
                source = name
                break
    if q is None:
        _reject_undeclared_quantization(model_dir)
        return NO_QUANT
    return parse_quant_config(q, source=f"{model_dir}/{source}")


# Tensor-name suffixes of quantized formats, for checkpoints that don't declare a quantization config.
_UNDECLARED_SIGNATURES = (
    ((".q_invperm", ".q_weight", ".q_scale_max"), "EXL2 tensors (q_weight/q_invperm)"),
    (
        (".weight.absmax", ".weight.quant_state.bitsandbytes__nf4", ".weight.quant_state.bitsandbytes__fp4", ".SCB"),
        "bitsandbytes tensors (absmax/quant_state/SCB)",
    ),
    ((".qweight", ".qzeros"), "GPTQ/AWQ-style tensors (qweight/qzeros)"),
    ((".weight_packed",), "compressed-tensors tensors (weight_packed)"),
    ((".weight_scale_inv",), "fp8 block-scaled tensors (weight_scale_inv)"),
)


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or malformed; the message names the file (never its full path)."""


# The safetensors format caps the JSON header at 100 MB.
_MAX_SAFETENSORS_HEADER = 100 * 1024**2


def safetensors_header(path: Union[str, Path]) -> Dict[str, Dict[str, Any]]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} from the JSON header of one .safetensors file.

    Reads no tensor data. `__metadata__` is left out. Raises CorruptCheckpointError when the header is unreadable
    or an entry lacks dtype/shape/data_offsets or points outside the file (truncated download).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CorruptCheckpointError(f"{path.name}: truncated safetensors file (no header length)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise CorruptCheckpointError(
                    f"{path.name}: corrupt safetensors header length {n} (file is {size} bytes)"
                )
            header = json.loads(f.read(n))
    except CorruptCheckpointError:
        raise
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptCheckpointError(f"{path.name}: unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path.name}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    tensors: Dict[str, Dict[str, Any]] = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = t["data_offsets"]
            ok = isinstance(t["dtype"], str) and isinstance(t["shape"], list)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{path.name}: tensor {name!r} lacks dtype, shape or data_offsets") from e
        if not ok:
            raise CorruptCheckpointError(f"{path.name}: tensor {name!r} has a malformed dtype or shape")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise CorruptCheckpointError(
                f"{path.name}: tensor {name!r} data {begin}..{end} lies outside the file "
                f"({data_len} data bytes): file truncated or corrupt"
            )
        tensors[name] = t
    return tensors


def _reject_undeclared_quantization(model_dir: Path) -> None:
    """A checkpoint without a quantization config must not hold quantized tensors: name them if it does."""
    for path in sorted(model_dir.glob("*.safetensors")):
        header = safetensors_header(path)
        for suffixes, what in _UNDECLARED_SIGNATURES:
            hit = next((k for k in header if k.endswith(suffixes)), None)
            if hit is not None:
                raise UnsupportedFormatError(
                    f"{model_dir} declares no quantization_config but {path.name} holds {what}, e.g. {hit!r}; "
                    f"jetserve reads the format only from the checkpoint's config"
                )
        fp8 = next((k for k, v in header.items() if v["dtype"].startswith("F8")), None)
        if fp8 is not None:
            raise UnsupportedFormatError(
                f"{model_dir}: {path.name} holds fp8 tensors (e.g. {fp8!r}) and no "
                f"quantization_config; fp8 checkpoints are not supported"
            )


def _bool(v: Any, default: bool) -> bool:
    return default if v is None else bool(v)


def parse_quant_config(q: Dict[str, Any], source: str = "quantization_config") -> QuantConfig:
    """Validate one quantization config dict (the contents of `quantization_config`)."""
    if not isinstance(q, dict):
        raise UnsupportedFormatError(f"{source}: expected a JSON object, found {type(q).__name__}")
    method = str(q.get("quant_method") or q.get("method") or "").lower().replace("-", "_")
    fmt = str(q.get("checkpoint_format") or q.get("format") or q.get("version") or "").lower()

    def bad(what: str) -> UnsupportedFormatError:
        return UnsupportedFormatError(
            f"unsupported quantization in {source}: {what}. jetserve runs GPTQ (v1/v2, 2/3/4/8-bit) and "
            f"AWQ GEMM (2/3/4/8-bit) checkpoints."
        )

    if method in ("exl2", "exl3") or "exl2" in fmt or "exl3" in fmt:
        raise bad(f"EXL2/EXL3 (quant_method={method!r}, format={fmt!r})")
    if q.get("is_marlin_format") or "marlin" in fmt or method == "marlin":
        raise bad(f"Marlin-packed weights (format={fmt!r}); re-export as plain GPTQ")
    if method in ("bitsandbytes", "bnb") or q.get("load_in_4bit") or q.get("load_in_8bit"):
        raise bad(f"bitsandbytes (quant_method={method!r})")
    if method in ("fp8", "fbgemm_fp8", "mxfp4", "nvfp4", "hqq", "quanto", "eetq", "aqlm", "gguf", "torchao"):
        raise bad(f"quant_method={method!r}")
    if method == "compressed_tensors":
        return _parse_compressed_tensors(q, bad)

    if method not in ("gptq", "awq"):
        raise bad(f"quant_method={method or None!r} (format={fmt or None!r})")

    bits = q.get("bits", q.get("w_bit"))
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise bad(f"{method.upper()} with bits={bits!r}")
    group_size = q.get("group_size", q.get("q_group_size", -1))
    if not isinstance(group_size, int) or not (group_size == -1 or (group_size > 0 and group_size % 16 == 0)):
        raise bad(f"{method.upper()} with group_size={group_size!r}")
    if q.get("dynamic"):
        raise bad(f"GPTQ `dynamic` per-module overrides ({list(q['dynamic'])[:3]}...)")

    if method == "gptq":
        if fmt in ("", "gptq"):
            ckpt = "gptq"
        elif fmt == "gptq_v2":
            ckpt = "gptq_v2"
        else:
            raise bad(f"GPTQ checkpoint_format={fmt!r}")
        pack_dtype = str(q.get("pack_dtype", "int32")).replace("torch.", "")
        if pack_dtype != "int32":
            raise bad(f"GPTQ pack_dtype={pack_dtype!r}")
        sym = _bool(q.get("sym"), True)
        return QuantConfig(
            "gptq",
            bits,
            group_size,
            sym,
            _bool(q.get("desc_act"), False),
            not sym,
            ckpt,
            dict(q),
            lm_head=_bool(q.get("lm_head"), False),
        )

    # AWQ
    if fmt not in ("", "gemm"):
        raise bad(f"AWQ version/format={fmt!r} (only GEMM)")
    zero_point = _bool(q.get("zero_point"), not _bool(q.get("sym"), False))
    if group_size == -1:
        raise bad("AWQ with group_size=-1")
    return QuantConfig("awq", bits, group_size, not zero_point, False, zero_point, "awq_gemm", dict(q))


def _parse_compressed_tensors(q: Dict[str, Any], bad) -> QuantConfig:
    """compressed-tensors: only weight-only "pack-quantized" int groups/channels applied to every Linear."""
    fmt = q.get("format")
    if fmt != "pack-quantized":
        raise bad(f"compressed-tensors format={fmt!r} (only pack-quantized weight-only int)")
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise bad(f"compressed-tensors with {len(groups)} config_groups (one needed)")
    grp = next(iter(groups.values()))
    w = grp.get("weights") or {}
    if grp.get("input_activations") or grp.get("output_activations"):
        raise bad("compressed-tensors activation quantization (only weight-only W*A16)")
    if sorted(grp.get("targets") or []) != ["Linear"]:
        raise bad(f"compressed-tensors targets={grp.get('targets')!r} (only ['Linear'])")
    extra_ignored = [n for n in (q.get("ignore") or []) if n not in ("lm_head", "re:.*lm_head")]
    if extra_ignored:
        raise bad(f"compressed-tensors ignore={extra_ignored[:3]!r} (only lm_head may stay dense)")
    if q.get("kv_cache_scheme"):
        raise bad("compressed-tensors kv_cache_scheme (quantized KV cache)")
    sparsity = q.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise bad(f"compressed-tensors sparsity format={sparsity.get('format')!r}")
    bits = w.get("num_bits")
    if w.get("type") != "int" or bits not in (2, 4, 8) or w.get("dynamic"):
        raise bad(f"compressed-tensors weights type={w.get('type')!r} num_bits={bits!r} dynamic={w.get('dynamic')!r}")
    strategy = w.get("strategy")
    if strategy == "group":
        group_size = w.get("group_size")
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 16:
            raise bad(f"compressed-tensors group_size={group_size!r}")
    elif strategy == "channel":
        group_size = -1
    else:
        raise bad(f"compressed-tensors strategy={strategy!r} (group or channel)")
    sym = bool(w.get("symmetric", True))
    actorder = w.get("actorder")
    if actorder not in (None, "group", "weight", "static", False):
        raise bad(f"compressed-tensors actorder={actorder!r}")
    return QuantConfig(
        "compressed_tensors", bits, group_size, sym, actorder == "group", not sym, "pack_quantized", dict(q)
    )


def linear_tensor_names(qcfg: QuantConfig, prefix: str, *, optional: bool = False) -> List[str]:
    """Names of the tensors of one linear layer at `prefix` (e.g. "model.layers.0.self_attn.q_proj").

    Required names only, unless `optional`: then also prefix.bias and (GPTQ) prefix.g_idx, which a loader
    should pass to QuantLinear.from_tensors whenever the checkpoint has them.
    """
    if qcfg.method == "none":
        names = [f"{prefix}.weight"]
    elif qcfg.method == "gptq":
        names = [f"{prefix}.qweight", f"{prefix}.qzeros", f"{prefix}.scales"]
        if qcfg.desc_act:
            names.append(f"{prefix}.g_idx")
        elif optional:
            names.append(f"{prefix}.g_idx")
    elif qcfg.method == "awq":
        names = [f"{prefix}.qweight", f"{prefix}.qzeros", f"{prefix}.scales"]
    elif qcfg.method == "compressed_tensors":
        names = [f"{prefix}.weight_packed", f"{prefix}.weight_scale", f"{prefix}.weight_shape"]
        if qcfg.zero_point:
            names.append(f"{prefix}.weight_zero_point")
        if qcfg.desc_act or optional:
            names.append(f"{prefix}.weight_g_idx")
    else:
        raise UnsupportedFormatError(f"unknown method {qcfg.method!r}")
    if optional:
        names.append(f"{prefix}.bias")
    return names


# ---------------------------------------------------------------------------------------------------------
# Bit streams: `bits`-wide codes packed little-endian into int32 words, 32 codes per `bits` words.
# ---------------------------------------------------------------------------------------------------------


def _pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dim of integer `values` (..., n) into int32 words (..., ceil(n*bits/32))."""
    n = values.shape[-1]
    blocks = math.ceil(n / 32)
    v = torch.zeros((*values.shape[:-1], blocks * 32), dtype=torch.int64, device=values.device)
    v[..., :n] = values.to(torch.int64) & ((1 << bits) - 1)
    v = v.view(*values.shape[:-1], blocks, 32)
    words = torch.zeros((*values.shape[:-1], blocks, bits), dtype=torch.int64, device=values.device)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        words[..., word] |= (v[..., i] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[..., word + 1] |= v[..., i] >> (32 - shift)
    words = words.reshape(*values.shape[:-1], blocks * bits)[..., : math.ceil(n * bits / 32)]
    return _to_int32(words)


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement wrap)."""
    w = words64 & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _unpack_rows(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack a stream packed along dim 0: int32 (w, n) -> uint8 (count, n) (GPTQ qweight)."""
    if 32 % bits:
        return _unpack_stream(words.t(), bits, count).t()
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32).view(1, -1, 1)
    codes = (words.unsqueeze(1) >> shifts).to(torch.uint8) & ((1 << bits) - 1)  # (w, per, n)
    return codes.reshape(-1, words.shape[1])[:count]


def _unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of _pack_stream: int32 (..., w) -> uint8 codes (..., count)."""
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # fields never cross words: one vectorized shift
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
        codes = (words.unsqueeze(-1) >> shifts).to(torch.uint8) & mask  # (..., w, per)
        return codes.reshape(*words.shape[:-1], words.shape[-1] * per)[..., :count]
    blocks = math.ceil(count / 32)
    w = torch.zeros((*words.shape[:-1], blocks * bits), dtype=torch.int64, device=words.device)
    w[..., : words.shape[-1]] = words.to(torch.int64) & 0xFFFFFFFF
    w = w.view(*words.shape[:-1], blocks, bits)
    codes = torch.empty((*words.shape[:-1], blocks, 32), dtype=torch.int64, device=words.device)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        val = w[..., word] >> shift
        if shift + bits > 32:
            val = val | (w[..., word + 1] << (32 - shift))
        codes[..., i] = val & mask
    return codes.reshape(*words.shape[:-1], blocks * 32)[..., :count].to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------------


def _gptq_v1_to_v2_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """v1 stores z-1; return unpacked true zeros (groups, out) uint8 (GPTQModel's exact inverse)."""
    if bits in _V1_WORD_OFFSET:  # per-word add, borrows included, as GPTQModel's v1<->v2 conversion does
        fixed = _to_int32(qzeros.to(torch.int64) + _V1_WORD_OFFSET[bits])
        return _unpack_stream(fixed, bits, out_features)
    z = _unpack_stream(qzeros, bits, out_features).to(torch.int16)
    return ((z + 1) & ((1 << bits) - 1)).to(torch.uint8)


def _v2_to_v1_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack true zeros (groups, out) into v1 qzeros words (GPTQModel's export)."""
    if bits in _V1_WORD_OFFSET:
        return _to_int32(_pack_stream(zeros, bits).to(torch.int64) - _V1_WORD_OFFSET[bits])
    return _pack_stream((zeros.to(torch.int16) - 1) & ((1 << bits) - 1), bits)


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bits: int,
    *,
    group_size: int = -1,
    checkpoint_format: str = "gptq",
    in_features: Optional[int] = None,
) -> QuantizedWeight:
    """GPTQ tensors -> QuantizedWeight. g_idx=None means sequential groups of `group_size`.

    g_idx equal to arange(in)//group_size is dropped (returned as None) so callers can tell act-order apart.
    """
    if bits not in SUPPORTED_BITS:
        raise UnsupportedFormatError(f"GPTQ bits={bits}")
    out_features = scales.shape[1]
    if in_features is None:
        in_features = g_idx.shape[0] if g_idx is not None else qweight.shape[0] * 32 // bits
    q = _unpack_rows(qweight, bits, in_features).t().contiguous()  # (in, out) -> (out, in)
    if checkpoint_format == "gptq":
        zeros = _gptq_v1_to_v2_qzeros(qzeros, bits, out_features)
    elif checkpoint_format == "gptq_v2":
        zeros = _unpack_stream(qzeros, bits, out_features)
    else:
        raise UnsupportedFormatError(f"GPTQ checkpoint_format={checkpoint_format!r}")
    groups = scales.shape[0]
    if group_size <= 0:
        group_size = in_features if groups == 1 else math.ceil(in_features / groups)
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32)
        seq = torch.arange(in_features, device=g_idx.device, dtype=torch.int32) // group_size
        if torch.equal(g_idx, seq):
            g_idx = None
    return QuantizedWeight(q, zeros, scales, g_idx, bits, group_size)


def pack_gptq(qw: QuantizedWeight, *, checkpoint_format: str = "gptq") -> Dict[str, torch.Tensor]:
    """QuantizedWeight -> AutoGPTQ/GPTQModel tensors {qweight, qzeros, scales (fp16), g_idx}."""
    qweight = _pack_stream(qw.qweight, qw.bits).t().contiguous()  # (out, in*bits/32) -> (in*bits/32, out)
    if checkpoint_format == "gptq":
        qzeros = _v2_to_v1_qzeros(qw.zeros, qw.bits)
    elif checkpoint_format == "gptq_v2":
        qzeros = _pack_stream(qw.zeros, qw.bits)
    else:
        raise ValueError(checkpoint_format)
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": qw.scales.to(torch.float16),
        "g_idx": qw.group_index().to(torch.int32),
    }


# ---------------------------------------------------------------------------------------------------------
# AWQ GEMM
# ---------------------------------------------------------------------------------------------------------


def _awq_interleave(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical column order -> AWQ storage order (4-bit only; other widths are stored in order)."""
    if bits != 4:
        return x
    return x.reshape(*x.shape[:-1], -1, 8)[..., list(AWQ_ORDER)].reshape(x.shape)


def _awq_deinterleave(x: torch.Tensor, bits: int) -> torch.Tensor:
    if bits != 4:
        return x
    inv = [AWQ_ORDER.index(j) for j in range(8)]  # [0, 4, 1, 5, 2, 6, 3, 7]
    return x.reshape(*x.shape[:-1], -1, 8)[..., inv].reshape(x.shape)


def unpack_awq(
    qweight: torch.Tensor, qzeros: Optional[torch.Tensor], scales: torch.Tensor, bits: int, *, group_size: int
) -> QuantizedWeight:
    """AWQ GEMM tensors -> QuantizedWeight. qzeros=None (no zero point) means zero = 2**(bits-1)."""
    if bits not in SUPPORTED_BITS:
        raise UnsupportedFormatError(f"AWQ bits={bits}")
    out_features = scales.shape[1]
    q = _awq_deinterleave(_unpack_stream(qweight, bits, _padded8(out_features, bits)), bits)[:, :out_features]
    if qzeros is None:
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8, device=scales.device)
    else:
        zeros = _awq_deinterleave(_unpack_stream(qzeros, bits, _padded8(out_features, bits)), bits)[:, :out_features]
    return QuantizedWeight(q.t().contiguous(), zeros.contiguous(), scales, None, bits, group_size)


def _padded8(n: int, bits: int) -> int:
    return (n + 7) // 8 * 8 if bits == 4 else n


def pack_awq(qw: QuantizedWeight) -> Dict[str, torch.Tensor]:
    """QuantizedWeight (sequential groups) -> AutoAWQ GEMM tensors {qweight, qzeros, scales (fp16)}."""
    if qw.g_idx is not None:
        raise ValueError("AWQ has no act-order")
    if qw.bits == 4 and qw.out_features % 8:
        raise ValueError("AWQ 4-bit needs out_features % 8 == 0")
    qweight = _pack_stream(_awq_interleave(qw.qweight.t().contiguous(), qw.bits), qw.bits)
    qzeros = _pack_stream(_awq_interleave(qw.zeros, qw.bits), qw.bits)
    return {"qweight": qweight, "qzeros": qzeros, "scales": qw.scales.to(torch.float16)}


# ---------------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized
# ---------------------------------------------------------------------------------------------------------


def unpack_compressed(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: Optional[torch.Tensor],
    weight_g_idx: Optional[torch.Tensor],
    bits: int,
    *,
    group_size: int,
    in_features: int,
) -> QuantizedWeight:
    """compressed-tensors pack-quantized tensors -> QuantizedWeight (zero_point None: symmetric)."""
    if bits not in (2, 4, 8):
        raise UnsupportedFormatError(f"compressed-tensors num_bits={bits}")
    out_features = weight_packed.shape[0]
    q = _unpack_stream(weight_packed, bits, in_features)  # (out, in): stored = signed + 2**(bits-1)
    scales = weight_scale.reshape(out_features, -1).t().contiguous()  # (groups, out)
    if weight_zero_point is None:
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8, device=scales.device)
    else:  # packed along out: (out*bits/32, groups)
        zeros = _unpack_stream(weight_zero_point.t().contiguous(), bits, out_features)  # (groups, out)
    if group_size <= 0:
        group_size = in_features
    g_idx = None
    if weight_g_idx is not None and not bool((weight_g_idx < 0).all()):
        g_idx = weight_g_idx.to(torch.int32)
        if torch.equal(g_idx, torch.arange(in_features, device=g_idx.device, dtype=torch.int32) // group_size):
            g_idx = None
    return QuantizedWeight(q, zeros, scales, g_idx, bits, group_size)


# ---------------------------------------------------------------------------------------------------------
# Reference dequantization and repack into torch int4 layouts
# ---------------------------------------------------------------------------------------------------------


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference: (out, in) weight = scale[g] * (q - zero[g]) computed in float32, returned as `dtype`."""
    g = qw.group_index()
    scales = qw.scales.float().t()[:, g]  # (out, in)
    zeros = qw.zeros.float().t()[:, g]
    return (scales * (qw.qweight.float() - zeros)).to(dtype)


def regroup(qw: QuantizedWeight, group_size: int) -> QuantizedWeight:
    """The same weight with sequential groups split into smaller ones (exact: scales/zeros repeated).

    Lets per-channel (group_size = in_features) or 512/1024-wide groups run on kernels that take 32..256.
    """
    if qw.g_idx is not None or qw.group_size % group_size or qw.in_features % group_size:
        raise ValueError(f"cannot regroup group_size={qw.group_size} (g_idx={qw.g_idx is not None}) to {group_size}")
    rep = qw.group_size // group_size
    return QuantizedWeight(
        qw.qweight,
        qw.zeros.repeat_interleave(rep, dim=0)[: qw.in_features // group_size],
        qw.scales.repeat_interleave(rep, dim=0)[: qw.in_features // group_size],
        None,
        qw.bits,
        group_size,
    )


def act_order_perm(qw: QuantizedWeight) -> Optional[torch.Tensor]:
    """Input permutation that makes groups contiguous: column j of the permuted weight is column perm[j].

    None when groups are already sequential. The permuted layer computes y = x[..., perm] @ W[:, perm].T.
    Raises when a group does not have exactly group_size members (cannot map onto contiguous groups).
    """
    if qw.g_idx is None:
        return None
    g = qw.g_idx.long()
    perm = torch.argsort(g, stable=True)
    counts = torch.bincount(g, minlength=qw.scales.shape[0])
    full = counts[:-1] if qw.in_features % qw.group_size else counts
    if bool((full != qw.group_size).any()):
        raise UnsupportedFormatError("act-order g_idx whose groups are not all of size group_size")
    return perm


def int4pack_scales_and_zeros(qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(groups, out, 2) [scale, (8 - z) * scale]: tinygemm computes w = (q - 8) * scale + zero."""
    s = qw.scales.float()
    z = (8.0 - qw.zeros.float()) * s
    return torch.stack([s, z], dim=-1).to(dtype).contiguous()


def int4_codes_grouped(qw: QuantizedWeight) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """4-bit codes (out, in) with groups contiguous along in, and the input permutation (None if sequential).

    What models.kernels.pack_int4 takes; the permuted layer computes y = x[..., perm] @ W[:, perm].T.
    """
    if qw.bits != 4:
        raise UnsupportedFormatError(f"int4 repack needs 4-bit weights, got {qw.bits}-bit")
    perm = act_order_perm(qw)
    q = qw.qweight if perm is None else qw.qweight[:, perm]
    return q.contiguous(), perm
