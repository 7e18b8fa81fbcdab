"""QuantLinear micro-benchmark: int4 kernel vs dense bf16 vs dequantize+dense, fused vs unfused.

Prints ratios measured side by side in one run (random weights: values don't matter for speed).

    .venv/bin/python benchmarks/qlinear.py                 # CPU, SmolLM2-135M shapes
    .venv/bin/python benchmarks/qlinear.py --device cuda   # + Llama-2-7B shapes, GB/s vs device copy GB/s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bandwidth import measure_bandwidth  # noqa: E402
from models import kernels  # noqa: E402
from models.formats import QuantizedWeight  # noqa: E402
from models.qlinear import QuantLinear  # noqa: E402

SMOLLM2 = {
    "q/o 576x576": (576, 576),
    "k/v 576->192": (576, 192),
    "gate/up 576->1536": (576, 1536),
    "down 1536->576": (1536, 576),
}
LLAMA2_7B = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 4096->11008": (4096, 11008), "down 11008->4096": (11008, 4096)}


GRAPH_CALLS = 20  # calls per captured CUDA graph: times the kernels, not Python launch overhead


def timer(device: torch.device, fn: Callable[[], object], reps: int) -> float:
    """Seconds per call after warm-up. CUDA: `fn` x GRAPH_CALLS captured in one CUDA graph (as the runtime's
    decode is), median over `reps` replays. CPU: best of `reps` (this 2-core CPU is shared, so the minimum
    is the estimate least disturbed by other processes)."""
    samples: List[float] = []
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / GRAPH_CALLS)
        del graph
    else:
        for _ in range(3):
            fn()
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples) if device.type == "cuda" else min(samples)


def random_layer(
    in_f: int, out_f: int, group: int, device: torch.device, gen: torch.Generator, g_idx: torch.Tensor = None
) -> QuantLinear:
    groups = in_f // group
    qw = QuantizedWeight(
        torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8),
        torch.randint(0, 16, (groups, out_f), generator=gen, dtype=torch.uint8),
        (torch.rand(groups, out_f, generator=gen) * 0.01).half(),
        g_idx,
        4,
        group,
    )
    return QuantLinear.from_quantized(qw, device=device)


def dense_weight(layer: QuantLinear) -> torch.Tensor:
    """(out, in) bf16 weight for the dense baseline (dequantized once, outside the timing)."""
    return layer.reference_weight().to(torch.bfloat16)


def bench_shapes(
    device: torch.device, shapes: dict, tokens: Tuple[int, ...], group: int, reps: int, gen: torch.Generator
) -> None:
    print(f"\n## int4 kernel vs dense bf16 on {device.type} (ms per call; ratio = dense / int4, >1: int4 faster)")
    cols = "| layer | tokens | int4 ms | dense ms | dense/int4 |"
    cols += " dequant+dense ms | (dequant+dense)/int4 |"
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    for name, (in_f, out_f) in shapes.items():
        layer = random_layer(in_f, out_f, group, device, gen)
        w = dense_weight(layer)
        for m in tokens:
            x = torch.randn(m, in_f, generator=gen).to(device=device, dtype=torch.bfloat16)
            t_int4 = timer(device, lambda: layer(x), reps)
            t_dense = timer(device, lambda: torch.nn.functional.linear(x, w), reps)
            row = f"| {name} | {m} | {t_int4 * 1e3:.3f} | {t_dense * 1e3:.3f} | {t_dense / t_int4:.2f} |"
            t_deq = timer(
                device,
                lambda: x @ kernels.dequant_t(layer.plan.name, layer.packed, layer.scales_and_zeros, group, in_f),
                reps,
            )
            row += f" {t_deq * 1e3:.3f} | {t_deq / t_int4:.2f} |"
            print(row, flush=True)
        layer = w = None  # free before the next shape


def bench_fusion(
    device: torch.device,
    hidden: int,
    kv: int,
    inter: int,
    group: int,
    tokens: Tuple[int, ...],
    reps: int,
    gen: torch.Generator,
) -> None:
    print(f"\n## fused vs unfused on {device.type} (ratio = unfused / fused, >1: fusion helps)")
    print("| projection | tokens | unfused ms | fused ms | unfused/fused |")
    print("|---|---|---|---|---|")
    for name, outs in (("qkv", (hidden, kv, kv)), ("gate+up", (inter, inter))):
        parts = [random_layer(hidden, o, group, device, gen) for o in outs]
        fused = QuantLinear.fuse(parts)
        for m in tokens:
            x = torch.randn(m, hidden, generator=gen).to(device=device, dtype=torch.bfloat16)
            t_sep = timer(device, lambda: [p(x) for p in parts], reps)
            t_fused = timer(device, lambda: fused(x).split(fused.split_sizes, dim=-1), reps)
            print(f"| {name} | {m} | {t_sep * 1e3:.3f} | {t_fused * 1e3:.3f} | {t_sep / t_fused:.2f} |", flush=True)


def bench_bandwidth(device: torch.device, shapes: dict, group: int, reps: int, gen: torch.Generator) -> None:
    """Batch-1 achieved GB/s (packed weight + scales bytes / time) against a copy the script measures itself."""
    mib = 256 if device.type == "cuda" else 64
    copy_gbs = measure_bandwidth(device, mib, lambda fn: timer(device, fn, reps))["copy_GBps"]  # read + write
    print(f"\n## batch-1 bandwidth on {device.type}: measured copy {copy_gbs:.1f} GB/s (read+write)")
    print("| layer | bytes | int4 us | GB/s | % of copy |")
    print("|---|---|---|---|---|")
    for name, (in_f, out_f) in shapes.items():
        layer = random_layer(in_f, out_f, group, device, gen)
        x = torch.randn(1, in_f, generator=gen).to(device=device, dtype=torch.bfloat16)
        t = timer(device, lambda: layer(x), reps)
        b = layer.weight_bytes()
        print(f"| {name} | {b} | {t * 1e6:.1f} | {b / t / 1e9:.1f} | {100 * b / t / 1e9 / copy_gbs:.0f}% |", flush=True)
        layer = None  # free before the next shape


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave default)")
    ap.add_argument("--tokens", default="1,2,4,8,32,128,512")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    plan = kernels.device_kernel(device)
    print(
        f"# QuantLinear benchmark: device={device}, kernel={plan.name}, torch={torch.__version__}, "
        f"threads={torch.get_num_threads()}"
        + (f", gpu={torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    )
    bench_shapes(device, SMOLLM2, tokens, 64, args.reps, gen)
    bench_fusion(device, 576, 192, 1536, 64, (1, 8, 128), args.reps, gen)
    if device.type == "cuda":
        bench_shapes(device, LLAMA2_7B, tuple(t for t in tokens if t in (1, 8, 32, 512)), 128, args.reps, gen)
        bench_fusion(device, 4096, 4096, 11008, 128, (1, 8, 512), args.reps, gen)
        bench_bandwidth(device, LLAMA2_7B, 128, args.reps, gen)
    else:
        bench_bandwidth(device, {"gate/up 576->1536": (576, 1536), "down 1536->576": (1536, 576)}, 64, args.reps, gen)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
