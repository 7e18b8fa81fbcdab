"""models/w4a8.py and models/csrc/w4a8.cpp: layout round trip, every buildable ISA against the plain-PyTorch
reference, the reference against the dense product, and the op under torch.compile."""

from __future__ import annotations

import pytest
import torch

from models import kernels, w4a8


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def ops_for(isa: str):
    ops, why = w4a8.load(isa)
    if ops is None:
        pytest.skip(f"W4A8 {isa} build unavailable: {why}")
    return ops


def random_layer(n: int, k: int, group: int, gen: torch.Generator):
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 1e-3).half().float()  # exact in float16
    zeros = torch.randint(0, 16, (k // group, n), generator=gen, dtype=torch.uint8)
    return codes, scales, zeros


def dense(codes, scales, zeros, group):
    g = torch.arange(codes.shape[1]) // group
    return (codes.double() - zeros.double()[g].t()) * scales.double()[g].t()  # (N, K)


@pytest.mark.parametrize("n,k,group", [(16, 64, 32), (100, 256, 64), (960, 576, 64), (48, 512, 128)])
def test_pack_unpack_roundtrip(n, k, group, gen):
    codes, scales, zeros = random_layer(n, k, group, gen)
    packed, s16, z8 = w4a8.pack(codes, scales, zeros, group)
    blocks = -(-n // 16)
    assert packed.shape == (blocks, k // 8, 64) and s16.shape == z8.shape == (blocks, k // group, 16)
    c, s, z = w4a8.unpack(packed, s16, z8)
    assert torch.equal(c[:n], codes) and torch.equal(s[:, :n], scales) and torch.equal(z[:, :n], zeros)
    assert not c[n:].any()  # padding columns are zero codes with zero scales


def test_pack_byte_layout():
    """Byte j of a 64-byte block: column j // 4, low nibble k = j % 4, high nibble k = 4 + j % 4."""
    codes = torch.zeros(16, 8, dtype=torch.uint8)
    codes[5, 2] = 7  # column 5, k 2: byte 5 * 4 + 2, low nibble
    codes[3, 6] = 9  # column 3, k 6: byte 3 * 4 + 2, high nibble
    packed, _, _ = w4a8.pack(codes, torch.ones(1, 16), torch.zeros(1, 16, dtype=torch.uint8), 8)
    flat = packed.reshape(64)
    assert flat[22] == 7 and flat[14] == 9 << 4 and int(flat.count_nonzero()) == 2


def test_pack_rejects_what_the_kernel_cannot_take():
    codes = torch.zeros(16, 64, dtype=torch.uint8)
    zeros = torch.zeros(2, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="float16"):
        w4a8.pack(codes, torch.full((2, 16), 1e-9), zeros, 32)  # below float16's normal range
    with pytest.raises(ValueError, match="float16"):
        w4a8.pack(codes, torch.full((2, 16), 1e5), zeros, 32)  # above it
    _, s16, _ = w4a8.pack(codes, torch.full((2, 16), 0.1), zeros, 32)  # inside: rounded to float16
    assert torch.equal(s16, torch.full((1, 2, 16), 0.1, dtype=torch.float16))
    with pytest.raises(ValueError, match="group_size"):
        w4a8.pack(codes, torch.ones(2, 16), zeros, 12)


@pytest.mark.parametrize("m", [1, 3, 8, 9, 21])
@pytest.mark.parametrize(
    "n,k,group,block",
    [
        (100, 256, 32, 32),
        (192, 576, 64, 32),
        (192, 576, 64, 64),
        (64, 512, 128, 16),
        (192, 576, 64, 8),
        (48, 72, 24, 8),  # 3 activation blocks a group: the paired rounding and its single-block tail
        (32, 64, 8, 8),  # one block a group
    ],
)
def test_kernel_matches_reference(isa, m, n, k, group, block, gen):
    ops = ops_for(isa)
    assert ops.isa() == isa
    codes, scales, zeros = random_layer(n, k, group, gen)
    packed, s16, z8 = w4a8.pack(codes, scales, zeros, group)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, :group] = 0  # a group of zeros: scale 0, no division by zero
    ref = w4a8.reference(x, codes, scales, zeros, group, block)
    y32 = ops.w4a8_mm(x, packed, s16, z8, group, block)
    assert y32.shape == (m, packed.shape[0] * 16) and y32.dtype == torch.float32
    assert not y32[:, n:].any()
    # the integer sums are exact; only float32 rounding of the per-group terms differs
    torch.testing.assert_close(y32[:, :n].double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    xb = x.to(torch.bfloat16)
    yb = ops.w4a8_mm(xb, packed, s16, z8, group, block)
    refb = w4a8.reference(xb, codes, scales, zeros, group, block)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb[:, :n].double(), refb, rtol=2**-8, atol=1e-4 * float(refb.abs().max()))


@pytest.mark.parametrize("n,k,group", [(960, 576, 64), (100, 256, 32), (576, 1536, 128), (48, 72, 24)])
def test_dequant_matches_reference(isa, n, k, group, gen):
    ops = ops_for(isa)
    codes, scales, zeros = random_layer(n, k, group, gen)
    packed, s16, z8 = w4a8.pack(codes, scales, zeros, group)
    w = ops.w4a8_dequant(packed, s16, z8, group)
    assert w.dtype == torch.bfloat16 and w.shape == (packed.shape[0] * 16, k)
    assert torch.equal(w, w4a8.dequant_reference(packed, s16, z8))  # one rounding, to bf16: exact
    assert torch.equal(w[:n].double(), dense(codes, scales, zeros, group).to(torch.bfloat16).double())


def amx_ops():
    ops = ops_for(w4a8.native_isa())
    if not w4a8.has_amx(ops):
        pytest.skip(
            f"no AMX here: the {ops.isa()} build has it: {ops.has_amx()}; torch runs AMX tiles: {kernels.cpu_has_amx()}"
        )
    return ops


@pytest.mark.parametrize("m", [1, 4, 8, 16, 17, 40])
@pytest.mark.parametrize("n,k,group", [(960, 576, 64), (100, 256, 32), (64, 512, 128), (48, 512, 256)])
def test_amx_kernel_matches_reference(m, n, k, group, gen):
    ops = amx_ops()
    codes, scales, zeros = random_layer(n, k, group, gen)
    packed, s16, z8 = w4a8.pack(codes, scales, zeros, group)
    x = (torch.randn(m, k, generator=gen) * 3).to(torch.bfloat16)
    x[0, :group] = 0
    y = ops.w4_amx_mm(x, packed, s16, z8, group)
    assert y.shape == (m, packed.shape[0] * 16) and y.dtype == torch.bfloat16
    assert not y[:, n:].any()
    ref = w4a8.amx_reference(x, packed, s16, z8)
    torch.testing.assert_close(ref[:, :n], x.double() @ dense(codes, scales, zeros, group).t())
    # float32 sums of exact products, one rounding to bf16: within an ulp of bf16 plus the float32 sums' error
    torch.testing.assert_close(y.double(), ref, rtol=2**-8, atol=1e-5 * float(ref.abs().max()))
    # no activation rounding: closer to the exact product than W4A8 with its default blocks
    w8 = ops.w4a8_mm(x, packed, s16, z8, group, w4a8.act_block(group)).double()
    assert (y.double() - ref).norm() < (w8 - ref).norm()


def test_amx_kernel_input_checks():
    ops = amx_ops()
    codes, scales, zeros = random_layer(16, 64, 32, torch.Generator().manual_seed(0))
    packed, s16, z8 = w4a8.pack(codes, scales, zeros, 32)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.w4_amx_mm(torch.randn(2, 64), packed, s16, z8, 32)
    with pytest.raises(RuntimeError, match="packed has K"):
        ops.w4_amx_mm(torch.randn(2, 128).to(torch.bfloat16), packed, s16, z8, 32)
    with pytest.raises(RuntimeError, match="group_size"):
        ops.w4_amx_mm(torch.randn(2, 64).to(torch.bfloat16), packed, s16, z8, 16)
    assert ops.w4_amx_mm(torch.randn(0, 64).to(torch.bfloat16), packed, s16, z8, 32).shape == (0, 16)


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_builds_without_amx_say_so(isa):
    ops = ops_for(isa)
    assert not ops.has_amx()
    codes, scales, zeros = random_layer(16, 64, 32, torch.Generator().manual_seed(0))
    packed, s16, z8 = w4a8.pack(codes, scales, zeros, 32)
    with pytest.raises(RuntimeError, match="no AMX path"):
        ops.w4_amx_mm(torch.randn(2, 64).to(torch.bfloat16), packed, s16, z8, 32)
    packed8, s8 = w4a8.pack_int8(torch.zeros(16, 64, dtype=torch.int8), torch.ones(16))
    with pytest.raises(RuntimeError, match="no AMX path"):
        ops.w8_amx_mm(torch.randn(2, 64), packed8, s8, 64, False)


def test_cpu_plan_dense_prefill_only_with_amx_or_avx512_bf16(monkeypatch):
    if w4a8.native_isa() == "scalar":
        pytest.skip("auto does not pick W4A8 without SIMD")
    cpu = torch.device("cpu")
    ops = ops_for(w4a8.native_isa())
    monkeypatch.setattr(kernels, "cpu_has_amx", lambda: True)
    plan = kernels.device_kernel(cpu)
    if ops.has_amx():
        assert (plan.amx_min_tokens, plan.dense_min_tokens) == (
            kernels.CPU_AMX_MIN_TOKENS,
            kernels.CPU_DENSE_MIN_TOKENS,
        )
    else:  # the AVX2 build on an AMX CPU (ATEN_CPU_CAPABILITY=avx2): oneDNN's dense prefill only
        assert (plan.amx_min_tokens, plan.dense_min_tokens) == (None, kernels.CPU_DENSE_MIN_TOKENS)
    int4pack = kernels.device_kernel(cpu, cpu_int4="int4pack")
    assert (int4pack.amx_min_tokens, int4pack.dense_min_tokens) == (None, None)
    monkeypatch.setattr(kernels, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(kernels, "cpu_has_avx512_bf16", lambda: False)
    assert (kernels.device_kernel(cpu).amx_min_tokens, kernels.device_kernel(cpu).dense_min_tokens) == (None, None)
    monkeypatch.setattr(kernels, "cpu_has_avx512_bf16", lambda: True)  # no AMX, AVX512-BF16: dense from 256
    plan = kernels.device_kernel(cpu)
    assert (plan.amx_min_tokens, plan.dense_min_tokens) == (None, kernels.CPU_BF16_DENSE_MIN_TOKENS)
    assert "AVX512-BF16" in plan.reason
    assert kernels.device_kernel(cpu, cpu_int4="int4pack").dense_min_tokens is None


def test_avx512_bf16_probe_is_off_below_avx512():
    """The dense-prefill probe says no where torch runs below AVX-512 (CI reruns this file under
    ATEN_CPU_CAPABILITY=avx2 and default) or the CPU has no AVX512-BF16, as on an AVX2-only CPU."""
    below = not torch.backends.cpu.get_cpu_capability().lower().startswith("avx512")
    if below or "avx512_bf16" not in w4a8.cpu_flags():
        assert not kernels.cpu_has_avx512_bf16()
    else:
        assert kernels.cpu_has_avx512_bf16() == torch.backends.mkldnn.is_available()


def test_reference_is_close_to_the_dense_product(gen):
    """The activation rounding (int8 per row and block) costs under 1% of the output for Gaussian inputs (about
    max|x| / 127 / sqrt(12) relative per input), and smaller blocks cost less."""
    codes, scales, zeros = random_layer(192, 576, 64, gen)
    x = torch.randn(8, 576, generator=gen)
    want = x.double() @ dense(codes, scales, zeros, 64).t()
    errs = [float((w4a8.reference(x, codes, scales, zeros, 64, b) - want).norm() / want.norm()) for b in (16, 64)]
    assert errs[0] < errs[1] < 1e-2


def test_kernel_input_checks():
    ops = ops_for("scalar")
    codes, scales, zeros = random_layer(16, 64, 32, torch.Generator().manual_seed(0))
    packed, s16, z8 = w4a8.pack(codes, scales, zeros, 32)
    with pytest.raises(RuntimeError, match="packed has K"):
        ops.w4a8_mm(torch.randn(2, 128), packed, s16, z8, 32, 32)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        ops.w4a8_mm(torch.randn(2, 64).half(), packed, s16, z8, 32, 32)
    with pytest.raises(RuntimeError, match="float16"):
        ops.w4a8_mm(torch.randn(2, 64), packed, s16.float(), z8, 32, 32)
    with pytest.raises(RuntimeError, match="act_block"):
        ops.w4a8_mm(torch.randn(2, 64), packed, s16, z8, 32, 12)
    assert ops.w4a8_mm(torch.randn(0, 64), packed, s16, z8, 32, 32).shape == (0, 16)


@pytest.mark.parametrize("op", ["w4a8_mm", "w4_amx_mm"])
def test_op_under_torch_compile(op, gen):
    """The ops have fake implementations, so a compiled graph calls them (as the compiled decode does)."""
    from models.compile import compile_unavailable

    why = compile_unavailable(torch.device("cpu"))
    if why:
        pytest.skip(why)
    ops = ops_for(w4a8.native_isa())
    if op == "w4_amx_mm" and not w4a8.has_amx(ops):
        pytest.skip("no AMX tile kernel here (CPU, OS or build)")
    codes, scales, zeros = random_layer(64, 128, 32, gen)
    packed, s16, z8 = w4a8.pack(codes, scales, zeros, 32)
    mm = getattr(ops, op)
    args = (16,) if op == "w4a8_mm" else ()

    def f(x):  # one bf16 rounding before the silu either way: compiled and eager agree
        return torch.nn.functional.silu(mm(x * 2, packed, s16, z8, 32, *args))

    x = torch.randn(3, 128, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_cpu_int4_choice():
    cpu = torch.device("cpu")
    assert kernels.device_kernel(cpu, cpu_int4="int4pack").name == kernels.CPU_INT4PACK
    assert kernels.device_kernel(cpu, cpu_int4="w4a8").name == kernels.CPU_W4A8
    want = kernels.CPU_W4A8 if w4a8.native_isa() != "scalar" else kernels.CPU_INT4PACK
    assert kernels.device_kernel(cpu, cpu_int4="auto").name == want
    with pytest.raises(ValueError, match="cpu_int4"):
        kernels.device_kernel(cpu, cpu_int4="fast")


def test_explicit_w4a8_without_a_compiler_is_an_error(no_cpp_compiler):
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        kernels.device_kernel(torch.device("cpu"), cpu_int4="w4a8")
    plan = kernels.device_kernel(torch.device("cpu"), cpu_int4="auto")
    assert plan.name == kernels.CPU_INT4PACK and "no C++ compiler" in plan.reason


# ------------------------------------------------------------------ W8A8: the int8 lm_head on the same path


@pytest.mark.parametrize("m", [1, 3, 8, 9, 21])
@pytest.mark.parametrize("n,k,block", [(100, 64, 8), (48, 576, 8), (32, 128, 32)])
def test_w8_kernel_matches_reference(isa, m, n, k, block, gen):
    ops = ops_for(isa)
    codes, scales = kernels.quantize_int8_per_channel(torch.randn(n, k, generator=gen))
    codes[0, :4] = torch.tensor([-127, 127, -127, 127], dtype=torch.int8)  # the ends of the code range
    packed, s = w4a8.pack_int8(codes, scales)
    x = torch.randn(m, k, generator=gen) * 3
    x[-1, :block] = 0
    ref = w4a8.reference_w8(x, codes, scales, block)
    y = ops.w8a8_mm(x, packed, s, block)
    assert y.shape == (m, -(-n // 16) * 16) and not y[:, n:].any()
    torch.testing.assert_close(y[:, :n].double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    yb = ops.w8a8_mm(x.to(torch.bfloat16), packed, s, block)
    refb = w4a8.reference_w8(x.to(torch.bfloat16), codes, scales, block)
    torch.testing.assert_close(yb[:, :n].double(), refb, rtol=2**-8, atol=1e-4 * float(refb.abs().max()))


@pytest.mark.parametrize("m", [1, 4, 8, 16, 17, 40])
@pytest.mark.parametrize("n,k", [(100, 64), (48, 576), (200, 1536)])
def test_w8_amx_kernel_is_w8a8_bit_for_bit(m, n, k, gen):
    """The AMX-INT8 twin of `w8a8_mm` (activation blocks of 64) sums the same exact int32 block dots in the
    same float order: equal results for every row count, input and output dtype."""
    ops = amx_ops()
    codes, scales = kernels.quantize_int8_per_channel(torch.randn(n, k, generator=gen))
    codes[0, :4] = torch.tensor([-127, 127, -127, 127], dtype=torch.int8)
    packed, s = w4a8.pack_int8(codes, scales)
    x = torch.randn(m, k, generator=gen) * 3
    x[-1, :64] = 0
    for xt in (x, x.to(torch.bfloat16)):
        for float_out in (False, True):
            y = ops.w8_amx_mm(xt, packed, s, 64, float_out)
            assert torch.equal(y, ops.w8a8_mm(xt, packed, s, 64, float_out))
    ref = w4a8.reference_w8(x, codes, scales, 64)
    y = ops.w8_amx_mm(x, packed, s, 64, True)[:, :n].double()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(RuntimeError, match="act_block must be 64"):
        ops.w8_amx_mm(x, packed, s, 32, False)


def test_int8_linear_w8a8_matches_its_reference(gen):
    from models.qlinear import Int8Linear

    if w4a8.load()[0] is None:
        pytest.skip(w4a8.load()[1])
    w = torch.randn(100, 64, generator=gen)
    bias = torch.randn(100, generator=gen)
    fast, plain = Int8Linear.from_dense(w, bias, w8a8=True), Int8Linear.from_dense(w, bias)
    assert torch.equal(fast.int8_codes(), plain.int8_codes())  # the packed layout holds the same codes
    assert "codes" not in dict(fast.named_buffers())  # one copy of the weight, not two
    x = torch.randn(5, 64, generator=gen)
    codes = fast.int8_codes()
    assert fast.act_block == w4a8.HEAD_ACT_BLOCK  # 64 divides the input width
    want = w4a8.reference_w8(x, codes, fast.scales, fast.act_block) + bias.double()
    torch.testing.assert_close(fast(x).double(), want, rtol=1e-5, atol=1e-4)
    dense = x @ w.t() + bias
    assert float((fast(x) - dense).norm() / dense.norm()) < 1e-2
    assert float((fast.forward_reference(x) - plain.forward_reference(x)).abs().max()) == 0.0
    ops = w4a8.load()[0]
    want_amx = kernels.CPU_AMX_MIN_TOKENS if w4a8.has_amx(ops) else None
    assert fast.amx_min_tokens == want_amx  # the AMX twin from that many rows, where it runs
    if want_amx is not None:
        xs = torch.randn(want_amx, 64, generator=gen)
        want = ops.w8_amx_mm(xs, fast.w8a8_packed, fast.w8a8_scales, 64, False)[:, :100] + bias
        assert torch.equal(fast(xs), want)
