"""`jetserve eval`: evaluate models one after another in one process with the same text and settings.

`evaluate_models(model_dirs, cfg)` returns a JSON-able dict `{"protocol", "environment", "models": [...]}`;
`models.evaluate.report` turns it into Markdown tables and a PNG chart.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from models.evaluate.measure import PeakMemory, disk_bytes, measure_speed, release_memory, rss_bytes
from models.evaluate.perplexity import perplexity
from models.evaluate.runtimes import load_runtime
from models.loader import resolve_device
from models.quantize.calibration import resolve_text

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class EvalConfig:
    text: str = "wiki"
    ppl_tokens: int = 32768
    max_length: int = 2048
    stride: int = 512
    new_tokens: int = 256
    prompt_tokens: int = 16
    ttft_tokens: int = 512
    runs: int = 3
    warmup: int = 1
    runtime: str = "transformers"
    device: str = "auto"
    dtype: str = "bfloat16"
    threads: Optional[int] = None
    skip_ppl: bool = False
    skip_speed: bool = False
    lm_head: str = "bf16"  # jetserve runtime only: load_runner's lm_head option
    cpu_int4: str = "auto"  # jetserve runtime only: load_runner's cpu_int4 option
    cpu_fused: str = "auto"  # jetserve runtime only: load_runner's cpu_fused option
    kv_cache_dtype: str = "auto"  # jetserve runtime only: load_runner's kv_cache_dtype option


def quant_summary(model_dir: Path) -> Dict[str, Any]:
    """method/bits/group/sym from config.json's quantization_config (method "none" for fp models)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    q = cfg.get("quantization_config")
    if not q:
        return {"method": "none", "dtype": cfg.get("dtype") or cfg.get("torch_dtype")}
    out = {
        k: q.get(k)
        for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "zero_point", "checkpoint_format")
        if k in q
    }
    out["method"] = out.pop("quant_method", q.get("method"))
    rec = Path(model_dir) / "jetserve-quantize.json"
    if rec.is_file():
        r = json.loads(rec.read_text())
        out["jetserve_spec"] = r.get("spec")
        out["quantize_seconds"] = r.get("seconds")
    return out


def _tokenizer_key(model_dir: Path) -> str:
    f = Path(model_dir) / "tokenizer.json"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else str(model_dir)


def evaluate_models(
    model_dirs: List[Path], cfg: EvalConfig, store: Optional[Path] = None, echo: Callable[[str], None] = print
) -> Dict[str, Any]:
    from transformers import AutoTokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    text_path = resolve_text(cfg.text, store)
    text = text_path.read_text(encoding="utf-8", errors="replace")
    token_cache: Dict[str, List[int]] = {}
    protocol = {
        "text": cfg.text,
        "text_file": str(text_path),
        "ppl_tokens": cfg.ppl_tokens,
        "max_length": cfg.max_length,
        "stride": cfg.stride,
        "new_tokens": cfg.new_tokens,
        "prompt_tokens": cfg.prompt_tokens,
        "ttft_prompt_tokens": cfg.ttft_tokens,
        "runs": cfg.runs,
        "warmup_runs": cfg.warmup,
        "runtime": cfg.runtime,
        "device": str(device),
        "dtype": cfg.dtype,
        "batch_size": 1,
        "decoding": "greedy",
    }
    echo("protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items()))
    results = []
    for model_dir in model_dirs:
        model_dir = Path(model_dir)
        key = _tokenizer_key(model_dir)
        if key not in token_cache:
            tok = AutoTokenizer.from_pretrained(str(model_dir))
            token_cache[key] = list(tok(text, add_special_tokens=False)["input_ids"])
        ids = token_cache[key]
        need = max(cfg.ppl_tokens if not cfg.skip_ppl else 0, cfg.ttft_tokens, cfg.prompt_tokens)
        if len(ids) < need:
            raise ValueError(f"text {cfg.text} has {len(ids)} tokens, fewer than the {need} this protocol needs")
        release_memory()
        rss_before = rss_bytes()
        row: Dict[str, Any] = {
            "name": model_dir.name,
            "path": str(model_dir),
            "quant": quant_summary(model_dir),
            **disk_bytes(model_dir),
        }
        echo(f"[{model_dir.name}] loading ({cfg.runtime} on {device})")
        with PeakMemory(device) as peak:
            t0 = time.perf_counter()
            rt = load_runtime(
                cfg.runtime,
                model_dir,
                device,
                dtype,
                max_seq=max(cfg.max_length, cfg.ttft_tokens, cfg.prompt_tokens + cfg.new_tokens),
                lm_head=cfg.lm_head,
                cpu_int4=cfg.cpu_int4,
                cpu_fused=cfg.cpu_fused,
                kv_cache_dtype=cfg.kv_cache_dtype,
            )
            row["load_s"] = round(time.perf_counter() - t0, 2)
            row["weights_bytes"] = rt.weights_bytes
            try:
                if not cfg.skip_ppl:
                    t0 = time.perf_counter()
                    pr = perplexity(rt.all_logits, ids[: cfg.ppl_tokens], cfg.max_length, cfg.stride)
                    row.update(
                        ppl=pr.ppl,
                        ppl_scored_tokens=pr.scored_tokens,
                        ppl_windows=pr.windows,
                        ppl_s=round(time.perf_counter() - t0, 1),
                    )
                    echo(
                        f"[{model_dir.name}] perplexity {pr.ppl:.3f} over {pr.scored_tokens} tokens "
                        f"({pr.windows} windows, {row['ppl_s']} s)"
                    )
                if not cfg.skip_speed:
                    prompt = torch.tensor(ids[: cfg.prompt_tokens], dtype=torch.long)
                    ttft_prompt = torch.tensor(ids[: cfg.ttft_tokens], dtype=torch.long)
                    sp = measure_speed(rt, prompt, ttft_prompt, cfg.new_tokens, cfg.runs, cfg.warmup)
                    row.update(asdict(sp))
                    echo(
                        f"[{model_dir.name}] decode {sp.decode_tok_s_median:.1f} tok/s "
                        f"(min {sp.decode_tok_s_min:.1f}, max {sp.decode_tok_s_max:.1f}, {sp.runs} runs), "
                        f"TTFT({sp.ttft_prompt_tokens}) {sp.ttft_ms_median:.0f} ms"
                    )
            finally:
                rt.close()
                del rt
        row["peak_memory_bytes"] = peak.peak
        row["peak_memory_kind"] = "cuda_max_memory_allocated" if device.type == "cuda" else "process_rss"
        row["rss_before_load_bytes"] = rss_before if device.type != "cuda" else None
        results.append(row)
        release_memory()
    return {"protocol": protocol, "environment": environment(device), "models": results}


def environment(device: torch.device) -> Dict[str, Any]:
    from models.quantize.api import tool_versions

    env = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": tool_versions(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
