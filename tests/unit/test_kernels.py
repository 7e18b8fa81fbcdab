"""models/kernels.py: kernel choice per device, CPU int4pack layout, int4 matmul parity vs the reference."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from models import kernels
from models.formats import QuantizedWeight, dequantize
from models.qlinear import repack_int4

from test_formats import random_qw

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA GPU not available (tinygemm path)")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def to_int4pack(qw: QuantizedWeight, name: str = kernels.CPU_INT4PACK, device="cpu"):
    """(packed, scales_and_zeros, perm) on `device`, exactly as QuantLinear builds them."""
    packed, sz, perm = repack_int4(qw, name, device)
    return packed.to(device), sz.to(device), None if perm is None else perm.to(device)


def _packer_from_permutation(perm: torch.Tensor):
    """A made-up layout: output nibble j holds input position perm[j], two nibbles a byte, low first."""

    def pack(codes: torch.Tensor) -> torch.Tensor:
        nib = codes.reshape(-1)[perm].to(torch.uint8)
        return (nib[0::2] | nib[1::2] << 4).reshape(codes.shape[0], -1)

    return pack


@pytest.mark.parametrize("n,k", [(1, 2), (16, 32), (64, 96), (96, 578)])
def test_nibble_order_inverts_any_permutation_layout(n, k, gen):
    """The probe reads back layouts it was never told about, at any shape, so no ISA's layout is assumed."""
    pack = _packer_from_permutation(torch.randperm(n * k, generator=gen))
    order = kernels.nibble_order(pack, n, k)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    assert torch.equal(kernels._nibbles(pack(codes)).index_select(0, order).reshape(n, k), codes)


def test_nibble_order_rejects_a_packer_that_loses_positions():
    def lossy(codes: torch.Tensor) -> torch.Tensor:
        nib = codes.reshape(-1).clone().to(torch.uint8)
        nib[1] = nib[0]  # position 1 is never stored
        return nib[0::2] | nib[1::2] << 4

    with pytest.raises(RuntimeError, match="not a nibble permutation"):
        kernels.nibble_order(lossy, 8, 32)
    with pytest.raises(RuntimeError, match="nibbles"):
        kernels.nibble_order(lambda c: c.reshape(-1)[:8].to(torch.uint8), 8, 32)


@pytest.mark.parametrize("n,k", [(64, 32), (192, 576), (576, 1536), (128, 96)])
def test_cpu_int4pack_codes_roundtrip(n, k, gen):
    """Whatever layout this ISA's converter uses, the codes read back are exactly the ones packed."""
    w = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    packed = kernels.pack_int4(kernels.CPU_INT4PACK, w, "cpu")
    assert torch.equal(kernels.int4pack_codes(kernels.CPU_INT4PACK, packed, k), w)
    assert kernels.packed_rows(kernels.CPU_INT4PACK, packed) == n


def test_cpu_int4pack_readback_agrees_with_the_kernel(gen):
    """Cross-check the probe with the matmul itself: int4_mm(I) is the dequantized W^T on this ISA."""
    qw = random_qw(128, 256, 4, 64, gen=gen)
    packed, sz, _ = to_int4pack(qw)
    eye = torch.eye(256, dtype=torch.bfloat16)
    from_kernel = kernels.int4_mm(kernels.CPU_INT4PACK, eye, packed, 64, sz)  # (in, N) = W^T
    from_codes = kernels.dequant_t(kernels.CPU_INT4PACK, packed, sz, 64, 256, dtype=torch.float32)
    assert torch.equal(from_kernel, from_codes.to(torch.bfloat16))  # the kernel dequantizes in float32


def test_device_kernel_cpu_logged_once(caplog):
    kernels.log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="models.kernels"):
        for _ in range(3):
            plan = kernels.device_kernel(torch.device("cpu"))
    assert plan.name in (kernels.CPU_W4A8, kernels.CPU_INT4PACK)
    assert sum("int4 kernel for cpu" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    "bits,group,in_f,out_f,why",
    [
        (8, 64, 576, 192, "8-bit"),
        (3, 64, 576, 192, "3-bit"),
        (4, 16, 576, 192, "group_size=16"),
        (4, 128, 576, 192, "not a multiple of group_size"),
        (4, 64, 576, 200, "out_features=200"),
    ],
)
def test_select_kernel_reference_for_unsupported_shapes(bits, group, in_f, out_f, why, caplog):
    kernels.log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="models.kernels"):
        plan = kernels.select_kernel(torch.device("cpu"), bits, group, in_f, out_f, cpu_int4="int4pack")
    assert plan.name == kernels.REFERENCE and why in plan.reason
    assert any(why in r.getMessage() for r in caplog.records)


def test_select_kernel_int4_for_smollm_shapes():
    for in_f, out_f in [(576, 576), (576, 192), (576, 1536), (1536, 576)]:
        for g in (32, 64, 192 if in_f == 576 else 128):
            want = (
                kernels.device_kernel(torch.device("cpu")).name if g in kernels.INT4_GROUP_SIZES else kernels.REFERENCE
            )
            assert kernels.select_kernel(torch.device("cpu"), 4, g, in_f, out_f).name == want


@pytest.mark.parametrize("m", [1, 2, 8, 32, 128])
@pytest.mark.parametrize("in_f,out_f,group", [(576, 192, 64), (576, 1536, 32), (1536, 576, 128), (256, 64, 64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_int4_mm_matches_reference(m, in_f, out_f, group, act_order, gen):
    qw = random_qw(out_f, in_f, 4, group, act_order=act_order, gen=gen)
    packed, sz, perm = to_int4pack(qw)
    x = torch.randn(m, in_f, generator=gen).to(torch.bfloat16)
    xp = x if perm is None else x[:, perm]
    out = kernels.int4_mm(kernels.CPU_INT4PACK, xp.contiguous(), packed, group, sz)
    ref = x.float() @ dequantize(qw).t()
    assert out.shape == (m, out_f) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("group", [32, 64, 128])
def test_cpu_int4pack_dense_dequant_matches_reference(group, gen):
    qw = random_qw(192, 1536, 4, group, gen=gen)
    packed, sz, _ = to_int4pack(qw)
    wt = kernels.dequant_t(kernels.CPU_INT4PACK, packed, sz, group, 1536, dtype=torch.float32)  # (in, out)
    # Only bf16 rounding of scale and (8 - z) * scale separates it from the fp16-scale reference.
    assert rel_err(wt.t(), dequantize(qw)) < 5e-3


def tinygemm_pack_emulated(q: torch.Tensor, tiles: int) -> torch.Tensor:
    """Loop-for-loop emulation of int4mm.cu's matrix_to_m16n8k16_Bint4_layout (NVIDIA branch)."""
    n, k = q.shape
    b = q[:, ::2].int() << 4 | q[:, 1::2].int()  # (n, k/2) bytes, even k in the high nibble
    out = torch.zeros(n // 8, k // (tiles * 16), 32, tiles // 2, dtype=torch.int64)
    for ko in range(out.shape[1]):
        for inner in range(0, tiles, 2):
            base0 = (ko * tiles + inner) * 8
            for t in range(32):
                rows = torch.arange(n // 8) * 8 + t // 4
                ks = [base0 + t % 4, base0 + t % 4 + 4, base0 + 8 + t % 4, base0 + 12 + t % 4]
                v = [b[rows, j].long() for j in ks]
                out[:, ko, t, inner // 2] = (
                    (v[3] & 0xF) << 28
                    | (v[2] & 0xF) << 24
                    | (v[1] & 0xF) << 20
                    | (v[0] & 0xF) << 16
                    | (v[3] & 0xF0) << 8
                    | (v[2] & 0xF0) << 4
                    | (v[1] & 0xF0)
                    | (v[0] & 0xF0) >> 4
                )
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("n,k,tiles", [(16, 64, 2), (24, 128, 4), (8, 256, 8)])
def test_cuda_tinygemm_codes_inverts_layout(n, k, tiles, gen):
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    assert torch.equal(kernels.cuda_tinygemm_codes(tinygemm_pack_emulated(q, tiles), k), q)


def test_cuda_inner_k_tiles():
    assert kernels.cuda_inner_k_tiles(4096) == 8
    assert kernels.cuda_inner_k_tiles(576) == 4
    assert kernels.cuda_inner_k_tiles(96) == 2
    with pytest.raises(ValueError):
        kernels.cuda_inner_k_tiles(48)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 4, 8, 64, 512])
@pytest.mark.parametrize("in_f,out_f,group", [(576, 192, 64), (4096, 4096, 128), (576, 1536, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_tinygemm_matches_reference(m, in_f, out_f, group, act_order, gen):
    dev = torch.device("cuda")
    assert kernels.device_kernel(dev).name == kernels.CUDA_TINYGEMM
    qw = random_qw(out_f, in_f, 4, group, act_order=act_order, gen=gen)
    packed, sz, perm = to_int4pack(qw, kernels.CUDA_TINYGEMM, dev)
    x = torch.randn(m, in_f, generator=gen).to(torch.bfloat16)
    xp = (x if perm is None else x[:, perm.cpu()]).to(dev).contiguous()
    out = kernels.int4_mm(kernels.CUDA_TINYGEMM, xp, packed, group, sz)
    ref = x.float() @ dequantize(qw).t()
    assert rel_err(out.cpu(), ref) < 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,k,tiles", [(16, 64, 2), (192, 576, 4), (64, 4096, 8)])
def test_cuda_tinygemm_layout_matches_converter(n, k, tiles, gen):
    """The real converter equals our emulation of it, and cuda_tinygemm_codes inverts it."""
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).cuda(), tiles)
    if k <= 576:
        assert torch.equal(packed.cpu(), tinygemm_pack_emulated(q, tiles))
    assert torch.equal(kernels.cuda_tinygemm_codes(packed, k).cpu(), q)


@pytest.mark.gpu
@needs_cuda
def test_cuda_dense_dequant_matches_reference(gen):
    qw = random_qw(256, 1024, 4, 128, gen=gen)
    packed, sz, _ = to_int4pack(qw, kernels.CUDA_TINYGEMM, "cuda")
    wt = kernels.dequant_t(kernels.CUDA_TINYGEMM, packed, sz, 128, 1024, dtype=torch.float32)
    assert rel_err(wt.t().cpu(), dequantize(qw)) < 5e-3


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,k", [(16, 64), (192, 576), (64, 4096)])
def test_cuda_probed_layout_matches_hand_written(n, k, gen):
    """The probe and the hand-written tinygemm unpacker read the same codes from the real converter."""
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    packed = kernels.pack_int4(kernels.CUDA_TINYGEMM, q, "cuda")
    order = kernels.nibble_order(lambda c: kernels.pack_int4(kernels.CUDA_TINYGEMM, c, "cuda"), n, k, "cuda")
    probed = kernels._nibbles(packed).index_select(0, order).reshape(n, k)
    assert torch.equal(probed.cpu(), q)
    assert torch.equal(kernels.cuda_tinygemm_codes(packed, k).cpu(), q)


def test_forced_cpu_capability_took_effect():
    """scripts/isa-matrix.sh reruns these tests under ATEN_CPU_CAPABILITY; make sure torch obeyed it."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if not forced:
        pytest.skip("ATEN_CPU_CAPABILITY not set: running on the native capability")
    assert torch.backends.cpu.get_cpu_capability().lower() == forced.lower()
