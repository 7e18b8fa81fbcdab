"""models/qlinear.py: QuantLinear fast path vs reference, fusion, memory, and parity with GPTQModel's layers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import pytest
import torch

from models import kernels
from models.formats import QuantizedWeight, dequantize, pack_awq, pack_gptq, parse_quant_config, read_quant_config
from models.qlinear import QuantLinear

from test_formats import random_qw

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA GPU not available (tinygemm path)")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def qcfg(method: str, bits: int = 4, group: int = 64, sym: bool = False, desc_act: bool = False, fmt: str = "gptq"):
    if method == "gptq":
        return parse_quant_config(
            {
                "quant_method": "gptq",
                "bits": bits,
                "group_size": group,
                "sym": sym,
                "desc_act": desc_act,
                "checkpoint_format": fmt,
            }
        )
    return parse_quant_config(
        {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": not sym, "version": "gemm"}
    )


def checkpoint(qw: QuantizedWeight, cfg, prefix: str = "layer", bias: torch.Tensor = None) -> Dict[str, torch.Tensor]:
    """Tensors as a checkpoint of `cfg`'s format would store them."""
    t = pack_gptq(qw, checkpoint_format=cfg.checkpoint_format) if cfg.method == "gptq" else pack_awq(qw)
    if cfg.method == "awq" and not cfg.zero_point:
        t.pop("qzeros")
    out = {f"{prefix}.{k}": v for k, v in t.items()}
    if bias is not None:
        out[f"{prefix}.bias"] = bias
    return out


CASES = [  # method, bits, sym, act_order, format
    ("gptq", 4, True, False, "gptq"),
    ("gptq", 4, False, False, "gptq"),
    ("gptq", 4, False, True, "gptq"),
    ("gptq", 4, False, True, "gptq_v2"),
    ("awq", 4, False, False, "awq_gemm"),
    ("awq", 4, True, False, "awq_gemm"),
]


CPU_KERNELS = {"int4pack": kernels.CPU_INT4PACK, "w4a8": kernels.CPU_W4A8}


def cpu_default() -> str:
    """The kernel a CPU layer gets with cpu_int4="auto" here (W4A8 where it builds with SIMD)."""
    return kernels.device_kernel(torch.device("cpu")).name


@pytest.mark.parametrize("method,bits,sym,act_order,fmt", CASES)
@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("cpu_int4", ["int4pack", "w4a8"])
def test_fast_path_matches_reference(method, bits, sym, act_order, fmt, m, cpu_int4, gen):
    cfg = qcfg(method, bits, 64, sym, act_order, fmt)
    qw = random_qw(192, 576, bits, 64, act_order=act_order, sym=sym, gen=gen)
    layer = QuantLinear.from_tensors(checkpoint(qw, cfg), "layer", cfg, 576, 192, device="cpu", cpu_int4=cpu_int4)
    assert layer.plan.name == CPU_KERNELS[cpu_int4]
    x = torch.randn(m, 576, generator=gen).to(torch.bfloat16)
    out = layer(x)
    ref = x.float() @ dequantize(qw).t()  # fp16 scales, float32: the checkpoint's own semantics
    assert out.shape == (m, 192) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
    assert rel_err(layer.forward_reference(x), ref) < 1e-2
    assert rel_err(layer.reference_weight(), dequantize(qw)) < 5e-3


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_other_bit_widths_use_reference_path(bits, method, gen):
    cfg = qcfg(method, bits, 32)
    qw = random_qw(64, 128, bits, 32, gen=gen)
    layer = QuantLinear.from_tensors(checkpoint(qw, cfg), "layer", cfg, 128, 64, device="cpu")
    assert layer.plan.name == kernels.REFERENCE
    x = torch.randn(2, 3, 128, generator=gen).to(torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, 3, 64)
    assert rel_err(out, x.float() @ dequantize(qw).t()) < 1e-2


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_layer(symmetric, gen):
    """A pack-quantized W4A16 layer written by compressed-tensors runs on the int4 kernel and matches it."""
    pq = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=64)
    state = {
        "weight": torch.randn(192, 576, generator=gen),
        "weight_scale": torch.rand(192, 9, generator=gen) * 0.05 + 1e-3,
    }
    if not symmetric:
        state["weight_zero_point"] = torch.randint(-8, 8, (192, 9), generator=gen).to(torch.int8)
    packed = pq.PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args))
    want_w = pq.PackedQuantizationCompressor.decompress(packed, QuantizationScheme(targets=["Linear"], weights=args))
    cfg = parse_quant_config(
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "g": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": symmetric,
                        "strategy": "group",
                        "group_size": 64,
                    },
                }
            },
        }
    )
    layer = QuantLinear.from_tensors({f"l.{k}": v for k, v in packed.items()}, "l", cfg, 576, 192, device="cpu")
    assert layer.plan.name == cpu_default()
    x = torch.randn(3, 576, generator=gen).to(torch.bfloat16)
    assert rel_err(layer(x), x.float() @ want_w["weight"].float().t()) < 1e-2


@pytest.mark.parametrize("group,in_f,want_group", [(-1, 576, 64), (512, 1024, 256), (1024, 2048, 256), (128, 576, 64)])
def test_wide_groups_split_exactly_for_int4_kernel(group, in_f, want_group, gen):
    """Per-channel and 512/1024-wide groups run on the int4 kernel with scales repeated (exact)."""
    cfg = qcfg("gptq", group=group)
    qw = random_qw(128, -(-in_f // group) * group if group > 0 else in_f, 4, in_f if group == -1 else group, gen=gen)
    if qw.in_features != in_f:  # partial last group: drop the columns past in_f
        qw = QuantizedWeight(qw.qweight[:, :in_f].contiguous(), qw.zeros, qw.scales, None, 4, group)
    layer = QuantLinear.from_tensors(checkpoint(qw, cfg), "layer", cfg, in_f, 128, device="cpu")
    assert layer.plan.name == cpu_default() and layer.group_size == want_group
    assert rel_err(layer.reference_weight(), dequantize(qw)) < 5e-3
    x = torch.randn(4, in_f, generator=gen).to(torch.bfloat16)
    assert rel_err(layer(x), x.float() @ dequantize(qw).t()) < 1e-2


@pytest.mark.parametrize("cpu_int4,out_f,padded", [("int4pack", 96, 128), ("w4a8", 100, 112)])
def test_odd_out_features_padded_and_bias(cpu_int4, out_f, padded, gen):
    cfg = qcfg("gptq", group=32)
    qw = random_qw(out_f, 64, 4, 32, gen=gen)
    bias = torch.randn(out_f, generator=gen).to(torch.float16)
    tensors = checkpoint(qw, cfg, bias=bias)
    layer = QuantLinear.from_tensors(tensors, "layer", cfg, 64, out_f, device="cpu", cpu_int4=cpu_int4)
    assert layer.plan.name == CPU_KERNELS[cpu_int4] and layer.out_padded == padded
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    out = layer(x)
    assert out.shape == (3, out_f)
    assert rel_err(out, x.float() @ dequantize(qw).t() + bias.float()) < 1e-2


def test_dense_prefill_switch(gen):
    """With a dense threshold in the plan, many-token inputs dequantize + dense and still match."""
    cfg = qcfg("gptq", desc_act=True)
    qw = random_qw(128, 256, 4, 64, act_order=True, gen=gen)
    layer = QuantLinear.from_tensors(checkpoint(qw, cfg), "layer", cfg, 256, 128, device="cpu", cpu_int4="int4pack")
    layer.plan = kernels.KernelPlan(kernels.CPU_INT4PACK, 16, "test")
    x = torch.randn(32, 256, generator=gen).to(torch.bfloat16)
    assert rel_err(layer(x), x.float() @ dequantize(qw).t()) < 1e-2


@pytest.mark.parametrize("act_order", [False, True])
def test_w4a8_dense_prefill_switch(act_order, gen):
    """The W4A8 plan with a dense threshold (the AMX plan): from that many tokens on, the exact bf16 dequantized
    weight times the bf16 input; below it, the W4A8 kernel."""
    from models import w4a8

    cfg = qcfg("gptq", desc_act=act_order)
    qw = random_qw(100, 256, 4, 64, act_order=act_order, gen=gen)
    layer = QuantLinear.from_tensors(checkpoint(qw, cfg), "layer", cfg, 256, 100, device="cpu", cpu_int4="w4a8")
    layer.plan = kernels.KernelPlan(kernels.CPU_W4A8, 16, "test")
    x = torch.randn(32, 256, generator=gen).to(torch.bfloat16)
    w = w4a8.dequant_reference(layer.packed, layer.w4a8_scales, layer.w4a8_zeros)[:100]  # (out, in) kernel order
    xp = x if layer.perm is None else x.index_select(-1, layer.perm)
    assert torch.equal(layer(x), torch.nn.functional.linear(xp, w))
    assert rel_err(layer(x), x.float() @ dequantize(qw).t()) < 1e-2
    few = x[:15]  # under the threshold: the W4A8 kernel
    want = layer._aten_int4(xp[:15].contiguous(), layer.packed, layer.w4a8_scales, layer.w4a8_zeros, 64, 8)[:, :100]
    assert torch.equal(layer(few), want)


@pytest.mark.parametrize("act_order", [False, True])
def test_w4a8_amx_switch(act_order, gen):
    """The AMX plan: W4A8 below amx_min_tokens, the AMX tile kernel from there, dense from dense_min_tokens."""
    from models import w4a8

    ops, _ = w4a8.load()
    if ops is None or not w4a8.has_amx(ops):
        pytest.skip("no AMX tile kernel here (CPU, OS or build)")
    cfg = qcfg("gptq", desc_act=act_order)
    qw = random_qw(100, 256, 4, 64, act_order=act_order, gen=gen)
    layer = QuantLinear.from_tensors(checkpoint(qw, cfg), "layer", cfg, 256, 100, device="cpu", cpu_int4="w4a8")
    assert layer.plan.amx_min_tokens == kernels.CPU_AMX_MIN_TOKENS
    layer.plan = kernels.KernelPlan(kernels.CPU_W4A8, 16, "test", amx_min_tokens=4)
    x = torch.randn(20, 256, generator=gen).to(torch.bfloat16)
    xp = (x if layer.perm is None else x.index_select(-1, layer.perm)).contiguous()
    bufs = (layer.packed, layer.w4a8_scales, layer.w4a8_zeros)
    assert torch.equal(layer(x[:3]), layer._aten_int4(xp[:3].contiguous(), *bufs, 64, 8)[:, :100])
    for m in (4, 15):
        assert torch.equal(layer(x[:m]), ops.w4_amx_mm(xp[:m].contiguous(), *bufs, 64)[:, :100])
        assert torch.equal(layer._forward_general(x[:m]), layer(x[:m]))
        assert rel_err(layer(x[:m]), x[:m].float() @ dequantize(qw).t()) < 1e-2
    w = w4a8.dequant_reference(*bufs)[:100]
    assert torch.equal(layer(x), torch.nn.functional.linear(xp, w))


def test_missing_tensor_and_shape_mismatch(gen):
    from models.formats import UnsupportedFormatError

    cfg = qcfg("gptq")
    qw = random_qw(64, 128, 4, 64, gen=gen)
    t = checkpoint(qw, cfg)
    with pytest.raises(UnsupportedFormatError, match="qzeros"):
        QuantLinear.from_tensors({k: v for k, v in t.items() if "qzeros" not in k}, "layer", cfg, 128, 64, device="cpu")
    with pytest.raises(UnsupportedFormatError, match="expected"):
        QuantLinear.from_tensors(t, "layer", cfg, 128, 128, device="cpu")


@pytest.mark.parametrize("cpu_int4,group_col_bytes", [("int4pack", 4), ("w4a8", 3)])
def test_weight_bytes_is_packed_size(cpu_int4, group_col_bytes, gen):
    cfg = qcfg("gptq", group=64)
    qw = random_qw(1536, 576, 4, 64, gen=gen)
    layer = QuantLinear.from_tensors(checkpoint(qw, cfg), "layer", cfg, 576, 1536, device="cpu", cpu_int4=cpu_int4)
    packed = 1536 * 576 // 2
    scales_zeros = (576 // 64) * 1536 * group_col_bytes  # bf16 scale + zero / fp16 scale + uint8 zero
    assert layer.weight_bytes() == packed + scales_zeros


# ----------------------------------------------------------------------------------------------- fusion
def _parts(cfg, outs, in_f, gen, act_order=False, shared_g_idx=True, cpu_int4="auto"):
    qws = [random_qw(o, in_f, 4, cfg.group_size, act_order=act_order, gen=gen) for o in outs]
    if act_order and shared_g_idx:
        for q in qws[1:]:
            q.g_idx = qws[0].g_idx.clone()
    layers = [
        QuantLinear.from_tensors(
            checkpoint(q, cfg, f"p{i}"), f"p{i}", cfg, in_f, q.out_features, device="cpu", cpu_int4=cpu_int4
        )
        for i, q in enumerate(qws)
    ]
    return qws, layers


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("cpu_int4", ["int4pack", "w4a8"])
def test_fuse_qkv_matches_separate(act_order, cpu_int4, gen):
    cfg = qcfg("gptq", group=64, desc_act=act_order)
    qws, layers = _parts(cfg, [576, 192, 192], 576, gen, act_order=act_order, cpu_int4=cpu_int4)
    assert {lin.plan.name for lin in layers} == {CPU_KERNELS[cpu_int4]}
    fused = QuantLinear.fuse(layers)
    assert fused is not None and fused.split_sizes == [576, 192, 192] and fused.out_features == 960
    x = torch.randn(4, 576, generator=gen).to(torch.bfloat16)
    y = fused(x)
    sep = torch.cat([lin(x) for lin in layers], dim=-1)
    assert torch.equal(y, sep)  # same kernel over the same bytes: bit-identical
    assert rel_err(fused.forward_reference(x), torch.cat([x.float() @ dequantize(q).t() for q in qws], -1)) < 1e-2
    assert fused.weight_bytes() == sum(lin.weight_bytes() for lin in layers) - (
        0 if not act_order else 2 * layers[0].perm.numel() * layers[0].perm.element_size()
    )


def test_fuse_refuses_mismatched_parts(gen):
    cfg = qcfg("gptq", group=64, desc_act=True)
    _, layers = _parts(cfg, [128, 128], 256, gen, act_order=True, shared_g_idx=False)
    assert QuantLinear.fuse(layers) is None  # different act-order permutations
    _, a = _parts(qcfg("gptq", group=64), [128], 256, gen)
    _, b = _parts(qcfg("gptq", group=32), [128], 256, gen)
    assert QuantLinear.fuse(a + b) is None  # different group sizes
    _, c = _parts(qcfg("gptq", group=64), [96, 128], 256, gen, cpu_int4="int4pack")
    assert QuantLinear.fuse(c) is None  # CPU layout would hold padding rows inside
    _, d = _parts(qcfg("gptq", group=64), [100, 128], 256, gen, cpu_int4="w4a8")
    assert QuantLinear.fuse(d) is None  # the same for W4A8's blocks of 16 rows


def test_fuse_reference_path(gen):
    cfg = qcfg("gptq", bits=8, group=32)
    qws = [random_qw(o, 64, 8, 32, gen=gen) for o in (64, 32)]
    layers = [
        QuantLinear.from_tensors(checkpoint(q, cfg, "p"), "p", cfg, 64, q.out_features, device="cpu") for q in qws
    ]
    fused = QuantLinear.fuse(layers)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([lin(x) for lin in layers], -1))


# ----------------------------------------------------------------------------------------------- GPTQModel parity
VARIANTS = {  # name -> (method, QuantizeConfig kwargs)
    "gptq-sym": ("gptq", dict(bits=4, group_size=32, sym=True, desc_act=False)),
    "gptq-asym-actorder": ("gptq", dict(bits=4, group_size=32, sym=False, desc_act=True)),
    "awq-zp": ("awq", dict(bits=4, group_size=32, sym=False)),
    "awq-nozp": ("awq", dict(bits=4, group_size=32, sym=True)),
}


@pytest.fixture(scope="module")
def gptqmodel_checkpoints(tiny_tokenizer_dir: Path, tmp_path_factory) -> Dict[str, Path]:
    """A tiny random Llama quantized by GPTQModel itself, once per variant (CPU, ~7 s each).

    hidden 128 / kv out 64: GPTQModel's AWQ clip search needs out_features divisible by its batch (64).
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gptqmodel-tiny")
    base = root / "base"
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    ).to(torch.bfloat16).save_pretrained(base)
    tok.save_pretrained(base)
    texts = [
        f"Calibration sentence {i}: the quick brown fox jumps over the lazy dog near river {i * 7}." for i in range(16)
    ]
    calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in (tok(t)["input_ids"] for t in texts)]
    out = {}
    for name, (method, kw) in VARIANTS.items():
        extra = dict(quant_method=METHOD.AWQ, format=FORMAT.GEMM) if method == "awq" else {}
        model = GPTQModel.load(str(base), QuantizeConfig(**kw, **extra))
        model.quantize(calib, batch_size=4, **({"backend": BACKEND.AWQ_TORCH} if method == "awq" else {}))
        model.save(str(root / name))
        out[name] = root / name
        del model
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_gptqmodel_layers(variant, gptqmodel_checkpoints, monkeypatch):
    """Every linear of a GPTQModel-written checkpoint: our QuantLinear == GPTQModel's own loaded layer."""
    import gptqmodel.nn_modules.qlinear.torch as gptqmodel_torch
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import load_file

    # GPTQModel's TorchLinear torch.compiles its dequantize per shape (~25 s here); eager gives the same numbers.
    monkeypatch.setattr(gptqmodel_torch, "torch_compile", lambda fn, **kwargs: fn)

    path = gptqmodel_checkpoints[variant]
    cfg = read_quant_config(path)
    method = VARIANTS[variant][0]
    assert cfg.method == method and cfg.checkpoint_format == ("gptq" if method == "gptq" else "awq_gemm")
    backend = BACKEND.TORCH if method == "gptq" else BACKEND.AWQ_TORCH
    theirs = GPTQModel.load(str(path), backend=backend, device="cpu", dtype=torch.bfloat16)
    tensors = load_file(str(path / "model.safetensors"))
    modules = dict(theirs.model.named_modules())
    names = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    assert len(names) == 2 * 7
    gen = torch.Generator().manual_seed(1234)
    for name in names:
        ref_layer = modules[name]
        ours = QuantLinear.from_tensors(tensors, name, cfg, ref_layer.in_features, ref_layer.out_features, device="cpu")
        x = torch.randn(6, ref_layer.in_features, generator=gen).to(torch.bfloat16)
        with torch.no_grad():
            want = ref_layer(x).float()
        assert rel_err(ours(x), want) < 1e-2, name
        assert rel_err(ours.forward_reference(x), want) < 1e-2, name


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method,bits,sym,act_order,fmt", CASES)
@pytest.mark.parametrize("m", [1, 8, 512])
def test_cuda_quantlinear_matches_reference(method, bits, sym, act_order, fmt, m, gen):
    cfg = qcfg(method, bits, 64, sym, act_order, fmt)
    qw = random_qw(192, 576, bits, 64, act_order=act_order, sym=sym, gen=gen)
    layer = QuantLinear.from_tensors(
        checkpoint(qw, cfg), "layer", cfg, 576, 192, device="cuda", keep_reference=m == 1
    )  # else reference from the tinygemm layout
    assert layer.plan.name == kernels.CUDA_TINYGEMM
    x = torch.randn(m, 576, generator=gen).to(torch.bfloat16)
    out = layer(x.cuda())
    ref = x.float() @ dequantize(qw).t()
    assert rel_err(out.cpu(), ref) < 1e-2
    assert rel_err(layer.forward_reference(x.cuda()).cpu(), ref) < 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_fuse_matches_separate(act_order, gen):
    cfg = qcfg("gptq", group=64, desc_act=act_order)
    qws = [random_qw(o, 576, 4, 64, act_order=act_order, gen=gen) for o in (576, 192, 192)]
    for q in qws[1:]:
        q.g_idx = qws[0].g_idx
    layers = [
        QuantLinear.from_tensors(checkpoint(q, cfg, "p"), "p", cfg, 576, q.out_features, device="cuda") for q in qws
    ]
    fused = QuantLinear.fuse(layers)
    assert fused is not None
    x = torch.randn(8, 576, generator=gen).to(torch.bfloat16).cuda()
    torch.testing.assert_close(fused(x), torch.cat([lin(x) for lin in layers], -1), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_dense_prefill_switch(gen):
    cfg = qcfg("gptq", desc_act=True)
    qw = random_qw(256, 512, 4, 64, act_order=True, gen=gen)
    layer = QuantLinear.from_tensors(checkpoint(qw, cfg), "layer", cfg, 512, 256, device="cuda")
    layer.plan = kernels.KernelPlan(kernels.CUDA_TINYGEMM, 16, "test")
    x = torch.randn(64, 512, generator=gen).to(torch.bfloat16)
    assert rel_err(layer(x.cuda()).cpu(), x.float() @ dequantize(qw).t()) < 1e-2
