"""models.sampling against straightforward per-row reference implementations on fresh random logits."""

from __future__ import annotations

import math

import pytest
import torch

from models import sampling
from models.sampling import (
    SamplingParams,
    TokenCounts,
    TokenCountsBuffer,
    apply_penalties,
    apply_warpers,
    make_generator,
    sample,
    unpack_token_bitmask,
)

V = 200


@pytest.fixture
def rng():
    # fresh random logits each test run (seed from the OS), printed so a failure can be replayed
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed())).item())
    print(f"logits seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def torch_draw(monkeypatch):
    """Draw sampled rows with the torch reference (`_draw_torch`) even where the C++ extension is loaded in this
    process (tests/unit/test_fused.py holds the `sample_rows` kernel to a reference of its own)."""
    from models import w4a8

    monkeypatch.setattr(w4a8, "loaded", lambda: None)


@pytest.fixture(params=[(4, 16), (4096,)], ids=["cpu-candidates", "full-sort"])
def cand(request, monkeypatch):
    """Run a test with the CPU top-K candidate shortcut (4, then 16 of V=200) and with the full sort (4096 >= V)."""
    monkeypatch.setattr(sampling, "CPU_TOP_P_CANDIDATES", request.param)
    return request.param


def rand_logits(rng, b, v=V, scale=3.0):
    return torch.randn(b, v, generator=rng) * scale


# ---- straightforward references (one row at a time, plain Python over sorted lists) ----


def ref_top_k(row: torch.Tensor, k: int) -> set:
    if k <= 0:
        return set(range(row.numel()))
    return set(torch.topk(row, k).indices.tolist())


def ref_top_p(row: torch.Tensor, p: float) -> set:
    if p >= 1.0:  # off (HF adds no warper); the float sum can reach 1.0 before the tail
        return finite_set(row)
    probs = torch.softmax(row.double(), -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        if i not in kept and math.isfinite(row[i].item()):
            kept.add(i)
            mass += probs[i]
        if mass >= p:
            break
    return kept


def boundary_tokens(row: torch.Tensor, p: float, tol: float = 1e-5) -> set:
    """Tokens whose exclusive cumulative mass is within `tol` of p: float32 rounding may put them either side."""
    probs = torch.softmax(row.double(), -1)
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(0) - sorted_p
    return set(order[(before - p).abs() < tol].tolist())


def ref_min_p(row: torch.Tensor, m: float) -> set:
    probs = torch.softmax(row.double(), -1)
    return {i for i in range(row.numel()) if probs[i] >= m * probs.max() and math.isfinite(row[i].item())}


def ref_warp(row: torch.Tensor, p: SamplingParams):
    """HF warper order: temperature, top-k, top-p, min-p; removed tokens at -inf.

    Also returns the tokens at the top-p boundary (float32 rounding may legitimately put them either side).
    """
    x = row.double() / p.temperature
    ambiguous = set()
    for step in ("k", "p", "min_p"):
        if step == "k":
            kept = ref_top_k(x, p.top_k)
        elif step == "p":
            kept = ref_top_p(x, p.top_p)
            ambiguous = boundary_tokens(x, p.top_p) if p.top_p < 1.0 else set()
        else:
            kept = ref_min_p(x, p.min_p)
        x = torch.tensor([x[i].item() if i in kept else float("-inf") for i in range(x.numel())], dtype=torch.float64)
    return x, ambiguous


def finite_set(row: torch.Tensor) -> set:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


# ---- greedy, masks, temperature ----


def test_greedy_is_argmax(rng):
    logits = rand_logits(rng, 6)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 6)
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert out.tokens.dtype == torch.int64 and out.top_ids is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_argmax_with_ties_and_nan(dtype):
    x = torch.randn(8, 49152, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[1, 7] = x[1, 9] = x[1].max() + 1  # tie: the first index wins
    x[2, 300] = x[2, 40] = float("nan")  # NaN counts as the largest, the first one
    x[3] = float("-inf")
    x[4, :] = 0.5  # all equal
    got = sampling.argmax_rows(x)
    assert torch.equal(got, x.argmax(dim=-1)) and got.dtype == torch.int64
    assert got[1] == 7 and got[2] == 40 and got[3] == 0 and got[4] == 0
    assert torch.equal(sampling.argmax_rows(x[5]), x[5].argmax())  # one row, shape ()


def test_greedy_ignores_filters_and_seed(rng):
    logits = rand_logits(rng, 3)
    ps = [SamplingParams(temperature=0.0, top_k=5, top_p=0.3, min_p=0.2, seed=i) for i in range(3)]
    out = sample(logits, ps, generators=[make_generator(p.seed, "cpu") for p in ps])
    assert torch.equal(out.tokens, logits.argmax(-1))


@pytest.mark.parametrize("k", [1, 2, 7, 50, V - 1, V, 10 * V])
def test_top_k_mask_matches_reference(rng, cand, k):
    logits = rand_logits(rng, 4)
    warped = apply_warpers(logits, [SamplingParams(top_k=k)] * 4)
    for b in range(4):
        assert finite_set(warped[b]) == ref_top_k(logits[b], min(k, V))
        kept = torch.isfinite(warped[b])
        assert torch.equal(warped[b][kept], logits[b][kept])  # kept logits untouched at temperature 1


@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.5, 0.9, 0.999])
def test_top_p_mask_matches_reference(rng, cand, top_p):
    logits = rand_logits(rng, 4)
    warped = apply_warpers(logits, [SamplingParams(top_p=top_p)] * 4)
    for b in range(4):
        assert finite_set(warped[b]) ^ ref_top_p(logits[b], top_p) <= boundary_tokens(logits[b], top_p)


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.2, 0.9, 1.0])
def test_min_p_mask_matches_reference(rng, cand, min_p):
    logits = rand_logits(rng, 4)
    warped = apply_warpers(logits, [SamplingParams(min_p=min_p)] * 4)
    for b in range(4):
        assert finite_set(warped[b]) == ref_min_p(logits[b], min_p)


def test_per_row_mixed_params_match_reference(rng, cand):
    """Different params in every row, one vectorised call, each row equal to its own reference."""
    params = [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=0.4, top_k=3),
        SamplingParams(temperature=2.0, min_p=0.3),
        SamplingParams(),
        SamplingParams(temperature=0.9, top_k=100, top_p=0.95, min_p=0.01),
    ]
    logits = rand_logits(rng, len(params))
    warped = apply_warpers(logits, params)
    for b, p in enumerate(params):
        ref, ambiguous = ref_warp(logits[b], p)
        diff = finite_set(warped[b]) ^ finite_set(ref)
        if diff and diff <= ambiguous:
            continue  # a float32 rounding case at the top-p boundary; rare
        assert finite_set(warped[b]) == finite_set(ref), p
        kept = torch.isfinite(ref)
        torch.testing.assert_close(warped[b][kept].double(), ref[kept], rtol=1e-5, atol=1e-5)


def test_temperature_scales_logits(rng):
    logits = rand_logits(rng, 3)
    warped = apply_warpers(logits, [SamplingParams(temperature=t) for t in (0.5, 1.0, 4.0)])
    torch.testing.assert_close(warped, logits / torch.tensor([[0.5], [1.0], [4.0]]))


def test_sampled_tokens_stay_inside_the_mask(rng, cand):
    logits = rand_logits(rng, 64)
    params = [SamplingParams(top_k=5, top_p=0.7, min_p=0.1)] * 64
    warped = apply_warpers(logits, params)
    for _ in range(5):
        toks = sample(logits, params).tokens
        assert torch.isfinite(warped.gather(1, toks[:, None])).all()


def test_never_picks_minus_inf_tokens():
    logits = torch.full((512, 1000), float("-inf"))
    logits[:, 3] = 0.0
    logits[:, 7] = -1.0
    for _ in range(4):
        toks = sample(logits, [SamplingParams()] * 512).tokens
        assert set(toks.tolist()) <= {3, 7}


# ---- statistics: empirical frequencies vs the target distribution (chi-square, can fail) ----

CHI2_999 = {7: 24.32, 4: 18.47, 3: 16.27, 2: 13.82, 1: 10.83}  # chi-square 0.999 quantiles by degrees of freedom


@pytest.fixture
def seeded_draws():
    """Fix the global RNG the unseeded draws use, so a 0.999-quantile bound cannot fail by bad luck (no flakes)."""
    torch.manual_seed(20261127)
    yield
    torch.seed()


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    support = expected > 0
    assert counts[~support].sum() == 0, "drew a token with zero probability"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


def test_temperature_one_matches_softmax(seeded_draws):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    n = 40000
    toks = sample(logits.expand(n, -1), [SamplingParams()] * n).tokens
    assert chi_square(toks, torch.softmax(logits, -1)) < CHI2_999[7]


def test_temperature_changes_distribution(seeded_draws):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    n = 40000
    toks = sample(logits.expand(n, -1), [SamplingParams(temperature=0.5)] * n).tokens
    assert chi_square(toks, torch.softmax(logits / 0.5, -1)) < CHI2_999[7]
    # and it is detectably not the temperature-1 distribution
    assert chi_square(toks, torch.softmax(logits, -1)) > 10 * CHI2_999[7]


def test_top_p_renormalises(seeded_draws):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    n = 30000
    toks = sample(logits.expand(n, -1), [SamplingParams(top_p=0.8)] * n).tokens
    kept = ref_top_p(logits, 0.8)
    target = torch.zeros(8)
    target[list(kept)] = torch.softmax(logits, -1)[list(kept)]
    target /= target.sum()
    assert chi_square(toks, target) < CHI2_999[len(kept) - 1]


def test_seeded_rows_follow_the_distribution():
    """The per-row generator path (one generator per row) is also an exact sample."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0])
    n = 3000
    params = [SamplingParams(seed=1000 + i) for i in range(n)]
    toks = sample(logits.expand(n, -1), params, generators=[make_generator(p.seed, "cpu") for p in params]).tokens
    assert chi_square(toks, torch.softmax(logits, -1)) < CHI2_999[4]


def test_candidate_shortcut_draws_follow_the_distribution(seeded_draws, monkeypatch, torch_draw):
    """Rows drawn among their top candidates only (the CPU shortcut, here 4 of 8 tokens) are exact samples of
    the top-k / top-p / min-p renormalised distribution; a min-p whose kept set the 4 do not cover takes the
    whole vocabulary."""
    monkeypatch.setattr(sampling, "CPU_TOP_P_CANDIDATES", (4,))
    took = []
    real = sampling._candidates

    def spy(*a):
        out = real(*a)
        took.append(bool(out[2].all()))
        return out

    monkeypatch.setattr(sampling, "_candidates", spy)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    n = 30000
    cases = (
        (SamplingParams(top_k=3), ref_top_k(logits, 3)),
        (SamplingParams(top_p=0.7), ref_top_p(logits, 0.7)),
        (SamplingParams(min_p=0.5), ref_min_p(logits, 0.5)),  # 2.0 and 1.5
        (SamplingParams(min_p=0.01), ref_min_p(logits, 0.01)),  # all 8: not covered by 4
    )
    for params, kept in cases:
        toks = sample(logits.expand(n, -1), [params] * n).tokens
        target = torch.zeros(8)
        target[list(kept)] = torch.softmax(logits, -1)[list(kept)]
        target /= target.sum()
        assert chi_square(toks, target) < CHI2_999[len(kept) - 1]
    assert took == [True, True, True, False]


def test_inverse_cdf_edges():
    """Removed tokens (-inf) are never drawn, u = 0 gives the first kept token, a u whose product with the mass
    rounds up to it gives the last kept one, and a row without finite logits gives 0."""
    inf = float("-inf")
    w = torch.tensor([[inf, 0.0, inf, 0.0, inf], [inf, inf, inf, inf, inf], [1.0, inf, 2.0, 3.0, inf]])
    first = sampling._inverse_cdf(w, torch.zeros(3))
    assert first.tolist() == [1, 0, 0]
    last = sampling._inverse_cdf(w, torch.full((3,), 1.0 - 2.0**-24))
    assert last.tolist() == [3, 0, 3]
    always_over = sampling._inverse_cdf(w, torch.ones(3))  # u = 1 is outside [0, 1): still a kept token
    assert always_over.tolist() == [3, 0, 3]
    mid = sampling._inverse_cdf(torch.tensor([[0.0, 0.0, 0.0, 0.0]]), torch.tensor([0.6]))
    assert mid.tolist() == [2]


# ---- seeds ----


def _draw_sequence(logits_row, seed, companions, position, steps=25):
    """Draw `steps` tokens for one seeded row placed at `position` among companion rows."""
    g = make_generator(seed, "cpu")
    comp_gens = [make_generator(s, "cpu") for s in companions]
    out = []
    for _ in range(steps):
        rows = [torch.randn(V) for _ in companions]
        rows.insert(position, logits_row)
        gens = list(comp_gens)
        gens.insert(position, g)
        params = [SamplingParams(temperature=0.8, top_p=0.95, seed=s) for s in companions]
        params.insert(position, SamplingParams(temperature=1.2, top_k=50, seed=seed))
        out.append(int(sample(torch.stack(rows), params, generators=gens).tokens[position]))
    return out


def test_seed_reproducible_regardless_of_batch(rng):
    row = rand_logits(rng, 1, scale=1.0)[0]
    alone = _draw_sequence(row, 1234, [], 0)
    assert _draw_sequence(row, 1234, [], 0) == alone
    assert _draw_sequence(row, 1234, [None, 5, None], 2) == alone
    assert _draw_sequence(row, 1234, [99, None, 7, 8, None, None, 3], 0) == alone
    assert _draw_sequence(row, 4321, [], 0) != alone  # 25 draws over a flat-ish 50-token set


def test_seeded_row_same_tokens_with_or_without_the_candidate_shortcut(rng, monkeypatch, torch_draw):
    """A seeded row's tokens are the same whether it is drawn among its top candidates (CPU shortcut) or over the
    whole vocabulary, and whether a batch companion the candidates do not cover goes the other way."""
    row = rand_logits(rng, 1, scale=1.0)[0]
    flat = torch.zeros(V)  # top_p 0.99 of a flat row needs 198 of 200 tokens: never covered by 16
    seeded = SamplingParams(temperature=0.9, top_k=12, top_p=0.9, seed=77)
    covered = []
    real = sampling._candidates

    def spy(*a):
        out = real(*a)
        covered.append(out[2].tolist())
        return out

    monkeypatch.setattr(sampling, "_candidates", spy)
    runs = {}
    for sizes, company in (((16,), False), ((16,), True), ((4096,), False)):  # 4096 >= V: no shortcut
        monkeypatch.setattr(sampling, "CPU_TOP_P_CANDIDATES", sizes)
        g = make_generator(77, "cpu")
        out = []
        for _ in range(40):
            if company:
                res = sample(torch.stack([flat, row]), [SamplingParams(top_p=0.99), seeded], generators=[None, g])
                out.append(int(res.tokens[1]))
            else:
                out.append(int(sample(row[None], [seeded], generators=[g]).tokens[0]))
        runs[(sizes, company)] = out
    assert covered == [[True]] * 40 + [[False, True]] * 40  # the 4096 runs never try candidates
    alone = runs[((16,), False)]
    assert alone == runs[((16,), True)] == runs[((4096,), False)] and len(set(alone)) > 1


@pytest.mark.parametrize("path", ["kernel-if-loaded", "torch"])
def test_filtered_and_unfiltered_rows_in_one_batch_draw_as_alone(rng, monkeypatch, path):
    """A batch mixing a temperature-only row and a top-k row (the torch reference draws them as two groups) gives
    each seeded row the tokens it gets alone."""
    if path == "torch":
        from models import w4a8

        monkeypatch.setattr(w4a8, "loaded", lambda: None)
    x = rand_logits(rng, 2, scale=1.0)
    params = [SamplingParams(temperature=0.9, seed=5), SamplingParams(top_k=5, seed=6)]
    gens = [make_generator(p.seed, "cpu") for p in params]
    alone_gens = [make_generator(p.seed, "cpu") for p in params]
    for _ in range(20):
        both = sample(x, params, generators=gens).tokens.tolist()
        alone = [int(sample(x[i : i + 1], [params[i]], generators=[alone_gens[i]]).tokens[0]) for i in range(2)]
        assert both == alone


def test_same_seed_same_tokens_different_seed_differs(rng):
    logits = rand_logits(rng, 1, scale=0.5).expand(2, -1)
    a = [make_generator(s, "cpu") for s in (7, 7)]
    got = [sample(logits, [SamplingParams(seed=7)] * 2, generators=a).tokens.tolist() for _ in range(20)]
    assert all(x[0] == x[1] for x in got)
    b = [make_generator(s, "cpu") for s in (7, 8)]
    got = [
        sample(logits, [SamplingParams(seed=7), SamplingParams(seed=8)], generators=b).tokens.tolist()
        for _ in range(20)
    ]
    assert any(x[0] != x[1] for x in got)


def test_make_generator_handles_none_and_big_or_negative_seeds():
    assert make_generator(None, "cpu") is None
    g1, g2 = make_generator(-1, "cpu"), make_generator(2**64 - 1, "cpu")
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


# ---- penalties ----


def test_repetition_penalty_matches_hf_processor(rng):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = rand_logits(rng, 3)
    hist = torch.randint(0, V, (3, 30), generator=rng)
    hist[1, 20:] = -1  # padding
    for penalty in (1.3, 0.7):
        ours = apply_penalties(logits, [SamplingParams(repetition_penalty=penalty)] * 3, hist, prompt_lens=[10, 5, 0])
        for b in range(3):
            ids = hist[b][hist[b] >= 0][None]
            ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[b : b + 1].clone())
            torch.testing.assert_close(ours[b : b + 1], ref)


def test_presence_frequency_openai_formula(rng):
    logits = rand_logits(rng, 2)
    hist = torch.tensor([[5, 5, 9, 9, 9, 11, 5, 12, 12, -1], [3, 3, 3, 4, 4, 4, 4, -1, -1, -1]])
    prompt_lens = [3, 4]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5),
    ]
    ours = apply_penalties(logits, params, hist, prompt_lens)
    for b, p in enumerate(params):
        ref = logits[b].clone()
        generated = [t for t in hist[b, prompt_lens[b] :].tolist() if t >= 0]
        for tok in set(generated):
            c = generated.count(tok)
            ref[tok] -= c * p.frequency_penalty + (1.0 if c > 0 else 0.0) * p.presence_penalty
        torch.testing.assert_close(ours[b], ref)
    # prompt-only tokens are not penalised by presence/frequency
    assert ours[1, 3] == logits[1, 3] and ours[0, 9] != logits[0, 9]


def test_penalties_change_greedy_choice_and_rows_are_independent():
    logits = torch.zeros(2, 10)
    logits[:, 4] = 1.0
    logits[:, 6] = 0.9
    hist = torch.tensor([[4, 4], [4, 4]])
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=0),
        SamplingParams(temperature=0.0, logprobs=0),
    ]
    out = sample(logits, params, hist)
    assert out.tokens.tolist() == [6, 4]
    # logprobs stay those of the raw model distribution
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1)[[0, 1], [6, 4]])


def test_no_history_no_penalty(rng):
    logits = rand_logits(rng, 2)
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=1.5)] * 2, None)
    assert torch.equal(out, logits)


def ref_penalties(row: torch.Tensor, p: SamplingParams, prompt, generated) -> torch.Tensor:
    """One row of the penalties in plain Python: repetition over prompt+generated, presence/frequency over
    generated ids only."""
    x = row.clone()
    for tok in set(prompt) | set(generated):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok in set(generated):
        x[tok] -= generated.count(tok) * p.frequency_penalty + p.presence_penalty
    return x


def padded(hists):
    out = torch.full((len(hists), max(len(h) for h in hists)), -1, dtype=torch.long)
    for i, h in enumerate(hists):
        out[i, : len(h)] = torch.tensor(h)
    return out


def test_incremental_counts_match_histories_over_a_multi_step_run(rng):
    """A TokenCountsBuffer updated one token per step (rows in permuted slots, one slot re-used by a new
    sequence mid-run) gives bit-identical penalised logits and tokens to statistics rebuilt from the histories,
    and both match the plain-Python reference."""
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(temperature=0.9, seed=5, repetition_penalty=0.8, frequency_penalty=-0.5),
        SamplingParams(temperature=0.0),  # no penalty: its row's statistics may be stale, its logits untouched
        SamplingParams(temperature=0.0, presence_penalty=-1.0),
    ]
    prompts = [torch.randint(0, V, (n,), generator=rng).tolist() for n in (7, 1, 4, 12)]
    generated = [[] for _ in params]
    slots = [3, 0, 5, 1]  # rows live in arbitrary buffer rows
    buf = TokenCountsBuffer(6, V)
    buf.reset(5, [1, 2, 3], [4, 4])  # a stale previous occupant of the no-penalty row's slot
    for i, slot in enumerate(slots):
        if i != 2:
            buf.reset(slot, prompts[i])
    gens_a = [make_generator(p.seed) for p in params]
    gens_b = [make_generator(p.seed) for p in params]
    for step in range(12):
        if step == 6:  # row 0's sequence ends; a new one takes its slot
            prompts[0], generated[0] = torch.randint(0, V, (3,), generator=rng).tolist(), []
            buf.reset(slots[0], prompts[0])
        logits = rand_logits(rng, 4, scale=1.0)
        hist, plens = padded([pr + g for pr, g in zip(prompts, generated)]), [len(pr) for pr in prompts]
        counts = buf.select(slots)
        old = apply_penalties(logits, params, hist, plens)
        new = apply_penalties(logits, params, None, counts=counts)
        assert torch.equal(old, new)
        for b, p in enumerate(params):
            torch.testing.assert_close(new[b], ref_penalties(logits[b], p, prompts[b], generated[b]))
        a = sample(logits, params, hist, gens_a, plens)
        b_ = sample(logits, params, generators=gens_b, counts=counts)
        assert torch.equal(a.tokens, b_.tokens)
        toks = a.tokens.tolist()
        for g, t in zip(generated, toks):
            g.append(t)
        buf.add([s for i, s in enumerate(slots) if i != 2], [t for i, t in enumerate(toks) if i != 2])
    for i in (0, 1, 3):  # the buffer holds exactly the statistics of the histories
        ref = TokenCounts.from_histories(padded([prompts[i] + generated[i]]), [len(prompts[i])], V)
        assert torch.equal(buf.seen[slots[i]], ref.seen[0]) and torch.equal(buf.counts[slots[i]], ref.counts[0])


def test_token_counts_buffer_reset_with_generated_ids():
    buf = TokenCountsBuffer(2, 10)
    buf.reset(1, [2, 3, 3], [3, 7, 7, 7])
    ref = TokenCounts.from_histories(torch.tensor([[2, 3, 3, 3, 7, 7, 7]]), [3], 10)
    assert torch.equal(buf.seen[1], ref.seen[0]) and torch.equal(buf.counts[1], ref.counts[0])
    assert buf.counts[1, 3] == 1 and buf.counts[1, 7] == 3 and not buf.seen[0].any()


# ---- logprobs ----


def test_logprobs_and_top_logprobs(rng):
    logits = rand_logits(rng, 3)
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(logprobs=0),
        SamplingParams(top_k=4, logprobs=2),
    ]
    out = sample(logits, params)
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.tokens[:, None]).squeeze(1))
    assert out.top_ids.shape == (3, 5) and out.top_logprobs.dtype == torch.float32
    top = raw.topk(5, -1)
    assert torch.equal(out.top_ids, top.indices)
    torch.testing.assert_close(out.top_logprobs, top.values)


def test_mixed_greedy_and_sampled_rows(rng):
    logits = rand_logits(rng, 4)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=1),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=1e-9),
    ]
    out = sample(logits, params)
    assert torch.equal(out.tokens, logits.argmax(-1))  # top_k=1 and tiny top_p are greedy too


# ---- per-step cost: only the work a row asked for ----


def test_greedy_fast_path_matches_the_general_path(rng):
    """All-greedy rows without penalties, mask or logprobs: the tokens equal those of the general path (forced
    by one row asking for logprobs, or by neutral-penalty statistics) and no logprobs come back."""
    logits = rand_logits(rng, 8)
    greedy = [SamplingParams(temperature=0.0)] * 8
    fast = sample(logits, greedy)
    assert fast.logprobs is None and fast.top_ids is None and fast.top_logprobs is None
    assert torch.equal(fast.tokens, logits.argmax(-1))
    general = sample(logits, [SamplingParams(temperature=0.0, logprobs=0)] + greedy[1:])
    assert torch.equal(fast.tokens, general.tokens)
    torch.testing.assert_close(general.logprobs, logits.log_softmax(-1).gather(1, fast.tokens[:, None]).squeeze(1))
    ones = torch.full((8, (V + 31) // 32), -1, dtype=torch.int32)
    assert torch.equal(fast.tokens, sample(logits, greedy, allowed=ones).tokens)
    pen = [SamplingParams(temperature=0.0, repetition_penalty=1.0 + 1e-6)] + greedy[1:]
    hist = torch.full((8, 1), -1)
    assert torch.equal(fast.tokens, sample(logits, pen, hist).tokens)  # no token seen: penalty is a no-op


def test_non_float32_logits_are_cast_once_and_float32_used_as_is(rng, monkeypatch):
    logits = rand_logits(rng, 3).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(seed=3), SamplingParams(top_k=5, seed=4)]
    ref = sample(logits.float(), params, generators=[make_generator(p.seed) for p in params])
    got = sample(logits, params, generators=[make_generator(p.seed) for p in params])
    for a, b in ((ref.tokens, got.tokens), (ref.logprobs, got.logprobs), (ref.top_ids, got.top_ids)):
        assert torch.equal(a, b)
    f32, calls = logits.float(), []
    real = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    sample(f32, params, generators=[make_generator(p.seed) for p in params])
    assert calls == []


def test_no_logsumexp_unless_a_row_asks_for_logprobs(rng, monkeypatch):
    """Neither greedy, sampled, masked nor penalised rows compute the logprob normaliser unless a row asks."""
    calls = []
    real_method, real_fn = torch.Tensor.logsumexp, torch.logsumexp
    monkeypatch.setattr(torch.Tensor, "logsumexp", lambda self, *a, **k: calls.append(1) or real_method(self, *a, **k))
    monkeypatch.setattr(torch, "logsumexp", lambda *a, **k: calls.append(1) or real_fn(*a, **k))
    logits = rand_logits(rng, 4)
    hist = torch.randint(0, V, (4, 6), generator=rng)
    ones = torch.full((4, (V + 31) // 32), -1, dtype=torch.int32)
    batches = [
        [SamplingParams(temperature=0.0)] * 4,
        [
            SamplingParams(temperature=0.0),
            SamplingParams(temperature=0.7),
            SamplingParams(min_p=0.1),
            SamplingParams(temperature=0.0, repetition_penalty=1.2, frequency_penalty=0.5),
        ],
    ]
    for params in batches:
        for kw in ({}, {"allowed": ones}, {"histories": hist, "prompt_lens": [2] * 4}):
            out = sample(logits, params, **kw)
            assert out.logprobs is None and out.top_ids is None
    assert calls == []
    out = sample(logits, batches[0][:3] + [SamplingParams(temperature=0.0, logprobs=1)])
    assert calls and out.logprobs.shape == (4,) and out.top_ids.shape == (4, 1)


# ---- allowed-token mask (structured output) ----


def pack(allowed_rows, v=V) -> torch.Tensor:
    """Reference packer: a list of allowed-id sets -> (B, ceil(V/32)) int32, bit j of word w = token 32w+j."""
    words = (v + 31) // 32
    out = torch.zeros(len(allowed_rows), words, dtype=torch.int64)
    for i, ids in enumerate(allowed_rows):
        for t in ids:
            out[i, t // 32] |= 1 << (t % 32)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # two's complement: bit 31 is the sign


def test_unpack_token_bitmask_matches_reference(rng):
    rows = [set(torch.randperm(V, generator=rng)[:k].tolist()) for k in (0, 1, 37, V)] + [{31, 63, V - 1}]
    bits = unpack_token_bitmask(pack(rows), V)
    assert bits.shape == (len(rows), V) and bits.dtype == torch.bool
    for i, ids in enumerate(rows):
        assert set(torch.nonzero(bits[i]).flatten().tolist()) == ids
    assert not unpack_token_bitmask(torch.full((1, 1), -1, dtype=torch.int32), 40)[0, 32:].any()  # past the words


def test_mask_restricts_every_row_and_leaves_logprobs_raw(rng):
    logits = rand_logits(rng, 4)
    best = logits.argmax(-1).tolist()
    allowed = [set(range(V)) - {best[0]}, {5, 17, 190}, set(range(V)), {best[3], 0}]
    params = [
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.5, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_p=0.5, seed=2),
    ]
    for _ in range(20):
        out = sample(logits, params, generators=[make_generator(p.seed) for p in params], allowed=pack(allowed))
        toks = out.tokens.tolist()
        assert all(t in a for t, a in zip(toks, allowed)), toks
        masked = logits.clone()
        masked[0, best[0]] = float("-inf")
        assert toks[0] == int(masked[0].argmax()) and toks[2] == best[2]
        assert torch.allclose(out.logprobs, logits.log_softmax(-1).gather(1, out.tokens[:, None]).squeeze(1))
        params[1] = SamplingParams(temperature=1.5, seed=int(torch.randint(0, 1000, (1,), generator=rng)))


def test_all_ones_mask_is_parity_with_no_mask(rng):
    """An unconstrained row (all bits set) draws exactly what it draws without a mask, seed for seed."""
    logits = rand_logits(rng, 3)
    params = [
        SamplingParams(temperature=0.8, top_k=20, seed=7),
        SamplingParams(temperature=0.0),
        SamplingParams(min_p=0.05, seed=9, logprobs=3),
    ]
    plain = sample(logits, params, generators=[make_generator(p.seed) for p in params])
    ones = torch.full((3, (V + 31) // 32), -1, dtype=torch.int32)
    masked = sample(logits, params, generators=[make_generator(p.seed) for p in params], allowed=ones)
    for a, b in ((plain.tokens, masked.tokens), (plain.logprobs, masked.logprobs), (plain.top_ids, masked.top_ids)):
        assert torch.equal(a, b)


def test_mask_shape_error():
    with pytest.raises(ValueError, match="allowed must be"):
        sample(torch.zeros(2, V), [SamplingParams()] * 2, allowed=torch.zeros(2, 3, dtype=torch.int32))


# ---- validation ----


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(temperature=float("inf")), "temperature must be finite"),
        (dict(temperature=-0.1), "temperature must be in"),
        (dict(temperature=2.01), "temperature must be in"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_p=float("nan")), "top_p must be finite"),
        (dict(top_k=-2), "top_k must be >= -1"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(min_p=-0.1), "min_p must be in"),
        (dict(min_p=float("inf")), "min_p must be finite"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be in"),
        (dict(repetition_penalty=10.5), "repetition_penalty must be in"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be finite"),
        (dict(presence_penalty=2.5), "presence_penalty must be in"),
        (dict(frequency_penalty=-3.0), "frequency_penalty must be in"),
        (dict(frequency_penalty=float("-inf")), "frequency_penalty must be finite"),
        (dict(seed="1"), "seed must be an integer"),
        (dict(logprobs=21), "logprobs must be in"),
        (dict(logprobs=-1), "logprobs must be in"),
        (dict(temperature="hot"), "temperature must be a number"),
    ],
)
def test_validation_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs).validate()


def test_validation_accepts_edges():
    for p in (
        SamplingParams(),
        SamplingParams(
            temperature=0,
            top_p=1.0,
            top_k=-1,
            min_p=1.0,
            repetition_penalty=0.5,
            presence_penalty=-2,
            frequency_penalty=2,
            seed=-5,
            logprobs=20,
        ),
        SamplingParams(temperature=2, repetition_penalty=10, logprobs=0),
    ):
        assert p.validate() is p


def test_shape_errors():
    with pytest.raises(ValueError, match="2 SamplingParams for 3 rows"):
        sample(torch.zeros(3, 5), [SamplingParams()] * 2)
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample(torch.zeros(5), [SamplingParams()])


def test_cpu_shortcut_avoids_full_sort(rng, monkeypatch):
    """Peaked logits: the nucleus lies in the 16 candidates, so no full-vocabulary sort runs, and masks still match."""
    monkeypatch.setattr(sampling, "CPU_TOP_P_CANDIDATES", (16,))
    logits = rand_logits(rng, 3, scale=12.0)
    params = [SamplingParams(top_p=0.9), SamplingParams(top_k=10, top_p=0.99), SamplingParams()]

    def no_sort(*a, **k):
        raise AssertionError("full sort used")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    warped = apply_warpers(logits, params)
    monkeypatch.undo()
    for b, p in enumerate(params):
        ref, ambiguous = ref_warp(logits[b], p)
        assert finite_set(warped[b]) ^ finite_set(ref) <= ambiguous
    assert torch.equal(warped[2], logits[2])  # the unfiltered row keeps the whole vocabulary


def test_describing_a_request_does_not_import_torch():
    """server/api builds SamplingParams and an IncrementalDetokenizer but never imports torch."""
    import subprocess
    import sys

    code = (
        "import sys, models.sampling as s, models.tokenizer; s.SamplingParams(top_p=0.5).validate(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in the GPU check)")


@pytest.mark.gpu
@needs_cuda
def test_cuda_sampling_matches_cpu_semantics(rng, seeded_draws):
    """On CUDA: greedy equals argmax, masks equal the CPU result, seeded rows reproducible, distribution exact."""
    logits = rand_logits(rng, 4, v=5000)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=40, top_p=0.9),
        SamplingParams(min_p=0.1, temperature=0.8),
        SamplingParams(top_p=0.5, seed=3),
    ]
    cuda = logits.cuda()
    warped = apply_warpers(cuda, params).cpu()
    ref = apply_warpers(logits, params)
    for b in range(4):
        diff = finite_set(warped[b]) ^ finite_set(ref[b])
        assert not diff or diff <= boundary_tokens(logits[b], params[b].top_p)
    hist = torch.randint(0, 5000, (4, 16), generator=rng)
    pen = [SamplingParams(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2)] * 4
    torch.testing.assert_close(
        apply_penalties(cuda, pen, hist.cuda(), [4] * 4).cpu(), apply_penalties(logits, pen, hist, [4] * 4)
    )
    gens = [make_generator(p.seed, "cuda") for p in params]
    first = [sample(cuda, params, generators=gens).tokens.cpu() for _ in range(5)]
    gens = [make_generator(p.seed, "cuda") for p in params]
    again = [sample(cuda, params, generators=gens).tokens.cpu() for _ in range(5)]
    assert all(int(t[0]) == int(logits[0].argmax()) for t in first)
    assert [int(t[3]) for t in first] == [int(t[3]) for t in again]
    small = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], device="cuda")
    n = 40000
    toks = sample(small.expand(n, -1), [SamplingParams()] * n).tokens.cpu()
    assert chi_square(toks, torch.softmax(small.cpu(), -1)) < CHI2_999[7]


@pytest.mark.gpu
@needs_cuda
def test_cuda_token_mask_matches_cpu(rng):
    """A host-side packed mask applied to CUDA logits restricts each row exactly as on CPU."""
    v = 5000
    logits = rand_logits(rng, 3, v=v)
    rows = [set(torch.randperm(v, generator=rng)[:50].tolist()), {31, 4999}, set(range(v))]
    allowed = pack(rows, v)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.0)]
    assert torch.equal(unpack_token_bitmask(allowed.cuda(), v).cpu(), unpack_token_bitmask(allowed, v))
    for _ in range(5):
        gens = [make_generator(p.seed, "cuda") for p in params]
        toks = sample(logits.cuda(), params, generators=gens, allowed=allowed).tokens.cpu().tolist()
        assert all(t in r for t, r in zip(toks, rows))
        assert toks[0] == max(rows[0], key=lambda t: float(logits[0, t])) and toks[2] == int(logits[2].argmax())


@pytest.mark.gpu
@needs_cuda
def test_cuda_token_counts_buffer_matches_cpu(rng):
    """Kept penalty statistics on CUDA equal the CPU ones after resets and per-step additions."""
    v = 5000
    bufs = [TokenCountsBuffer(3, v, "cpu"), TokenCountsBuffer(3, v, "cuda")]
    prompts = [torch.randint(0, v, (n,), generator=rng).tolist() for n in (5, 1, 9)]
    for buf in bufs:
        for i, p in enumerate(prompts):
            buf.reset(i, p, p[:2])
    for _ in range(4):
        toks = torch.randint(0, v, (2,), generator=rng).tolist()
        for buf in bufs:
            buf.add([2, 0], toks)
    a, b = bufs[0].select([2, 0, 1]), bufs[1].select([2, 0, 1])
    assert torch.equal(a.seen, b.seen.cpu()) and torch.equal(a.counts, b.counts.cpu())
