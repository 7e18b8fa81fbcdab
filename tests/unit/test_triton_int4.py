"""Parity of the Triton W4A16 kernel with its plain-PyTorch reference, on CPU through the Triton interpreter.

The interpreter has no bf16 arithmetic, so here the kernel's dot runs in fp32 (DOT_BF16=False); the
indexing, unpacking, group handling, split-K and masking are the same code the GPU runs. tests/gpu/
checks the bf16 dot on a CUDA device.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

# Interpreter mode must be set before the first `import triton` in a process. When something imported
# triton earlier (gptqmodel does), the parity tests run in a child pytest with TRITON_INTERPRET=1.
_LATE = not torch.cuda.is_available() and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available() and not _LATE:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton not installed (dev extra)")
late = pytest.mark.skipif(_LATE, reason="triton imported before interpreter mode: run by the subprocess test")


@pytest.mark.skipif(not _LATE, reason="interpreter mode active in this process")
def test_interpreter_parity_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "9 passed" in r.stdout, r.stdout[-2000:]


@pytest.fixture(scope="module")
def t4():
    import models.triton_int4 as mod

    return importlib.reload(mod)  # re-decorate the kernel in interpreter mode if imported earlier


def _case(n, k, g, gen):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    sz = torch.stack(
        [torch.rand(k // g, n, generator=gen) * 0.02 + 0.001, torch.randn(k // g, n, generator=gen) * 0.05], dim=-1
    ).to(torch.bfloat16)
    return codes, sz


@late
def test_pack_roundtrip(t4):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    codes = torch.randint(0, 16, (48, 64), dtype=torch.uint8, generator=gen)
    qt = t4.pack_qweight_t(codes)
    assert qt.shape == (8, 48) and qt.dtype == torch.int32
    assert torch.equal(t4.unpack_qweight_t(qt), codes)


@pytest.mark.parametrize(
    "m,n,k,g,config",
    [
        (1, 96, 256, 128, (32, 128, 2, False, 4)),
        (1, 64, 512, 64, (64, 128, 8, True, 4)),  # BLOCK_K capped at the group size, split-K 8, reshape unpack
        (4, 200, 128, 32, (64, 64, 4, True, 8)),  # N not a multiple of BLOCK_N (masking), group 32
        (8, 64, 192, 64, (128, 128, 16, False, 8)),  # split-K reduced until it divides K
        (17, 64, 256, 128, (32, 128, 2, True, 4)),  # two M tiles
        (3, 80, 256, 64, (16, 128, 1, False, 4)),  # no split-K: direct bf16 store
        (1, 64, 256, 128, (32, 128, 1, True, 4)),
    ],
)
@late
def test_w4_matmul_matches_reference(t4, m, n, k, g, config):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    codes, sz = _case(n, k, g, gen)
    qt = t4.pack_qweight_t(codes)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    ref = t4.w4_matmul_reference(x, qt, sz, g)
    y = t4.w4_matmul(x, qt, sz, g, config=config)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@late
def test_dequant_matches_tinygemm_convention(t4):
    """w = (q - 8) * s + z: the same scales_and_zeros tensor the torch int4 kernels take."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    codes, sz = _case(32, 128, 64, gen)
    w_t = t4.dequant_t(t4.pack_qweight_t(codes), sz, 64, torch.float32)
    g = torch.arange(128) // 64
    want = (codes.float() - 8) * sz[g, :, 0].float().t() + sz[g, :, 1].float().t()
    torch.testing.assert_close(w_t, want.t(), rtol=0, atol=0)
