"""`jetserve loadtest`: closed-loop concurrency sweeps and open-loop Poisson load against a loopback server."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 or v > 4096 for v in vals):
        raise argparse.ArgumentTypeError("concurrency values must be between 1 and 4096")
    return vals


def _float_list(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not vals or any(not (v > 0) or v == float("inf") for v in vals):
        raise argparse.ArgumentTypeError("rates must be positive finite numbers (requests/s)")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Server base URL (loopback only).")
    p.add_argument("--model", default=None, help="Model id (default: the first model GET /v1/models lists as loaded).")
    p.add_argument("--concurrency", type=_int_list, default=None,
                   help="Closed-loop concurrency levels, e.g. 1,2,4,8 (default 1,2,4,8 when --rate is not given).")
    p.add_argument("--rate", type=_float_list, default=None, help="Open-loop Poisson arrival rate(s), requests/s.")
    p.add_argument("--duration", type=float, default=30.0, help="Seconds per level (upper bound).")
    p.add_argument("--max-requests", type=int, default=1000, help="Requests per level (upper bound).")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request.")
    p.add_argument("--prompt", default=None, help="User message of each request.")
    p.add_argument("--request-timeout", type=float, default=60.0, help="Per-request timeout in seconds.")
    p.add_argument("--max-inflight", type=int, default=256, help="Open loop: most requests in flight at once.")
    p.add_argument("--api-key", default=None, help="Bearer API key, if the server needs one.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the Poisson arrival process.")
    p.add_argument("--out", type=Path, default=Path("loadtest-out"), help="Directory for loadtest.json and loadtest.png.")


def run(args: argparse.Namespace) -> int:
    from server.loadtest import DEFAULT_PROMPT, LoadConfig, LoadtestError, format_table, run_sweep, write_report

    cfg = LoadConfig(
        url=args.url, model=args.model, max_tokens=args.max_tokens, prompt=args.prompt or DEFAULT_PROMPT,
        duration_s=args.duration, max_requests=args.max_requests, request_timeout_s=args.request_timeout,
        api_key=args.api_key, max_inflight=args.max_inflight, seed=args.seed,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    concurrency = args.concurrency if args.concurrency is not None else ([] if args.rate else [1, 2, 4, 8])
    try:
        cfg.validate()
        report = asyncio.run(run_sweep(cfg, concurrency, args.rate or []))
    except LoadtestError as e:
        print(f"jetserve loadtest: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # server unreachable or not OpenAI-shaped: one clear line, not a traceback
        print(f"jetserve loadtest: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    paths = write_report(report, args.out)
    print(format_table(report))
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0
