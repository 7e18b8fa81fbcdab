"""Checkpoint inspection, footprint prediction, device resolution, heap trimming and `load_runner`.

load_runner: config.json -> arch table -> build the transformer on the meta device -> open the safetensors
shards with mmap (safe_open) -> create each linear (dense, or QuantLinear from the format named in the
checkpoint's own config) -> fuse qkv and gate/up -> assign -> allocate the KV cache once -> Runner.
An architecture without a table runs through the transformers fallback runner at batch 1 (logged).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .arch import ArchSpec, Dims, UnsupportedArchError, find_arch
from .formats import QuantConfig, UnsupportedFormatError, read_quant_config, safetensors_header
from .heap import keep_workspace_heap, release_freed_heap
from .kv_cache import KV_CACHE_DTYPES, KVCache
from .model import DenseLinear, Transformer, fuse_linears
from .tokenizer import config_eos_token_ids

logger = logging.getLogger(__name__)

# load-time options for a dense lm_head: "bf16" keeps it in the model dtype; "int8" quantizes it per output row;
# "int4" to 4-bit groups of HEAD_INT4_GROUP_SIZE (round to nearest with a clipping search, the int4 kernel)
# "auto": int8 where its CPU kernel runs (see resolve_lm_head), else bf16
LM_HEAD_DTYPES = ("auto", "bf16", "int8", "int4")
HEAD_INT4_GROUP_SIZE = 32


def resolve_lm_head(lm_head: str, device: Union[str, torch.device], hidden: int) -> str:
    """The head option a load applies: "auto" is "int8" on CPU where aten._weight_int8pack_mm takes the shape
    (perplexity +0.18%, decode faster at batch 1; docs/benchmarks.md), else "bf16" (on CUDA int8 would
    dequantize every step). Other values are returned as given."""
    if lm_head != "auto":
        return lm_head
    from .kernels import INT8_K_MULTIPLE, has_cpu_int8_mm

    cpu = torch.device(device).type == "cpu"
    return "int8" if cpu and hidden % INT8_K_MULTIPLE == 0 and has_cpu_int8_mm() else "bf16"


_ST_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint needs, from config.json and safetensors headers only (no tensor data read)."""

    model_dir: Path
    config: Dict[str, Any] = field(repr=False)
    arch: str  # our table name ("llama", "qwen2", "opt", ...) or the HF model_type if none
    fused: bool  # True when the fused runtime supports it (else: transformers fallback)
    qcfg: QuantConfig
    weight_bytes: int  # exact: sum of the header tensors' byte ranges (as stored)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    vocab: int
    hidden: int
    intermediate: int
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]] = field(repr=False, default_factory=dict)  # name -> (dtype, shape)


def _safetensors_files(model_dir: Path) -> List[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir} (only safetensors checkpoints are supported)")
    return files


def _load_config(model_dir: Path) -> Dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def inspect_checkpoint(model_dir: Union[str, Path]) -> CheckpointInfo:
    """Architecture, quantization format and exact weight bytes of a checkpoint, without reading tensors.

    Raises FileNotFoundError (no config.json or no *.safetensors), models.formats.CorruptCheckpointError (bad
    header) and models.formats.UnsupportedFormatError (a quantization format jetserve cannot run).
    """
    model_dir = Path(model_dir)
    cfg = _load_config(model_dir)
    qcfg = read_quant_config(model_dir)
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    weight_bytes = 0
    for f in _safetensors_files(model_dir):
        for name, t in safetensors_header(f).items():
            tensors[name] = (t["dtype"], tuple(t["shape"]))
            begin, end = t["data_offsets"]
            weight_bytes += end - begin
    spec = find_arch(cfg)
    dims: Optional[Dims] = None
    if spec is not None:
        try:
            dims = spec.parse_dims(cfg)
        except (UnsupportedArchError, KeyError) as e:
            logger.info("fused runtime cannot run %s: %s", model_dir, e)
            spec = None
    if dims is None:
        text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg  # multimodal: the LM part
        heads = int(text.get("num_attention_heads", 1))
        hidden = int(text.get("hidden_size", text.get("d_model", 0)))
        dims_kv = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
        n_layers = int(text.get("num_hidden_layers", text.get("n_layer", 0)))
        max_pos = int(text.get("max_position_embeddings", text.get("n_positions", 2048)))
        vocab = int(text.get("vocab_size", 0))
        inter = int(text.get("intermediate_size") or text.get("ffn_dim") or 4 * hidden)
    else:
        hidden, dims_kv, head_dim, n_layers = dims.hidden, dims.kv_heads, dims.head_dim, dims.layers
        max_pos, vocab, inter = dims.max_position, dims.vocab, dims.intermediate
    return CheckpointInfo(
        model_dir=model_dir,
        config=cfg,
        arch=spec.name if spec else str(cfg.get("model_type")),
        fused=spec is not None,
        qcfg=qcfg,
        weight_bytes=weight_bytes,
        num_layers=n_layers,
        num_kv_heads=dims_kv,
        head_dim=head_dim,
        max_position=max_pos,
        vocab=vocab,
        hidden=hidden,
        intermediate=inter,
        tensors=tensors,
    )


# ---------------------------------------------------------------- footprint prediction

# Fixed per-model runtime overhead not proportional to the shapes (tokenizer, allocator slack, small per-layer
# buffers). Calibrated by benchmarks/memory_prediction.py on SmolLM2-135M (CPU).
WORKSPACE_CONSTANT_BYTES = 16 * 1024**2
# CUDA: measured - predicted stayed at 30.0 +- 0.2 MB over (slots, max_seq) = (8, 2048), (4, 1024), (2, 512)
# on an H100 (SmolLM2-135M shape, torch 2.11) once cuBLAS workspaces and graph outputs were counted.
CUDA_CONSTANT_BYTES = 29 * 1024**2
# CPU, compiled decode (models.compile): RSS growth of warm-up with compile minus without, after
# `models.compile.prewarm` paid the process-wide part (about 230 MiB, once per process): 45-48 MiB for
# SmolLM2-135M with six layers per compiled call, about 20 MiB more with fifteen (from the on-disk cache; a
# first, cold compile keeps about 45 MiB more than that), torch 2.13, docs/benchmarks.md
COMPILE_CONSTANT_BYTES = 60 * 1024**2


@dataclass(frozen=True)
class Footprint:
    """Predicted bytes of one loaded model; the server's memory budget counts `total_bytes`."""

    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    max_batch_size: int
    max_seq: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.workspace_bytes

    def as_dict(self) -> Dict[str, int]:
        return {
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "workspace_bytes": self.workspace_bytes,
            "total_bytes": self.total_bytes,
        }


def _loaded_weight_bytes(info: CheckpointInfo, dtype: torch.dtype, w4a8: bool = False) -> int:
    """Bytes the loaded weights take: float tensors in `dtype`; 4-bit GPTQ/AWQ as half a byte a weight + bf16
    scale/zero pairs (int4pack), or + a float16 scale and a uint8 zero (`w4a8`)."""
    elem = torch.empty((), dtype=dtype).element_size()
    total = 0
    quant = info.qcfg.is_quantized
    for name, (dt, shape) in info.tensors.items():
        n = math.prod(shape)
        if quant and name.endswith(".qzeros"):
            continue  # folded into the scale/zero pairs below
        if quant and name.endswith(".scales"):
            if info.qcfg.bits == 4:
                total += 3 * n if w4a8 else 2 * n * elem  # fp16 scale + uint8 zero / (groups, out, 2) pairs
            else:
                total += n * elem + n  # scales + zero codes
        elif quant and name.endswith(".qweight"):
            total += n * 4 if info.qcfg.bits == 4 else n * 32 // info.qcfg.bits  # int4pack: same bytes; else codes
        elif quant and name.endswith(".g_idx"):
            # act-order: an int32 input permutation; a sequential g_idx is dropped at load
            total += n * 4 if info.qcfg.desc_act else 0
        elif dt in ("F32", "F16", "BF16", "F64"):
            total += n * elem
        else:
            total += n * _ST_DTYPE_BYTES.get(dt, 4)
    return total


def w8a8_head(device: Union[str, torch.device], cpu_int4: str, in_features: int) -> bool:
    """Whether an int8 head runs the W8A8 kernel: on CPU, where the int4 layers run W4A8 (same build), and where
    its activation blocks divide the input width."""
    from .kernels import CPU_W4A8, device_kernel
    from .w4a8 import ACT_BLOCK

    if torch.device(device).type != "cpu" or in_features % ACT_BLOCK:
        return False

    return device_kernel(torch.device("cpu"), cpu_int4=cpu_int4).name == CPU_W4A8


def _quantized_head_delta(info: CheckpointInfo, dtype: torch.dtype, lm_head: str, w8a8: bool = False) -> int:
    """Bytes `lm_head="int8"` / `"int4"` adds to the loaded weights. int8: codes + float32 scales per row; int4:
    the CPU int4pack layout (rows padded to kernels.CPU_N_BLOCK, half a byte per weight) + bf16 scale/zero pairs
    per group of HEAD_INT4_GROUP_SIZE. An untied dense head's `dtype` weight goes, a tied head keeps the
    embedding for the input lookup; a bias stays in `dtype`. 0 for "bf16" or a head the checkpoint quantized."""
    spec = find_arch(info.config) if info.fused else None
    if lm_head == "bf16" or spec is None or info.qcfg.lm_head or f"{spec.lm_head}.qweight" in info.tensors:
        return 0
    if lm_head == "int8":
        rows = -(-info.vocab // 16) * 16 if w8a8 else info.vocab  # W8A8 pads to blocks of 16 rows
        quant = rows * info.hidden + info.vocab * 4 + (rows * 4 if w8a8 else 0)  # + its per-block scale copy
    else:
        from .kernels import CPU_N_BLOCK

        rows = -(-info.vocab // CPU_N_BLOCK) * CPU_N_BLOCK
        quant = rows * info.hidden // 2 + (info.hidden // HEAD_INT4_GROUP_SIZE) * rows * 2 * 2
    dense = info.tensors.get(f"{spec.lm_head}.weight")
    if dense is None:
        return quant
    return quant - math.prod(dense[1]) * torch.empty((), dtype=dtype).element_size()


def workspace_bytes(info: CheckpointInfo, *, max_batch_size: int, prefill_chunk: int, dtype: torch.dtype) -> int:
    """Scratch the runner keeps or peaks at: float32 logits for a decode batch, a prefill chunk's activations
    (hidden states, q/k/v, attention output and the MLP's gate/up/act) and `WORKSPACE_CONSTANT_BYTES`."""
    elem = torch.empty((), dtype=dtype).element_size()
    logits = max_batch_size * info.vocab * 4
    act = prefill_chunk * (4 * info.hidden + 3 * info.intermediate) * elem
    return logits + act + WORKSPACE_CONSTANT_BYTES


def dense_prefill_bytes(
    info: CheckpointInfo, *, prefill_chunk: int, device: Union[str, torch.device] = "cpu", cpu_int4: str = "auto"
) -> int:
    """The bf16 weight a prefill chunk dequantizes for its largest 4-bit layer (fused gate+up, qkv or down) where
    the device's int4 plan multiplies dense from `dense_min_tokens` tokens on (models.kernels: CUDA, CPUs with
    AMX or AVX512-BF16, and the reference plan at every size): a per-call temporary, one alive at a time. 0 where
    prefill never goes dense."""
    if not (info.qcfg.is_quantized and info.qcfg.bits == 4 and info.fused):
        return 0
    from .kernels import REFERENCE, device_kernel

    plan = device_kernel(torch.device(device), cpu_int4=cpu_int4)
    if plan.dense_min_tokens is None or prefill_chunk < plan.dense_min_tokens:
        return 0
    qkv_out = info.hidden + 2 * info.num_kv_heads * info.head_dim
    largest = max(2 * info.intermediate * info.hidden, qkv_out * info.hidden, info.intermediate * info.hidden)
    return largest * (6 if plan.name == REFERENCE else 2)  # the reference: a float32 dequant, then its bf16 copy


def cublas_workspace_bytes(device: Union[str, torch.device]) -> int:
    """torch's default cuBLAS workspace per stream: CUBLAS_WORKSPACE_CONFIG ":SIZE_KiB:COUNT..." when set, else
    ":4096:8" (32 MiB) on sm90+ and ":4096:2:16:8" (8 MiB + 128 KiB) below."""
    cfg = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if not cfg:
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        cfg = ":4096:8" if major >= 9 else ":4096:2:16:8"
    nums = [int(x) for x in cfg.split(":") if x]
    return sum(size * 1024 * count for size, count in zip(nums[0::2], nums[1::2]))


def cuda_runtime_bytes(
    vocab: int, *, batch_buckets: Sequence[int], kv_buckets: Sequence[int], cublas_workspace: int, streams: int = 2
) -> int:
    """CUDA-only memory of a warmed-up runner: one cuBLAS workspace per stream that ran a matmul (the default
    stream and the graph-capture stream), the float32 logits output kept by every captured decode graph (one
    graph per batch bucket x kv bucket) and `CUDA_CONSTANT_BYTES`."""
    outputs = sum(batch_buckets) * len(kv_buckets) * vocab * 4
    return streams * cublas_workspace + outputs + CUDA_CONSTANT_BYTES


def predict_footprint(
    info: CheckpointInfo,
    *,
    max_batch_size: int,
    max_seq: int,
    dtype: torch.dtype = torch.bfloat16,
    prefill_chunk: int = 256,
    device: Union[str, torch.device] = "cpu",
    lm_head: str = "bf16",
    compile_decode: bool = False,
    cpu_int4: str = "auto",
    kv_cache_dtype: str = "auto",
) -> Footprint:
    """Memory `load_runner(info.model_dir, ..., lm_head=lm_head)` plus warmup will take, from config.json and
    headers only; `compile_decode` (on CPU) adds `COMPILE_CONSTANT_BYTES` of workspace, a dense prefill
    `dense_prefill_bytes`.

    weights: as loaded (float tensors in `dtype`; 4-bit GPTQ/AWQ in the CPU kernel's layout), checked
    against the runner's own tensors by the unit tests. KV cache: `KVCache.predict_bytes` (the scratch slot
    included). Workspace: `workspace_bytes`, plus `cuda_runtime_bytes` on a CUDA device; checked against the
    measured growth of the process (CPU) or of torch.cuda.memory_allocated by benchmarks/memory_prediction.py.
    """
    w4a8 = False
    if torch.device(device).type == "cpu" and info.qcfg.is_quantized and info.qcfg.bits == 4:
        from .kernels import CPU_W4A8, device_kernel

        w4a8 = device_kernel(torch.device("cpu"), cpu_int4=cpu_int4).name == CPU_W4A8
    weights = _loaded_weight_bytes(info, dtype, w4a8)
    weights += _quantized_head_delta(
        info, dtype, resolve_lm_head(lm_head, device, info.hidden), w8a8_head(device, cpu_int4, info.hidden)
    )
    kv = KVCache.predict_bytes(
        info.num_layers, max_batch_size, max_seq, info.num_kv_heads, info.head_dim, dtype, kv_cache_dtype
    )
    workspace = workspace_bytes(info, max_batch_size=max_batch_size, prefill_chunk=prefill_chunk, dtype=dtype)
    workspace += dense_prefill_bytes(info, prefill_chunk=prefill_chunk, device=device, cpu_int4=cpu_int4)
    if torch.device(device).type == "cuda":
        from .runner import batch_buckets, kv_buckets_cuda

        workspace += cuda_runtime_bytes(
            info.vocab,
            batch_buckets=batch_buckets(max_batch_size),
            kv_buckets=kv_buckets_cuda(max_seq),
            cublas_workspace=cublas_workspace_bytes(device),
        )
    elif compile_decode:
        workspace += COMPILE_CONSTANT_BYTES
    return Footprint(weights, kv, workspace, max_batch_size, max_seq)


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


def _make_linear(
    src: TensorSource,
    prefix: str,
    qcfg: QuantConfig,
    in_f: int,
    out_f: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    cpu_int4: str = "auto",
) -> nn.Module:
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

    return QuantLinear.from_tensors(src, prefix, qcfg, in_f, out_f, device=device, dtype=dtype, cpu_int4=cpu_int4)


def build_model(
    model_dir: Path,
    spec: ArchSpec,
    dims: Dims,
    qcfg: QuantConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    lm_head: str = "bf16",
    cpu_int4: str = "auto",
) -> Transformer:
    """Meta-device build, then every weight assigned from the mmap'd checkpoint.

    lm_head="int8" quantizes a dense head (tied or not) to `qlinear.Int8Linear`, "int4" to a 4-bit
    `QuantLinear` (`quantize_int4_rtn`, groups of HEAD_INT4_GROUP_SIZE); a tied embedding stays in
    `dtype` for the input lookup. A head the checkpoint quantized itself (GPTQ `"lm_head": true`) loads as a
    QuantLinear whatever `lm_head` says; one declared quantized but stored without `.qweight` raises
    UnsupportedFormatError. cpu_int4 picks the CPU int4 kernel (`kernels.CPU_INT4_CHOICES`).
    """
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
        return _make_linear(src, prefix, qcfg, in_f, out_f, device=device, dtype=dtype, cpu_int4=cpu_int4)

    model.embed = param(f"{spec.embed}.weight")
    if spec.pos_embed:
        model.pos_embed = param(f"{spec.pos_embed}.weight")
    for i, blk in enumerate(model.blocks):
        p = spec.layer.format(i=i)
        set_norm(blk.norm1, p + spec.input_norm)
        set_norm(blk.norm2, p + spec.post_norm)
        blk.qkv = fuse_linears(
            [lin(p + spec.q, h, dims.heads * d), lin(p + spec.k, h, kv * d), lin(p + spec.v, h, kv * d)]
        )
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
    if qcfg.lm_head:
        if f"{head}.qweight" not in src:
            raise UnsupportedFormatError(
                f'{model_dir}: quantization_config has "lm_head": true but the checkpoint has no '
                f"{head}.qweight (found {head}.weight: {f'{head}.weight' in src}); re-export the checkpoint"
            )
        from .qlinear import QuantLinear

        model.lm_head = QuantLinear.from_tensors(
            src, head, qcfg, h, dims.vocab, device=device, dtype=dtype, cpu_int4=cpu_int4
        )
        logger.info("%s: lm_head is %d-bit %s from the checkpoint", model_dir.name, qcfg.bits, qcfg.method)
    elif f"{head}.weight" in src or f"{head}.qweight" in src:
        model.lm_head = lin(head, h, dims.vocab)
    else:
        if not dims.tied_embeddings:
            logger.warning("%s: no %s weight in the checkpoint; tying it to the embedding", model_dir, head)
        model.lm_head = DenseLinear(model.embed.data)  # tied: shares the embedding storage
    if lm_head in ("int8", "int4") and isinstance(model.lm_head, DenseLinear):
        from .qlinear import Int8Linear, QuantLinear

        w, bias = model.lm_head.weight.data, None if model.lm_head.bias is None else model.lm_head.bias.data
        if lm_head == "int8":
            w8a8 = w8a8_head(device, cpu_int4, w.shape[1])
            model.lm_head = Int8Linear.from_dense(w, bias, w8a8=w8a8)
            what = "int8 per-channel, " + ("W8A8 kernel" if w8a8 else "int8pack kernel")
        else:
            model.lm_head = QuantLinear.from_dense(w, bias, group_size=HEAD_INT4_GROUP_SIZE, device=device, dtype=dtype)
            what = f"int4 g{HEAD_INT4_GROUP_SIZE}"
        logger.info(
            "%s: lm_head quantized to %s at load (%.1f MiB)", model_dir.name, what, model.lm_head.weight_bytes() / 2**20
        )
    elif lm_head != "bf16":
        logger.info("%s: lm_head=%s ignored: the checkpoint's head is already quantized", model_dir.name, lm_head)
    leftover = [
        n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t is not None and t.is_meta
    ]
    if leftover:
        raise ValueError(f"{model_dir}: weights not found in the checkpoint for {leftover[:5]}")
    return model


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """ "auto" -> cuda when torch sees a GPU, else cpu; any other name -> torch.device(name)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_runner(
    model_dir: Union[str, Path],
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_batch_size: int = 8,
    max_seq: int = 2048,
    trust_remote_code: bool = False,
    lm_head: str = "bf16",
    compile_cache_dir: Optional[Union[str, Path]] = None,
    cpu_int4: str = "auto",
    cpu_attention: str = "auto",
    cpu_fused: str = "auto",
    kv_cache_dtype: str = "auto",
):
    """A Runner for `model_dir`: the fused runtime for a supported architecture, else the transformers
    fallback at batch 1 (logged with a warning). Unsupported quantization formats raise
    `models.formats.UnsupportedFormatError` (never a silent fallback).

    lm_head: "bf16" keeps a dense head in `dtype`; "int8" / "int4" quantize it at load (see build_model); "auto"
    picks by device (`resolve_lm_head`). The transformers fallback ignores it (logged). Other values raise ValueError.
    compile_cache_dir: compile the decode step at `warmup()` (CPU; models.compile), caching it there; None: eager.
    cpu_int4: the CPU int4 kernel, one of `kernels.CPU_INT4_CHOICES` ("auto": W4A8 where it builds).
    cpu_attention: the CPU decode attention, one of `attention.CPU_ATTENTION_CHOICES` ("auto": the in-place
    kernel where it builds); CUDA always runs SDPA.
    cpu_fused: prefill's norms, RoPE and activation on CPU, one of `fused.CPU_FUSED_CHOICES` ("auto": the C++
    kernels where they build and the activations are bfloat16; "torch": torch's ops).
    kv_cache_dtype: one of `kv_cache.KV_CACHE_DTYPES` ("auto": the activation dtype; "int8": rows of int8 codes
    and a scale, half the bytes of bfloat16).
    """
    from .attention import CPU_ATTENTION_CHOICES, decode_attention_for
    from .fused import CPU_FUSED_CHOICES, cpu_fused_ops
    from .runner import Runner

    if cpu_attention not in CPU_ATTENTION_CHOICES:
        raise ValueError(f"cpu_attention must be one of {CPU_ATTENTION_CHOICES}, got {cpu_attention!r}")
    if cpu_fused not in CPU_FUSED_CHOICES:
        raise ValueError(f"cpu_fused must be one of {CPU_FUSED_CHOICES}, got {cpu_fused!r}")
    if lm_head not in LM_HEAD_DTYPES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_DTYPES}, got {lm_head!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    keep_workspace_heap()  # prefill's temporaries reuse heap pages instead of faulting in fresh ones
    model_dir = Path(model_dir)
    device = resolve_device(device)
    info = inspect_checkpoint(model_dir)
    cfg = info.config
    eos = config_eos_token_ids(model_dir)
    spec = find_arch(cfg) if info.fused else None
    if spec is None:
        from .hf_fallback import HFFallbackRunner

        logger.warning(
            "architecture %r (%s) has no fused implementation: running it through transformers at "
            "batch 1 (slower, max_batch_size=1)",
            info.arch,
            cfg.get("architectures"),
        )
        if lm_head not in ("bf16", "auto"):
            logger.warning("lm_head=%s is not applied by the transformers fallback", lm_head)
        if compile_cache_dir is not None:
            logger.warning("compiled decode is not applied by the transformers fallback")
        if cpu_attention == "inplace":
            logger.warning("cpu_attention=inplace is not applied by the transformers fallback")
        if cpu_fused == "fused":
            logger.warning("cpu_fused=fused is not applied by the transformers fallback")
        if kv_cache_dtype != "auto":
            logger.warning("kv_cache_dtype=%s is not applied by the transformers fallback", kv_cache_dtype)
        return HFFallbackRunner(
            model_dir,
            device=device,
            dtype=dtype,
            max_seq=max_seq,
            eos_token_ids=eos,
            trust_remote_code=trust_remote_code,
            info=info,
        )
    dims = spec.parse_dims(cfg)
    if spec.name == "mistral" and cfg.get("sliding_window") and max_seq > int(cfg["sliding_window"]):
        logger.warning("mistral sliding_window=%s < max_seq=%d: capping max_seq", cfg["sliding_window"], max_seq)
        max_seq = int(cfg["sliding_window"])
    head = resolve_lm_head(lm_head, device, dims.hidden)
    if head != lm_head:
        logger.info("%s: lm_head=%s -> %s on %s", model_dir.name, lm_head, head, device)
    model = build_model(model_dir, spec, dims, info.qcfg, device=device, dtype=dtype, lm_head=head, cpu_int4=cpu_int4)
    release_freed_heap()  # the unpack/repack temporaries of every layer
    if device.type == "cpu":
        model.decode_attention = decode_attention_for(cpu_attention, dims.heads, dims.kv_heads, dims.head_dim)[0]
        model.fused_ops = cpu_fused_ops(cpu_fused, dtype)[0]
    else:
        if cpu_attention == "inplace":
            logger.warning("cpu_attention=inplace applies on CPU only; %s runs SDPA", device)
        if cpu_fused == "fused":
            logger.warning("cpu_fused=fused applies on CPU only; %s runs torch's ops", device)
    model.init_rope(max_seq, device, dtype)
    cache = KVCache(
        dims.layers,
        max_batch_size,
        max_seq,
        dims.kv_heads,
        dims.head_dim,
        device=device,
        dtype=dtype,
        kv_dtype=kv_cache_dtype,
    )
    logger.info(
        "loaded %s (%s, %s %d-bit g%d) on %s: %d layers, %s KV cache %.1f MiB for %d slots x %d tokens",
        model_dir.name,
        spec.name,
        info.qcfg.method,
        info.qcfg.bits,
        info.qcfg.group_size,
        device,
        dims.layers,
        "int8" if cache.quantized else str(dtype).replace("torch.", ""),
        cache.nbytes() / 2**20,
        max_batch_size,
        max_seq,
    )
    return Runner(
        model,
        cache,
        device=device,
        dtype=dtype,
        eos_token_ids=eos,
        info=info,
        compile_cache_dir=None if compile_cache_dir is None else Path(compile_cache_dir),
    )
