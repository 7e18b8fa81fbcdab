"""`jetserve quantize SRC OUT --method gptq|awq|rtn`: quantize through GPTQModel (models/quantize/api.py).

Bad input is refused with one line on stderr and exit code 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="fp16/bf16 HF model: a local folder or a hub id")
    parser.add_argument("out", metavar="OUT", help="Output folder (must be empty unless --overwrite)")
    parser.add_argument(
        "--method", default="gptq", help="gptq | awq | rtn (round-to-nearest floor, no calibration); default gptq"
    )
    parser.add_argument("--bits", type=int, default=4, help="Weight bits (GPTQ/RTN: 2,3,4,8; AWQ w_bit: 4)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="Quantization group size (AWQ q_group_size); -1 = per channel. Default 128",
    )
    g = parser.add_argument_group("GPTQ (defaults chosen by the sweep in docs/benchmarks.md)")
    g.add_argument(
        "--desc-act",
        dest="desc_act",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Act-order: quantize columns by decreasing Hessian diagonal (default: off)",
    )
    g.add_argument("--damp-percent", type=float, default=None, help="Hessian dampening fraction (default 0.01)")
    g.add_argument("--sym", dest="sym", action="store_true", default=None, help="Symmetric grid")
    g.add_argument("--asym", dest="sym", action="store_false", help="Asymmetric grid with zero points (default)")
    g.add_argument(
        "--act-group-aware",
        dest="act_group_aware",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPTQModel's group-aware activation ordering (default: off)",
    )
    g.add_argument("--static-groups", action="store_true", help="Fix group scales before act-order (GPTQ)")
    g.add_argument("--mse", type=float, default=0.0, help="GPTQModel MSE grid search norm (0 = off)")
    g.add_argument(
        "--sink-weight",
        type=float,
        default=None,
        help="Weight of each calibration sample's first (attention-sink) token in the GPTQ Hessians of "
        "the q/k/v projections; 1 = plain GPTQ (default 128, see docs/benchmarks.md)",
    )
    a = parser.add_argument_group("AWQ")
    a.add_argument(
        "--zero-point",
        dest="zero_point",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Asymmetric grid with zero points (default: on)",
    )
    c = parser.add_argument_group("calibration")
    c.add_argument("--calib", default="c4", help="c4 | wiki | tiny | PATH to a UTF-8 text file (default c4)")
    c.add_argument("--nsamples", type=int, default=64, help="Calibration samples (default 64)")
    c.add_argument("--seqlen", type=int, default=512, help="Tokens per sample (default 512)")
    c.add_argument("--seed", type=int, default=0, help="Sample selection seed (default 0)")
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="Model store whose data/ holds the built-in texts (default $JETSERVE_MODEL_STORE or ./model-store)",
    )
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT")


def run(args: argparse.Namespace) -> int:
    from models.quantize.api import QuantizeInputError, QuantSpec, quantize
    from server.config import Settings

    # SIGTERM -> SystemExit, so the temp output folder is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    spec = QuantSpec(
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        desc_act=args.desc_act,
        damp_percent=args.damp_percent,
        act_group_aware=args.act_group_aware,
        static_groups=args.static_groups,
        mse=args.mse,
        sink_weight=args.sink_weight,
        zero_point=args.zero_point,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
    )
    store = args.store if args.store is not None else Settings().model_store
    try:
        res = quantize(args.src, args.out, spec, args.overwrite, store, device=args.device)
    except QuantizeInputError as e:
        print(f"jetserve quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"jetserve quantize: wrote {res.out_dir} in {res.seconds:.1f} s with {res.spec}", file=sys.stderr)
    print(res.out_dir)
    return 0
