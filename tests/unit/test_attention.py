"""models/attention.py and models/csrc/decode_attention.cpp: the in-place decode attention against its
plain-PyTorch reference (gather + SDPA) under every ISA build this CPU can run, on caches in q's dtype and on
int8 caches (models/kv_cache.py rows), its input checks, the op under torch.compile after in-place KV writes (as
the compiled decode calls it), and the `cpu_attention` choice."""

from __future__ import annotations

import pytest
import torch

from models import attention, w4a8
from models.kv_cache import quantize_rows, to_cache


def op_for(isa: str):
    ops, why = w4a8.load(isa)
    if ops is None:
        pytest.skip(f"extension build {isa} unavailable: {why}")
    return ops.decode_attention


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def case(B, H, kvh, D, slots_n, T, dtype, gen):
    kc = torch.randn(slots_n, T, kvh, D, generator=gen).to(dtype)
    vc = torch.randn(slots_n, T, kvh, D, generator=gen).to(dtype)
    # q as the model makes it: the first H heads of a (B, H + 2 * kvh, D) projection (rows not contiguous)
    q = torch.randn(B, H + 2 * kvh, D, generator=gen).to(dtype)[:, :H]
    slots = torch.randperm(slots_n, generator=gen)[:B]
    positions = torch.randint(0, T, (B,), generator=gen)
    positions[0] = 0  # a row that sees one key
    if B > 1:
        positions[1] = T - 1  # a row that sees the whole cache
    return q, kc, vc, slots, positions


def reference(q, kc, vc, slots, positions):
    kv_len = int(positions.max()) + 1
    f = torch.float32
    if kc.dtype != torch.int8:  # int8 rows stay rows: the reference dequantizes them
        kc, vc = kc.to(f), vc.to(f)
    out = attention.reference(q.to(f), kc, vc, slots, attention.decode_mask(positions, kv_len), kv_len)
    return out.double()


@pytest.mark.parametrize(
    "B,H,kvh,D",
    [
        (1, 9, 3, 64),  # SmolLM2: GQA 3, head_dim 64 (compile-time specialized)
        (8, 9, 3, 64),
        (5, 8, 8, 128),  # MHA, head_dim 128
        (3, 32, 4, 128),  # GQA 8
        (4, 12, 1, 80),  # MQA, group 12 and head_dim 80: the run-time sizes
        (2, 4, 2, 16),
    ],
)
@pytest.mark.parametrize("T", [1, 37, 300])
def test_kernel_matches_reference(isa, B, H, kvh, D, T, gen):
    op = op_for(isa)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        q, kc, vc, slots, positions = case(B, H, kvh, D, B + 2, T, dtype, gen)
        got = op(q, kc, vc, slots, positions, D**-0.5)
        assert got.shape == (B, H, D) and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.double(), reference(q, kc, vc, slots, positions), atol=tol, rtol=tol)


@pytest.mark.parametrize("B,H,kvh,D", [(1, 9, 3, 64), (8, 9, 3, 64), (3, 32, 4, 128), (4, 12, 1, 80), (2, 4, 2, 16)])
@pytest.mark.parametrize("T", [1, 37, 300])
def test_int8_cache_matches_reference(isa, B, H, kvh, D, T, gen):
    """An int8 cache (rows of D codes and their scale): the kernel against the reference, which dequantizes the
    same rows, with q in each dtype; head-major storage as the KV cache lays it out."""
    op = op_for(isa)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        q, kc, vc, slots, positions = case(B, H, kvh, D, B + 2, T, torch.float32, gen)
        kq = quantize_rows(kc.transpose(1, 2).contiguous()).transpose(1, 2)  # (S, T, KVH, D + 4), head-major
        vq = quantize_rows(vc.transpose(1, 2).contiguous()).transpose(1, 2)
        q = q.to(dtype)
        got = op(q, kq, vq, slots, positions, D**-0.5)
        assert got.shape == (B, H, D) and got.dtype == dtype
        torch.testing.assert_close(got.double(), reference(q, kq, vq, slots, positions), atol=tol, rtol=tol)


def test_head_major_cache_layout(isa, gen):
    """The cache may be any strided view whose head_dim is contiguous: (S, KVH, T, D) storage seen as (S, T, KVH, D)
    gives the result of the contiguous cache exactly."""
    op = op_for(isa)
    q, kc, vc, slots, positions = case(4, 9, 3, 64, 6, 70, torch.bfloat16, gen)
    kh, vh = kc.transpose(1, 2).contiguous().transpose(1, 2), vc.transpose(1, 2).contiguous().transpose(1, 2)
    assert kh.stride(2) != 64
    torch.testing.assert_close(
        op(q, kh, vh, slots, positions, 0.125), op(q, kc, vc, slots, positions, 0.125), atol=0, rtol=0
    )


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_split_keys_merge_exactly(threads, gen):
    """Batch 1 splits the keys into chunks (one per thread and more) merged by their running maxima: the result
    does not depend on the split."""
    op = op_for(w4a8.native_isa())
    q, kc, vc, slots, positions = case(1, 6, 2, 64, 2, 1000, torch.float32, gen)
    positions[0] = 999
    qs = q * 8  # peaked softmax: chunks with very different maxima
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = op(qs, kc, vc, slots, positions, 0.125)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got.double(), reference(qs, kc, vc, slots, positions), atol=1e-5, rtol=1e-5)


def test_only_the_rows_slot_and_positions_are_read(gen):
    """Keys past a row's position and other slots never count: poisoning them changes nothing."""
    op = op_for(w4a8.native_isa())
    q, kc, vc, slots, positions = case(3, 4, 2, 64, 6, 50, torch.float32, gen)
    want = op(q, kc, vc, slots, positions, 0.125)
    kp, vp = kc.clone(), vc.clone()
    for s in range(kc.shape[0]):
        used = (slots == s).nonzero()
        start = int(positions[used[0, 0]]) + 1 if len(used) else 0
        kp[s, start:] = float("nan")
        vp[s, start:] = float("nan")
    torch.testing.assert_close(op(q, kp, vp, slots, positions, 0.125), want, atol=0, rtol=0)


def test_input_checks():
    op = op_for("scalar")
    kc = torch.zeros(2, 8, 2, 16)
    q = torch.zeros(1, 4, 16)
    s, p = torch.tensor([0]), torch.tensor([3])
    with pytest.raises(RuntimeError, match="slot 2 out of range"):
        op(q, kc, kc, torch.tensor([2]), p, 1.0)
    with pytest.raises(RuntimeError, match="position 8 out of range"):
        op(q, kc, kc, s, torch.tensor([8]), 1.0)
    with pytest.raises(RuntimeError, match="q's dtype, or both be int8"):
        op(q.double(), kc, kc, s, p, 1.0)
    k8 = torch.zeros(2, 8, 2, 20, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="q's dtype, or both be int8"):
        op(q, k8, torch.zeros(2, 8, 2, 20), s, p, 1.0)
    with pytest.raises(RuntimeError, match=r"head_dim \+ 4 bytes"):
        op(q, k8[..., :16], k8[..., :16], s, p, 1.0)
    assert op(q, k8, k8, s, p, 1.0).shape == (1, 4, 16)
    with pytest.raises(RuntimeError, match="head_dim"):
        op(torch.zeros(1, 4, 32), kc, kc, s, p, 1.0)
    with pytest.raises(RuntimeError, match="H % KVH"):
        op(torch.zeros(1, 3, 16), kc, kc, s, p, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        op(q, kc, kc, s.int(), p, 1.0)
    strided = torch.zeros(2, 8, 2, 32)[..., ::2]
    with pytest.raises(RuntimeError, match="head_dim.*contiguous"):
        op(q, strided, strided, s, p, 1.0)
    assert op(torch.zeros(0, 4, 16), kc, kc, s[:0], p[:0], 1.0).shape == (0, 4, 16)


@pytest.mark.parametrize("int8", [False, True])
def test_op_under_torch_compile_after_in_place_kv_writes(gen, int8):
    """As in the compiled decode: the step's keys and values are written into the cache in place, then the op
    reads them; a compiled graph must order the two and must not copy the cache."""
    from models.compile import compile_unavailable

    why = compile_unavailable(torch.device("cpu"))
    if why:
        pytest.skip(why)
    op = op_for(w4a8.native_isa()).default

    def step(q, k, v, kc, vc, slots, positions):
        kc.index_put_((slots, positions), to_cache(kc, k))
        vc.index_put_((slots, positions), to_cache(vc, v))
        return op(q, kc, vc, slots, positions, 0.125)

    compiled = torch.compile(step, dynamic=True, fullgraph=True)
    kc = torch.randn(5, 64, 2, 64, generator=gen)
    vc = torch.randn(5, 64, 2, 64, generator=gen)
    if int8:  # the int8 rows are written by the graph too (quantize_rows inside it)
        kc, vc = quantize_rows(kc), quantize_rows(vc)
    kc2, vc2 = kc.clone(), vc.clone()
    slots = torch.tensor([3, 0, 1])
    ptrs = (kc2.data_ptr(), vc2.data_ptr())
    with torch.inference_mode():
        for i in range(4):
            q = torch.randn(3, 4, 64, generator=gen)
            k, v = torch.randn(3, 2, 64, generator=gen), torch.randn(3, 2, 64, generator=gen)
            positions = torch.tensor([10 + i, 20 + i, 5 + 2 * i])
            want = step(q, k, v, kc, vc, slots, positions)
            got = compiled(q, k, v, kc2, vc2, slots, positions)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc) and (kc2.data_ptr(), vc2.data_ptr()) == ptrs


def test_cpu_attention_choice():
    assert attention.cpu_attention_op("sdpa") == (None, "requested")
    op, reason = attention.cpu_attention_op("inplace")
    assert op is not None and "in-place" in reason
    op, _ = attention.cpu_attention_op("auto")
    assert (op is not None) == (w4a8.native_isa() != "scalar")
    with pytest.raises(ValueError, match="cpu_attention"):
        attention.cpu_attention_op("fast")


def test_cpu_attention_choice_without_a_compiler(no_cpp_compiler):
    """Without a compiler, "auto" falls back to SDPA with the reason and "inplace" is an error."""
    op, reason = attention.cpu_attention_op("auto")
    assert op is None and "no C++ compiler" in reason
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        attention.cpu_attention_op("inplace")


def test_shapes_outside_the_kernel_bounds_run_sdpa():
    """A model with more query heads per KV head (or a wider head) than the kernel's buffers: SDPA under "auto"
    (logged), an error under "inplace"; the constants match the C++ bounds (the kernel rejects one past them)."""
    if w4a8.native_isa() != "scalar":  # "auto" takes the kernel here, so the bounds decide
        assert attention.decode_attention_for("auto", 32, 8, 128)[0] is not None
        op, why = attention.decode_attention_for("auto", 2 * attention.MAX_GROUP, 1, 64)
        assert op is None and "query heads per KV head" in why
        assert attention.decode_attention_for("auto", 4, 4, attention.MAX_HEAD_DIM * 2)[0] is None
    assert attention.decode_attention_for("inplace", attention.MAX_GROUP, 1, attention.MAX_HEAD_DIM)[0] is not None
    with pytest.raises(ValueError, match="query heads per KV head"):
        attention.decode_attention_for("inplace", 2 * attention.MAX_GROUP, 1, 64)
    with pytest.raises(ValueError, match="head_dim"):
        attention.decode_attention_for("inplace", 4, 4, attention.MAX_HEAD_DIM * 2)
    op = op_for("scalar")
    g = attention.MAX_GROUP
    kc = torch.zeros(1, 4, 1, 16)
    s, p = torch.tensor([0]), torch.tensor([1])
    assert op(torch.zeros(1, g, 16), kc, kc, s, p, 1.0).shape == (1, g, 16)
    with pytest.raises(RuntimeError, match="H / KVH <= 16"):
        op(torch.zeros(1, g + 1, 16), kc, kc, s, p, 1.0)
    big = torch.zeros(1, 4, 1, attention.MAX_HEAD_DIM + 8)
    with pytest.raises(RuntimeError, match="head_dim <= 256"):
        op(torch.zeros(1, 1, attention.MAX_HEAD_DIM + 8), big, big, s, p, 1.0)
