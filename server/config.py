"""Settings: the one reader of the environment.

`Settings` is read once (CLI flags > `JETSERVE_*` environment > `.env` > defaults), frozen, and passed
down. Nothing else in jetserve reads `os.environ` for configuration.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, List, Literal, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEMO_MODEL = "smollm2-135m-instruct-gptq-g64"

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
}


def parse_memory_budget(value: str, total_bytes: int) -> int:
    """Parse "6GiB", "512MB", "123456" (bytes) or a fraction "0.75" / "75%" of `total_bytes`."""
    v = value.strip()
    if v.endswith("%"):
        return int(float(v[:-1]) / 100.0 * total_bytes)
    try:
        f = float(v)
        if 0.0 < f <= 1.0 and "." in v:
            return int(f * total_bytes)
    except ValueError:
        pass
    m = _SIZE_RE.match(v)
    if not m:
        raise ValueError(f"invalid memory size {value!r}: use bytes like '6GiB' or a fraction like '0.8'")
    unit = (m.group(2) or "").lower()
    if unit not in _UNITS:
        raise ValueError(f"invalid memory unit in {value!r}")
    return int(float(m.group(1)) * _UNITS[unit])


class Settings(BaseSettings):
    """Every knob of `jetserve serve`. Each field is a `--flag` and a `JETSERVE_<NAME>` variable."""

    model_config = SettingsConfigDict(env_prefix="JETSERVE_", env_file=".env", extra="ignore", frozen=True)

    model: str = Field(
        DEMO_MODEL,
        description="Model to serve by default: a name in the model store, an alias, or a path inside the store.",
    )
    model_store: Path = Field(Path("model-store"), description="Directory of models (each an HF folder).")
    models_config: Optional[Path] = Field(
        None,
        description="Optional YAML/JSON file with aliases and per-model settings (max_context, max_batch_size, pinned, keep_alive).",
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Activation dtype.")
    lm_head_dtype: Literal["auto", "bf16", "int8", "int4"] = Field(
        "auto",
        description="A dense lm_head kept in the activation dtype ('bf16') or quantized at load: 'int8' per output row (perplexity +0.18% on the demo), 'int4' in groups of 32 (round to nearest with a clipping search; perplexity +8%, opt-in only). 'auto': int8 on CPU where its kernel takes the shape, bf16 on CUDA. A tied head keeps its bf16 embedding for the input lookup, so RSS grows by the quantized copy (28 MiB for int8 on the demo). Figures: docs/benchmarks.md. A head the checkpoint quantized itself is used as stored.",
    )
    cpu_int4_kernel: Literal["auto", "w4a8", "int4pack"] = Field(
        "auto",
        description="CPU kernel for 4-bit GPTQ/AWQ layers. 'w4a8': jetserve's C++ kernel (models/csrc/w4a8.cpp; AVX-512 VNNI or AVX2, compiled on first use into $TORCH_EXTENSIONS_DIR), int4 weights times activations rounded to int8 per row and block of 8 inputs, exact integer sums (perplexity +0.04% over int4pack on the demo). 'int4pack': torch's _weight_int4pack_mm_for_cpu with bf16 activations. 'auto': w4a8 where it builds, else int4pack with the reason logged; asking for w4a8 where it cannot build is an error. The int8 lm_head follows: the same kernel's W8A8 path where the int4 layers run w4a8, else torch's _weight_int8pack_mm. Speed and perplexity: docs/benchmarks.md.",
    )
    cpu_attention_kernel: Literal["auto", "inplace", "sdpa"] = Field(
        "auto",
        description="CPU decode attention. 'inplace': jetserve's C++ kernel (models/csrc/decode_attention.cpp, built with the w4a8 kernel), where each sequence reads its own keys and values where they lie in the KV cache, exactly as many as its position. 'sdpa': copy the batch's cache slots out, then torch's scaled_dot_product_attention over a masked length bucket. 'auto': inplace where the C++ extension builds with AVX2 or AVX-512, else sdpa with the reason logged; asking for inplace where it cannot build is an error. CUDA always runs sdpa (inside its CUDA graphs). Speed: docs/benchmarks.md.",
    )
    cpu_fused_ops: Literal["auto", "fused", "torch"] = Field(
        "auto",
        description="CPU prefill's and eager decode's RMSNorm (with the residual add), RoPE and gated activation. 'fused': jetserve's C++ kernels (models/csrc/fused_ops.cpp, built with the w4a8 kernel), one pass over memory each, rounding where transformers' bfloat16 ops round. 'torch': torch's ops, several passes each. 'auto': fused where the C++ extension builds with AVX2 or AVX-512 and the activations are bfloat16, else torch with the reason logged; asking for fused where it cannot run is an error. Eager decode (compile_decode off) uses them too; the compiled decode graphs fuse these ops themselves. Speed: docs/benchmarks.md.",
    )
    kv_cache_dtype: Literal["auto", "int8"] = Field(
        "auto",
        description="Element type of the KV cache. 'auto': the activation dtype (bfloat16). 'int8': each position's key and value rows of every KV head as int8 codes with one float32 scale (max |x| / 127, round half to even): 0.53 of bfloat16's bytes at head_dim 64, so twice the tokens fit the same memory budget, and batched decode over long contexts reads half the memory. The CPU in-place attention reads it directly; elsewhere (sdpa, CUDA) it is dequantized on read. Prefill attends to the stored rows too, its own included, as decode does. On CPU (demo model, paired runs): perplexity +0.09% (the full protocol), prefill as fast, batch 1 at 0.93x (median of noisy pairs on an AMD EPYC) to 1.0x (an Intel Xeon), batch 8 up to 1.26-1.36x faster. Figures: docs/benchmarks.md.",
    )
    compile_decode: bool = Field(
        True,
        description="CPU: compile the decode step with torch.compile at load (one graph per fifteen layers, shared by all of them; 60-85 s cold on 2 cores, about 16 s from the on-disk cache); where no C++ compiler is found, or compiling fails, decode stays eager with a logged reason. Not applied on CUDA (CUDA graphs).",
    )
    compile_cache_dir: Optional[Path] = Field(
        None,
        description="On-disk cache of the compiled decode (default: .compile-cache in the model store). $TORCHINDUCTOR_CACHE_DIR, when set, wins.",
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="Concurrent sequences (KV slots) per model.")
    max_context: int = Field(
        2048, ge=16, description="Max tokens per sequence (prompt + generation); sizes the KV cache."
    )
    max_queue: int = Field(64, ge=0, description="Waiting requests per model before 429.")
    prefill_chunk: int = Field(256, ge=16, description="Prompt tokens prefilled per engine step (chunked prefill).")
    prefix_caching: bool = Field(
        True,
        description="Reuse the KV of a previous request's identical prompt prefix left in a free slot "
        "(off for the transformers fallback runner).",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Per-request wall-clock limit.")
    stream_interval_ms: float = Field(
        50.0,
        ge=0,
        le=1000,
        description="Hand a request's tokens to its stream at most this often (0: every engine step). A "
        "request's first token and its finish are never held; the tokens in between that arrive within the "
        "interval go out together (one SSE chunk). Slower than one token per interval, every token goes out "
        "at once; faster, this cuts the per-token serving work that competes with decoding for the CPU.",
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="On SIGTERM, time in-flight streams get to finish.")
    api_keys: Annotated[List[str], NoDecode] = Field(
        default_factory=list, description="Bearer API keys; empty means no auth. Repeatable flag."
    )
    admin_key: Optional[str] = Field(
        None, description="Key for /admin endpoints (load/unload). Admin endpoints are disabled without it."
    )
    metrics_require_key: bool = Field(False, description="Whether /metrics needs an API key.")
    memory_budget: str = Field(
        "0.8", description="Memory for models: bytes ('6GiB') or a fraction of total memory ('0.8')."
    )
    keep_alive_s: float = Field(
        0.0, ge=0, description="Unload an idle, unpinned model after this many seconds (0 = never)."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest accepted request body.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code (off unless set).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        # the environment gives the raw string (NoDecode): "k1,k2", '["k1","k2"]' or "" (no auth)
        if isinstance(v, str) and v.strip().startswith("["):
            return json.loads(v)
        if isinstance(v, str):
            return [k for k in (p.strip() for p in v.split(",")) if k]
        return v
