"""Checkpoint inspection, footprint prediction and `load_runner`.

load_runner: config.json -> arch table -> build the transformer on the meta device -> open the safetensors
shards with mmap (safe_open) -> create each linear (dense, or QuantLinear from the format named in the
checkpoint's own config) -> fuse qkv and gate/up -> assign -> allocate the KV cache once -> Runner.
An architecture without a table runs through the transformers fallback runner at batch 1 (logged).
"""
from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .arch import ArchSpec, Dims, UnsupportedArchError, find_arch
from .formats import QuantConfig, read_quant_config
from .kv_cache import KVCache
from .model import DenseLinear, Transformer, fuse_linears

logger = logging.getLogger(__name__)

_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint needs, from config.json and safetensors headers only (no tensor data read)."""
    model_dir: Path
    config: Dict[str, Any] = field(repr=False)
    arch: str                       # our table name ("llama", "qwen2", "opt", ...) or the HF model_type if none
    fused: bool                     # True when the fused runtime supports it (else: transformers fallback)
    qcfg: QuantConfig
    weight_bytes: int               # exact: sum over header tensors of dtype size * numel
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    vocab: int
    hidden: int
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]] = field(repr=False, default_factory=dict)  # name -> (dtype, shape)


@dataclass(frozen=True)
class Footprint:
    weights: int
    kv_cache: int
    workspace: int
    total: int


def _safetensors_files(model_dir: Path) -> List[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir} (only safetensors checkpoints are supported)")
    return files


def read_safetensors_header(path: Path) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from the JSON header of one .safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def _load_config(model_dir: Path) -> Dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def inspect_checkpoint(model_dir: Union[str, Path]) -> CheckpointInfo:
    """Architecture, quantization format and exact weight bytes of a checkpoint, without reading tensors."""
    model_dir = Path(model_dir)
    cfg = _load_config(model_dir)
    qcfg = read_quant_config(model_dir)
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    for f in _safetensors_files(model_dir):
        tensors.update(read_safetensors_header(f))
    weight_bytes = sum(_ST_DTYPE_BYTES.get(dt, 4) * math.prod(shape) for dt, shape in tensors.values())
    spec = find_arch(cfg)
    dims: Optional[Dims] = None
    if spec is not None:
        try:
            dims = spec.parse_dims(cfg)
        except (UnsupportedArchError, KeyError) as e:
            logger.info("fused runtime cannot run %s: %s", model_dir, e)
            spec = None
    if dims is None:
        heads = int(cfg.get("num_attention_heads", 1))
        hidden = int(cfg.get("hidden_size", cfg.get("d_model", 0)))
        dims_kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or (hidden // heads if heads else 0))
        n_layers = int(cfg.get("num_hidden_layers", cfg.get("n_layer", 0)))
        max_pos = int(cfg.get("max_position_embeddings", cfg.get("n_positions", 2048)))
        vocab = int(cfg.get("vocab_size", 0))
    else:
        hidden, dims_kv, head_dim, n_layers = dims.hidden, dims.kv_heads, dims.head_dim, dims.layers
        max_pos, vocab = dims.max_position, dims.vocab
    return CheckpointInfo(
        model_dir=model_dir, config=cfg, arch=spec.name if spec else str(cfg.get("model_type")),
        fused=spec is not None, qcfg=qcfg, weight_bytes=weight_bytes, num_layers=n_layers, num_kv_heads=dims_kv,
        head_dim=head_dim, max_position=max_pos, vocab=vocab, hidden=hidden, tensors=tensors)


def _loaded_weight_bytes(info: CheckpointInfo, dtype: torch.dtype) -> int:
    """Bytes the loaded weights take: float tensors in `dtype`; 4-bit GPTQ/AWQ as int4pack + bf16 scale/zero pairs."""
    elem = torch.empty((), dtype=dtype).element_size()
    total = 0
    quant = info.qcfg.is_quantized
    for name, (dt, shape) in info.tensors.items():
        n = math.prod(shape)
        if quant and name.endswith(".qzeros"):
            continue  # folded into the scale/zero pairs below
        if quant and name.endswith(".scales"):
            total += 2 * n * elem if info.qcfg.bits == 4 else n * elem + n  # (groups, out, 2) / scales + zero codes
        elif quant and name.endswith(".qweight"):
            total += n * 4 if info.qcfg.bits == 4 else n * 32 // info.qcfg.bits  # int4pack: same bytes; else uint8 codes
        elif quant and name.endswith(".g_idx"):
            total += n * 8  # input permutation (long) when act-order
        elif dt in ("F32", "F16", "BF16", "F64"):
            total += n * elem
        else:
            total += n * _ST_DTYPE_BYTES.get(dt, 4)
    return total


def predict_footprint(info: CheckpointInfo, *, max_slots: int, max_seq: int, dtype: torch.dtype = torch.bfloat16,
                      device: Union[str, torch.device] = "cpu") -> Footprint:
    """Memory a loaded runner will take: weights (as loaded), the static KV cache, and a workspace estimate.

    Workspace: rope tables, float32 logits for a full decode batch, and one 512-token prefill chunk's
    activations (qkv, MLP intermediate, last-token logits).
    """
    elem = torch.empty((), dtype=dtype).element_size()
    weights = _loaded_weight_bytes(info, dtype)
    kv = KVCache.predict_bytes(info.num_layers, max_slots, max_seq, info.num_kv_heads, info.head_dim, dtype)
    inter = int(info.config.get("intermediate_size", info.config.get("ffn_dim", 4 * info.hidden)))
    chunk = min(512, max_seq)
    workspace = (2 * max_seq * max(info.head_dim, 1) * elem                 # rope cos/sin
                 + 2 * max_slots * info.vocab * 4                           # decode logits (+ graph output)
                 + chunk * (3 * info.hidden + 2 * inter) * elem * 2         # prefill activations
                 + chunk * max_seq * 4 * 2)                                 # attention scores of one chunk
    return Footprint(weights, kv, workspace, weights + kv + workspace)


class TensorSource(Mapping):
    """name -> tensor across safetensors shards, read lazily through mmap'd safe_open handles."""

    def __init__(self, model_dir: Path, device: torch.device):
        from safetensors import safe_open

        self._handles = []
        self._where: Dict[str, Any] = {}
        dev = "cpu" if device.type == "cpu" else str(device)
        for f in _safetensors_files(model_dir):
            h = safe_open(str(f), framework="pt", device=dev)
            self._handles.append(h)
            for k in h.keys():
                self._where[k] = h

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._where[name].get_tensor(name)
        except KeyError:
            raise KeyError(f"checkpoint has no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _float(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # copy: no tensor keeps the checkpoint mmap alive, so its pages are not resident twice after the load
    return t.to(device=device, dtype=dtype, copy=True)


def _make_linear(src: TensorSource, prefix: str, qcfg: QuantConfig, in_f: int, out_f: int, *,
                 device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Dense linear when `prefix.weight` exists, else a QuantLinear in the checkpoint's declared format."""
    bias = src[f"{prefix}.bias"] if f"{prefix}.bias" in src else None
    if f"{prefix}.weight" in src:
        w = _float(src[f"{prefix}.weight"], device, dtype)
        if tuple(w.shape) != (out_f, in_f):
            raise ValueError(f"{prefix}.weight has shape {tuple(w.shape)}, expected {(out_f, in_f)}")
        return DenseLinear(w, None if bias is None else _float(bias, device, dtype))
    if not qcfg.is_quantized:
        raise KeyError(f"checkpoint has neither {prefix}.weight nor a quantization config")
    from .qlinear import QuantLinear

    return QuantLinear.from_tensors(src, prefix, qcfg, in_f, out_f, device=device, dtype=dtype)


def build_model(model_dir: Path, spec: ArchSpec, dims: Dims, qcfg: QuantConfig, *, device: torch.device,
                dtype: torch.dtype) -> Transformer:
    """Meta-device build, then every weight assigned from the mmap'd checkpoint."""
    with torch.device("meta"):
        model = Transformer(spec, dims)
    src = TensorSource(model_dir, device)
    h, kv, d, inter = dims.hidden, dims.kv_heads, dims.head_dim, dims.intermediate

    def param(name: str) -> nn.Parameter:
        return nn.Parameter(_float(src[name], device, dtype), requires_grad=False)

    def set_norm(norm, prefix: str) -> None:
        norm.weight = param(f"{prefix}.weight")
        if norm.bias is not None:
            norm.bias = param(f"{prefix}.bias")

    def lin(prefix: str, in_f: int, out_f: int) -> nn.Module:
        return _make_linear(src, prefix, qcfg, in_f, out_f, device=device, dtype=dtype)

    model.embed = param(f"{spec.embed}.weight")
    if spec.pos_embed:
        model.pos_embed = param(f"{spec.pos_embed}.weight")
    for i, blk in enumerate(model.blocks):
        p = spec.layer.format(i=i)
        set_norm(blk.norm1, p + spec.input_norm)
        set_norm(blk.norm2, p + spec.post_norm)
        blk.qkv = fuse_linears([lin(p + spec.q, h, dims.heads * d), lin(p + spec.k, h, kv * d),
                                lin(p + spec.v, h, kv * d)])
        blk.o = lin(p + spec.o, dims.heads * d, h)
        if spec.mlp == "gated_silu":
            gate, up, down = spec.mlp_names
            blk.up = fuse_linears([lin(p + gate, h, inter), lin(p + up, h, inter)])
            blk.down = lin(p + down, inter, h)
        else:
            fc1, fc2 = spec.mlp_names
            blk.up = lin(p + fc1, h, inter)
            blk.down = lin(p + fc2, inter, h)
    set_norm(model.final_norm, spec.final_norm)
    head = f"{spec.lm_head}"
    if f"{head}.weight" in src or f"{head}.qweight" in src:
        model.lm_head = lin(head, h, dims.vocab)
    else:
        if not dims.tied_embeddings:
            logger.warning("%s: no %s weight in the checkpoint; tying it to the embedding", model_dir, head)
        model.lm_head = DenseLinear(model.embed.data)  # tied: shares the embedding storage
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t is not None and t.is_meta]
    if leftover:
        raise ValueError(f"{model_dir}: weights not found in the checkpoint for {leftover[:5]}")
    return model


def _eos_ids(model_dir: Path, cfg: Dict[str, Any]) -> Tuple[int, ...]:
    ids: List[int] = []
    gen = model_dir / "generation_config.json"
    for source in ([json.loads(gen.read_text())] if gen.is_file() else []) + [cfg]:
        e = source.get("eos_token_id")
        if e is None:
            continue
        ids += [int(x) for x in (e if isinstance(e, list) else [e])]
    return tuple(dict.fromkeys(ids))


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def release_freed_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc `malloc_trim(0)`); False where libc has no malloc_trim.

    Loading frees tens of MiB of unpack/repack temporaries that glibc keeps in its arenas: resident and counted by
    the OS (on a Jetson, against the RAM the GPU shares) though no tensor uses them. On SmolLM2 GPTQ g64 the RSS
    growth of a load fell from 357-389 MiB (varying run to run) to 326 MiB against 331 MiB predicted.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is None:
        return False
    import gc

    gc.collect()
    trim(0)
    return True


def load_runner(model_dir: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                dtype: torch.dtype = torch.bfloat16, max_slots: int = 8, max_seq: int = 2048,
                trust_remote_code: bool = False):
    """A Runner for `model_dir`: the fused runtime for a supported architecture, else the transformers
    fallback at batch 1 (logged with a warning). Unsupported quantization formats raise
    `models.formats.UnsupportedFormatError` (never a silent fallback)."""
    from .runner import Runner

    model_dir = Path(model_dir)
    device = resolve_device(device)
    info = inspect_checkpoint(model_dir)
    cfg = info.config
    eos = _eos_ids(model_dir, cfg)
    spec = find_arch(cfg) if info.fused else None
    if spec is None:
        from .hf_fallback import HFFallbackRunner

        logger.warning("architecture %r (%s) has no fused implementation: running it through transformers at "
                       "batch 1 (slower, max_slots=1)", info.arch, cfg.get("architectures"))
        return HFFallbackRunner(model_dir, device=device, dtype=dtype, max_seq=max_seq, eos_token_ids=eos,
                                trust_remote_code=trust_remote_code, info=info)
    dims = spec.parse_dims(cfg)
    if spec.name == "mistral" and cfg.get("sliding_window") and max_seq > int(cfg["sliding_window"]):
        logger.warning("mistral sliding_window=%s < max_seq=%d: capping max_seq", cfg["sliding_window"], max_seq)
        max_seq = int(cfg["sliding_window"])
    model = build_model(model_dir, spec, dims, info.qcfg, device=device, dtype=dtype)
    release_freed_heap()  # the unpack/repack temporaries of every layer
    model.init_rope(max_seq, device, dtype)
    cache = KVCache(dims.layers, max_slots, max_seq, dims.kv_heads, dims.head_dim, device=device, dtype=dtype)
    logger.info("loaded %s (%s, %s %d-bit g%d) on %s: %d layers, KV cache %.1f MiB for %d slots x %d tokens",
                model_dir.name, spec.name, info.qcfg.method, info.qcfg.bits, info.qcfg.group_size, device,
                dims.layers, cache.nbytes() / 2**20, max_slots, max_seq)
    return Runner(model, cache, device=device, dtype=dtype, eos_token_ids=eos, info=info)
