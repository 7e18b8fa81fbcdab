"""`jetserve generate MODEL --prompt ... --max-tokens N [--stream] [--chat]`: one generation on the jetserve runtime.

Loads MODEL (a folder, or a name in the model store) with `models.loader.load_runner`, prefills the prompt,
then decodes one token at a time with `models.sampling.sample` and turns the ids into text with
`models.tokenizer.IncrementalDetokenizer`. The text goes to stdout (as it comes with --stream); timings go to
stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
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
    parser.add_argument("--temperature", "-t", type=float, default=0.0,
                        help="Sampling temperature; 0 = greedy (default 0)")
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
    parser.add_argument("--max-seq", type=int, default=None,
                        help="KV cache length (default: prompt + max tokens, capped by the model's context)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Allow the model folder to run its own code (transformers fallback, tokenizer)")
    parser.add_argument("--store", type=Path, default=None,
                        help="Model store (default $JETSERVE_MODEL_STORE or ./model-store)")


def _resolve(model: str, store: Path) -> Optional[Path]:
    for cand in (Path(model).expanduser(), store / model):
        if (cand / "config.json").is_file():
            return cand
    return None


def _error(msg: str) -> int:
    print(f"jetserve generate: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from server.config import Settings

    store = Path(args.store if args.store is not None else Settings().model_store)
    model_dir = _resolve(args.model, store)
    if model_dir is None:
        return _error(f"model {args.model!r} is neither a folder with config.json nor a name in {store}")
    if args.max_tokens < 1:
        return _error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()

    from models.sampling import SamplingParams

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed)
    try:
        params.validate()
    except ValueError as e:
        return _error(str(e))

    import torch

    from models.loader import inspect_checkpoint, load_runner
    from models.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_dir(model_dir, trust_remote_code=args.trust_remote_code)
    try:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
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
        return _error(f"prompt ({len(prompt_ids)} tokens) + --max-tokens ({args.max_tokens}) exceeds the context "
                      f"({max_seq} tokens)")

    t_load = time.perf_counter()
    runner = load_runner(model_dir, device=args.device, dtype=getattr(torch, args.dtype), max_slots=1, max_seq=max_seq,
                         trust_remote_code=args.trust_remote_code)
    runner.warmup()
    t_load = time.perf_counter() - t_load
    text, n_gen, reason, ttft, t_decode = _generate(runner, tokenizer, params, prompt_ids, args)

    if args.stream:
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()
    decode_rate = (n_gen - 1) / t_decode if n_gen > 1 and t_decode > 0 else float("nan")
    print(f"[{model_dir.name} on {runner.device}, load {t_load:.2f}s] prompt {len(prompt_ids)} tokens, "
          f"time to first token {ttft * 1000:.0f} ms; generated {n_gen} tokens ({reason}), "
          f"decode {decode_rate:.1f} tok/s", file=sys.stderr)
    return 0


def _generate(runner, tokenizer, params, prompt_ids, args):
    """The generation loop; returns (text, tokens generated, finish reason, TTFT s, decode s after the first)."""
    import torch

    from models.sampling import make_generator, sample
    from models.tokenizer import IncrementalDetokenizer

    dev = runner.device
    P, N = len(prompt_ids), args.max_tokens
    penalties = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                 or params.frequency_penalty != 0.0)
    history = torch.full((1, P + N), -1, dtype=torch.long, device=dev)  # prompt then generated ids, -1 padded
    history[0, :P] = torch.tensor(prompt_ids, dtype=torch.long)
    gen = [make_generator(params.seed, dev)]
    detok = IncrementalDetokenizer(tokenizer, stop=args.stop, prompt_ids=prompt_ids)
    eos = set() if args.ignore_eos else set(tokenizer.eos_token_ids) | set(runner.eos_token_ids)
    slot = torch.zeros(1, dtype=torch.long)
    pos = torch.zeros(1, dtype=torch.long)

    def emit(piece: str) -> None:
        if args.stream and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()

    t0 = time.perf_counter()
    logits = runner.prefill(torch.tensor(prompt_ids, dtype=torch.long), 0, 0)[None]  # (1, V)
    reason, n, ttft, t1 = "length", 0, 0.0, t0
    for n in range(1, N + 1):
        tok = sample(logits, [params], history if penalties else None, gen, prompt_lens=[P]).tokens  # (1,)
        tid = int(tok[0])
        if n == 1:
            t1 = time.perf_counter()
            ttft = t1 - t0
        if tid in eos:
            reason = "eos"
            break
        history[0, P + n - 1] = tid
        emit(detok.add(tid))
        if detok.stopped:
            reason = "stop"
            break
        if n == N:
            break
        pos[0] = P + n - 1
        logits = runner.decode(tok, pos, slot)
    emit(detok.finish())
    t_decode = time.perf_counter() - t1
    runner.release(0)
    return detok.text, n, reason, ttft, t_decode
