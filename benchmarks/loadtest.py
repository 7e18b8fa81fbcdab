"""Load generator for a running jetserve (or any OpenAI-compatible) server; a benchmark, not server code.

    .venv/bin/python -m benchmarks.loadtest --concurrency 1,4,8       # or: python benchmarks/loadtest.py ...

Speaks only HTTP/SSE (httpx async); imports nothing from the engine or torch. Two modes:

- closed loop: for each concurrency level `c`, `c` workers each send a request, wait for the end of its
  stream and send the next, until the level's `duration_s` or `max_requests` is reached;
- open loop: Poisson arrivals at `rate` requests/s (exponential gaps, seeded), each request in its own task,
  whatever the server's speed, until `duration_s` or `max_requests`; at most `max_inflight` in flight
  (arrivals beyond that are counted as `client_overflow`, never queued).

Every loop is bounded in time and count, every request has a timeout, and only loopback targets
(127.0.0.0/8, ::1, localhost) are accepted: `check_loopback` raises `LoadtestError` otherwise.

Also the harness shared by benchmarks/faults.py, benchmarks/soak.py and the fault tests: `ServerProcess`
(`jetserve serve`, or another entry module, as a child process on a free loopback port) and `scrape_metrics`
(/metrics parsed by prometheus-client).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence
from urllib.parse import urlsplit

import httpx

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Write a short story about a robot that learns to paint."


class LoadtestError(ValueError):
    """A load test that must not run (bad target or bad parameters)."""


def check_loopback(url: str) -> str:
    """Return `url` without a trailing slash if its host is loopback, else raise `LoadtestError`.

    Accepted hosts: `localhost`, any address in 127.0.0.0/8, and `::1`. No DNS lookup is made.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise LoadtestError(f"refusing target {url!r}: the URL must start with http:// or https://")
    host = (parts.hostname or "").lower()
    if not host:
        raise LoadtestError(f"refusing target {url!r}: no host in URL")
    ok = host == "localhost"
    if not ok:
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
    if not ok:
        raise LoadtestError(
            f"refusing target {url!r}: the load test only targets loopback hosts (127.0.0.0/8, ::1, localhost)"
        )
    return url.rstrip("/")


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (q in [0, 100]) of `values`; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summarize(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """p50/p95/p99/mean/max of `values` (seconds), None when empty."""
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": (sum(values) / len(values)) if values else None,
        "max": max(values) if values else None,
    }


@dataclass
class RequestResult:
    """One request as seen by the client. `status` is the HTTP code, or a client-side label
    (`timeout`, `connection_error`, `stream_error`, `client_overflow`)."""

    status: str
    ok: bool
    start: float
    end: float
    ttft: Optional[float] = None
    itls: List[float] = field(default_factory=list)
    output_tokens: int = 0
    error: Optional[str] = None


@dataclass(frozen=True)
class LoadConfig:
    """Parameters of one load test run."""

    url: str
    model: Optional[str] = None
    max_tokens: int = 32
    prompt: str = DEFAULT_PROMPT
    duration_s: float = 30.0
    max_requests: int = 1000
    request_timeout_s: float = 60.0
    api_key: Optional[str] = None
    temperature: float = 0.0
    max_inflight: int = 256
    seed: int = 0
    drain_timeout_s: float = 60.0

    def validate(self) -> "LoadConfig":
        check_loopback(self.url)
        if self.duration_s <= 0 or not math.isfinite(self.duration_s):
            raise LoadtestError("--duration must be a positive number of seconds")
        if self.max_requests < 1:
            raise LoadtestError("--max-requests must be >= 1")
        if self.max_tokens < 1:
            raise LoadtestError("--max-tokens must be >= 1")
        if self.request_timeout_s <= 0:
            raise LoadtestError("--request-timeout must be > 0")
        if self.max_inflight < 1:
            raise LoadtestError("--max-inflight must be >= 1")
        return self


def _headers(cfg: LoadConfig) -> Dict[str, str]:
    h = {"content-type": "application/json", "accept": "text/event-stream"}
    if cfg.api_key:
        h["authorization"] = f"Bearer {cfg.api_key}"
    return h


async def resolve_model(client: httpx.AsyncClient, cfg: LoadConfig) -> str:
    """`cfg.model`, else the first model GET /v1/models lists as loaded, else the first it lists."""
    if cfg.model:
        return cfg.model
    r = await client.get(f"{cfg.url}/v1/models", headers=_headers(cfg), timeout=cfg.request_timeout_s)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise LoadtestError("the server lists no models; pass --model")
    loaded = [m for m in data if m.get("state") == "loaded"]
    return str((loaded or data)[0]["id"])


async def one_request(client: httpx.AsyncClient, cfg: LoadConfig, model: str) -> RequestResult:
    """Send one streaming chat completion and time it. Never raises for server or network faults.

    TTFT is the time to the first SSE chunk carrying content; inter-token latencies are the gaps between
    later content chunks. Output tokens are taken from the final `usage` chunk when present, else the
    number of content chunks. The whole request (headers and stream) is bounded by `cfg.request_timeout_s`.
    """
    t0 = time.perf_counter()
    res = RequestResult(status="0", ok=False, start=t0, end=t0)
    try:
        await asyncio.wait_for(_stream_into(res, client, cfg, model), cfg.request_timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException) as e:
        res.status, res.error = "timeout", repr(e)
    except httpx.HTTPError as e:
        res.status, res.error = "connection_error", repr(e)
    res.end = time.perf_counter()
    res.ok = res.status == "200"
    return res


async def _stream_into(res: RequestResult, client: httpx.AsyncClient, cfg: LoadConfig, model: str) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": cfg.prompt}],
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    last = None
    chunks = 0
    usage_tokens = None
    finished = False
    async with client.stream(
        "POST", f"{cfg.url}/v1/chat/completions", json=body, headers=_headers(cfg), timeout=cfg.request_timeout_s
    ) as resp:
        res.status = str(resp.status_code)
        if resp.status_code != 200:
            res.error = (await resp.aread()).decode("utf-8", "replace")[:300]
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                finished = True
                break
            try:
                msg = json.loads(payload)
            except ValueError:
                res.status, res.error = "stream_error", f"bad SSE payload: {payload[:100]!r}"
                return
            if "error" in msg:
                res.status, res.error = "stream_error", str(msg["error"])[:300]
                return
            if msg.get("usage"):
                usage_tokens = msg["usage"].get("completion_tokens")
            for ch in msg.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - res.start
                    else:
                        res.itls.append(now - last)
                    last = now
                    chunks += 1
    res.output_tokens = int(usage_tokens) if usage_tokens is not None else chunks
    if not finished:
        res.status, res.error = "stream_error", "stream ended without [DONE]"


def level_report(name: str, results: List[RequestResult], wall_s: float, **extra) -> dict:
    """Aggregate one level (a concurrency value or a rate) into the JSON report shape."""
    ok = [r for r in results if r.ok]
    errors: Dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    itls = [x for r in ok for x in r.itls]
    wall = max(wall_s, 1e-9)
    return {
        "level": name,
        **extra,
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall,
        "throughput_tok_s": out_tokens / wall,
        "output_tokens": out_tokens,
        "ttft_s": summarize([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": summarize(itls),
        "latency_s": summarize([r.end - r.start for r in ok]),
    }


async def run_closed_loop(
    cfg: LoadConfig, concurrency: int, client: Optional[httpx.AsyncClient] = None, model: Optional[str] = None
) -> dict:
    """`concurrency` workers back to back for `cfg.duration_s` or `cfg.max_requests` requests in total."""
    if concurrency < 1:
        raise LoadtestError("concurrency must be >= 1")
    own = client is None
    client = client or _client(cfg, concurrency)
    try:
        model = model or await resolve_model(client, cfg)
        results: List[RequestResult] = []
        issued = 0
        t0 = time.perf_counter()
        deadline = t0 + cfg.duration_s

        async def worker():
            nonlocal issued
            while time.perf_counter() < deadline and issued < cfg.max_requests:
                issued += 1
                results.append(await one_request(client, cfg, model))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        return level_report(f"c={concurrency}", results, wall, mode="closed", concurrency=concurrency)
    finally:
        if own:
            await client.aclose()


async def run_open_loop(
    cfg: LoadConfig, rate: float, client: Optional[httpx.AsyncClient] = None, model: Optional[str] = None
) -> dict:
    """Poisson arrivals at `rate` req/s for `cfg.duration_s` or `cfg.max_requests` arrivals, then drain
    in-flight requests for at most `cfg.drain_timeout_s` (stragglers are cancelled and counted `timeout`)."""
    if not (rate > 0 and math.isfinite(rate)):
        raise LoadtestError("--rate must be a positive number of requests per second")
    own = client is None
    client = client or _client(cfg, cfg.max_inflight)
    try:
        model = model or await resolve_model(client, cfg)
        rng = random.Random(cfg.seed)
        results: List[RequestResult] = []
        tasks: set = set()
        t0 = time.perf_counter()
        deadline = t0 + cfg.duration_s
        next_at = t0
        arrivals = 0
        while arrivals < cfg.max_requests:
            next_at += rng.expovariate(rate)
            if next_at >= deadline:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            arrivals += 1
            if len(tasks) >= cfg.max_inflight:
                now = time.perf_counter()
                results.append(RequestResult(status="client_overflow", ok=False, start=now, end=now))
                continue
            task = asyncio.ensure_future(one_request(client, cfg, model))
            tasks.add(task)
            task.add_done_callback(_collect(tasks, results))
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=cfg.drain_timeout_s)
            for t in pending:
                t.cancel()
                now = time.perf_counter()
                results.append(RequestResult(status="timeout", ok=False, start=now, end=now, error="drain timeout"))
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
        return level_report(f"rate={rate:g}", results, wall, mode="open", rate=rate, arrivals=arrivals)
    finally:
        if own:
            await client.aclose()


def _collect(tasks: set, results: List[RequestResult]):
    def done(t: asyncio.Future) -> None:
        tasks.discard(t)
        if t.cancelled():
            return
        if t.exception() is not None:
            now = time.perf_counter()
            results.append(
                RequestResult(status="client_error", ok=False, start=now, end=now, error=repr(t.exception()))
            )
        else:
            results.append(t.result())

    return done


def _client(cfg: LoadConfig, conns: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max(conns, 1) + 4, max_keepalive_connections=max(conns, 1) + 4)
    return httpx.AsyncClient(limits=limits, timeout=cfg.request_timeout_s, trust_env=False)


async def run_sweep(cfg: LoadConfig, concurrencies: Sequence[int] = (), rates: Sequence[float] = ()) -> dict:
    """Run every closed-loop concurrency then every open-loop rate; return the full report dict."""
    cfg.validate()
    if not concurrencies and not rates:
        raise LoadtestError("give --concurrency and/or --rate")
    async with _client(cfg, max(list(concurrencies) + [cfg.max_inflight if rates else 1])) as client:
        model = await resolve_model(client, cfg)
        levels = []
        for c in concurrencies:
            logger.info(
                "closed loop: concurrency %d for up to %.0fs / %d requests", c, cfg.duration_s, cfg.max_requests
            )
            levels.append(await run_closed_loop(cfg, c, client, model))
        for r in rates:
            logger.info(
                "open loop: Poisson %.3g req/s for up to %.0fs / %d requests", r, cfg.duration_s, cfg.max_requests
            )
            levels.append(await run_open_loop(cfg, r, client, model))
    cfg_dict = asdict(cfg)
    cfg_dict.pop("api_key", None)
    cfg_dict["model"] = model
    return {"config": cfg_dict, "levels": levels}


def write_report(report: dict, out_dir: Path) -> Dict[str, Path]:
    """Write `loadtest.json` and `loadtest.png` into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath = out_dir / "loadtest.json"
    jpath.write_text(json.dumps(report, indent=2, sort_keys=False))
    ppath = out_dir / "loadtest.png"
    plot_report(report, ppath)
    return {"json": jpath, "png": ppath}


def plot_report(report: dict, path: Path) -> None:
    """Two panels per level: throughput (tok/s, req/s) and latency percentiles (TTFT, ITL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    names = [lv["level"] for lv in levels]
    x = list(range(len(levels)))

    def ms(lv, key, q):
        v = lv[key][q]
        return v * 1000.0 if v is not None else float("nan")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(x, [lv["throughput_tok_s"] for lv in levels], "o-", label="output tok/s")
    ax1.set_ylabel("tokens/s")
    ax1b = ax1.twinx()
    ax1b.plot(x, [lv["throughput_rps"] for lv in levels], "s--", color="tab:orange", label="req/s")
    ax1b.set_ylabel("requests/s")
    ax1.set_xticks(x, names)
    ax1.set_title("Throughput")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper left")
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL")):
        for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
            ax2.plot(x, [ms(lv, key, q) for lv in levels], style, label=f"{label} {q}")
    ax2.set_yscale("log")
    ax2.set_ylabel("ms")
    ax2.set_xticks(x, names)
    ax2.set_title("Latency")
    ax2.legend(fontsize=8)
    errs = sum(sum(lv["errors"].values()) for lv in levels)
    fig.suptitle(
        f"jetserve loadtest: {report['config'].get('model')} max_tokens={report['config'].get('max_tokens')}"
        f" errors={errs}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(report: dict) -> str:
    """Human-readable summary, one line per level."""

    def f(v, scale=1000.0):
        return "-" if v is None else f"{v * scale:.1f}"

    lines = [
        f"{'level':>12} {'req':>5} {'ok':>5} {'req/s':>7} {'tok/s':>8} {'ttft p50/p95/p99 ms':>22} "
        f"{'itl p50/p95/p99 ms':>22}  errors"
    ]
    for lv in report["levels"]:
        t, i = lv["ttft_s"], lv["itl_s"]
        lines.append(
            f"{lv['level']:>12} {lv['requests']:>5} {lv['ok']:>5} {lv['throughput_rps']:>7.2f} {lv['throughput_tok_s']:>8.1f} "
            f"{f(t['p50']) + '/' + f(t['p95']) + '/' + f(t['p99']):>22} {f(i['p50']) + '/' + f(i['p95']) + '/' + f(i['p99']):>22}  "
            f"{lv['errors'] or '-'}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- server-process harness
class ServerProcess:
    """`jetserve serve` as a child process on 127.0.0.1 (for fault, restart and soak runs).

    `serve_args` are extra `jetserve serve` flags. `module` is the entry run as `python -m MODULE serve ...`:
    `server.cli`, or a test entry such as `benchmarks.fault_runner` (then `cwd` must be the repository root). The child's output goes to `log_path`. Use as a context
    manager; on exit the child gets SIGTERM, then SIGKILL after `kill_after_s`. Only this child is signalled.
    """

    def __init__(
        self,
        serve_args: Sequence[str] = (),
        *,
        port: Optional[int] = None,
        env: Optional[Dict[str, str]] = None,
        log_path: Optional[Path] = None,
        cwd: Optional[Path] = None,
        kill_after_s: float = 30.0,
        module: str = "server.cli",
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", str(self.port), *serve_args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.cwd = cwd
        self.kill_after_s = kill_after_s
        self.proc = None
        self.started_at = 0.0
        self._log = None

    def start(self) -> "ServerProcess":
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="jetserve-serve-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log = open(self.log_path, "wb")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        return self

    def wait_ready(self, timeout_s: float = 180.0, path: str = "/health") -> float:
        """Poll `path` until it answers 200; return seconds since start. Raises RuntimeError on exit/timeout."""
        deadline = time.perf_counter() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as c:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"jetserve serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if c.get(self.url + path).status_code == 200:
                        return time.perf_counter() - self.started_at
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"jetserve serve not ready after {timeout_s}s:\n{self.log_tail()}")

    def rss(self) -> int:
        """Resident set size of the server process in bytes."""
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(self.kill_after_s) is None:
                self.proc.kill()
                self.wait(10)
        if self._log:
            self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_metrics(url: str, api_key: Optional[str] = None, timeout_s: float = 10.0) -> Dict[str, float]:
    """GET /metrics and parse it with prometheus-client: {"name{label=value,...}": value} (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/") + "/metrics", headers=headers, timeout=timeout_s, trust_env=False)
    r.raise_for_status()
    out: Dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


# ----------------------------------------------------------------------------- command line
def _int_list(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 or v > 4096 for v in vals):
        raise argparse.ArgumentTypeError("concurrency values must be between 1 and 4096")
    return vals


def _float_list(text: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not vals or any(not (v > 0) or v == float("inf") for v in vals):
        raise argparse.ArgumentTypeError("rates must be positive finite numbers (requests/s)")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/loadtest.py", description="Load test a running server (closed-loop sweeps, open-loop Poisson)"
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Server base URL (loopback only).")
    p.add_argument("--model", default=None, help="Model id (default: the first model GET /v1/models lists as loaded).")
    p.add_argument(
        "--concurrency",
        type=_int_list,
        default=None,
        help="Closed-loop concurrency levels, e.g. 1,2,4,8 (default 1,2,4,8 when --rate is not given).",
    )
    p.add_argument("--rate", type=_float_list, default=None, help="Open-loop Poisson arrival rate(s), requests/s.")
    p.add_argument("--duration", type=float, default=30.0, help="Seconds per level (upper bound).")
    p.add_argument("--max-requests", type=int, default=1000, help="Requests per level (upper bound).")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request.")
    p.add_argument("--prompt", default=None, help="User message of each request.")
    p.add_argument("--request-timeout", type=float, default=60.0, help="Per-request timeout in seconds.")
    p.add_argument("--max-inflight", type=int, default=256, help="Open loop: most requests in flight at once.")
    p.add_argument("--api-key", default=None, help="Bearer API key, if the server needs one.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the Poisson arrival process.")
    p.add_argument(
        "--out", type=Path, default=Path("loadtest-out"), help="Directory for loadtest.json and loadtest.png."
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the sweep; 0 on success, 2 for a refused target or bad parameters, 1 when the server fails."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = LoadConfig(
        url=args.url,
        model=args.model,
        max_tokens=args.max_tokens,
        prompt=args.prompt or DEFAULT_PROMPT,
        duration_s=args.duration,
        max_requests=args.max_requests,
        request_timeout_s=args.request_timeout,
        api_key=args.api_key,
        max_inflight=args.max_inflight,
        seed=args.seed,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    concurrency = args.concurrency if args.concurrency is not None else ([] if args.rate else [1, 2, 4, 8])
    try:
        cfg.validate()
        report = asyncio.run(run_sweep(cfg, concurrency, args.rate or []))
    except LoadtestError as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # server unreachable or not OpenAI-shaped: one clear line, not a traceback
        print(f"loadtest: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    paths = write_report(report, args.out)
    print(format_table(report))
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
