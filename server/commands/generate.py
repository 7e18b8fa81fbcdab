"""`jetserve generate MODEL --prompt ... --max-tokens N [--stream] [--chat]`: one generation on the jetserve runtime.

Loads MODEL (a folder, or a name in the model store) with `models.loader.load_runner`, starts the serving
engine (`server.engine.Engine`, one slot) over it, submits one request and streams its tokens; the ids become
text here, at the edge, with `models.tokenizer.IncrementalDetokenizer`. The text goes to stdout (as it comes
with --stream); timings go to stderr. Exit status: 0, 2 for bad arguments, 1 if the engine fails the request.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="Model folder, or a name in the model store")
    parser.add_argument("--prompt", "-p", default=None, help="Prompt text (default: read stdin)")
    parser.add_argument("--max-tokens", "-n", type=int, default=128, help="Tokens to generate at most (default 128)")
    parser.add_argument("--stream", action="store_true", help="Print text as it is generated")
    parser.add_argument("--chat", action="store_true", help="Wrap the prompt as a user message in the chat template")
    parser.add_argument("--system", default=None, help="System message for --chat")
    parser.add_argument(
        "--temperature", "-t", type=float, default=0.0, help="Sampling temperature; 0 = greedy (default 0)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (default 1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="Keep the k most likely tokens (default 0 = off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="Drop tokens below min_p x the top probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="HF repetition penalty (default 1)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty (default 0)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty (default 0)")
    parser.add_argument("--seed", type=int, default=None, help="Seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="Stop string (repeatable); not printed")
    parser.add_argument("--ignore-eos", action="store_true", help="Keep generating past end-of-sequence tokens")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="Activation dtype (default bfloat16)")
    parser.add_argument(
        "--max-seq",
        type=int,
        default=None,
        help="KV cache length (default: prompt + max tokens, capped by the model's context)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow the model folder to run its own code (transformers fallback, tokenizer)",
    )
    parser.add_argument(
        "--store", type=Path, default=None, help="Model store (default $JETSERVE_MODEL_STORE or ./model-store)"
    )


def _resolve(model: str, store: Path) -> Optional[Path]:
    for cand in (Path(model).expanduser(), store / model):
        if (cand / "config.json").is_file():
            return cand
    return None


def _error(msg: str, rc: int = 2) -> int:
    print(f"jetserve generate: error: {msg}", file=sys.stderr)
    return rc


def run(args: argparse.Namespace) -> int:
    from server.config import Settings

    settings = Settings()  # the engine's prefill chunk, as `jetserve serve` would use it
    store = Path(args.store if args.store is not None else settings.model_store)
    model_dir = _resolve(args.model, store)
    if model_dir is None:
        return _error(f"model {args.model!r} is neither a folder with config.json nor a name in {store}")
    if args.max_tokens < 1:
        return _error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()

    from models.sampling import SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
    )
    try:
        params.validate()
    except ValueError as e:
        return _error(str(e))

    import torch

    from models.loader import inspect_checkpoint, load_runner
    from models.threads import run_in_fresh_thread
    from models.tokenizer import Tokenizer
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, new_request_id

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_dir(model_dir, trust_remote_code=args.trust_remote_code)
    try:
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt_ids = tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}])
        else:
            prompt_ids = tokenizer.encode(prompt)
    except ValueError as e:
        return _error(str(e))
    if not prompt_ids:
        return _error("the prompt is empty")

    context = inspect_checkpoint(model_dir).max_position
    max_seq = args.max_seq or min(context, len(prompt_ids) + args.max_tokens)
    if len(prompt_ids) + args.max_tokens > max_seq:
        return _error(
            f"prompt ({len(prompt_ids)} tokens) + --max-tokens ({args.max_tokens}) exceeds the context "
            f"({max_seq} tokens)"
        )

    t_load = time.perf_counter()

    def load():
        r = load_runner(
            model_dir,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            max_batch_size=1,
            max_seq=max_seq,
            trust_remote_code=args.trust_remote_code,
            lm_head=settings.lm_head_dtype,  # the served head; decode stays eager (no compile for one request)
            cpu_int4=settings.cpu_int4_kernel,
            cpu_attention=settings.cpu_attention_kernel,
            cpu_fused=settings.cpu_fused_ops,
            kv_cache_dtype=settings.kv_cache_dtype,
        )
        r.warmup()
        return r

    runner = run_in_fresh_thread(load)  # the engine thread is then the only OpenMP user (models.threads)
    t_load = time.perf_counter() - t_load
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        params=params,
        max_tokens=args.max_tokens,
        request_id=new_request_id("gen"),
        stop_token_ids=tuple(tokenizer.eos_token_ids),
        ignore_eos=args.ignore_eos,
        timeout_s=math.inf,
    )
    engine = Engine(runner, settings, name=model_dir.name).start()
    try:
        result = asyncio.run(_generate(engine, tokenizer, request, args))
    finally:
        engine.stop()
    if result.error is not None:
        sys.stdout.write("\n" if args.stream else result.text + "\n")
        return _error(f"generation failed: {result.error}", rc=1)

    if args.stream:
        sys.stdout.write("\n")
    else:
        sys.stdout.write(result.text + "\n")
    sys.stdout.flush()
    n_gen, t_decode = result.tokens, result.decode_s
    decode_rate = (n_gen - 1) / t_decode if n_gen > 1 and t_decode > 0 else float("nan")
    print(
        f"[{model_dir.name} on {runner.device}, load {t_load:.2f}s] prompt {len(prompt_ids)} tokens, "
        f"time to first token {result.ttft_s * 1000:.0f} ms; generated {n_gen} tokens ({result.reason}), "
        f"decode {decode_rate:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


@dataclass
class _Result:
    text: str
    tokens: int  # tokens sampled, the one that ended generation (EOS) included
    reason: str  # "eos" | "stop" (a stop string) | "length"
    ttft_s: float
    decode_s: float  # from the first token to the end
    error: Optional[str] = None  # the engine's error, if the request failed


async def _generate(engine, tokenizer, request, args) -> _Result:
    """Submit `request` to `engine`, stream its tokens and detokenize them here, at the edge.

    A stop string aborts the request (recorded as "stop"); `--stream` text goes to stdout as it comes.
    """
    from models.tokenizer import IncrementalDetokenizer
    from server.engine.request import FINISH_ABORT, FINISH_ERROR, FINISH_STOP, FINISH_TIMEOUT

    detok = IncrementalDetokenizer(tokenizer, stop=args.stop, prompt_ids=request.prompt_ids)

    def emit(piece: str) -> None:
        if args.stream and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()

    t0 = time.perf_counter()
    t1 = t0
    n, reason, error = 0, "length", None
    handle = engine.submit(request)
    async for ev in handle:
        if ev.token_id >= 0:
            n += 1
            if n == 1:
                t1 = time.perf_counter()
        if ev.finish_reason in (FINISH_ERROR, FINISH_TIMEOUT, FINISH_ABORT):
            error = ev.error or ev.finish_reason
            break
        if ev.finish_reason == FINISH_STOP:  # an EOS / stop token (never detokenized)
            reason = "eos"
            break
        emit(detok.add(ev.token_id))
        if detok.stopped:
            reason = "stop"
            handle.abort(FINISH_STOP)
            break
        if ev.finish_reason is not None:
            break
    emit(detok.finish())
    return _Result(detok.text, n, reason, t1 - t0, time.perf_counter() - t1, error)
