"""Triton W4A16 kernel on a CUDA GPU: bf16 parity with the reference, QuantLinear integration, graph capture."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("CUDA GPU not available (Triton W4 kernel)", allow_module_level=True)
triton_int4 = pytest.importorskip("models.triton_int4")
if not triton_int4.available():
    pytest.skip("triton not installed", allow_module_level=True)

from models import kernels  # noqa: E402
from models.formats import QuantizedWeight  # noqa: E402
from models.qlinear import QuantLinear  # noqa: E402

DEV = torch.device("cuda")


def _qw(n, k, g, gen, act_order=False):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    zeros = torch.randint(0, 16, (k // g, n), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.001).half()
    g_idx = None
    if act_order:
        g_idx = (torch.arange(k) // g)[torch.randperm(k, generator=gen)].to(torch.int32)
    return QuantizedWeight(q, zeros, scales, g_idx, 4, g)


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 17, 64])
@pytest.mark.parametrize(
    "n,k,g,act", [(4096, 4096, 128, False), (11008, 4096, 128, True), (576, 576, 64, False), (1536, 576, 32, False)]
)
def test_quantlinear_triton_vs_reference(m, n, k, g, act):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    qw = _qw(n, k, g, gen, act)
    lin = QuantLinear.from_quantized(qw, device=DEV, cuda_kernel=kernels.CUDA_TRITON, keep_reference=True)
    assert lin.plan.name == kernels.CUDA_TRITON
    x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
    y = lin(x)
    ref = lin.forward_reference(x).float()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_fused_triton_matches_parts():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    parts = [
        QuantLinear.from_quantized(_qw(n, 1024, 128, gen), device=DEV, cuda_kernel=kernels.CUDA_TRITON)
        for n in (1024, 256, 256)
    ]
    fused = QuantLinear.fuse(parts)
    assert fused is not None
    x = torch.randn(3, 1024, device=DEV).to(torch.bfloat16)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=2e-2, atol=2e-2)


def test_triton_kernel_graph_capture():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    lin = QuantLinear.from_quantized(_qw(4096, 4096, 128, gen), device=DEV, cuda_kernel=kernels.CUDA_TRITON)
    x = torch.randn(1, 4096, device=DEV).to(torch.bfloat16)
    want = lin(x)  # eager call also tunes the shape before capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lin(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lin(x)
    x.copy_(torch.randn(1, 4096, device=DEV).to(torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(out, lin(x), rtol=1e-2, atol=1e-2)
    assert not torch.equal(out, want)
