"""bf16 vs int8 lm_head, side by side in one process: the head alone and a whole decode step.

    .venv/bin/python benchmarks/lm_head.py [--model model-store/smollm2-135m-instruct-gptq-g64] [--json out.json]

Head alone: the model's own lm_head weight (tied: the embedding), x (B, hidden) in bf16, batch 1 and 8; the
bf16 `F.linear` and `kernels.int8_linear` calls alternate in blocks, so both see the same machine load.
Decode step: the model loaded twice (`lm_head="bf16"` and `"int8"`), slots prefilled to `--context` tokens, then
`Runner.decode` at batch 1 and 8, alternating the two runners. Every figure is ms per call: the minimum and the
median of the block means. The JSON records lscpu's model name and flags (benchmarks.decode.cpu_info): figures
from different CPUs are not comparable.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import cpu_info  # noqa: E402
from models.loader import load_runner  # noqa: E402
from models.qlinear import Int8Linear  # noqa: E402

logger = logging.getLogger(__name__)


def side_by_side(fns: Dict[str, Callable[[], object]], blocks: int, calls: int) -> Dict[str, Dict[str, float]]:
    """ms per call of each fn: blocks of `calls` calls, the fns alternating block by block."""
    for f in fns.values():
        f()
    per: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(blocks):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            per[k].append((time.perf_counter() - t0) / calls * 1e3)
    return {k: {"min_ms": round(min(v), 3), "median_ms": round(statistics.median(v), 3)} for k, v in per.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("model-store/smollm2-135m-instruct-gptq-g64"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--context", type=int, default=256, help="tokens in each slot before the timed decode steps")
    ap.add_argument("--skip-decode", action="store_true", help="time the head alone")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    res: Dict[str, object] = {
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": str(args.model),
        "head": {},
        "decode_step": {},
    }
    slots = max(args.batches)
    base = load_runner(args.model, device="cpu", max_batch_size=slots, max_seq=args.context + 64)
    w = base.model.lm_head.weight.data
    q = Int8Linear.from_dense(w)
    res["head_shape"] = list(w.shape)
    gen = torch.Generator().manual_seed(0)
    for b in args.batches:
        x = torch.randn(b, w.shape[1], generator=gen).to(torch.bfloat16)
        res["head"][b] = side_by_side({"bf16": lambda: F.linear(x, w), "int8": lambda: q(x)}, args.blocks, 5)
        print(f"head alone  b{b}: {res['head'][b]}", flush=True)
    if not args.skip_decode:
        quant = load_runner(args.model, device="cpu", max_batch_size=slots, max_seq=args.context + 64, lm_head="int8")
        prompt = torch.randint(0, w.shape[0], (args.context,), generator=gen)
        for r in (base, quant):
            for s in range(slots):
                r.prefill(prompt, s, 0)
        for b in args.batches:
            tok = torch.randint(0, w.shape[0], (b,), generator=gen)
            pos = torch.full((b,), args.context, dtype=torch.long)
            sl = torch.arange(b)
            fns = {"bf16": lambda: base.decode(tok, pos, sl), "int8": lambda: quant.decode(tok, pos, sl)}
            res["decode_step"][b] = side_by_side(fns, max(5, args.blocks // 3), 3)
            print(f"decode step b{b}: {res['decode_step'][b]}", flush=True)
    print(json.dumps(res["cpu"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
