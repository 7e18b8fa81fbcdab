"""Sampling: pure functions from logits to token ids.

No text, no module state. `sample` works on a batch whose rows may each have different parameters; every
step is vectorised across the batch with per-row parameter tensors (the only Python loop is over seeded
rows, to draw each row's noise from its own generator).

Order of operations (HF `generate` order for the warpers, vLLM order for the penalties):
0. an optional allowed-token mask (grammar-constrained rows, packed 32 tokens per int32 word) sets the logits
   of every disallowed token to -inf;
1. penalties on the raw logits: repetition (HF `RepetitionPenaltyLogitsProcessor`: a logit of a token seen
   in prompt+generated is divided by the penalty when positive, multiplied when negative), then frequency
   and presence (OpenAI: `logit -= frequency * count + presence * (count > 0)`, counting generated tokens only);
2. greedy rows (temperature == 0) take the argmax of the penalised logits;
3. temperature, then top-k, then top-p (the smallest set of most likely tokens whose mass reaches top_p;
   the most likely token is always kept), then min-p (drop tokens whose probability is below
   min_p * the largest probability);
4. one draw per row by inversion: one uniform u per row, the token where the cumulative probability of the kept
   tokens, in vocabulary order, first exceeds u: an exact sample of `p`. A row with a generator draws only from
   it, so a seeded request gives the same tokens whatever else is in the batch. Float32 CPU rows take steps 3-4
   in one C++ call (`sample_rows`) where the extension is loaded; `_draw_torch` is its reference and the path
   elsewhere, and on CPU draws a row that filters (top-k, top-p or min-p) among its 128 (else 1024) most likely
   tokens when they hold every token it keeps (`_candidates`).

Returned log-probabilities are those of the raw model distribution (`log_softmax` of the logits as given,
before penalties and temperature), as vLLM reports them by default. They are computed only when a row asks.

Per-step cost: a batch of greedy rows without penalties, mask or logprobs is one argmax over the vocabulary.
Penalties need per-row token statistics (`TokenCounts`): build them from padded histories, or keep them across
steps in a `TokenCountsBuffer`, updated by one scatter per step instead of rebuilt from the token lists.

torch is imported inside the functions, so describing a request (`SamplingParams`) does not import torch:
server/api builds SamplingParams and never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Range:
    """An interval `[lo, hi]` (`(lo, ...` when `lo_open`; `hi=None`: unbounded above) and what its values mean."""

    lo: float
    hi: Optional[float] = None
    lo_open: bool = False
    note: str = ""

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        return above and (self.hi is None or v <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"


# The one table of sampling limits: `SamplingParams.validate` checks it and server/api/protocol.py derives its
# request bounds from it. OpenAI's ranges where OpenAI has one; logprobs is OpenAI chat's top_logprobs limit,
# used for completions' logprobs too (as vLLM does).
LIMITS: Dict[str, Range] = {
    "temperature": Range(0.0, 2.0, note="0 means greedy"),
    "top_p": Range(0.0, 1.0, lo_open=True),
    "top_k": Range(-1, note="0 or -1 disables it"),
    "min_p": Range(0.0, 1.0, note="0 disables it"),
    "repetition_penalty": Range(0.0, 10.0, lo_open=True, note="1 disables it"),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "logprobs": Range(0, 20, note="top tokens returned besides the chosen one"),
}
MAX_LOGPROBS = int(LIMITS["logprobs"].hi)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters. Defaults sample from the full distribution at temperature 1."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # None: no logprobs; k >= 0: chosen token's logprob plus the top k

    def validate(self) -> "SamplingParams":
        """Raise ValueError with a clear message when a value is NaN, infinite or outside `LIMITS`; return self."""

        def finite(name: str, v) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
            return float(v)

        def integer(name: str, v) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            return v

        for name, limit in LIMITS.items():
            v = getattr(self, name)
            if name == "logprobs" and v is None:
                continue
            v = integer(name, v) if name in ("top_k", "logprobs") else finite(name, v)
            if v not in limit:
                note = f" ({limit.note})" if limit.note else ""
                raise ValueError(f"{name} must be {limit}{note}, got {v}")
        if self.seed is not None:
            integer("seed", self.seed)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SampleOutput:
    """Result of one `sample` call; tensors live on the logits' device.

    tokens: (B,) int64 chosen ids. logprobs: (B,) float32 raw-model log-probability of each chosen id, for every
    row when at least one row asked for logprobs (`SamplingParams.logprobs` not None), else None.
    top_ids / top_logprobs: (B, k) with k = the largest `logprobs` asked in the batch (rows that asked
    for fewer use their first entries), sorted by decreasing logprob; None when no row asked for k > 0.
    """

    tokens: torch.Tensor
    logprobs: Optional[torch.Tensor] = None
    top_ids: Optional[torch.Tensor] = None
    top_logprobs: Optional[torch.Tensor] = None


def make_generator(seed: Optional[int], device: Union[str, torch.device] = "cpu") -> Optional[torch.Generator]:
    """A generator on `device` seeded with `seed` (any Python int; taken mod 2**64), or None when seed is None
    (the row then draws from torch's global generator)."""
    import torch

    if seed is None:
        return None
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed) % (1 << 64))
    return g


def _row_tensor(values: Sequence[float], like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Per-row values as a (B, 1) tensor on `like`'s device, to broadcast over the vocabulary."""
    import torch

    return torch.tensor(values, dtype=dtype or torch.float32).to(like.device, non_blocking=True).unsqueeze(1)


def _param_columns(params: Sequence[SamplingParams], *fields: str) -> List[torch.Tensor]:
    """One (B,) float32 CPU tensor per named `SamplingParams` field: the C++ kernels' per-row arguments."""
    import torch

    return [torch.tensor([getattr(p, f) for p in params], dtype=torch.float32) for f in fields]


def _as_float32(logits: torch.Tensor) -> torch.Tensor:
    """`logits` itself when already float32, else a float32 copy."""
    import torch

    return logits if logits.dtype == torch.float32 else logits.float()


def argmax_rows(x: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x.argmax(dim=-1)` (the first index on ties, NaN counts as largest); with `allowed` (B, ceil(V/32)) int32
    packed token masks, that of `x` with every disallowed token at -inf. A 2-D float32 CPU `x` (and a contiguous
    int32 CPU mask) goes to the C++ kernel (`argmax_rows` in models/csrc/fused_ops.cpp) where this process has
    loaded the extension, else (and for anything else) to `max(dim=-1).indices` after `unpack_token_bitmask` and
    `masked_fill`; torch runs `max` about three times faster than `argmax` on CPU. All give the same indices
    (docs/benchmarks.md)."""
    import torch

    if x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[1] > 0:
        from . import w4a8

        ops = w4a8.loaded()
        if ops is not None and (
            allowed is None or (allowed.dtype == torch.int32 and allowed.device.type == "cpu" and allowed.dim() == 2)
        ):
            xc = x if x.stride(1) == 1 else x.contiguous()
            return ops.argmax_rows(xc) if allowed is None else ops.argmax_rows(xc, allowed.contiguous())
    if allowed is not None:
        keep = unpack_token_bitmask(allowed.to(x.device, non_blocking=True), x.shape[-1])
        x = x.masked_fill(~keep, float("-inf"))
    return x.max(dim=-1).indices


def has_penalty(p: SamplingParams) -> bool:
    """True when `p` asks for any repetition, presence or frequency penalty."""
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


@dataclass
class TokenCounts:
    """Per-row token statistics the penalties read.

    seen: (B, V) bool, the token occurs in the prompt or among the generated ids. counts: (B, V) float32,
    occurrences of the token among the generated ids only (exact integers).
    """

    seen: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_histories(
        cls, histories: torch.Tensor, prompt_lens: Optional[Union[torch.Tensor, Sequence[int]]], vocab: int
    ) -> "TokenCounts":
        """From (B, L) int64 histories (prompt ids then generated ids, padded with -1) and (B,) counts of leading
        prompt ids (None: 0, i.e. the whole history counts as generated); on the histories' device."""
        import torch

        b, length = histories.shape
        device = histories.device
        if prompt_lens is None:
            prompt_lens_t = torch.zeros(b, dtype=torch.long, device=device)
        else:
            prompt_lens_t = torch.as_tensor(prompt_lens, dtype=torch.long).to(device)
        valid = histories >= 0  # (B, L)
        ids = torch.where(valid, histories, torch.full_like(histories, vocab))  # padding -> spare column V
        seen = torch.zeros(b, vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
        pos = torch.arange(length, device=device).unsqueeze(0)  # (1, L)
        generated = valid & (pos >= prompt_lens_t.unsqueeze(1))  # (B, L)
        counts = torch.zeros(b, vocab + 1, dtype=torch.float32, device=device)
        counts.scatter_add_(1, ids, generated.to(torch.float32))
        return cls(seen[:, :vocab], counts[:, :vocab])


class TokenCountsBuffer:
    """`TokenCounts` kept across steps for a fixed set of rows (e.g. one per KV slot): a decode step then costs
    one scatter of the new tokens instead of a rebuild from the token lists.

    `reset(row, prompt, generated)` (re)fills one row, O(V + len), once per sequence; `add(rows, tokens)` counts
    one more generated token in each of the given distinct rows; `select(rows)` returns those rows'
    `TokenCounts`, in that order, for `sample`. Memory: (num_rows, V) bool + float32 on `device`, allocated once.
    """

    def __init__(self, num_rows: int, vocab: int, device: Union[str, torch.device] = "cpu"):
        import torch

        self.vocab = vocab
        self.device = torch.device(device)
        self.seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(num_rows, vocab, dtype=torch.float32, device=self.device)

    def reset(self, row: int, prompt: Sequence[int], generated: Sequence[int] = ()) -> None:
        import torch

        self.seen[row].zero_()
        self.counts[row].zero_()
        ids = torch.tensor(list(prompt) + list(generated), dtype=torch.long).to(self.device, non_blocking=True)
        self.seen[row].scatter_(0, ids, True)
        if len(generated):
            gen = ids[len(prompt) :]
            self.counts[row].scatter_add_(0, gen, torch.ones(gen.shape, dtype=torch.float32, device=self.device))

    def add(self, rows: Sequence[int], tokens: Sequence[int]) -> None:
        import torch

        if not len(rows):
            return
        r = torch.tensor(list(rows), dtype=torch.long).to(self.device, non_blocking=True)
        t = torch.tensor(list(tokens), dtype=torch.long).to(self.device, non_blocking=True)
        self.seen[r, t] = True
        self.counts[r, t] += 1.0  # distinct rows: no (row, token) pair repeats

    def select(self, rows: Sequence[int]) -> TokenCounts:
        import torch

        r = torch.tensor(list(rows), dtype=torch.long).to(self.device, non_blocking=True)
        return TokenCounts(self.seen.index_select(0, r), self.counts.index_select(0, r))


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Optional[torch.Tensor],
    prompt_lens: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    counts: Optional[TokenCounts] = None,
) -> torch.Tensor:
    """Repetition, frequency and presence penalties; returns (B, V) float32 (the input itself when it is float32
    and no row has a penalty, or neither statistics source is given).

    Token statistics come from `counts` (used when given) or from `histories`: (B, L) int64, each row prompt ids
    then generated ids, padded with -1, with prompt_lens: (B,) count of leading prompt ids per row (None: 0, i.e.
    the whole history counts as generated). Equal statistics give bit-identical results. Float32 CPU logits go
    to the C++ kernel where this process has loaded the extension (it may round `logit - frequency * count` once
    instead of twice).
    """
    import torch

    x = _as_float32(logits)
    if counts is None and (histories is None or histories.numel() == 0):
        return x
    if not any(has_penalty(p) for p in params):
        return x
    if counts is None:
        counts = TokenCounts.from_histories(histories.to(x.device, torch.long), prompt_lens, x.shape[1])
    seen, n = counts.seen.to(x.device), counts.counts.to(x.device)
    if x.device.type == "cpu" and seen.dtype == torch.bool and n.dtype == torch.float32:
        from . import w4a8

        ops = w4a8.loaded()
        if ops is not None:  # the same formulas in one pass (models/csrc/fused_ops.cpp `penalties`)
            row = _param_columns(params, "repetition_penalty", "frequency_penalty", "presence_penalty")
            return ops.penalties(x.contiguous(), seen.contiguous(), n.contiguous(), *row)
    rep = _row_tensor([p.repetition_penalty for p in params], x)
    penalised = torch.where(x > 0, x / rep, x * rep)
    x = torch.where(seen, penalised, x)
    freq = _row_tensor([p.frequency_penalty for p in params], x)
    pres = _row_tensor([p.presence_penalty for p in params], x)
    x = x - freq * n - pres * (n > 0).to(x.dtype)
    return x


def _filters(p: SamplingParams, v: int) -> bool:
    """Whether a sampled row's top-k, top-p or min-p removes tokens from a `v`-token vocabulary."""
    return 0 < p.top_k < v or p.top_p < 1.0 or p.min_p > 0.0


def _temperature(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Float32 logits divided by each row's temperature (greedy rows by 1)."""
    x = _as_float32(x)
    temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    return x / _row_tensor(temps, x) if any(t != 1.0 for t in temps) else x


def _k_and_p(params: Sequence[SamplingParams], v: int) -> Tuple[List[int], List[float]]:
    """Per-row top-k (v: off) and top-p (1: off); greedy rows keep everything."""
    ks = [p.top_k if (p.top_k > 0 and p.temperature > 0) else v for p in params]
    ps = [p.top_p if p.temperature > 0 else 1.0 for p in params]
    return ks, ps


def _min_p(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Drop the tokens of each row whose probability is below min_p x the row's largest (rows of x: kept tokens
    finite, removed ones -inf, in any order and over any subset of the vocabulary holding all kept tokens)."""
    mins = [p.min_p if p.temperature > 0 else 0.0 for p in params]
    if not any(m > 0 for m in mins):
        return x
    probs = x.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * _row_tensor(mins, x)  # (B, 1)
    return x.masked_fill(probs < threshold, float("-inf"))


def apply_warpers(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p for sampled rows; returns (B, V) float32 logits with removed tokens at -inf.

    Greedy rows (temperature 0) are left at temperature 1 and unfiltered: their token is the argmax anyway.
    """
    x = _temperature(logits, params)
    ks, ps = _k_and_p(params, x.shape[1])
    if any(k < x.shape[1] for k in ks) or any(p < 1.0 for p in ps):
        x = _top_k_top_p(x, ks, ps)
    return _min_p(x, params)


def _draw(x: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[Optional[torch.Generator]]):
    """One token per sampled row of `x` (S, V) from its warped distribution (`apply_warpers`' kept tokens and
    probabilities), by inversion with one uniform per row (a row with a generator draws from it alone, once).
    Float32 CPU rows go to the C++ kernel (`sample_rows` in models/csrc/fused_ops.cpp) where this process has
    loaded the extension; `_draw_torch` is its plain-PyTorch reference and the path everywhere else."""
    import torch

    if x.device.type == "cpu" and x.dtype == torch.float32:
        from . import w4a8

        ops = w4a8.loaded()
        if ops is not None:
            v = x.shape[1]
            f32 = _param_columns(params, "temperature", "top_p", "min_p")
            top_k = torch.tensor([p.top_k if p.top_k > 0 else v for p in params], dtype=torch.long)
            u = _uniforms(len(params), x.device, generators)
            return ops.sample_rows(x.contiguous(), f32[0], top_k, f32[1], f32[2], u)
    return _draw_torch(x, params, generators)


def _draw_torch(
    x: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[Optional[torch.Generator]]
) -> torch.Tensor:
    """`_draw` in torch operations: the rows that filter (top-k, top-p or min-p) apart from the others, so that on
    CPU they can draw among their top candidates (`_draw_group_torch`)."""
    import torch

    v = x.shape[1]
    filtered = [i for i, p in enumerate(params) if _filters(p, v)]
    if len(filtered) in (0, len(params)):
        return _draw_group_torch(x, params, generators)
    tokens = torch.empty(len(params), dtype=torch.long, device=x.device)
    for rows in (filtered, [i for i, p in enumerate(params) if not _filters(p, v)]):
        idx = torch.tensor(rows, device=x.device)
        tokens[idx] = _draw_group_torch(x[rows], [params[i] for i in rows], [generators[i] for i in rows])
    return tokens


def _draw_group_torch(
    x: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[Optional[torch.Generator]]
) -> torch.Tensor:
    """`_draw_torch` for rows that all filter, or all do not. On CPU, when every row filters, each row whose top
    candidates cover its kept tokens is warped and drawn among them (`CPU_TOP_P_CANDIDATES` sizes in turn); the
    others over the whole vocabulary."""
    import torch

    xt = _temperature(x, params)
    s, v = xt.shape
    ks, ps = _k_and_p(params, v)
    mins = [p.min_p for p in params]
    tokens = torch.empty(s, dtype=torch.long, device=xt.device)
    pending = list(range(s))
    need = max((k for k in ks if k < v), default=0)
    if xt.device.type == "cpu" and all(_filters(p, v) for p in params) and need <= CPU_TOP_P_CANDIDATES[-1]:
        for size in CPU_TOP_P_CANDIDATES:
            n_cand = max(size, need)
            if n_cand >= v or not pending:
                break
            sub = xt if len(pending) == s else xt[pending]
            cand, idx, covered = _candidates(
                sub, [ks[i] for i in pending], [ps[i] for i in pending], [mins[i] for i in pending], n_cand
            )
            hit = covered.tolist()  # host tensor: no device sync
            rows = [r for r, h in zip(pending, hit) if h]
            if rows:
                keep = torch.tensor([j for j, h in enumerate(hit) if h])
                cand, idx = (cand, idx) if len(rows) == len(pending) else (cand[keep], idx[keep])
                # in vocabulary order, as full rows: a row's cumulative mass, and so its token for a given uniform,
                # does not depend on which path it took
                idx, order = idx.sort(dim=-1)  # (R, K) each
                vals = _min_p(cand, [params[i] for i in rows]).gather(1, order)
                pos = _inverse_cdf(vals, _uniforms(len(rows), xt.device, [generators[i] for i in rows]))
                drawn = idx.gather(1, pos.unsqueeze(1)).squeeze(1)
                if len(rows) == s:
                    return drawn
                tokens[torch.tensor(rows)] = drawn
            pending = [r for r, h in zip(pending, hit) if not h]
    if pending:
        sub = xt if len(pending) == s else xt[pending]
        pk, pp = [ks[i] for i in pending], [ps[i] for i in pending]
        if any(k < v for k in pk) or any(p < 1.0 for p in pp):
            sub = _top_k_top_p(sub, pk, pp, candidates=False)
        vals = _min_p(sub, [params[i] for i in pending])  # (P, V)
        pos = _inverse_cdf(vals, _uniforms(len(pending), xt.device, [generators[i] for i in pending]))
        if len(pending) == s:
            return pos
        tokens[torch.tensor(pending, device=xt.device)] = pos
    return tokens


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of warped logits w (B, N) (removed tokens -inf), the first position whose cumulative probability
    exceeds u (B,) in [0, 1): an exact draw from softmax(w). Removed tokens add no mass, so they are never drawn;
    a row without any finite logit gives 0."""
    import torch

    m = w.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    cum = (w - m).exp_().cumsum_(dim=-1)  # (B, N), unnormalised
    total = cum[:, -1:].contiguous()
    pos = torch.searchsorted(cum, u.unsqueeze(1) * total, right=True)  # first position with cum > u * total
    # u * total can round up to total: then the last position adding mass (the first where cum reaches total)
    return torch.minimum(pos, torch.searchsorted(cum, total)).squeeze(1)


def _uniforms(b: int, device: torch.device, generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """(B,) float32 uniforms in [0, 1): a row with a generator draws from it alone, other rows from the global
    RNG."""
    import torch

    u = torch.empty(b, dtype=torch.float32, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == b:
        return u.uniform_()
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand((), generator=g, device=device)
    return u


# On CPU a full sort of the vocabulary costs ~5 ms a row, and top-k of 1024 of 49152 logits ~0.3 ms against
# ~0.06 ms for 128: the top-p nucleus almost always lies in the few dozen most likely tokens, so the candidate
# sets are tried in these sizes, and everything is sorted only when the largest does not cover a row.
CPU_TOP_P_CANDIDATES = (128, 1024)


def _candidates(
    x: torch.Tensor, ks: Sequence[int], ps: Sequence[float], mins: Sequence[float], n_cand: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's top `n_cand` (< V, >= every top_k below V) logits filtered by its top-k and top-p: (values
    (B, K) sorted descending, removed ones -inf; their vocabulary indices (B, K); covered (B,) bool). A row is
    covered when the candidates hold every token its top-p keeps (those whose preceding mass is below top_p) and,
    for a row that min-p filters alone, every token whose probability is at least min_p x the largest (a logit
    at least the largest + log(min_p)); only a covered row's values are its filtered distribution."""
    import torch

    b, v = x.shape
    k_t = _row_tensor(ks, x, torch.long)  # (B, 1)
    k_on = k_t < v
    # rows with top_p == 1 keep everything (float32 cumsum can reach 1.0 before the tail)
    limit = _row_tensor([p if p < 1.0 else float("inf") for p in ps], x)  # (B, 1)
    floor = _row_tensor([math.log(m) if m > 0 else float("-inf") for m in mins], x)  # (B, 1)
    min_only = ~k_on & torch.isinf(limit) & torch.isfinite(floor)
    cand, idx = x.topk(n_cand, dim=-1)  # (B, K) sorted descending
    cand = cand.masked_fill(torch.arange(n_cand).unsqueeze(0) >= k_t, float("-inf"))
    covered = ~min_only | (cand[:, -1:] < cand[:, :1] + floor)
    if any(p < 1.0 for p in ps):  # top-p needs each candidate's probability; top-k and min-p do not
        lse = cand.logsumexp(-1, keepdim=True)
        if not bool(k_on.all()):
            lse = torch.where(k_on, lse, x.logsumexp(-1, keepdim=True))  # (B, 1)
        probs = (cand - lse).exp()
        cum = probs.cumsum(dim=-1)
        covered &= (cum[:, -1:] >= limit) | torch.isinf(limit)
        cand = cand.masked_fill(cum - probs >= limit, float("-inf"))
    return cand, idx, covered.squeeze(1)


def _top_k_top_p_candidates(
    x: torch.Tensor, ks: Sequence[int], ps: Sequence[float]
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """CPU shortcut of `_top_k_top_p`: `_candidates` of the first of `CPU_TOP_P_CANDIDATES` (at least the largest
    top_k) that covers every row, as (values, indices); None on other devices, or when no size covers every row
    or K would hold the vocabulary."""
    b, v = x.shape
    need = max((k for k in ks if k < v), default=0)
    if x.device.type != "cpu" or need > CPU_TOP_P_CANDIDATES[-1]:
        return None
    for size in CPU_TOP_P_CANDIDATES:
        n_cand = max(size, need)
        if n_cand >= v:
            return None
        cand, idx, covered = _candidates(x, ks, ps, [0.0] * b, n_cand)
        if bool(covered.all()):
            return cand, idx
    return None


def _top_k_top_p(x: torch.Tensor, ks: Sequence[int], ps: Sequence[float], candidates: bool = True) -> torch.Tensor:
    """Keep each row's `ks[i]` largest logits, then the smallest prefix whose mass (after top-k) reaches `ps[i]`.
    `candidates=False` skips the CPU shortcut (a caller that already found it does not cover the rows)."""
    import torch

    b, v = x.shape
    cand = _top_k_top_p_candidates(x, ks, ps) if candidates else None
    if cand is not None:
        active = _row_tensor([k < v or p < 1.0 for k, p in zip(ks, ps)], x, torch.bool)  # unfiltered rows keep all
        return torch.where(active, torch.full_like(x, float("-inf")).scatter(1, cand[1], cand[0]), x)
    k_t = _row_tensor(ks, x, torch.long)  # (B, 1)
    limit = _row_tensor([p if p < 1.0 else float("inf") for p in ps], x)  # (B, 1)
    sorted_x, order = x.sort(dim=-1, descending=True)  # (B, V) each
    sorted_x = sorted_x.masked_fill(torch.arange(v, device=x.device).unsqueeze(0) >= k_t, float("-inf"))
    if any(p < 1.0 for p in ps):
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # exclusive cumulative mass, (B, V)
        sorted_x = sorted_x.masked_fill(mass_before >= limit, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)


def unpack_token_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, ceil(V/32)) int32 packed mask -> (B, V) bool; bit j of word w allows token 32 * w + j (the layout
    llguidance and xgrammar fill). Tokens past 32 * words are disallowed."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1).bool().flatten(1)  # (B, 32 * W)
    if bits.shape[1] < vocab:
        bits = torch.cat([bits, bits.new_zeros(bits.shape[0], vocab - bits.shape[1])], dim=1)
    return bits[:, :vocab]


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Optional[torch.Tensor] = None,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
    prompt_lens: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    allowed: Optional[torch.Tensor] = None,
    counts: Optional[TokenCounts] = None,
) -> SampleOutput:
    """Choose one token per row.

    logits: (B, V) float (float32 is used as is, any other dtype is cast once); params: B validated
    SamplingParams; histories: (B, L) int64 prompt+generated ids padded with -1, with prompt_lens: (B,) leading
    prompt ids in each history (None: 0), or counts: the rows' `TokenCounts` (used instead of histories when
    given); either is needed only for penalties, and without both no penalty applies. generators: B entries
    from `make_generator` (None entries and a None list use the global RNG); allowed: (B, ceil(V/32)) int32
    packed token mask (`unpack_token_bitmask`; an unconstrained row is all ones, i.e. -1; every row must allow
    at least one token), on any device: it is copied to the logits' device without waiting. Only allowed tokens
    can be chosen; logprobs stay those of the unmasked model and are computed only when some row asks
    (`SampleOutput.logprobs` is None otherwise). All-greedy rows with no penalty, mask or logprobs cost one
    argmax. Generators must be on the logits' device. The logits are never modified. No host
    synchronisation: the result stays on the device.
    """
    import torch

    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    b, v = logits.shape
    if len(params) != b:
        raise ValueError(f"got {len(params)} SamplingParams for {b} rows")
    if generators is None:
        generators = [None] * b
    elif len(generators) != b:
        raise ValueError(f"got {len(generators)} generators for {b} rows")
    if allowed is not None and tuple(allowed.shape) != (b, (v + 31) // 32):
        raise ValueError(f"allowed must be ({b}, {(v + 31) // 32}) packed int32, got {tuple(allowed.shape)}")

    logits = _as_float32(logits)
    want_lp = any(p.logprobs is not None for p in params)
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0.0]
    penalties = (counts is not None or (histories is not None and histories.numel() > 0)) and any(
        has_penalty(p) for p in params
    )
    if not sampled_rows and not penalties and allowed is None and not want_lp:
        return SampleOutput(tokens=argmax_rows(logits))  # fast path: what the general path computes here

    x = apply_penalties(logits, params, histories, prompt_lens, counts) if penalties else logits
    if not sampled_rows:  # greedy: the mask goes into the argmax, no masked copy of the logits
        tokens = argmax_rows(x, allowed)
    else:
        if allowed is not None:
            keep = unpack_token_bitmask(allowed.to(logits.device, non_blocking=True), v)
            x = x.masked_fill(~keep, float("-inf"))  # a new tensor: `logits` keeps the raw values for the logprobs
        sub = x if len(sampled_rows) == b else x[sampled_rows]
        drawn = _draw(sub, [params[i] for i in sampled_rows], [generators[i] for i in sampled_rows])
        if len(sampled_rows) == b:
            tokens = drawn
        else:
            tokens = argmax_rows(x)
            tokens[torch.tensor(sampled_rows, device=tokens.device)] = drawn

    out = SampleOutput(tokens=tokens)
    if not want_lp:
        return out
    # raw-model log-probabilities: logit - logsumexp, without materialising a (B, V) log_softmax
    lse = logits.logsumexp(dim=-1, keepdim=True)  # (B, 1)
    out.logprobs = (logits.gather(1, tokens.unsqueeze(1)) - lse).squeeze(1)
    k = max((p.logprobs or 0) for p in params)
    if k > 0:
        top = logits.topk(k, dim=-1)
        out.top_ids, out.top_logprobs = top.indices, top.values - lse
    return out
