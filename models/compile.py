"""Compiled decode on CPU: `torch.compile` (inductor) of the decode step, a group of layers at a time.

`Transformer.decode_layers` takes everything its layers differ by (their blocks, their KV tensors) as arguments,
so one compiled graph serves every group of `layer_group(n_layers)` consecutive layers: dynamo traces part of
the model (15 layers, half of SmolLM2's) instead of all of it, which bounds cold and warm start-up, and pays its
per-call cost (guards, wrappers) a few times a step instead of once per layer. When every layer has the same
structure (module types, tensor shapes and dtypes, settings; `layer_structure`), dynamo's guards on the blocks
are skipped: the weights are graph inputs and the structure is checked once here, so each call checks only the
activations and caches.
Each model compiles its own copy of the code (`_own_code`): dynamo keeps graphs, guards and its recompile limit
per code object, so two models in one process never share or crowd out each other's graphs. At batch 1 the final
norm and lm_head are a second compiled function, where an int8 head runs as one fused dequantize-and-reduce loop
(`kernels.int8_linear`). Inductor fuses the small ops between the matmuls (norms, RoPE, residual adds, the gated
activation, the mask) into generated C++ loops; the int4/int8/dense matmuls and attention stay library kernels,
called from a generated C++ wrapper (`cpp_wrapper`), so a compiled call runs without Python or the GIL inside it.
Shapes are dynamic where they vary (dynamo's automatic dynamic shapes): a dimension becomes symbolic once two
warm-up calls differ in it, i.e. the batch (batch 1 and batch >= 2 are two graphs) and, on the SDPA attention path,
the attention length; the caches and weights keep static shapes, so a call checks fewer guards (docs/benchmarks.md). `compile_decode` triggers every graph the engine uses during
warm-up, so serving never compiles.

The compiled artifacts are cached on disk (`cache_dir`, under the model store by default: inductor's FX graph
and AOT autograd caches), so a restart reuses them. Compilation needs a C++ compiler; without one, or when
compiling fails for any other reason, the runner keeps eager decode and the reason is logged (never silent).
CUDA keeps its CUDA graphs of the eager step (compiling there is not measured yet).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import os
import shutil
import time
import types
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
LAYER_GROUP = 15  # layers per compiled call (docs/benchmarks.md: fewer calls vs longer cold compiles)
# inductor's per-call shape and alignment asserts in the generated wrapper: the shapes are dynamo's, guarded.
# cpp_wrapper: the wrapper that calls a graph's kernels is C++ (one call per graph, kernels called without the
# GIL) instead of Python (docs/benchmarks.md, "C++ wrapper")
INDUCTOR_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "cpp_wrapper": True}
# the head keeps its final norm a buffer of its own: inlined, inductor recomputes it for every vocab row
HEAD_OPTIONS = dict(INDUCTOR_OPTIONS, realize_opcount_threshold=1)


def layer_group(n_layers: int, target: int = LAYER_GROUP) -> int:
    """Layers per compiled call: the divisor of `n_layers` nearest `target` (the smaller on a tie), so every
    call runs the same graph."""
    divisors = [d for d in range(1, n_layers + 1) if n_layers % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


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


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))  # _parameters, _buffers, _modules, hook dicts, training


def _describe(v) -> str:
    """A value's part of `layer_structure`: primitives, dtypes and containers of them by value, dataclasses by
    their fields; anything else (a tensor or object outside the module's parameters and buffers, which a graph
    would bake in as a constant) by identity, so that layers holding different ones never count as equal."""
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device, enum.Enum)):
        return repr(v)
    if isinstance(v, (tuple, list)):
        return f"{type(v).__name__}({', '.join(_describe(x) for x in v)})"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        fields = ", ".join(f"{f.name}={_describe(getattr(v, f.name))}" for f in dataclasses.fields(v))
        return f"{type(v).__qualname__}({fields})"
    return f"<{type(v).__qualname__} at {id(v):#x}>"


def layer_structure(block: torch.nn.Module) -> str:
    """Everything about a block that a compiled graph depends on besides its parameters' and buffers' values:
    module types, tensor shapes, strides, dtypes and devices, which buffers are None, and every other attribute
    (settings such as group size and kernel plan by value, other objects by identity; see `_describe`). Blocks
    with equal structure run the same graph correctly with their own weights. Checked once, at compile: blocks
    must not change structure afterwards."""
    parts = []
    for name, mod in block.named_modules():
        parts.append(f"{name}:{type(mod).__module__}.{type(mod).__qualname__}")
        for tname, t in itertools.chain(mod._parameters.items(), mod._buffers.items()):
            meta = None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)
            parts.append(f"{name}.{tname}={meta}")
        for k, v in sorted(vars(mod).items()):
            if k not in _MODULE_INTERNALS:
                parts.append(f"{name}.{k}={_describe(v)}")
        hooks = sorted(k for k in _MODULE_INTERNALS if k.endswith("hooks") and getattr(mod, k, None))
        if hooks:
            parts.append(f"{name}.hooks={hooks}")
    return "\n".join(parts)


def _skip_block_guards(entries) -> list:
    """guard_filter_fn for `Transformer.decode_layers`: drop the guards on its `blocks` argument (kept: the
    number of blocks, the activations, the caches and everything else)."""
    return [not e.name.startswith("blocks[") for e in entries]


def _own_code(fn: Callable) -> Callable:
    """`fn` (a function or bound method) running a copy of its code object, for one model's compiled graphs."""
    func = getattr(fn, "__func__", fn)
    copy = types.FunctionType(
        func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__, func.__closure__
    )
    copy.__kwdefaults__ = func.__kwdefaults__
    owner = getattr(fn, "__self__", None)
    return copy if owner is None else types.MethodType(copy, owner)


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
    """Install `model.compiled_decode` (compiled `decode_layers` and batch-1 `head`) and compile their graphs by calling
    `warm(batch, kv_len)` for every pair given (the caller runs one decode step there). Returns None on success;
    on any failure the model is left eager and the reason is returned (the caller logs it)."""
    from .model import CompiledDecode

    reason = compile_unavailable(next(model.parameters()).device)
    if reason is not None:
        return reason
    t0 = time.perf_counter()
    try:
        where = set_cache_dir(cache_dir)
        group = layer_group(len(model.blocks), LAYER_GROUP)
        uniform = len({layer_structure(b) for b in model.blocks}) == 1
        layer_options = dict(INDUCTOR_OPTIONS, guard_filter_fn=_skip_block_guards) if uniform else INDUCTOR_OPTIONS
        model.compiled_decode = CompiledDecode(
            layers=torch.compile(_own_code(model.decode_layers), dynamic=None, options=layer_options),
            head=torch.compile(_own_code(model.head), dynamic=False, options=HEAD_OPTIONS),
            group=group,
        )
        for b in batch_sizes:
            for n in kv_lens:
                warm(b, n)
    except Exception as e:  # inductor/codegen/compiler errors: eager still works
        model.compiled_decode = None
        return _failed(e)
    logger.info(
        "compiled decode (%d layers a call, %s): %d warm-up shapes in %.1f s (cache %s)",
        group,
        "one layer structure" if uniform else "layers differ in structure: block guards kept",
        len(batch_sizes) * len(kv_lens),
        time.perf_counter() - t0,
        where,
    )
    return None
