"""Where a 7B-shaped W4 decode step spends GPU time: per-kernel achieved GB/s at M=1 and a profiler table."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ev_time(fn, iters=50):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters / 1e3


def main() -> int:
    dev = torch.device("cuda")
    x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
    for n, k in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]:
        xk = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
        sz = torch.randn(k // 128, n, 2, device=dev, dtype=torch.bfloat16)
        for tiles in (8, 4, 2):
            if k % (16 * tiles):
                continue
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), tiles)
            t = ev_time(lambda: torch.ops.aten._weight_int4pack_mm(xk, packed, 128, sz))
            print(
                f"int4mm n={n} k={k} tiles={tiles}: {t * 1e6:.1f} us, {(n * k / 2 + sz.numel() * 2) / t / 1e9:.0f} GB/s"
            )
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        t = ev_time(lambda: torch.nn.functional.linear(xk, w))
        print(f"bf16 linear n={n} k={k}: {t * 1e6:.1f} us, {n * k * 2 / t / 1e9:.0f} GB/s")
    w = torch.randn(32000, 4096, device=dev, dtype=torch.bfloat16)
    t = ev_time(lambda: torch.nn.functional.linear(x, w))
    print(f"lm_head bf16: {t * 1e6:.1f} us, {w.numel() * 2 / t / 1e9:.0f} GB/s")

    from scripts.gpu_bench import LLAMA2_7B, build_random_model
    from models.kv_cache import KVCache
    from models.runner import Runner

    model = build_random_model(LLAMA2_7B, dev)
    model.init_rope(512, dev, torch.bfloat16)
    cache = KVCache(32, 8, 512, 32, 128, device=dev, dtype=torch.bfloat16)
    r = Runner(model, cache, device=dev, dtype=torch.bfloat16, use_cuda_graphs=False)
    toks, pos, slots = torch.zeros(1, dtype=torch.long), torch.tensor([200]), torch.tensor([0])
    for _ in range(3):
        r.decode(toks, pos, slots)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            r.decode(toks, pos, slots)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
