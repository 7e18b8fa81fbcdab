"""`jetserve demo prepare [--store DIR]`: build the offline demo model store (see models/quantize/demo.py)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "prepare", help="Convert SmolLM2-135M-Instruct to bf16 and write its GPTQ/AWQ g64 variants (idempotent, cached)"
    )
    p.add_argument(
        "--store", type=Path, default=None, help="Model store (default: $JETSERVE_MODEL_STORE or ./model-store)"
    )
    p.add_argument(
        "--source",
        default=None,
        help="Ordinary path: a local HF folder or a hub id to use as the bf16 base instead of the GGUF",
    )
    p.add_argument("--name", default=None, help="Folder name of the base model in the store")
    p.add_argument(
        "--variants",
        nargs="*",
        default=None,
        metavar="VARIANT",
        help="Which quantized variants to write (default: gptq-g64 awq-g64; also awq-g64-l2, the AWQ "
        "settings on the model's first 2 layers, which make test checks; none: no variants)",
    )


def run(args: argparse.Namespace) -> int:
    from server.config import Settings

    # SIGTERM -> SystemExit, so the temp output folder is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    store = args.store if args.store is not None else Settings().model_store
    from models.quantize.api import QuantizeInputError
    from models.quantize.demo import ALL_VARIANTS, prepare

    if args.variants is not None:
        unknown = [v for v in args.variants if v not in ALL_VARIANTS]
        if unknown:
            print(
                f"jetserve demo prepare: unknown variant(s) {', '.join(unknown)}; "
                f"choose from {', '.join(ALL_VARIANTS)}",
                file=sys.stderr,
            )
            return 2
    print(f"jetserve demo prepare: store {Path(store).resolve()}", file=sys.stderr)
    try:
        res = prepare(
            Path(store),
            source=args.source,
            name=args.name,
            variants=args.variants,
            echo=lambda m: print(m, file=sys.stderr),
        )
    except QuantizeInputError as e:
        print(f"jetserve demo prepare: {e}", file=sys.stderr)
        return 2
    state = f"built {', '.join(res.built)}" if res.built else "everything up to date"
    print(f"jetserve demo prepare: ready in {res.seconds:.1f} s ({state})", file=sys.stderr)
    for d in [res.base, *res.variants.values()]:
        print(d)
    return 0
