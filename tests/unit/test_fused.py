"""models/fused.py and models/csrc/fused_ops.cpp: each fused prefill op against its plain-PyTorch reference under
every ISA build this CPU can run (odd widths, rows with a stride, one row and many), the input checks, the
`cpu_fused` choice, the argmax kernel against torch's `max` indices, and a model's prefill with the kernels against
the same model with torch's ops (also on an int8 KV cache, whose rows `kv_rows` writes)."""

from __future__ import annotations

import math

import pytest
import torch

from models import fused, w4a8
from models.kv_cache import dequantize_rows, quantize_rows

BF16_ULP = 2.0**-7  # relative spacing of bfloat16 near 1


def ops_for(isa: str) -> fused.FusedOps:
    ops, why = w4a8.load(isa)
    if ops is None:
        pytest.skip(f"extension build {isa} unavailable: {why}")
    return fused.kernels(ops)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def rows(T: int, width: int, gen, pad: int = 0, scale: float = 1.0) -> torch.Tensor:
    """(T, width) bfloat16; with `pad`, a view of a wider tensor (rows `width + pad` apart)."""
    full = (torch.randn(T, width + pad, generator=gen) * scale).to(torch.bfloat16)
    return full[:, :width]


def assert_rarely_off(got: torch.Tensor, want: torch.Tensor, max_mismatch: float) -> None:
    """Equal except for a few elements (a `max_mismatch` share of them, or one) where an intermediate rounded to
    the neighbouring bfloat16: at most two rounding steps apart (that one, and the final rounding after it)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = got.float(), want.float()
    diff = (g - w).abs()
    bound = w.abs().clamp_min(1e-30) * 2 * BF16_ULP
    assert bool((diff <= bound).all()), f"max |diff| {diff.max().item()} beyond two bf16 steps"
    assert int((diff > 0).sum()) <= max(1, int(max_mismatch * diff.numel()))


@pytest.mark.parametrize("T,H,pad", [(1, 576, 0), (7, 64, 0), (300, 576, 40), (33, 100, 3)])
def test_rms_norm_and_residual_add_match_reference(isa, T, H, pad, gen):
    ops = ops_for(isa)
    x = rows(T, H, gen, pad, scale=3.0)
    w = (torch.randn(H, generator=gen) * 0.5 + 1).to(torch.bfloat16)
    # float32 sums in another order, so rsqrt may differ in its last bit, and x * rsqrt can sit on a bfloat16
    # rounding midpoint: those elements (and every element equal to them: bfloat16 inputs repeat) round the
    # other way
    assert_rarely_off(ops.rms_norm(x, w, 1e-5), fused.rms_norm_reference(x, w, 1e-5), max_mismatch=0.05)
    d = rows(T, H, gen, pad)
    x_ref, x_got = x.clone(), x.clone()
    want = fused.add_rms_norm_reference_(x_ref, d, w, 1e-6)
    got = ops.add_rms_norm_(x_got, d, w, 1e-6)
    assert torch.equal(x_got, x_ref)  # the residual add is one bfloat16 rounding, exactly
    assert_rarely_off(got, want, max_mismatch=0.05)


def test_rms_norm_of_a_zero_row_is_zero(isa):
    ops = ops_for(isa)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), x)


@pytest.mark.parametrize("T,heads,D,extra", [(1, 12, 64, 3 * 64), (37, 6, 128, 128), (5, 3, 8, 0)])
def test_rope_matches_reference_exactly(isa, T, heads, D, extra, gen):
    """Every product and sum rounds to bfloat16 as the reference's ops do: bit-equal. Heads past `heads` (V) stay."""
    ops = ops_for(isa)
    qkv = rows(T, heads * D + extra, gen).contiguous()
    ang = torch.rand(T, D // 2, generator=gen) * 6.3
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    want, got = qkv.clone(), qkv.clone()
    fused.rope_reference_(want, cos, sin, heads, D)
    assert ops.rope_(got, cos, sin, heads, D) is None
    assert torch.equal(got, want)
    assert torch.equal(got[:, heads * D :], qkv[:, heads * D :])


@pytest.mark.parametrize("T,inter,pad", [(1, 1536, 0), (64, 96, 5), (513, 1536, 0), (3, 7, 0)])
def test_silu_mul_matches_reference(isa, T, inter, pad, gen):
    ops = ops_for(isa)
    gu = rows(T, 2 * inter, gen, pad, scale=4.0)
    # silu's exp is a polynomial (relative error ~2e-7), torch's is libm's: a rare rounding step apart
    assert_rarely_off(ops.silu_mul(gu), fused.silu_mul_reference(gu), max_mismatch=0.01)


def test_silu_mul_extremes(isa):
    """Zeros of both signs, large gates of both signs (exp's clamp at 2^-126), infinities and NaN."""
    ops = ops_for(isa)
    g = torch.tensor([0.0, -0.0, 90.0, -90.0, -200.0, 3e38, float("inf"), float("-inf"), float("nan"), 1.0])
    gu = torch.cat([g, torch.full_like(g, 1.5)])[None].to(torch.bfloat16)
    got, want = ops.silu_mul(gu).float(), fused.silu_mul_reference(gu).float()
    torch.testing.assert_close(got, want, atol=1e-30, rtol=2**-7, equal_nan=True)


@pytest.mark.parametrize("T,heads,D", [(1, 3, 64), (37, 3, 64), (5, 2, 128), (3, 1, 16)])
def test_kv_rows_match_quantize_rows_byte_for_byte(isa, T, heads, D, gen):
    """The int8 KV rows of the projection's K heads (a strided view, as prefill passes them): the same bytes as
    models/kv_cache.py's quantize_rows, ties included (round half to even), and an all-zero row."""
    ops = ops_for(isa)
    qkv = (torch.randn(T, (heads + 4) * D, generator=gen) * 3).to(torch.bfloat16)
    qkv[0, 2 * D : 2 * D + 4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1 in row (0, 0): ties at .5
    qkv[0, 2 * D + 4 : 3 * D] = 0
    if T > 2:
        qkv[2, 2 * D : 3 * D] = 0  # an all-zero row
    k = qkv[:, 2 * D : (2 + heads) * D].view(T, heads, D)
    got = ops.kv_rows(k)
    assert got.shape == (T, heads, D + 4) and got.dtype == torch.int8
    assert torch.equal(got, quantize_rows(k))
    assert got[0, 0, :4].tolist() == [127, 0, 2, -2]
    back = ops.kv_values(got.transpose(0, 1).contiguous().transpose(0, 1))  # rows with a stride, as the cache
    assert back.shape == (T, heads, D) and back.dtype == torch.bfloat16
    assert torch.equal(back, dequantize_rows(got, torch.bfloat16))


def tricky_rows(V: int, gen) -> torch.Tensor:
    """(12, V) float32 rows, V + 5 apart (a strided view): random ones and the cases argmax can get wrong."""
    x = torch.randn(12, V + 5, generator=gen)[:, :V]
    last = V - 1
    x[1, last // 2] = x[1, last] = 50.0  # tie: the first index wins (across vector lanes and the tail)
    x[2, last] = float("nan")  # a NaN counts as the largest: in the tail
    x[3, last // 3] = x[3, last] = float("nan")  # the first NaN wins
    x[4] = float("-inf")
    x[5] = 0.25  # all equal
    x[6] = 0.0
    x[6, last] = -0.0  # -0.0 == 0.0: index 0
    x[7, last] = float("inf")
    x[8, 0] = float("nan")
    x[9] = torch.arange(V, dtype=torch.float32)  # the maximum is the last element
    x[10] = -torch.arange(V, dtype=torch.float32)  # the first
    x[11, last // 2] = 1e30
    return x


@pytest.mark.parametrize("V", [1, 7, 8, 16, 17, 100, 49152, 65601])
def test_argmax_rows_is_torch_max_indices(isa, V, gen):
    ops = w4a8.load(isa)[0] or pytest.skip(f"extension build {isa} unavailable")
    x = tricky_rows(V, gen)
    want = x.max(dim=-1).indices
    got = ops.argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(ops.argmax_rows(x[:1]), want[:1]) and ops.argmax_rows(x[:0]).shape == (0,)
    if V > 1:
        assert int(got[1]) == (V - 1) // 2 and int(got[3]) == (V - 1) // 3 and int(got[9]) == V - 1
    with pytest.raises(RuntimeError, match="float32"):
        ops.argmax_rows(x.bfloat16())
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.argmax_rows(torch.randn(V + 1, 2).t())
    with pytest.raises(RuntimeError, match="1 to"):
        ops.argmax_rows(x[:, :0])


def masked_reference(x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """What sampling's general path computes: disallowed tokens at -inf, then torch's max indices."""
    from models.sampling import unpack_token_bitmask

    return x.masked_fill(~unpack_token_bitmask(allowed, x.shape[1]), float("-inf")).max(dim=-1).indices


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, V) bool -> (B, ceil(V/32)) int32, bit j % 32 of word j / 32 (llguidance's layout)."""
    B, V = keep.shape
    bits = torch.zeros(B, (V + 31) // 32 * 32, dtype=torch.int64)
    bits[:, :V] = keep.long()
    words = (bits.view(B, -1, 32) << torch.arange(32)).sum(-1)  # < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("V", [1, 7, 8, 16, 17, 100, 49152, 65600])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_argmax_rows_with_a_token_mask_is_the_masked_max(isa, V, threads, gen):
    """With a packed mask the kernel picks what masked_fill(-inf) + max picks: random masks, a tie whose first
    index is masked, NaNs masked away or allowed, a row allowing only a -inf (index 0, as torch), an all-allowed
    row (the unmasked answer); on 1, 2 and 3 threads (rows split over them)."""
    ops = w4a8.load(isa)[0] or pytest.skip(f"extension build {isa} unavailable")
    x = tricky_rows(V, gen)
    keep = torch.rand(x.shape, generator=gen) < 0.5
    last = V - 1
    keep[0] = True  # all allowed
    keep[1, last // 2] = False  # the tie's first index masked: the second wins
    keep[1, last] = True
    keep[2, last] = False  # the only NaN masked away
    keep[3, last // 3] = False  # the first NaN masked: the second counts
    keep[3, last] = True
    keep[4] = False  # nothing allowed on an all -inf row
    keep[5] = False
    keep[5, last] = True  # one allowed token among equals
    keep[7] = False
    keep[7, 0] = True  # +inf (at the end) masked away; x[7, 0] allowed
    x[8, 0] = float("nan")
    keep[8, 0] = False  # a leading NaN masked away
    keep[11] = False
    keep[11, last] = True
    x[11, last] = float("-inf")  # the only allowed token is -inf: torch gives index 0
    allowed = pack_mask(keep)
    want = masked_reference(x, allowed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ops.argmax_rows(x, allowed)
        unmasked = ops.argmax_rows(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)
    assert torch.equal(unmasked, x.max(dim=-1).indices)
    assert int(got[0]) == int(unmasked[0]) and int(got[11]) == 0
    if V > 1:
        assert int(got[1]) == last and int(got[5]) == last
    with pytest.raises(RuntimeError, match="allowed must be"):
        ops.argmax_rows(x, allowed[:, :-1] if allowed.shape[1] > 1 else allowed[:0])
    with pytest.raises(RuntimeError, match="allowed must be"):
        ops.argmax_rows(x, allowed.long())


@pytest.mark.parametrize("V", [1, 15, 49152])
def test_penalties_match_apply_penalties(isa, V, gen, monkeypatch):
    """The one-pass penalty kernel against `sampling.apply_penalties`' torch formulas: positive, negative and zero
    logits, NaN and infinities, seen and unseen tokens, counts, per-row penalties including neutral rows (which
    must come back unchanged, bit for bit) and negative frequency / presence penalties."""
    from models import sampling

    ops = w4a8.load(isa)[0] or pytest.skip(f"extension build {isa} unavailable")
    B = 5
    x = torch.randn(B, V, generator=gen) * 4
    x[:, 0] = 0.0
    if V > 3:
        x[0, 1], x[1, 2], x[2, 3] = float("nan"), float("inf"), float("-inf")
    seen = torch.rand(B, V, generator=gen) < 0.3
    counts = torch.where(torch.rand(B, V, generator=gen) < 0.2, torch.randint(1, 5, (B, V), generator=gen), 0).float()
    params = [
        sampling.SamplingParams(repetition_penalty=1.3),
        sampling.SamplingParams(repetition_penalty=0.7, frequency_penalty=0.5, presence_penalty=-0.4),
        sampling.SamplingParams(),  # neutral: stale statistics must not change its logits
        sampling.SamplingParams(frequency_penalty=-1.5, presence_penalty=2.0),
        sampling.SamplingParams(repetition_penalty=1.1, presence_penalty=0.2),
    ]
    tc = sampling.TokenCounts(seen, counts)
    monkeypatch.setattr(w4a8, "loaded", lambda: None)
    want = sampling.apply_penalties(x, params, None, counts=tc)
    monkeypatch.setattr(w4a8, "loaded", lambda: ops)
    got = sampling.apply_penalties(x, params, None, counts=tc)
    assert got.dtype == torch.float32 and got.shape == (B, V)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(got[2], x[2])
    with pytest.raises(RuntimeError, match="seen must be"):
        ops.penalties(x, seen.float(), counts, *[torch.ones(B)] * 3)
    with pytest.raises(RuntimeError, match="rep, freq and pres"):
        ops.penalties(x, seen, counts, torch.ones(B + 1), torch.ones(B), torch.ones(B))


def kept_reference(x: torch.Tensor, t: float, k: int, p: float, mp: float):
    """`sample_rows`' kept tokens of one row in float64, in vocabulary order, and each token's mass exp(s - max):
    temperature, top-k, top-p (a token stays while the mass before it, normalised over the top-k or the whole row,
    is below p), then min-p."""
    s = x.double() / t
    finite = torch.isfinite(s)
    order = sorted((i for i in range(s.numel()) if finite[i]), key=lambda i: (-float(s[i]), i))
    if not order:
        return [], {}
    m = float(s[order[0]])
    mass = {i: math.exp(float(s[i]) - m) for i in order}
    if 0 < k < s.numel():
        order = order[:k]
    if p < 1.0:
        norm = sum(mass[i] for i in order) if 0 < k < s.numel() else sum(mass.values())
        kept, before = [], 0.0
        for i in order:
            if kept and before >= p * norm:
                break
            kept.append(i)
            before += mass[i]
        order = kept
    if mp > 0:
        order = [i for i in order if mass[i] >= mp]
    return sorted(order), mass


def draw_reference(x: torch.Tensor, t: float, k: int, p: float, mp: float, u: float) -> int:
    """`sample_rows` for one row in float64: the kept tokens, then inversion in vocabulary order with uniform u."""
    kept, mass = kept_reference(x, t, k, p, mp)
    if not kept:
        return 0
    total = sum(mass[i] for i in kept)
    cum = 0.0
    for i in kept:
        cum += mass[i]
        if cum > u * total:
            return i
    return kept[-1]


DRAW_CASES = [
    (0.7, 0, 1.0, 0.0),
    (1.0, 0, 1.0, 0.0),
    (0.8, 40, 1.0, 0.0),
    (0.7, 0, 0.9, 0.0),
    (1.2, 50, 0.95, 0.0),
    (0.9, 0, 1.0, 0.05),
    (0.7, 20, 0.8, 0.1),
    (1.5, 0, 0.5, 0.02),
    (0.5, 1, 1.0, 0.0),
]


@pytest.mark.parametrize("V", [5, 200, 49152])
def test_sample_rows_matches_a_float64_reference(isa, V, gen):
    """Every build draws the token a float64 reference draws for the same uniform, for temperature, top-k, top-p
    and min-p alone and together; a case may differ only where nudging top_p or u by float32 rounding moves the
    reference (a token at the boundary)."""
    ops = w4a8.load(isa)[0] or pytest.skip(f"extension build {isa} unavailable")
    rows = 4 if V > 1000 else 24
    x = torch.randn(rows, V, generator=gen) * 3
    x[1, : V // 2] = float("-inf")  # a masked half
    checked = 0
    for t, k, p, mp in DRAW_CASES:
        u = torch.rand(rows, generator=gen)
        u[0], u[2] = 0.0, 1.0 - 2.0**-24
        cols = [torch.full((rows,), c, dtype=torch.float32) for c in (t, p, mp)]
        got = ops.sample_rows(x, cols[0], torch.full((rows,), k, dtype=torch.long), cols[1], cols[2], u).tolist()
        for b in range(rows):
            args = (x[b], t, k, p, mp)
            want = draw_reference(*args, float(u[b]))
            if got[b] != want:  # accepted only at a boundary float32 rounding can move
                nudged = {
                    draw_reference(x[b], t, k, pp, mp, uu)
                    for pp in (p * (1 - 1e-5), min(1.0, p * (1 + 1e-5)))
                    for uu in (float(u[b]) - 1e-6, float(u[b]) + 1e-6)  # past 1: the last kept token
                }
                assert got[b] in nudged, (t, k, p, mp, b, got[b], want)
            checked += 1
    assert checked == rows * len(DRAW_CASES)


def test_sample_rows_at_the_largest_uniform_draws_the_reference_token(isa, gen):
    """With u = 1 - 2^-24 a row draws the last token whose mass the reference's cumulative sum still needs, also
    where the last tokens hold less than 2^-24 of the row's mass: the row's total and the running sum are both
    taken in double, so they agree to far below that (a float total drew an earlier token in about 5% of such
    rows)."""
    ops = w4a8.load(isa)[0] or pytest.skip(f"extension build {isa} unavailable")
    rows, V = 200, 200
    x = torch.randn(rows, V, generator=gen) * 3
    u = torch.full((rows,), 1.0 - 2.0**-24)
    ones = torch.ones(rows)
    for t in (0.7, 1.0):
        got = ops.sample_rows(x, t * ones, torch.zeros(rows, dtype=torch.long), ones, 0 * ones, u).tolist()
        assert got == [draw_reference(x[b], t, 0, 1.0, 0.0, float(u[b])) for b in range(rows)], t


@pytest.mark.parametrize("V", [200, 16384])
def test_sample_rows_keeps_the_smaller_indices_of_a_tie(isa, V, gen):
    """Where the last token top-k or top-p keeps is tied, the tied tokens of smaller index stay (the reference's
    order), also when the margin widens to thousands of candidates and only the k first, or the tokens of the
    bucket where the top-p mass crosses, are sorted: every uniform draws the reference's token (or, where the
    float32 masses cross u just before the float64 ones, that of u nudged by 1e-6). Logits take 6 values, so
    ties are everywhere."""
    ops = w4a8.load(isa)[0] or pytest.skip(f"extension build {isa} unavailable")
    rows = 4
    x = torch.randint(0, 6, (rows, V), generator=gen).float() * 4  # steps of 4: margins 8, 16 ... take 2, 4 ... values
    x[:, V // 3] = 24.0  # one largest token; the boundary then lies among thousands of ties (large V)
    u = torch.linspace(0.0, 1.0 - 2.0**-24, rows)
    ones = torch.ones(rows)
    for k, p in [(2, 1.0), (7, 1.0), (40, 1.0), (V // 4, 1.0), (0, 0.5), (0, 0.9), (0, 0.999), (V // 4, 0.7)]:
        for t in (1.0, 4.0):
            kk = torch.full((rows,), k, dtype=torch.long)
            got = ops.sample_rows(x, t * ones, kk, p * ones, 0 * ones, u).tolist()
            for b in range(rows):
                want = draw_reference(x[b], t, k, p, 0.0, float(u[b]))
                if got[b] != want:
                    near = {draw_reference(x[b], t, k, p, 0.0, float(u[b]) + du) for du in (-1e-6, 1e-6)}
                    assert got[b] in near, (k, p, t, b, got[b], want)


def test_sample_rows_follows_the_distribution(isa):
    """Drawn with torch's uniforms, the kernel's tokens pass a chi-square test against the warped distribution
    (seeded, so the 0.999 bound cannot fail by bad luck); removed, NaN and -inf tokens are never drawn, and a row
    without a finite logit gives 0."""
    ops = w4a8.load(isa)[0] or pytest.skip(f"extension build {isa} unavailable")
    g = torch.Generator().manual_seed(20261202)
    logits = torch.tensor([2.0, 1.0, 0.5, float("nan"), -0.5, float("-inf"), 1.5, 0.2])
    n = 30000
    for t, k, p, mp in [
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 1.0, 0.0),
        (1.0, 3, 1.0, 0.0),
        (1.0, 0, 0.7, 0.0),
        (1.0, 0, 1.0, 0.3),
    ]:
        x = logits.expand(n, -1).contiguous()
        u = torch.rand(n, generator=g)
        cols = [torch.full((n,), c, dtype=torch.float32) for c in (t, p, mp)]
        toks = ops.sample_rows(x, cols[0], torch.full((n,), k, dtype=torch.long), cols[1], cols[2], u)
        kept, mass = kept_reference(logits, t, k, p, mp)
        keep = torch.zeros(8, dtype=torch.bool)
        keep[kept] = True
        target = torch.tensor([mass[i] if i in kept else 0.0 for i in range(8)], dtype=torch.float64)
        target /= target.sum()
        counts = torch.bincount(toks, minlength=8).double()
        assert counts[~keep].sum() == 0
        expected = target.double() * n
        chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        assert chi2 < {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[int(keep.sum()) - 1], (t, k, p, mp, chi2)
    none = torch.full((2, 8), float("-inf"))
    none[1] = float("nan")
    ones = torch.ones(2)
    assert ops.sample_rows(none, ones, torch.zeros(2, dtype=torch.long), ones, 0 * ones, 0.5 * ones).tolist() == [0, 0]
    with pytest.raises(RuntimeError, match="temperature > 0"):
        ops.sample_rows(none, 0 * ones, torch.zeros(2, dtype=torch.long), ones, 0 * ones, 0.5 * ones)
    with pytest.raises(RuntimeError, match="top_k must be"):
        ops.sample_rows(none, ones, torch.zeros(2), ones, 0 * ones, 0.5 * ones)


def test_sample_draws_with_the_kernel_once_loaded(monkeypatch, gen):
    """`sampling.sample`'s sampled rows go to `sample_rows` where the extension is loaded, each with the uniform its
    generator gives (the same tokens as calling the kernel with those uniforms), and to the torch reference
    otherwise, with the same distribution (the chi-square tests in tests/unit/test_sampling.py)."""
    from models import sampling

    ops = w4a8.load()[0] or pytest.skip("extension unavailable")
    monkeypatch.setattr(w4a8, "loaded", lambda: ops)
    x = torch.randn(4, 3000, generator=gen) * 3
    params = [
        sampling.SamplingParams(temperature=0.7, top_p=0.9, seed=1),
        sampling.SamplingParams(temperature=1.0, seed=2),
        sampling.SamplingParams(temperature=0.8, top_k=40, min_p=0.05, seed=3),
        sampling.SamplingParams(temperature=0.0),
    ]
    gens = [sampling.make_generator(p.seed, "cpu") for p in params]
    got = sampling.sample(x, params, generators=gens).tokens
    twins = [sampling.make_generator(p.seed, "cpu") for p in params[:3]]
    u = torch.stack([torch.rand((), generator=g) for g in twins])
    f32 = [torch.tensor([getattr(p, a) for p in params[:3]]) for a in ("temperature", "top_p", "min_p")]
    k = torch.tensor([p.top_k if p.top_k > 0 else 3000 for p in params[:3]])
    want = ops.sample_rows(x[:3].contiguous(), f32[0], k, f32[1], f32[2], u)
    assert torch.equal(got[:3], want) and int(got[3]) == int(x[3].argmax())


def test_argmax_rows_takes_the_kernel_once_loaded(monkeypatch, gen):
    """`sampling.argmax_rows` calls the loaded extension for 2-D float32 CPU rows (never building it), with or
    without a token mask (as `sample`'s greedy rows do), and torch's `max` (after masked_fill) for everything
    else, with the same indices."""
    from models import sampling

    ops = w4a8.load()[0] or pytest.skip("extension unavailable")
    calls = []
    monkeypatch.setattr(w4a8, "loaded", lambda: calls.append(1) or ops)
    x = tricky_rows(300, gen)
    assert torch.equal(sampling.argmax_rows(x), x.max(-1).indices) and calls == [1]
    assert torch.equal(sampling.argmax_rows(x.bfloat16()), x.bfloat16().max(-1).indices) and calls == [1]
    assert torch.equal(sampling.argmax_rows(x[0]), x[0].argmax()) and calls == [1]
    keep = torch.rand(x.shape, generator=gen) < 0.3
    keep[:, 7] = True
    allowed = pack_mask(keep)
    want = masked_reference(x, allowed)
    assert torch.equal(sampling.argmax_rows(x, allowed), want) and calls == [1, 1]
    greedy = [sampling.SamplingParams(temperature=0.0)] * x.shape[0]
    assert torch.equal(sampling.sample(x, greedy, allowed=allowed).tokens, want) and calls == [1, 1, 1]
    monkeypatch.setattr(w4a8, "loaded", lambda: None)
    assert torch.equal(sampling.argmax_rows(x), x.max(-1).indices)
    assert torch.equal(sampling.argmax_rows(x, allowed), want)
    assert torch.equal(sampling.sample(x, greedy, allowed=allowed).tokens, want)


def test_input_checks(isa):
    ops = ops_for(isa)
    x = torch.randn(4, 64).to(torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.rms_norm(x.float(), w, 1e-6)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.rms_norm(x.t(), w, 1e-6)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(x, w[:32], 1e-6)
    with pytest.raises(RuntimeError, match="differ in shape"):
        ops.add_rms_norm_(x, x[:2], w, 1e-6)
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.rope_(x, x[:, :8], x[:, :8], 2, 48)
    with pytest.raises(RuntimeError, match="cos and sin"):
        ops.rope_(x, x[:, :8], x[:, :8], 2, 32)
    with pytest.raises(RuntimeError, match="even"):
        ops.silu_mul(x[:, :63])
    with pytest.raises(RuntimeError, match="kv_rows"):
        ops.kv_rows(x.view(4, 2, 32).float())
    with pytest.raises(RuntimeError, match="kv_values"):
        ops.kv_values(x.view(4, 2, 32))


def test_cpu_fused_choice():
    assert fused.cpu_fused_ops("torch") == (None, "requested")
    ops, reason = fused.cpu_fused_ops("fused")
    assert ops is not None and "C++ kernels" in reason
    ops, _ = fused.cpu_fused_ops("auto")
    assert (ops is not None) == (w4a8.native_isa() != "scalar")
    ops, reason = fused.cpu_fused_ops("auto", torch.float32)
    assert ops is None and "bfloat16" in reason
    with pytest.raises(RuntimeError, match="bfloat16"):
        fused.cpu_fused_ops("fused", torch.float32)
    with pytest.raises(ValueError, match="cpu_fused"):
        fused.cpu_fused_ops("fast")


def test_cpu_fused_choice_without_a_compiler(no_cpp_compiler):
    """Without a compiler, "auto" keeps torch's ops with the reason and "fused" is an error."""
    ops, reason = fused.cpu_fused_ops("auto")
    assert ops is None and "no C++ compiler" in reason
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        fused.cpu_fused_ops("fused")


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_prefill_and_eager_decode_with_fused_ops_match_torch_ops(tiny_llama_dir, gen, kv):
    """A tiny bfloat16 Llama: the fused prefill (chunked too, through the cached prefix) and two batched eager
    decode steps against torch's ops, the same KV cache written (int8 rows by `kv_rows` against quantize_rows),
    and `cpu_fused` reaching the model."""
    from models.kv_cache import from_cache
    from models.loader import load_runner

    if w4a8.load()[0] is None:
        pytest.skip(f"extension unavailable: {w4a8.load()[1]}")
    kw = dict(dtype=torch.bfloat16, max_batch_size=2, max_seq=128, kv_cache_dtype=kv)
    a = load_runner(tiny_llama_dir, cpu_fused="fused", **kw)
    b = load_runner(tiny_llama_dir, cpu_fused="torch", **kw)
    assert a.model.fused_ops is not None and b.model.fused_ops is None
    tokens = torch.randint(0, a.vocab_size, (40,), generator=gen)
    for r in (a, b):
        r.prefill(tokens[:25], 1, 0)
    got, want = a.prefill(tokens[25:], 1, 25), b.prefill(tokens[25:], 1, 25)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=0)
    for ca, cb in ((a.cache.k_all, b.cache.k_all), (a.cache.v_all, b.cache.v_all)):
        ra, rb = from_cache(ca[:, 1, :40], torch.float32), from_cache(cb[:, 1, :40], torch.float32)
        torch.testing.assert_close(ra, rb, atol=5e-2 if kv == "auto" else 1e-1, rtol=0)
    for r in (a, b):
        r.prefill(tokens[:7], 0, 0)
    for step in range(2):
        nxt, pos = torch.randint(0, a.vocab_size, (2,), generator=gen), torch.tensor([7 + step, 40 + step])
        got, want = a.decode(nxt, pos, torch.tensor([0, 1])), b.decode(nxt, pos, torch.tensor([0, 1]))
        torch.testing.assert_close(got, want, atol=5e-2, rtol=0)
