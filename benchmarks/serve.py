"""Serving benchmark: HTTP/SSE overhead and concurrency scaling of `jetserve serve`.

One run measures, on the same machine and model:
1. in-process decode tok/s at batch 1, twice: the bare runtime (`Runner.prefill` + a greedy `Runner.decode` loop
   on a thread of its own, as the engine's) and the engine (Engine + Runner in this process, no HTTP);
2. end-to-end SSE decode tok/s at batch 1 against a real `jetserve serve` subprocess (httpx streaming client),
   interleaved with (1) so background load hits all three alike; prints the ratios SSE / runtime (the issue's
   target >= 0.95) and SSE / engine. A second server with `--stream-interval-ms 0` (every token its own chunk)
   runs beside the first, and its stream joins each round, so the default stream interval's gain is measured
   in pairs. Then CPU time per token (/proc task times, robust to background load) of the server's event loop,
   of its engine with the OpenMP team and of the client, streamed and not;
3. aggregate tok/s and TTFT p50/p95 at 1, 2, 4, 8 concurrent streams;
4. a server-side probe that is robust to background load: the app in this process streams one request to a
   `curl` client while the engine's steps are timed; the fraction of wall time spent inside engine steps shows
   how much the HTTP/SSE side delays generation (1.0 = not at all);
5. prefix caching: TTFT of a request whose first `--prefix-tokens` (1,000) prompt tokens repeat the previous
   request's vs that first request's, against a server with a context large enough; prints first / second
   (target >= 5). `--prefix-only` runs just this;
6. structured output: decode tok/s of `json_schema` requests (llguidance token masks) vs the same requests
   unconstrained, at 1 and 8 concurrent streams, interleaved pairs; prints constrained / free (target >= 0.90,
   a cost of at most 10%). `--structured-only` runs just this;
7. sampled decode: the same for requests with a typical chat request's sampling (`SAMPLED`: temperature 0.7,
   top_p 0.9) against greedy ones; prints sampled / greedy.

Decode tok/s = (completion_tokens - 1) / (time of last token - time of first token), so prefill/TTFT is
excluded from both sides of the ratio. Requests use greedy decoding (but in 7) with ignore_eos so lengths are
fixed.

    python benchmarks/serve.py [--model NAME] [--model-store DIR] [--device cpu] [--tokens 64] [--reps 3]
                               [--prefix-tokens 1000] [--prefix-only] [--structured-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time"


def pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ----------------------------------------------------------------------------- in-process engine
def engine_decode_tps(engine, prompt_ids: List[int], tokens: int) -> float:
    from models.sampling import SamplingParams
    from server.engine.request import GenerationRequest

    async def go():
        req = GenerationRequest(list(prompt_ids), SamplingParams(temperature=0.0), max_tokens=tokens, ignore_eos=True)
        times = []
        async for ev in engine.submit(req):
            if ev.token_id >= 0:
                times.append(time.perf_counter())
        return (len(times) - 1) / (times[-1] - times[0])

    return asyncio.run(go())


def runtime_decode_tps(runner, prompt_ids: List[int], tokens: int) -> float:
    """The bare runtime at batch 1 on a fresh thread (the only OpenMP user, as an engine thread is; no engine may be
    running meanwhile): prefill the prompt into slot 0, then `tokens - 1` greedy decode steps; decode tok/s timed as
    the engine's (first to last token). A 4-token run first warms the thread's OpenMP pool."""
    import torch

    from models.threads import run_in_fresh_thread
    from models.sampling import argmax_rows

    def go() -> float:
        with torch.inference_mode():
            ids = torch.tensor(prompt_ids)
            slots = torch.zeros(1, dtype=torch.long)
            times: List[float] = []
            for n in (4, tokens):
                times = []
                tok = argmax_rows(runner.prefill(ids, 0, 0).view(1, -1))
                times.append(time.perf_counter())
                for i in range(n - 1):
                    tok = argmax_rows(runner.decode(tok, torch.tensor([len(prompt_ids) + i]), slots))
                    times.append(time.perf_counter())
            return (len(times) - 1) / (times[-1] - times[0])

    return run_in_fresh_thread(go, name="jetserve-bench-runtime")


# ----------------------------------------------------------------------------- HTTP side
async def stream_completion(client, body: dict) -> Tuple[float, Optional[float], Optional[float], dict, int]:
    """POST a streamed completion with `body` and read it to [DONE]: (t0, time of the first chunk with choices,
    time of the last one, the usage chunk's usage, the number of chunks with choices)."""
    t0 = time.perf_counter()
    first = last = None
    usage: dict = {}
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices"):
                now = time.perf_counter()
                if first is None:
                    first = now
                last = now
                chunks += 1
            if d.get("usage"):
                usage = d["usage"]
    return t0, first, last, usage, chunks


def _greedy_stream(model: str, prompt, tokens: int) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


async def sse_request(client, model: str, tokens: int, extra: Optional[dict] = None) -> Tuple[float, float, int, float]:
    """(ttft_s, decode_tps, completion_tokens, t_end) of one streamed greedy completion, `extra` fields set over
    its body (a response_format, sampling parameters)."""
    body = {**_greedy_stream(model, PROMPT, tokens), **(extra or {})}
    t0, first, last, usage, _ = await stream_completion(client, body)
    n = usage["completion_tokens"]
    # chunks may coalesce several tokens; the first chunk carries >= 1 token
    tps = (n - 1) / (last - first) if last > first else float("nan")
    return first - t0, tps, n, last


async def sse_decode_tps(base: str, model: str, tokens: int) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
        _, tps, _, _ = await sse_request(c, model, tokens)
    return tps


def _task_cpu_s(pid: int) -> Dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: Dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state is field 0, utime 11, stime 12
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def cpu_per_token(base: str, pid: int, model: str, tokens: int, reps: int) -> Dict[str, Dict[str, float]]:
    """CPU time per generated token of the server's event-loop thread (its main thread), of its other threads
    together (the engine and its OpenMP team) and of this client (httpx on this thread), for `reps` streamed
    requests and then the same requests without streaming; plus SSE chunks per token. /proc task times:
    robust to background load, unlike tok/s."""
    import resource

    import httpx

    def client_s() -> float:
        r = resource.getrusage(resource.RUSAGE_THREAD)
        return r.ru_utime + r.ru_stime

    out: Dict[str, Dict[str, float]] = {}
    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
        for mode in ("sse", "json"):
            body = _greedy_stream(model, PROMPT, tokens)
            body["stream"] = mode == "sse"
            chunks = 0
            t0, c0 = _task_cpu_s(pid), client_s()
            for _ in range(reps):
                if mode == "sse":
                    chunks += (await stream_completion(c, body))[4]
                else:
                    (await c.post("/v1/completions", json=body)).raise_for_status()
            t1, c1 = _task_cpu_s(pid), client_s()
            n = tokens * reps
            loop = t1.get(pid, 0.0) - t0.get(pid, 0.0)
            rest = sum(v - t0.get(k, 0.0) for k, v in t1.items() if k != pid)
            out[mode] = {
                "event_loop_us": loop / n * 1e6,
                "engine_and_openmp_us": rest / n * 1e6,
                "client_us": (c1 - c0) / n * 1e6,
                "chunks_per_token": chunks / n,
            }
    return out


async def concurrency(base: str, model: str, n: int, tokens: int, extra: Optional[dict] = None) -> Dict[str, float]:
    import httpx

    limits = httpx.Limits(max_connections=n + 2)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(sse_request(c, model, tokens, extra) for _ in range(n)))
        wall = max(r[3] for r in res) - t0
    ttfts = [r[0] for r in res]
    total = sum(r[2] for r in res)
    # decode only: tokens after each stream's first, over the time from the last first token to the last token
    decode_wall = max(r[3] for r in res) - (t0 + max(ttfts))
    return {
        "streams": n,
        "aggregate_tps": total / wall,
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p95_s": pct(ttfts, 0.95),
        "per_stream_decode_tps": statistics.median(r[1] for r in res),
        "completion_tokens": total,
        "decode_aggregate_tps": (total - n) / decode_wall,
        "wall_s": wall,
    }


async def ttft_request(client, model: str, prompt_ids: List[int]) -> Tuple[float, int]:
    """(ttft_s, usage cached_tokens) of one streamed greedy completion of 2 tokens from token ids."""
    t0, first, _, usage, _ = await stream_completion(client, _greedy_stream(model, prompt_ids, 2))
    return first - t0, usage["prompt_tokens_details"]["cached_tokens"] if usage else -1


def prefix_cache_ttft(args, env: Dict[str, str]) -> Dict[str, object]:
    """TTFT of a request sharing its first `args.prefix_tokens` tokens with the previous request vs the first,
    on a fresh `jetserve serve` whose context holds them; one new shared prefix per rep (no stale hits)."""
    import httpx

    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(args.model_store / args.model)
    filler = " ".join(f"Rule {i}: be brief, be polite, never invent facts, cite the manual." for i in range(400))
    q1, q2 = tok.encode(" First question: what should I do?"), tok.encode(" Second question: how do I reset it?")
    ctx = -(-(args.prefix_tokens + max(len(q1), len(q2)) + 64) // 256) * 256
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    proc = start_server(argparse.Namespace(**{**vars(args), "max_context": ctx}), port, env)
    base = f"http://127.0.0.1:{port}"
    firsts: List[float] = []
    seconds: List[float] = []
    cached: List[int] = []
    try:
        wait_ready(base, proc)

        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=600) as c:
                await ttft_request(c, args.model, tok.encode(PROMPT))  # warm
                for rep in range(args.reps):
                    system = tok.encode(f"Session {rep}. {filler}")[: args.prefix_tokens]
                    t1, c1 = await ttft_request(c, args.model, system + q1)
                    t2, c2 = await ttft_request(c, args.model, system + q2)
                    assert c1 < 16, f"the first request of rep {rep} hit the cache ({c1} tokens)"
                    firsts.append(t1)
                    seconds.append(t2)
                    cached.append(c2)

        asyncio.run(go())
    finally:
        stop_server(proc)
    first, second = statistics.median(firsts), statistics.median(seconds)
    return {
        "prefix_tokens": args.prefix_tokens,
        "ttft_first_s": first,
        "ttft_second_s": second,
        "ratio": first / second,
        "cached_tokens": statistics.median(cached),
        "firsts": firsts,
        "seconds": seconds,
    }


def print_prefix(r: Dict[str, object]) -> None:
    print(
        f"prefix cache: TTFT first {r['ttft_first_s'] * 1000:.1f} ms, second sharing a {r['prefix_tokens']}-token "
        f"prefix ({r['cached_tokens']:.0f} tokens cached) {r['ttft_second_s'] * 1000:.1f} ms, "
        f"ratio {r['ratio']:.1f}x (median of {len(r['firsts'])}; target >= 5)"
    )


# a long free-text field: the grammar stays open for the whole run, so every token is masked and decode lengths
# match the unconstrained requests (max_tokens ends both)
STRUCTURED_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "story",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "story": {"type": "string", "minLength": 4000}},
            "required": ["title", "story"],
            "additionalProperties": False,
        },
    },
}


# a typical chat request's sampling (temperature and nucleus), against greedy decoding
SAMPLED = {"temperature": 0.7, "top_p": 0.9, "seed": 1}


def variant_cost(
    base: str, model: str, tokens: int, reps: int, streams: List[int], extra: dict
) -> List[Dict[str, object]]:
    """Per stream count: aggregate decode tok/s of requests with the `extra` body fields vs the same greedy
    requests without them, from interleaved pairs.

    Aggregate decode tok/s = tokens after each stream's first / time from the last first token to the last
    token (prefill excluded, as in the batch-1 figure); the ratio is the median of per-pair ratios
    (same background load within a pair). Every request must reach `tokens` tokens (no early grammar stop)."""
    rows = []
    for n in streams:
        asyncio.run(concurrency(base, model, n, 8, extra))  # warm: compiles a grammar
        free, variant = [], []
        for _ in range(reps):
            f = asyncio.run(concurrency(base, model, n, tokens))
            c = asyncio.run(concurrency(base, model, n, tokens, extra))
            if c["completion_tokens"] != n * tokens:
                raise RuntimeError(f"requests stopped early: {c['completion_tokens']} of {n * tokens} tokens")
            free.append(f["decode_aggregate_tps"])
            variant.append(c["decode_aggregate_tps"])
        rows.append(
            {
                "streams": n,
                "free_tps": statistics.median(free),
                "variant_tps": statistics.median(variant),
                "ratio": statistics.median(c / f for c, f in zip(variant, free)),
                "free_runs": free,
                "variant_runs": variant,
            }
        )
    return rows


def structured_cost(base: str, model: str, tokens: int, reps: int, streams: List[int]) -> List[Dict[str, object]]:
    """`variant_cost` of `STRUCTURED_FORMAT` (json_schema requests against free text)."""
    return variant_cost(base, model, tokens, reps, streams, {"response_format": STRUCTURED_FORMAT})


def print_structured(rows: List[Dict[str, object]]) -> None:
    for r in rows:
        print(
            f"structured output, {r['streams']} stream(s): json_schema {r['variant_tps']:.1f} tok/s vs free text "
            f"{r['free_tps']:.1f} tok/s aggregate decode, ratio {r['ratio']:.3f} (median of {len(r['free_runs'])} "
            f"interleaved pairs; target >= 0.90)"
        )


def print_sampled(rows: List[Dict[str, object]]) -> None:
    for r in rows:
        print(
            f"sampled decode ({', '.join(f'{k} {v}' for k, v in SAMPLED.items())}), {r['streams']} stream(s): "
            f"{r['variant_tps']:.1f} tok/s vs greedy {r['free_tps']:.1f} tok/s aggregate decode, ratio "
            f"{r['ratio']:.3f} (median of {len(r['free_runs'])} interleaved pairs)"
        )


def engine_busy_probe(args, tokens: int) -> Dict[str, float]:
    """Server-side view, robust to background load: run the app in this process (uvicorn thread), stream one
    request to a `curl` client, and report the fraction of the stream's wall time the engine thread spent
    inside its steps. 1.0 means the HTTP/SSE side never delayed generation."""
    import shutil
    import threading

    import httpx
    import uvicorn

    from server.api.app import create_app
    from server.config import Settings

    curl = shutil.which("curl")
    if curl is None:
        return {}
    settings = Settings(
        model=args.model,
        model_store=args.model_store,
        device=args.device,
        max_batch_size=8,
        max_context=args.max_context,
        log_level="warning",
    )
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None))
    th = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    th.start()
    try:
        while True:
            try:
                if httpx.get(base + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if app.state.jetserve.load_error:
                raise RuntimeError(app.state.jetserve.load_error)
            time.sleep(0.2)
        engine = app.state.manager.get_loaded(args.model).engine
        steps: List[Tuple[float, float]] = []
        chained = engine.on_step

        def record(st):
            steps.append((time.perf_counter(), st.step_duration_s))
            if chained is not None:
                chained(st)

        engine.on_step = record
        out = {}
        for stream in (True, False):
            body = json.dumps(
                {
                    "model": args.model,
                    "prompt": PROMPT,
                    "max_tokens": tokens,
                    "temperature": 0,
                    "stream": stream,
                    "ignore_eos": True,
                }
            )
            steps.clear()
            r = subprocess.run(
                [curl, "-sN", base + "/v1/completions", "-H", "content-type: application/json", "-d", body],
                check=True,
                capture_output=True,
            )
            if len(steps) < 2:
                raise RuntimeError(f"the probe's request produced no tokens: {r.stdout[:300]!r}")
            span = steps[-1][0] - steps[0][0]
            key = "sse" if stream else "json"
            out[f"{key}_engine_busy"] = sum(d for _, d in steps[1:]) / span
            out[f"{key}_tps"] = (len(steps) - 1) / span
        return out
    finally:
        server.should_exit = True
        th.join(30)
        sock.close()


def start_server(args, port: int, env: Dict[str, str], extra: Tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--port",
        str(port),
        "--model-store",
        str(args.model_store),
        "--model",
        args.model,
        "--device",
        args.device,
        "--max-batch-size",
        "8",
        "--max-context",
        str(args.max_context),
        "--log-level",
        "warning",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _ints(csv: str) -> List[int]:
    return [int(x) for x in csv.split(",") if x.strip()]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError("server exited during startup")
        try:
            if httpx.get(base + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name in the store (default: demo 4-bit, else bf16)")
    p.add_argument(
        "--model-store", type=Path, default=Path(os.environ.get("JETSERVE_MODEL_STORE", REPO / "model-store"))
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="shared prompt prefix of the prefix-cache TTFT")
    p.add_argument("--prefix-only", action="store_true", help="run only the prefix-cache TTFT measurement")
    p.add_argument("--structured-only", action="store_true", help="run only the structured-output cost measurement")
    p.add_argument("--structured-streams", default="1,8", help="stream counts of the structured-output cost")
    args = p.parse_args(argv)
    if args.model is None:
        for name in ("smollm2-135m-instruct-gptq-g64", "smollm2-135m-instruct"):
            if (args.model_store / name / "config.json").is_file():
                args.model = name
                break
        else:
            p.error(f"no model in {args.model_store}; run `jetserve demo prepare`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETSERVE_")}
    if args.prefix_only:
        r = prefix_cache_ttft(args, env)
        print_prefix(r)
        if args.json:
            args.json.write_text(json.dumps({"model": args.model, "device": args.device, "prefix_cache": r}, indent=2))
        return 0

    if args.structured_only:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = start_server(args, port, env)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, proc)
            rows = structured_cost(base, args.model, args.tokens, args.reps, _ints(args.structured_streams))
        finally:
            stop_server(proc)
        print_structured(rows)
        if args.json:
            args.json.write_text(json.dumps({"model": args.model, "device": args.device, "structured": rows}, indent=2))
        return 0

    import torch

    from benchmarks.decode import cpu_info
    from models.loader import load_runner
    from models.tokenizer import Tokenizer
    from server.config import Settings
    from server.engine.engine import Engine
    from models.threads import run_in_fresh_thread
    from server.manager import compile_cache_dir

    model_dir = args.model_store / args.model
    settings = Settings(
        model=args.model,
        model_store=args.model_store,
        device=args.device,
        max_batch_size=8,
        max_context=args.max_context,
    )

    # the same runtime options as the server's defaults (lm_head, compiled decode)
    def load():
        r = load_runner(
            model_dir,
            device=args.device,
            dtype=torch.bfloat16,
            max_batch_size=8,
            max_seq=args.max_context,
            lm_head=settings.lm_head_dtype,
            cpu_int4=settings.cpu_int4_kernel,
            cpu_attention=settings.cpu_attention_kernel,
            cpu_fused=settings.cpu_fused_ops,
            kv_cache_dtype=settings.kv_cache_dtype,
            compile_cache_dir=compile_cache_dir(settings, args.device),
        )
        r.warmup()
        return r

    runner = run_in_fresh_thread(load)  # as the model manager loads: the engine thread is the only OpenMP user
    tok = Tokenizer.from_dir(model_dir)
    prompt_ids = tok.encode(PROMPT)

    def engine_run() -> float:
        # a fresh engine per run, stopped after it: while an engine thread lives, its OpenMP pool makes the bare
        # runtime's thread one of two OpenMP users (models/threads.py), and the runtime run would be slowed down
        engine = Engine(runner, settings, name=args.model).start()
        try:
            engine_decode_tps(engine, prompt_ids, 8)  # warm this thread's pool
            return engine_decode_tps(engine, prompt_ids, args.tokens)
        finally:
            engine.stop()

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    proc = start_server(args, ports[0], env)
    proc0 = start_server(args, ports[1], env, ("--stream-interval-ms", "0"))
    base, base0 = (f"http://127.0.0.1:{p}" for p in ports)
    result: Dict[str, object] = {
        "model": args.model,
        "device": args.device,
        "tokens": args.tokens,
        "stream_interval_ms": settings.stream_interval_ms,
        "cpu": cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg()[0],
    }
    try:
        wait_ready(base, proc)
        wait_ready(base0, proc0)
        asyncio.run(sse_decode_tps(base, args.model, 8))  # warm
        asyncio.run(sse_decode_tps(base0, args.model, 8))
        rt, eng, sse, sse0 = [], [], [], []
        for _ in range(args.reps):  # interleaved so background load affects all alike
            rt.append(runtime_decode_tps(runner, prompt_ids, args.tokens))
            eng.append(engine_run())
            sse.append(asyncio.run(sse_decode_tps(base, args.model, args.tokens)))
            sse0.append(asyncio.run(sse_decode_tps(base0, args.model, args.tokens)))
        stop_server(proc0)
        r_med, e_med, s_med = statistics.median(rt), statistics.median(eng), statistics.median(sse)
        # per adjacent triple: the same background load
        ratio = statistics.median(s / e for s, e in zip(sse, eng))
        ratio_rt = statistics.median(s / r for s, r in zip(sse, rt))
        ratio_iv = statistics.median(s / s0 for s, s0 in zip(sse, sse0))
        ratio0_rt = statistics.median(s0 / r for s0, r in zip(sse0, rt))
        result.update(
            runtime_tps=r_med,
            engine_tps=e_med,
            sse_tps=s_med,
            ratio=ratio,
            sse_over_runtime=ratio_rt,
            sse_every_token_tps=statistics.median(sse0),
            sse_every_token_over_runtime=ratio0_rt,
            sse_over_sse_every_token=ratio_iv,
            runtime_runs=rt,
            engine_runs=eng,
            sse_runs=sse,
            sse_every_token_runs=sse0,
        )
        print(
            f"batch 1 decode: bare runtime {r_med:.1f} tok/s, in-process engine {e_med:.1f} tok/s, end-to-end SSE "
            f"{s_med:.1f} tok/s; SSE / runtime {ratio_rt:.3f} (target >= 0.95), SSE / engine {ratio:.3f} (medians "
            f"of {len(eng)} interleaved rounds; stream interval {settings.stream_interval_ms:g} ms)"
        )
        print(
            f"stream interval 0 (a chunk per token): SSE {statistics.median(sse0):.1f} tok/s, SSE / runtime "
            f"{ratio0_rt:.3f}; default / every token {ratio_iv:.3f} (per-round pairs: "
            + ", ".join(f"{s / s0:.3f}" for s, s0 in zip(sse, sse0))
            + ")"
        )
        if Path(f"/proc/{proc.pid}/task").is_dir():
            cpt = asyncio.run(cpu_per_token(base, proc.pid, args.model, args.tokens, args.reps))
            result["cpu_per_token"] = cpt
            for mode, label in (("sse", "streamed"), ("json", "without streaming")):
                r = cpt[mode]
                print(
                    f"CPU a token, {label} ({args.reps} x {args.tokens} tokens, /proc): server event loop "
                    f"{r['event_loop_us']:.0f} us, engine + OpenMP {r['engine_and_openmp_us']:.0f} us, client "
                    f"{r['client_us']:.0f} us"
                    + (f"; {r['chunks_per_token']:.2f} SSE chunks a token" if mode == "sse" else "")
                )
        rows = []
        for n in _ints(args.streams):
            row = asyncio.run(concurrency(base, args.model, n, args.tokens))
            rows.append(row)
            print(
                f"{n} streams: aggregate {row['aggregate_tps']:.1f} tok/s, TTFT p50 {row['ttft_p50_s'] * 1000:.0f} ms "
                f"p95 {row['ttft_p95_s'] * 1000:.0f} ms, per-stream {row['per_stream_decode_tps']:.1f} tok/s"
            )
        result["concurrency"] = rows
        result["structured"] = structured_cost(base, args.model, args.tokens, args.reps, _ints(args.structured_streams))
        print_structured(result["structured"])
        result["sampled"] = variant_cost(
            base, args.model, args.tokens, args.reps, _ints(args.structured_streams), SAMPLED
        )
        print_sampled(result["sampled"])
        result["loadavg_after"] = os.getloadavg()[0]
        print(
            f"load average (1 min) before {result['loadavg_before']:.1f}, after {result['loadavg_after']:.1f} "
            f"on {os.cpu_count()} CPUs"
        )
    finally:
        stop_server(proc)
        if proc0.poll() is None:
            stop_server(proc0)
    # twice the tokens where the context holds them (PROMPT is under 64 tokens)
    probe = engine_busy_probe(args, min(args.tokens * 2, args.max_context - 64))
    if probe:
        result["probe"] = probe
        print(
            f"server-side probe (curl client): engine busy {probe['sse_engine_busy']:.1%} of the wall time while "
            f"streaming SSE ({probe['sse_tps']:.1f} tok/s) vs {probe['json_engine_busy']:.1%} for the same request "
            f"without streaming ({probe['json_tps']:.1f} tok/s)"
        )
    result["prefix_cache"] = prefix_cache_ttft(args, env)
    print_prefix(result["prefix_cache"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
