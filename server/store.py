"""Model store: names confined to one directory, an optional models config, and footprint prediction.

A model is an HF folder (config.json + *.safetensors + tokenizer files) directly or nested inside
`Settings.model_store`. Names are relative paths inside the store; `..`, absolute paths and symlinks that
resolve outside the store are rejected. The optional models config (`Settings.models_config`, YAML or
JSON) adds aliases and per-model settings:

```yaml
models:
  smollm2-135m-instruct-gptq-g64:
    aliases: [smollm2]
    max_context: 1024     # overrides Settings.max_context (sizes the KV cache)
    max_batch: 4          # overrides Settings.max_batch_size (KV slots)
    pinned: true          # never evicted
    keep_alive: 10m       # seconds or "30s"/"10m"/"1h"; 0 = never unload when idle
aliases:
  gpt-4o-mini: smollm2-135m-instruct-gptq-g64
```

Prediction (`predict_footprint`) reads only config.json and the safetensors headers (never tensor data):
weights = sum of tensor byte ranges in the headers; KV cache = layers x (slots + 1 scratch) x max_seq x kv_heads x head_dim
x 2 (K and V) x dtype size; workspace = decode logits (slots x vocab x 4, float32) + prefill scratch
(prefill_chunk x activations) + a fixed runtime constant, calibrated on SmolLM2 (see
`WORKSPACE_CONSTANT_BYTES` and benchmarks/memory_prediction.py); on CUDA also the cuBLAS workspaces and
the captured decode graphs' outputs (`cuda_runtime_bytes`).
"""
from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Fixed per-model runtime overhead not proportional to the shapes above (tokenizer, allocator slack,
# small per-layer buffers). Calibrated by benchmarks/memory_prediction.py on SmolLM2-135M (CPU).
WORKSPACE_CONSTANT_BYTES = 16 * 1024**2
# CUDA: measured - predicted stayed at 30.0 +- 0.2 MB over (slots, max_seq) = (8, 2048), (4, 1024), (2, 512)
# on an H100 (SmolLM2-135M shape, torch 2.11) once cuBLAS workspaces and graph outputs were counted.
CUDA_CONSTANT_BYTES = 29 * 1024**2


class ModelNotFoundError(LookupError):
    """The requested name is not a model in the store (or not allowed). Maps to HTTP 404."""


class ModelLoadError(RuntimeError):
    """The model exists but cannot be loaded (corrupt file, unsupported format...). Message says why."""


@dataclass(frozen=True)
class ModelSpec:
    """A model the store can serve, with its per-model settings (None = use Settings)."""

    name: str
    path: Path
    aliases: Tuple[str, ...] = ()
    max_context: Optional[int] = None
    max_batch: Optional[int] = None
    pinned: bool = False
    keep_alive_s: Optional[float] = None


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache and workspace sizes depend on (from config.json)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    quant_method: str = "none"


@dataclass(frozen=True)
class Footprint:
    """Predicted bytes of one loaded model."""

    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    max_slots: int
    max_seq: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.workspace_bytes

    def as_dict(self) -> Dict[str, int]:
        return {"weights_bytes": self.weights_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "workspace_bytes": self.workspace_bytes, "total_bytes": self.total_bytes}


# ---------------------------------------------------------------- safetensors headers

def safetensors_header(path: Path) -> Dict[str, Any]:
    """Parse the JSON header of one .safetensors file without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelLoadError(f"{path.name}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > min(size - 8, 100 * 1024**2):
                raise ModelLoadError(f"{path.name}: corrupt safetensors header length {n} (file is {size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path.name}: unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = t["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{path.name}: tensor {name!r} has no valid data_offsets") from e
        if not (0 <= begin <= end <= data_len):
            raise ModelLoadError(f"{path.name}: tensor {name!r} data {begin}..{end} lies outside the file "
                                 f"({data_len} data bytes): file truncated or corrupt")
    return header


def weight_bytes(model_dir: Path) -> int:
    """Sum of tensor byte sizes over every *.safetensors file of the folder (headers only)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir.name}: no *.safetensors files (only safetensors checkpoints are served)")
    total = 0
    for f in files:
        for name, t in safetensors_header(f).items():
            if name != "__metadata__":
                begin, end = t["data_offsets"]
                total += end - begin
    return total


# ---------------------------------------------------------------- config.json

def read_model_shape(model_dir: Path) -> ModelShape:
    """Shapes from config.json (nested `text_config` supported). Raises ModelLoadError when unusable."""
    cfg_path = model_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model_dir.name}: cannot read config.json: {e}") from e
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        vocab = int(text["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{model_dir.name}: config.json lacks {e} needed to size the KV cache") from e
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    inter = int(text.get("intermediate_size") or text.get("ffn_dim") or 4 * hidden)
    max_pos = int(text.get("max_position_embeddings") or 2048)
    q = cfg.get("quantization_config") or {}
    method = str(q.get("quant_method") or "none").lower() if isinstance(q, dict) else "none"
    return ModelShape(layers, kv_heads, head_dim, hidden, inter, vocab, max_pos, method)


def kv_cache_bytes(shape: ModelShape, *, max_slots: int, max_seq: int, dtype: str) -> int:
    """layers x (slots + 1) x max_seq x kv_heads x head_dim x 2 (K and V) x dtype size.

    The runner's cache has one scratch slot beyond `max_slots` for padded decode rows (models/kv_cache.py).
    """
    slots = max_slots + 1
    return shape.num_layers * slots * max_seq * shape.num_kv_heads * shape.head_dim * 2 * DTYPE_BYTES[dtype]


def workspace_bytes(shape: ModelShape, *, max_slots: int, prefill_chunk: int, dtype: str,
                    device_extra_bytes: int = 0) -> int:
    """Scratch the runner keeps or peaks at: float32 logits for a decode batch, a prefill chunk's activations,
    the fixed constant, plus `device_extra_bytes` (CUDA: see `cuda_runtime_bytes`)."""
    d = DTYPE_BYTES[dtype]
    logits = max_slots * shape.vocab_size * 4
    # prefill chunk: hidden states, q/k/v, attention output and the MLP's gate/up/act (T x width x dtype)
    act = prefill_chunk * (4 * shape.hidden_size + 3 * shape.intermediate_size) * d
    return logits + act + WORKSPACE_CONSTANT_BYTES + device_extra_bytes


def cuda_runtime_bytes(shape: ModelShape, *, batch_buckets: List[int], kv_buckets: List[int],
                       cublas_workspace: int, streams: int = 2) -> int:
    """CUDA-only memory of a warmed-up runner: one cuBLAS workspace per stream that ran a matmul (the default
    stream and the graph-capture stream) and the float32 logits output kept by every captured decode graph
    (one graph per batch bucket x kv bucket)."""
    outputs = sum(batch_buckets) * len(kv_buckets) * shape.vocab_size * 4
    return streams * cublas_workspace + outputs + CUDA_CONSTANT_BYTES


def predict_footprint(model_dir: Path, *, max_slots: int, max_seq: int, dtype: str,
                      prefill_chunk: int = 256, device_extra: Optional[Callable[[ModelShape], int]] = None
                      ) -> Footprint:
    """Footprint of `model_dir` loaded with these settings, from config.json and safetensors headers only.
    `device_extra(shape)` adds device-specific runtime bytes (the manager passes the CUDA ones)."""
    shape = read_model_shape(model_dir)
    extra = int(device_extra(shape)) if device_extra is not None else 0
    return Footprint(
        weights_bytes=weight_bytes(model_dir),
        kv_cache_bytes=kv_cache_bytes(shape, max_slots=max_slots, max_seq=max_seq, dtype=dtype),
        workspace_bytes=workspace_bytes(shape, max_slots=max_slots, prefill_chunk=prefill_chunk, dtype=dtype,
                                        device_extra_bytes=extra),
        max_slots=max_slots,
        max_seq=max_seq,
    )


# ---------------------------------------------------------------- models config

_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: Union[str, int, float, None]) -> Optional[float]:
    """Seconds from 30, "30s", "10m", "1h" (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError(f"invalid duration {value!r}: use seconds or '30s', '10m', '1h'")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


def load_models_config(path: Path) -> Dict[str, Any]:
    """Read the models config file (JSON, or YAML when it ends in .yaml/.yml). Raises ValueError with the path."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"models config {path}: {e}") from e
    if str(path).endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ValueError(f"models config {path} is YAML but PyYAML is not installed (pip install pyyaml)") from e
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"models config {path}: top level must be a mapping with 'models' and/or 'aliases'")
    unknown = set(data) - {"models", "aliases"}
    if unknown:
        raise ValueError(f"models config {path}: unknown keys {sorted(unknown)}")
    return data


_ALLOWED_MODEL_KEYS = {"aliases", "max_context", "max_batch", "pinned", "keep_alive"}


class ModelStore:
    """Names -> confined folders, plus the models config. Read-only; cheap to call from the event loop."""

    def __init__(self, root: Path, models_config: Optional[Path] = None):
        self.root = Path(root)
        self._per_model: Dict[str, Dict[str, Any]] = {}
        self._aliases: Dict[str, str] = {}
        if models_config is not None:
            data = load_models_config(models_config)
            for name, opts in (data.get("models") or {}).items():
                opts = dict(opts or {})
                bad = set(opts) - _ALLOWED_MODEL_KEYS
                if bad:
                    raise ValueError(f"models config: model {name!r} has unknown keys {sorted(bad)}")
                opts["keep_alive"] = parse_duration(opts.get("keep_alive"))
                self._per_model[name] = opts
                for a in opts.get("aliases") or ():
                    self._aliases[str(a)] = name
            for a, target in (data.get("aliases") or {}).items():
                self._aliases[str(a)] = str(target)

    # -- names

    def _root_resolved(self) -> Path:
        return self.root.resolve()

    def _confined(self, name: str) -> Path:
        """The folder for `name`, or ModelNotFoundError when the name escapes the store or is no model."""
        if not name or "\x00" in name or "\\" in name or name.startswith("/") or Path(name).is_absolute():
            raise ModelNotFoundError(f"model {name!r} not found: names are paths relative to the model store")
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ModelNotFoundError(f"model {name!r} not found: '..', '.' and empty path parts are not allowed")
        root = self._root_resolved()
        try:
            path = (root / name).resolve()
            is_model = (path / "config.json").is_file()
        except OSError as e:  # e.g. ENAMETOOLONG for a 5000-character name: still just "not found"
            raise ModelNotFoundError(f"model {name[:200]!r} not found: {e.strerror or e}") from None
        if not path.is_relative_to(root) or path == root:
            raise ModelNotFoundError(f"model {name!r} not found: it resolves outside the model store")
        if not is_model:
            raise ModelNotFoundError(f"model {name!r} not found in the model store")
        return path

    def canonical_name(self, name: str) -> str:
        """Alias -> model name (one level), else the name itself."""
        return self._aliases.get(name, name)

    def resolve(self, name: str) -> ModelSpec:
        """ModelSpec for a name or alias; ModelNotFoundError when absent or outside the store."""
        canon = self.canonical_name(name)
        path = self._confined(canon)
        opts = self._per_model.get(canon, {})
        aliases = tuple(sorted(a for a, t in self._aliases.items() if t == canon))
        return ModelSpec(
            name=canon, path=path, aliases=aliases,
            max_context=opts.get("max_context"), max_batch=opts.get("max_batch"),
            pinned=bool(opts.get("pinned", False)), keep_alive_s=opts.get("keep_alive"),
        )

    def available(self) -> List[ModelSpec]:
        """Every model folder in the store (up to two levels deep, e.g. `org/model`), sorted by name."""
        root = self._root_resolved()
        if not root.is_dir():
            return []
        names: List[str] = []
        for cfg in list(root.glob("*/config.json")) + list(root.glob("*/*/config.json")):
            rel = cfg.parent.relative_to(root).as_posix()
            names.append(rel)
        specs = []
        for n in sorted(set(names)):
            try:
                specs.append(self.resolve(n))
            except ModelNotFoundError:
                logger.warning("skipping %s: it resolves outside the model store", n)
        return specs
