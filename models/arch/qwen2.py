"""Qwen2 / Qwen2.5: the Llama block with biases on q, k and v."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict

from . import Dims
from .llama import _llama_like, llama_dims


def qwen2_dims(cfg: Dict[str, Any]) -> Dims:
    return replace(llama_dims(cfg), qkv_bias=True, mlp_bias=False)


QWEN2 = _llama_like("qwen2", ("qwen2",), True, qwen2_dims)
