"""CUDA parity for the fused runtime: tinygemm path vs the CPU runtime on the same checkpoints, CUDA-graph
decode vs eager decode, padding to a graph bucket. Skipped visibly without a CUDA GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

_UNIT = Path(__file__).resolve().parents[1] / "unit" / "test_model_quant.py"


def _quant_helpers():
    spec = importlib.util.spec_from_file_location("_jetserve_quant_helpers", _UNIT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    h = _quant_helpers()
    root = tmp_path_factory.mktemp("gpu-tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(root / "dense", safe_serialization=True)
    out = {"dense": root / "dense"}
    for name, kw in {
        "gptq_act_order": dict(method="gptq", sym=False, act_order=True),
        "gptq_sym": dict(method="gptq", sym=True),
        "awq_zp": dict(method="awq", zero_point=True),
    }.items():
        out[name] = h.write_rtn_checkpoint(root / "dense", root / name, group_size=64, **kw)
    return out


@pytest.mark.parametrize("name", ["dense", "gptq_sym", "gptq_act_order", "awq_zp"])
def test_cuda_matches_cpu_runtime(ckpts, name):
    from models.loader import load_runner

    cpu = load_runner(ckpts[name], device="cpu", dtype=torch.bfloat16, max_batch_size=4, max_seq=512)
    gpu = load_runner(ckpts[name], device="cuda", dtype=torch.bfloat16, max_batch_size=4, max_seq=512)
    gpu.warmup()  # captures the decode graphs
    assert gpu._graphs
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in (7, 40, 300)]
    for slot, p in enumerate(prompts):
        a, b = cpu.prefill_logits(p, slot, 0), gpu.prefill_logits(p, slot, 0).cpu()
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() < 0.03 * scale + 0.02
    positions = torch.tensor([len(p) for p in prompts])
    slots = torch.arange(3)
    toks = torch.tensor([1, 2, 3])
    for _ in range(5):  # batch 3 -> padded to the 4 bucket with the scratch slot
        a, b = cpu.decode(toks, positions, slots), gpu.decode(toks, positions, slots).cpu()
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() < 0.03 * scale + 0.02
        toks = a.argmax(-1)
        positions = positions + 1


def test_cuda_graph_decode_equals_eager(ckpts):
    from models.loader import load_runner

    r = load_runner(ckpts["gptq_sym"], device="cuda", dtype=torch.bfloat16, max_batch_size=8, max_seq=512)
    r.warmup()
    prompt = torch.arange(20)
    for s in range(8):
        r.prefill(prompt + s, s, 0)
    toks, pos = torch.arange(5), torch.tensor([20, 20, 20, 20, 20])
    slots = torch.tensor([0, 2, 4, 6, 7])
    graph = r.decode(toks, pos, slots)
    r.use_cuda_graphs = False
    eager = r.decode(toks, pos, slots)  # rewrites the same KV entries with the same values
    torch.testing.assert_close(graph, eager, atol=1e-3, rtol=0)
    ptrs = r.cache.data_ptrs()
    r.use_cuda_graphs = True
    r.decode(toks, pos + 1, slots)
    assert r.cache.data_ptrs() == ptrs


def test_qlinear_tinygemm_matches_reference(ckpts):
    from models.formats import read_quant_config
    from models.loader import TensorSource
    from models.qlinear import QuantLinear

    path = ckpts["gptq_act_order"]
    src = TensorSource(path, torch.device("cpu"))
    ql = QuantLinear.from_tensors(
        src,
        "model.layers.0.mlp.down_proj",
        read_quant_config(path),
        512,
        256,
        device="cuda",
        dtype=torch.bfloat16,
        keep_reference=True,
    )
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    ref = ql.forward_reference(x).float()
    got = ql(x).float()
    assert (got - ref).abs().max().item() < 0.02 * ref.abs().max().item() + 1e-2
