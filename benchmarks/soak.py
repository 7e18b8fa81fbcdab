"""Soak test: N minutes of steady closed-loop load; reports RSS growth and errors.

By default it starts `jetserve serve` itself as a child process on a free loopback port (so it can read the
server's RSS), warms it up (waves of `--concurrency` requests), then keeps `--concurrency` streaming chat requests in flight for `--minutes`.
RSS is sampled every `--sample-s` seconds. Growth is measured from the RSS after warm-up (the baseline) to
the RSS at the end, after the load has stopped and the server is idle. Targets: growth < 2 %, zero errors.

    .venv/bin/python benchmarks/soak.py --minutes 10 --model smollm2-135m-instruct-gptq-g64 --out bench-out/soak

Writes soak.json and soak.png into --out; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: benchmarks.* is importable from the repository root
    sys.path.insert(0, str(REPO))

from benchmarks.loadtest import LoadConfig, ServerProcess, level_report, one_request  # noqa: E402


async def _soak(
    cfg: LoadConfig,
    srv: ServerProcess,
    model: str,
    concurrency: int,
    seconds: float,
    sample_s: float,
    warmup_requests: int,
) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        # warm-up at the soak's concurrency, so batch-sized buffers exist before the baseline is taken
        warm = []
        for _ in range(max(1, warmup_requests // concurrency)):
            warm += await asyncio.gather(*(one_request(client, cfg, model) for _ in range(concurrency)))
        if not all(r.ok for r in warm):
            raise RuntimeError(f"warm-up failed: {[(r.status, r.error) for r in warm if not r.ok][:3]}")
        await asyncio.sleep(1.0)
        baseline = srv.rss()
        samples = [(0.0, baseline)]
        results = []
        t0 = time.perf_counter()
        deadline = t0 + seconds
        max_requests = max(1, int(seconds * 200))  # count bound far above what a CPU server can do

        async def worker():
            while time.perf_counter() < deadline and len(results) < max_requests:
                results.append(await one_request(client, cfg, model))

        async def sampler():
            while time.perf_counter() < deadline:
                await asyncio.sleep(min(sample_s, max(0.0, deadline - time.perf_counter())))
                samples.append((time.perf_counter() - t0, srv.rss()))

        await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(2.0)
        final = srv.rss()
        samples.append((time.perf_counter() - t0, final))
    level = level_report(f"c={concurrency}", results, wall, mode="closed", concurrency=concurrency)
    return {
        "duration_s": wall,
        "concurrency": concurrency,
        "model": model,
        "max_tokens": cfg.max_tokens,
        "rss_baseline_bytes": baseline,
        "rss_final_bytes": final,
        "rss_peak_bytes": max(v for _, v in samples),
        "rss_growth_pct": 100.0 * (final - baseline) / baseline,
        "errors": level["errors"],
        "requests": level["requests"],
        "ok": level["ok"],
        "throughput_tok_s": level["throughput_tok_s"],
        "ttft_s": level["ttft_s"],
        "itl_s": level["itl_s"],
        "rss_samples": samples,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [t / 60 for t, _ in report["rss_samples"]]
    ys = [v / 2**20 for _, v in report["rss_samples"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs, ys, ".-")
    ax.axhline(report["rss_baseline_bytes"] / 2**20 * 1.02, color="tab:red", ls="--", label="baseline + 2 %")
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(
        f"soak {report['duration_s'] / 60:.1f} min, c={report['concurrency']}: RSS growth "
        f"{report['rss_growth_pct']:+.2f} %, {sum(report['errors'].values())} errors / {report['requests']} requests"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default="smollm2-135m-instruct-gptq-g64")
    p.add_argument("--model-store", type=Path, default=REPO / "model-store")
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--warmup-requests", type=int, default=8)
    p.add_argument("--serve-arg", action="append", default=[], help="Extra `jetserve serve` flag (repeatable).")
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "soak")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    serve_args = [
        "--model-store",
        str(a.model_store),
        "--model",
        a.model,
        "--max-batch-size",
        str(max(a.concurrency, 1)),
        *a.serve_arg,
    ]
    with ServerProcess(serve_args, log_path=a.out / "serve.log", cwd=REPO) as srv:
        ready_s = srv.wait_ready(path="/ready")
        cfg = LoadConfig(
            url=srv.url, model=a.model, max_tokens=a.max_tokens, duration_s=a.minutes * 60, request_timeout_s=120.0
        )
        report = asyncio.run(_soak(cfg, srv, a.model, a.concurrency, a.minutes * 60, a.sample_s, a.warmup_requests))
        report["time_to_ready_s"] = ready_s
    report["command"] = " ".join(
        [".venv/bin/python", "benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])]
    )
    (a.out / "soak.json").write_text(json.dumps(report, indent=2))
    plot(report, a.out / "soak.png")
    errs = sum(report["errors"].values())
    print(
        f"soak {report['duration_s']:.0f}s c={a.concurrency}: {report['requests']} requests, {errs} errors, "
        f"{report['throughput_tok_s']:.1f} tok/s, RSS {report['rss_baseline_bytes'] / 2**20:.1f} -> "
        f"{report['rss_final_bytes'] / 2**20:.1f} MiB ({report['rss_growth_pct']:+.2f} %), peak "
        f"{report['rss_peak_bytes'] / 2**20:.1f} MiB"
    )
    print(f"wrote {a.out / 'soak.json'} and {a.out / 'soak.png'}")
    return 0 if errs == 0 and report["rss_growth_pct"] < 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
