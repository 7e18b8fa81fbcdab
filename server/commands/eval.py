"""`jetserve eval MODEL [MODEL...]`: perplexity, decode tok/s, TTFT and memory, one model after another.

Writes `<out>/eval.md` (tables), `<out>/eval.json` and `<out>/eval.png` (chart) and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="Model folders, or names in the model store")
    parser.add_argument(
        "--runtime",
        choices=("transformers", "jetserve"),
        default="transformers",
        help="transformers (AutoModelForCausalLM) or jetserve (models.loader.load_runner)",
    )
    parser.add_argument("--text", default="wiki", help="Evaluation text: wiki | c4 | tiny | PATH (default wiki)")
    parser.add_argument("--ppl-tokens", type=int, default=32768, help="Tokens of the text scored (default 32768)")
    parser.add_argument("--max-length", type=int, default=2048, help="Perplexity window (default 2048)")
    parser.add_argument("--stride", type=int, default=512, help="Perplexity stride (default 512)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Decode tokens per run (default 256)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="Prompt before decoding (default 16)")
    parser.add_argument("--ttft-tokens", type=int, default=512, help="Prompt length for TTFT (default 512)")
    parser.add_argument("--runs", type=int, default=3, help="Timed runs; median, min and max are reported")
    parser.add_argument("--warmup", type=int, default=1, help="Warm-up runs before timing (default 1)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument(
        "--lm-head",
        choices=("auto", "bf16", "int8", "int4"),  # models.loader.LM_HEAD_DTYPES (no torch import here)
        default="bf16",
        help="jetserve runtime: keep a dense lm_head in --dtype (bf16) or quantize it at load to int8 "
        "per-channel or int4 groups of 32; auto: int8 on CPU, bf16 on CUDA, as `jetserve serve` (default bf16)",
    )
    parser.add_argument(
        "--cpu-int4",
        choices=("auto", "w4a8", "int4pack"),  # models.kernels.CPU_INT4_CHOICES (no torch import here)
        default="auto",
        help="jetserve runtime on CPU: the int4 kernel (w4a8: int8 activations per group, our C++ kernel; "
        "int4pack: torch's bf16 kernel); auto: w4a8 where it builds, as `jetserve serve` (default auto)",
    )
    parser.add_argument(
        "--cpu-fused",
        choices=("auto", "fused", "torch"),  # models.fused.CPU_FUSED_CHOICES (no torch import here)
        default="auto",
        help="jetserve runtime on CPU: prefill's norms, RoPE and activation as our fused C++ kernels (fused) or "
        "torch's ops (torch); auto: fused where they build and run, as `jetserve serve` (default auto)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "int8"),  # models.kv_cache.KV_CACHE_DTYPES (no torch import here)
        default="auto",
        help="jetserve runtime: the KV cache's element type; int8 stores rows of int8 codes and a scale, and "
        "prefill attends over the stored rows (default auto: the activation dtype, as `jetserve serve`)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-ppl", action="store_true", help="Skip perplexity")
    parser.add_argument("--skip-speed", action="store_true", help="Skip tok/s and TTFT")
    parser.add_argument(
        "--store", type=Path, default=None, help="Model store (default $JETSERVE_MODEL_STORE or ./model-store)"
    )
    parser.add_argument("--out", type=Path, default=Path("eval-results"), help="Output folder (default ./eval-results)")
    parser.add_argument("--name", default="eval", help="File stem of the outputs (default eval)")


def _resolve(model: str, store: Path) -> Path | None:
    for cand in (Path(model).expanduser(), store / model):
        if (cand / "config.json").is_file():
            return cand
    return None


def run(args: argparse.Namespace) -> int:
    from server.config import Settings

    store = args.store if args.store is not None else Settings().model_store
    dirs = []
    for m in args.models:
        d = _resolve(m, Path(store))
        if d is None:
            print(
                f"jetserve eval: error: model {m!r} is neither a folder with config.json nor a name in {store}",
                file=sys.stderr,
            )
            return 2
        dirs.append(d)
    for flag, v in (
        ("--ppl-tokens", args.ppl_tokens),
        ("--max-length", args.max_length),
        ("--stride", args.stride),
        ("--max-new-tokens", args.max_new_tokens),
        ("--prompt-tokens", args.prompt_tokens),
        ("--ttft-tokens", args.ttft_tokens),
        ("--runs", args.runs),
    ):
        if v < 1:
            print(f"jetserve eval: error: {flag} must be >= 1, got {v}", file=sys.stderr)
            return 2
    if args.cpu_int4 != "auto" and args.runtime != "jetserve":
        print(f"jetserve eval: error: --cpu-int4 {args.cpu_int4} needs --runtime jetserve", file=sys.stderr)
        return 2
    if args.cpu_fused != "auto" and args.runtime != "jetserve":
        print(f"jetserve eval: error: --cpu-fused {args.cpu_fused} needs --runtime jetserve", file=sys.stderr)
        return 2
    if args.kv_cache_dtype != "auto" and args.runtime != "jetserve":
        print(f"jetserve eval: error: --kv-cache-dtype {args.kv_cache_dtype} needs --runtime jetserve", file=sys.stderr)
        return 2
    if args.lm_head != "bf16" and args.runtime != "jetserve":
        print(f"jetserve eval: error: --lm-head {args.lm_head} needs --runtime jetserve", file=sys.stderr)
        return 2
    if args.stride > args.max_length:
        print("jetserve eval: error: --stride must be <= --max-length", file=sys.stderr)
        return 2

    from models.evaluate.compare import EvalConfig, evaluate_models
    from models.evaluate.report import markdown, write_outputs
    from models.evaluate.runtimes import RuntimeUnavailable
    from models.quantize.calibration import CalibrationError

    cfg = EvalConfig(
        text=args.text,
        ppl_tokens=args.ppl_tokens,
        max_length=args.max_length,
        stride=args.stride,
        new_tokens=args.max_new_tokens,
        prompt_tokens=args.prompt_tokens,
        ttft_tokens=args.ttft_tokens,
        runs=args.runs,
        warmup=args.warmup,
        runtime=args.runtime,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        skip_ppl=args.skip_ppl,
        skip_speed=args.skip_speed,
        lm_head=args.lm_head,
        cpu_int4=args.cpu_int4,
        cpu_fused=args.cpu_fused,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    try:
        res = evaluate_models(dirs, cfg, Path(store), echo=lambda s: print(s, file=sys.stderr))
    except (RuntimeUnavailable, CalibrationError, ValueError) as e:
        print(f"jetserve eval: error: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(res, args.out, args.name)
    print(markdown(res))
    print(f"jetserve eval: wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0
