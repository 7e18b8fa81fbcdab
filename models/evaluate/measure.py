"""Speed and memory measurements for one loaded runtime (see runtimes.EvalRuntime).

- decode tokens/s: prefill a short prompt, then `new_tokens` greedy decode steps at batch 1; only the decode
  steps are timed; one warm-up run first; median/min/max over `runs`.
- TTFT: wall time of prefilling a `ttft_prompt_tokens` prompt plus the argmax of the first token (median of runs).
- peak memory: process RSS sampled every 5 ms by a thread (CPU) or torch.cuda.max_memory_allocated (CUDA).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from models.heap import release_freed_heap


@dataclass(frozen=True)
class SpeedResult:
    decode_tok_s_median: float
    decode_tok_s_min: float
    decode_tok_s_max: float
    runs: int
    new_tokens: int
    prompt_tokens: int
    ttft_ms_median: float
    ttft_prompt_tokens: int


def decode_once(rt, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode `new_tokens` tokens after `prompt`; returns decode seconds (prefill excluded)."""
    logits = rt.prefill(prompt)
    tok = logits.argmax()
    rt.sync()
    pos = int(prompt.numel())
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        tok = rt.decode(tok, pos).argmax()
        pos += 1
    rt.sync()
    return time.perf_counter() - t0


def ttft_once(rt, prompt: torch.Tensor) -> float:
    rt.sync()
    t0 = time.perf_counter()
    tok = rt.prefill(prompt).argmax()
    rt.sync()
    _ = int(tok)  # the first token is on the host
    return time.perf_counter() - t0


def measure_speed(
    rt, prompt: torch.Tensor, ttft_prompt: torch.Tensor, new_tokens: int = 256, runs: int = 3, warmup: int = 1
) -> SpeedResult:
    for _ in range(warmup):
        decode_once(rt, prompt, min(new_tokens, 32))
        ttft_once(rt, ttft_prompt)
    rates: List[float] = [new_tokens / decode_once(rt, prompt, new_tokens) for _ in range(runs)]
    ttfts = [ttft_once(rt, ttft_prompt) for _ in range(runs)]
    return SpeedResult(
        statistics.median(rates),
        min(rates),
        max(rates),
        runs,
        new_tokens,
        int(prompt.numel()),
        statistics.median(ttfts) * 1e3,
        int(ttft_prompt.numel()),
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _page_size()


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """gc + return freed heap pages to the OS (models.heap.release_freed_heap), so the next model's RSS starts
    low."""
    release_freed_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PeakMemory:
    """Context manager: peak process RSS (CPU) or peak allocated CUDA bytes while inside."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = rss_bytes()
            self.peak = self.start
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())


def disk_bytes(model_dir: Path) -> Dict[str, int]:
    files = [p for p in Path(model_dir).rglob("*") if p.is_file()]
    return {
        "weights_on_disk": sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".bin")),
        "folder_on_disk": sum(p.stat().st_size for p in files),
    }
