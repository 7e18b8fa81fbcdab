"""Sliding-window perplexity (the Hugging Face "perplexity of fixed-length models" protocol).

Windows of at most `max_length` tokens start every `stride` tokens; in each window only the tokens not
scored by an earlier window are scored, so every token after the first is scored exactly once, each with
up to `max_length - stride` tokens of left context. Unlike the HF recipe (which averages per-window mean
losses weighted by `trg_len`), this sums exact per-token NLLs and divides by the exact count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Tuple

import torch


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float
    scored_tokens: int
    windows: int


def windows(n_tokens: int, max_length: int, stride: int) -> Iterator[Tuple[int, int, int]]:
    """(begin, end, first_scored) per window: input is ids[begin:end]; targets ids[first_scored:end] are scored."""
    if max_length < 2 or stride < 1 or stride > max_length:
        raise ValueError(f"need 2 <= max_length and 1 <= stride <= max_length (got {max_length}, {stride})")
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)  # token `begin` has no context inside this window
        if end > first:
            yield begin, end, first
        prev_end = end
        if end == n_tokens:
            break


def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    ids: Sequence[int],
    max_length: int = 2048,
    stride: int = 512,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """`logits_fn(ids (T,) LongTensor, last) -> (last, vocab)` logits of the window's last `last` positions
    (no cache); only the positions that predict a scored token are asked for."""
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    nll_sum = 0.0
    count = 0
    n_windows = 0
    for begin, end, first in windows(len(ids_t), max_length, stride):
        n = end - first
        # logits at position p predict token p+1: targets first..end-1 use the logits of positions first-1..end-2,
        # i.e. the last n+1 positions without the final one
        pred = logits_fn(ids_t[begin:end], n + 1).float()[:-1]  # (n, V)
        tgt = ids_t[first:end].to(pred.device)  # (n,)
        nll = torch.nn.functional.cross_entropy(pred, tgt, reduction="sum")
        nll_sum += float(nll)
        count += n
        n_windows += 1
        if progress is not None:
            progress(n)
    if count == 0:
        raise ValueError("text too short for perplexity: need at least 2 tokens")
    return PerplexityResult(math.exp(nll_sum / count), nll_sum, count, n_windows)
