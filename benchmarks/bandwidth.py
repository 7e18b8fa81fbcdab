"""Memory bandwidth the benchmarks measure themselves: read (sum of a big float32 tensor) and copy (read + write).

The read probe sums float32: a bf16 sum into float32 is compute-bound on CPU (about 1 GB/s on one core where
a float32 sum reads about 29 GB/s), so it measured the conversion, not the memory."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional

import torch


def _best_median(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: the lower of two medians of 3 calls (a shared CPU disturbs single samples)."""

    def once(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    def timer(fn: Callable[[], object]) -> float:
        fn()  # warm-up: page in both buffers
        return min(statistics.median(once(fn) for _ in range(3)) for _ in range(2))

    return timer


def measure_bandwidth(
    device="cpu", mib: int = 512, timer: Optional[Callable[[Callable[[], object]], float]] = None
) -> Dict[str, float]:
    """GB/s of reading `mib` MiB (float32 sum) and of copying it (read + write bytes counted).

    `timer(fn)` returns seconds per call; the default is the lower of two medians of 3 calls."""
    device = torch.device(device)
    n = mib * 2**20
    a = torch.ones(n // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    timer = timer or _best_median(device)
    t_read = timer(lambda: a.sum())
    t_copy = timer(lambda: b.copy_(a))
    return {"read_GBps": n / t_read / 1e9, "copy_GBps": 2 * n / t_copy / 1e9}
