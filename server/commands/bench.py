"""`jetserve bench`: decode/prefill benchmark of the jetserve runtime vs transformers (benchmarks/decode.py)."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"


def _module():
    if not _SCRIPT.is_file():
        raise SystemExit(f"error: {_SCRIPT} not found (jetserve bench needs a source checkout)")
    spec = importlib.util.spec_from_file_location("jetserve_bench_decode", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _module().add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return _module().run(args)
