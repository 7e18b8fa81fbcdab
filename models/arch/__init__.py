"""Architectures as data: one small table per family, and a registry keyed by HF `model_type`.

`ArchSpec` names the checkpoint tensors and the structural choices (norm, MLP, biases, positions);
`Dims` holds the numbers read from one checkpoint's config.json. `models/model.py` builds a transformer
from the two; nothing else in the runtime knows about a family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class ArchSpec:
    """Names and structure of one family. Tensor names use `{i}` for the layer index."""

    name: str
    model_types: Tuple[str, ...]
    norm: str  # "rms" | "layer"
    mlp: str  # "gated_silu" (gate/up/down) | "relu" (fc1/fc2)
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    positions: str  # "rope" | "learned"
    embed: str
    final_norm: str
    lm_head: str
    layer: str  # prefix of one block, e.g. "model.layers.{i}."
    q: str
    k: str
    v: str
    o: str
    input_norm: str
    post_norm: str
    mlp_names: Tuple[str, ...]  # ("gate", "up", "down") names or ("fc1", "fc2") names, relative to `layer`
    pos_embed: Optional[str] = None
    pos_offset: int = 0  # OPT's learned positions start at index 2
    parse_dims: Callable[[Dict[str, Any]], "Dims"] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]


@dataclass(frozen=True)
class Dims:
    """Numbers of one checkpoint, from its config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_position: int
    norm_eps: float
    tied_embeddings: bool
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None  # None, or {"rope_type": "llama3"|"linear", ...}
    qkv_bias: Optional[bool] = None  # per-checkpoint override of the family default
    mlp_bias: Optional[bool] = None


def rope_params(cfg: Dict[str, Any]) -> Tuple[float, Optional[Dict[str, Any]]]:
    """(theta, scaling) from transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp and isinstance(rp["full_attention"], dict):
        rp = rp["full_attention"]
    if isinstance(rp, dict):
        theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = dict(rp)
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = kind
        if kind == "default":
            scaling = None
    return theta, scaling


def rope_inv_freq(dims: Dims) -> "Any":
    """Inverse frequencies (head_dim/2,) float32, with llama3 / linear scaling applied."""
    import torch

    d = dims.head_dim
    inv = 1.0 / (dims.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = dims.rope_scaling
    if sc is None:
        return inv.float()
    kind = sc["rope_type"]
    if kind == "linear":
        return (inv / float(sc["factor"])).float()
    if kind == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old_ctx = float(sc.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(is_mid, mid, scaled).float()
    raise UnsupportedArchError(f"rope scaling type {kind!r} is not supported by the fused runtime")


class UnsupportedArchError(ValueError):
    """The fused runtime cannot run this checkpoint (the loader then uses the transformers fallback)."""


from .llama import LLAMA, MISTRAL  # noqa: E402
from .opt import OPT  # noqa: E402
from .qwen2 import QWEN2  # noqa: E402

ARCHS: Tuple[ArchSpec, ...] = (LLAMA, MISTRAL, QWEN2, OPT)


def find_arch(config: Dict[str, Any]) -> Optional[ArchSpec]:
    """The spec for a config.json dict, or None when the fused runtime has no table for it."""
    mt = config.get("model_type")
    for spec in ARCHS:
        if mt in spec.model_types:
            return spec
    return None
