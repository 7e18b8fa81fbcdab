"""Quality of the batched decode path: teacher-forced perplexity through `Runner.decode`, one token per step.

`jetserve eval` prefills windows of 512 and more tokens, so it scores the prefill kernels. This scores the ones
decode runs: `--batch` sequences of `--tokens` tokens of a text, fed one token per decode step at that batch size,
each step's logits scoring the next token. It compares, in one run, the int4 kernel plans the CPU can take:
- "auto": the default plan (on AMX CPUs W4A8 below `kernels.CPU_AMX_MIN_TOKENS` rows, the AMX tile kernels from
  there; elsewhere W4A8),
- "w4a8": the same layers with the AMX kernels switched off (W4A8 at every row count),
- "int4pack": torch's int4pack kernel with bf16 activations.

    .venv/bin/python benchmarks/decode_quality.py [--model smollm2-135m-instruct-gptq-g64] [--batch 8] [--tokens 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.loader import load_runner  # noqa: E402
from models.qlinear import QuantLinear  # noqa: E402
from models.quantize.calibration import resolve_text  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402

VARIANTS = ("auto", "w4a8", "int4pack")


def text_ids(tokenizer: Tokenizer, path: Path, n: int) -> List[int]:
    """The first `n` token ids of a text file, without its `<doc ...>` header lines (wiki.utf8's)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    text = "\n".join(line for line in lines if not line.startswith("<doc"))
    ids: List[int] = []
    step = 4 * n
    for start in range(0, len(text), step):
        ids += tokenizer.encode(text[start : start + step], add_special_tokens=False)
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"{path} holds fewer than {n} tokens")


def without_amx(runner) -> None:
    """Switch the AMX tile kernels off in a loaded runner (W4A8 at every row count below the dense prefill)."""
    for lin in runner.model.linear_modules():
        if isinstance(lin, QuantLinear) and lin.plan.amx_min_tokens is not None:
            lin.plan = dataclasses.replace(lin.plan, amx_min_tokens=None)
    head = runner.model.lm_head
    if getattr(head, "amx_min_tokens", None) is not None:
        head._amx, head.amx_min_tokens = None, None


def decode_perplexity(model_dir: Path, seqs: torch.Tensor, variant: str) -> Dict[str, Any]:
    """Teacher-forced perplexity of `seqs` (B, T) through decode at batch B, with the kernels of `variant`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose from {VARIANTS}")
    b, t = seqs.shape
    cpu_int4 = "int4pack" if variant == "int4pack" else "auto"
    runner = load_runner(model_dir, max_batch_size=b, max_seq=t, lm_head="auto", cpu_int4=cpu_int4)
    if variant == "w4a8":
        without_amx(runner)
    plans = sorted({f"{lin.plan.name} amx>={lin.plan.amx_min_tokens}" for lin in runner.model.linear_modules()})
    nll, n = 0.0, 0
    slots = torch.arange(b)  # sequence i in slot i: also the row index of its logits
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(b):
            runner.prefill(seqs[s, :1], s, 0)
        for pos in range(1, t - 1):
            logits = runner.decode(seqs[:, pos], torch.full((b,), pos), slots).float()
            nll -= torch.log_softmax(logits, -1)[slots, seqs[:, pos + 1]].double().sum().item()
            n += b
    return {
        "variant": variant,
        "perplexity": math.exp(nll / n),
        "scored_tokens": n,
        "plans": plans,
        "seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=Path("model-store"))
    p.add_argument("--model", default="smollm2-135m-instruct-gptq-g64")
    p.add_argument("--text", default="wiki", help="built-in text name or a UTF-8 file (default wiki)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.store / args.model
    tok = Tokenizer.from_dir(model_dir)
    ids = text_ids(tok, resolve_text(args.text, args.store), args.batch * args.tokens)
    seqs = torch.tensor(ids).reshape(args.batch, args.tokens)  # (B, T): consecutive stretches of the text
    results = [decode_perplexity(model_dir, seqs, v) for v in args.variants.split(",")]
    base = results[0]["perplexity"]
    print(f"| kernels ({args.batch} x {args.tokens - 2} scored tokens, batch {args.batch}) | perplexity | vs first |")
    print("|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} ({'; '.join(r['plans'])}) | {r['perplexity']:.4f} | {r['perplexity'] / base - 1:+.2%} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
