"""Predicted vs measured memory of a model load through the ModelManager.

    .venv/bin/python benchmarks/memory_prediction.py [--models A B] [--max-batch-size 8] [--max-context 2048]
                                                      [--device cpu|cuda|auto] [--json]

Each model loads in a fresh subprocess (so one load's allocator state cannot hide another's), through
`ModelManager.load` with the real runtime (`models.loader.load_runner`), tokenizer and warmup, exactly as
`jetserve serve` loads it. Prediction: config.json + safetensors headers only (`models.loader.predict_footprint`).
Measurement (server/manager.py): on CPU the growth of anonymous RSS + resident pages of the model's own
files (read from /proc/self/status and /proc/self/smaps, after malloc_trim), around load + tokenizer +
warmup; on CUDA the growth of torch.cuda.memory_allocated. Error = (measured - predicted) / predicted.
Exit status 1 when any |error| exceeds --tolerance (default 5%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("smollm2-135m-instruct", "smollm2-135m-instruct-gptq-g64", "smollm2-135m-instruct-awq-g64")


def measure_one(store: Path, name: str, max_batch_size: int, max_context: int, device: str) -> dict:
    """Load `name` once through a ModelManager in this process and report the figures."""
    sys.path.insert(0, str(REPO))
    from server.config import Settings
    from server.manager import ModelManager

    settings = Settings(
        model_store=store,
        model=name,
        device=device,
        max_batch_size=max_batch_size,
        max_context=max_context,
        memory_budget="0.95",
    )

    async def run() -> dict:
        mgr = ModelManager(settings)
        lm = await mgr.load(name)
        report = lm.runner.memory_report() if hasattr(lm.runner, "memory_report") else {}
        out = {
            "model": name,
            "device": mgr.device,
            "max_batch_size": max_batch_size,
            "max_context": max_context,
            "predicted": lm.predicted.as_dict(),
            "measured_bytes": lm.measured_bytes,
            "runner_report": report,
            "load_seconds": round(lm.load_seconds, 2),
            "error": (lm.measured_bytes - lm.predicted.total_bytes) / lm.predicted.total_bytes,
        }
        await mgr.close()
        return out

    return asyncio.run(run())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=Path(os.environ.get("JETSERVE_MODEL_STORE", REPO / "model-store")))
    ap.add_argument("--models", nargs="*", default=None, help="default: the SmolLM2 variants present in the store")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--json", action="store_true", help="print one JSON object per model")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure in this process
    args = ap.parse_args(argv)

    if args.one:
        print(json.dumps(measure_one(args.store, args.one, args.max_batch_size, args.max_context, args.device)))
        return 0

    models = args.models or [m for m in DEFAULT_MODELS if (args.store / m / "config.json").is_file()]
    if not models:
        print(f"no models found in {args.store}", file=sys.stderr)
        return 2
    results = []
    for name in models:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--store",
            str(args.store),
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-context",
            str(args.max_context),
            "--device",
            args.device,
        ]
        pythonpath = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath})
        if p.returncode != 0:
            print(f"{name}: load failed\n{p.stderr[-2000:]}", file=sys.stderr)
            return 2
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))

    worst = max(abs(r["error"]) for r in results)
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        MiB = 2**20
        print(f"device={results[0]['device']} max_batch_size={args.max_batch_size} max_context={args.max_context}")
        print(
            f"{'model':36s} {'weights':>9s} {'kv':>9s} {'workspace':>9s} {'predicted':>10s} {'measured':>10s}"
            f" {'error':>7s}"
        )
        for r in results:
            p = r["predicted"]
            print(
                f"{r['model']:36s} {p['weights_bytes'] / MiB:8.1f}M {p['kv_cache_bytes'] / MiB:8.1f}M "
                f"{p['workspace_bytes'] / MiB:8.1f}M {p['total_bytes'] / MiB:9.1f}M "
                f"{r['measured_bytes'] / MiB:9.1f}M {100 * r['error']:+6.2f}%"
            )
        print(f"worst |error| {100 * worst:.2f}% (tolerance {100 * args.tolerance:.0f}%)")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
