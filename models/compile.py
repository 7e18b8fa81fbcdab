"""Compiled decode on CPU: `torch.compile` (inductor) of one transformer layer's decode step.

`Transformer.decode_layer` takes everything a layer differs by (its block, its KV tensors) as arguments, so one
compiled graph serves all layers: dynamo traces one layer instead of the whole model, which keeps cold and
warm start-up short. Inductor fuses the small ops between the matmuls (norms, RoPE, residual adds, the gated
activation, the mask) into generated C++ loops; the int4/int8/dense matmuls and attention stay library
kernels. Shapes are dynamic: a handful of graphs (batch 1 and batch >= 2, by attention length bucket) cover
every shape the engine uses, and `compile_decode` triggers them all during warm-up, so serving never compiles.

The compiled artifacts are cached on disk (`cache_dir`, under the model store by default: inductor's FX graph
and AOT autograd caches), so a restart reuses them. Compilation needs a C++ compiler; without one, or when
compiling fails for any other reason, the runner keeps eager decode and the reason is logged (never silent).
CUDA keeps its CUDA graphs of the eager step (compiling there is not measured yet).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_unavailable(device: torch.device) -> Optional[str]:
    """Why decode cannot be compiled here (None when it can)."""
    if device.type != "cpu":
        return f"compiled decode is CPU-only; {device.type} uses its own decode path (CUDA graphs)"
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    cxx = os.environ.get("CXX")
    if not any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"]):
        return "no C++ compiler (g++, c++ or clang++ on PATH, or $CXX): inductor needs one on CPU"
    return None


def set_cache_dir(cache_dir: Optional[Path]) -> Path:
    """Point inductor's on-disk cache at `cache_dir` unless the operator set $TORCHINDUCTOR_CACHE_DIR (process
    wide: read when the first graph compiles). Returns the directory in use."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if cache_dir is None:
        raise ValueError("a compile cache directory is needed")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(cache_dir)
    return cache_dir


def _failed(e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"torch.compile failed ({type(e).__name__}: {first})"


def prewarm(cache_dir: Optional[Path]) -> Optional[str]:
    """Pay the process-wide, one-time cost of compiling (dynamo and inductor imports, the C++ toolchain check,
    about 230 MiB of RSS on CPU) by compiling a trivial function, so that a caller measuring a model's memory
    (the model manager) does not count it as that model's. Returns why compiling is unavailable, or None."""
    reason = compile_unavailable(torch.device("cpu"))
    if reason is not None:
        return reason
    try:
        set_cache_dir(cache_dir)
        fn = torch.compile(lambda x, n: (x * 2 + 1).sum() + n, dynamic=True)
        for n in (1, 2):
            fn(torch.ones(4 * n), n)
    except Exception as e:
        return _failed(e)
    return None


def compile_decode(
    model, warm: Callable[[int, int], None], batch_sizes: Sequence[int], kv_lens: Sequence[int], cache_dir: Path
) -> Optional[str]:
    """Install a compiled `decode_layer` on `model` and compile its graphs by calling `warm(batch, kv_len)` for
    every pair given (the caller runs one decode step there). Returns None on success; on any failure the model
    is left eager and the reason is returned (the caller logs it)."""
    reason = compile_unavailable(next(model.parameters()).device)
    if reason is not None:
        return reason
    t0 = time.perf_counter()
    try:
        where = set_cache_dir(cache_dir)
        model.decode_layer_fn = torch.compile(model.decode_layer, dynamic=True)
        for b in batch_sizes:
            for n in kv_lens:
                warm(b, n)
    except Exception as e:  # inductor/codegen/compiler errors: eager still works
        model.decode_layer_fn = None
        return _failed(e)
    logger.info(
        "compiled decode: %d warm-up shapes in %.1f s (cache %s)",
        len(batch_sizes) * len(kv_lens),
        time.perf_counter() - t0,
        where,
    )
    return None
