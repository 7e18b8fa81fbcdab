"""Every quantized linear of the real SmolLM2 GPTQ/AWQ g64 checkpoints loads exactly into QuantLinear.

The model store is written by `jetserve demo prepare` (make test runs it); a missing variant skips visibly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import kernels, w4a8
from models.formats import act_order_perm, dequantize, int4pack_scales_and_zeros, read_quant_config
from models.qlinear import QuantLinear, unpack_linear

# awq-g64-l2 (the AWQ settings on the first 2 layers) is what make test writes; awq-g64 is checked where present
VARIANTS = {
    "smollm2-135m-instruct-gptq-g64": "gptq",
    "smollm2-135m-instruct-awq-g64": "awq",
    "smollm2-135m-instruct-awq-g64-l2": "awq",
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.slow
@pytest.mark.parametrize("cpu_int4", ["int4pack", "w4a8"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_linear_matches_reference(variant, cpu_int4, model_store: Path):
    from safetensors import safe_open

    path = model_store / variant
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} missing: run `jetserve demo prepare` (make test does)")
    cfg = read_quant_config(path)
    assert cfg.method == VARIANTS[variant] and cfg.bits == 4 and cfg.group_size == 64
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys if not k.endswith(("embed_tokens.weight", "lm_head.weight"))}
        for prefix in sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight")):
            out_f = tensors[f"{prefix}.scales"].shape[1]
            qweight = tensors[f"{prefix}.qweight"]
            in_f = qweight.shape[0] * 32 // cfg.bits if cfg.method == "gptq" else qweight.shape[0]
            qw = unpack_linear(tensors, prefix, cfg, in_f, out_f)
            layer = QuantLinear.from_tensors(tensors, prefix, cfg, in_f, out_f, device="cpu", cpu_int4=cpu_int4)
            perm = act_order_perm(qw)
            want_codes = qw.qweight if perm is None else qw.qweight[:, perm]
            ref_w = dequantize(qw)  # checkpoint semantics (fp16/bf16 scales, float32)
            if cpu_int4 == "int4pack":
                assert layer.plan.name == kernels.CPU_INT4PACK, prefix
                # Exact: the int4 layout holds the same codes, and scale/zero are the checkpoint's rounded to bf16.
                codes = kernels.int4pack_codes(layer.plan.name, layer.packed, in_f)[:out_f]
                assert torch.equal(layer.scales_and_zeros[:, :out_f], int4pack_scales_and_zeros(qw)), prefix
                assert rel_err(layer.reference_weight(), ref_w) < 5e-3, prefix
            else:
                assert layer.plan.name == kernels.CPU_W4A8, prefix
                # Exact: the same codes and zeros, and the checkpoint's float16 scales unrounded.
                codes, scales, zeros = w4a8.unpack(layer.packed, layer.w4a8_scales, layer.w4a8_zeros)
                codes = codes[:out_f]
                assert torch.equal(scales[:, :out_f], qw.scales.float()) and torch.equal(zeros[:, :out_f], qw.zeros)
                assert rel_err(layer.reference_weight(), ref_w) < 1e-6, prefix
            assert torch.equal(codes, want_codes), prefix
            x = torch.randn(4, in_f, generator=gen).to(torch.bfloat16)
            assert rel_err(layer(x), x.float() @ ref_w.t()) < 1e-2, prefix
            checked += 1
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    assert checked == layers * 7  # SmolLM2-135M: 30 layers (or the cut) x (q, k, v, o, gate, up, down)
