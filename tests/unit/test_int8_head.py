"""The int8 per-channel lm_head option: kernel vs its plain-PyTorch reference on CPU, Int8Linear, the loader's
`lm_head="int8"` (tied and untied heads, footprint prediction) and GPTQModel's `"lm_head": true`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import kernels
from models.formats import QuantizedWeight, UnsupportedFormatError, dequantize, pack_gptq, parse_quant_config
from models.loader import inspect_checkpoint, load_runner, predict_footprint
from models.qlinear import Int8Linear, QuantLinear

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("tiny-int8-head")
    torch.manual_seed(0)
    out = {"llama": root / "llama", "qwen2": root / "qwen2", "qwen2_128": root / "qwen2_128"}
    LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)).save_pretrained(out["llama"])
    Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False)).save_pretrained(out["qwen2"])
    # k/v rows a multiple of 64: every int4 layer fuses, so the footprint prediction is exact
    wide = {**TINY, "hidden_size": 128, "intermediate_size": 256}
    Qwen2ForCausalLM(Qwen2Config(**wide, tie_word_embeddings=False)).save_pretrained(out["qwen2_128"])
    return out


def test_quantize_int8_per_channel_round_trip():
    w = torch.randn(96, 64) * torch.linspace(0.01, 3.0, 96)[:, None]
    w[5] = 0.0
    codes, scales = kernels.quantize_int8_per_channel(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    assert scales.shape == (96,) and scales[5] == 1.0 and not codes[5].any()
    err = (codes.float() * scales[:, None] - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-6).all())  # round to nearest: half a step at most


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_kernel_matches_reference(rows, dtype):
    torch.manual_seed(rows)
    codes, scales = kernels.quantize_int8_per_channel(torch.randn(1000, 576))
    x = torch.randn(rows, 576).to(dtype)
    assert kernels.int8_mm_fast_ok(x, 576)  # the demo shape takes the fast CPU kernel
    got = kernels.int8_linear(x, codes, scales.to(dtype)).float()
    ref = kernels.int8_linear_reference(x, codes, scales).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, ref, atol=tol * float(ref.abs().max()), rtol=0)


def test_int8_kernel_falls_back_where_the_cpu_kernel_is_wrong():
    # aten._weight_int8pack_mm returned garbage (or crashed) for K % 16 != 0 on torch 2.13: never called there
    x = torch.randn(4, 40, dtype=torch.bfloat16)
    assert not kernels.int8_mm_fast_ok(x, 40)
    codes, scales = kernels.quantize_int8_per_channel(torch.randn(64, 40))
    got = kernels.int8_linear(x, codes, scales.to(torch.bfloat16)).float()
    ref = kernels.int8_linear_reference(x, codes, scales).float()
    torch.testing.assert_close(got, ref, atol=2e-2 * float(ref.abs().max()), rtol=0)


def test_int8_linear_module_with_bias_matches_dense():
    torch.manual_seed(0)
    w, b = torch.randn(80, 64), torch.randn(80)
    lin = Int8Linear.from_dense(w, b)
    x = torch.randn(2, 3, 64)
    assert lin(x).shape == (2, 3, 80)
    torch.testing.assert_close(lin(x), lin.forward_reference(x), atol=1e-4, rtol=0)
    dense = torch.nn.functional.linear(x, w, b)
    assert float((lin(x) - dense).abs().max()) < 0.02 * float(dense.abs().max())  # int8: < 2% of the range
    assert lin.weight_bytes() == 80 * 64 + 80 * 4 + 80 * 4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied and untied heads
@pytest.mark.parametrize("cpu_int4", ["auto", "int4pack"])
def test_load_runner_int8_head_logits_and_footprint(tiny_dirs, arch, cpu_int4):
    """The int8 head loads with the W8A8 kernel where the int4 layers run W4A8 (cpu_int4 auto here), else with
    int8pack; logits close to the bf16 head, and the footprint predicted exactly."""
    path = tiny_dirs[arch]
    base = load_runner(path, dtype=torch.bfloat16, max_batch_size=2, max_seq=64)
    quant = load_runner(path, dtype=torch.bfloat16, max_batch_size=2, max_seq=64, lm_head="int8", cpu_int4=cpu_int4)
    assert isinstance(quant.model.lm_head, Int8Linear) and not isinstance(base.model.lm_head, Int8Linear)
    w8a8 = quant.model.lm_head.w8a8
    assert w8a8 == (kernels.device_kernel(torch.device("cpu"), cpu_int4=cpu_int4).name == kernels.CPU_W4A8)
    assert quant.model.embed.dtype == torch.bfloat16  # the input lookup stays exact
    torch.testing.assert_close(quant.model.embed, base.model.embed, atol=0, rtol=0)
    tokens = torch.randint(0, TINY["vocab_size"], (12,), generator=torch.Generator().manual_seed(1))
    lb = base.prefill(tokens, 0, 0).float()
    lq = quant.prefill(tokens, 0, 0).float()
    assert float((lq - lb).abs().max()) < 0.05 * float(lb.abs().max())
    info = inspect_checkpoint(path)
    rep_b, rep_q = base.memory_report(), quant.memory_report()
    fp = predict_footprint(info, max_batch_size=2, max_seq=64, dtype=torch.bfloat16, lm_head="int8", cpu_int4=cpu_int4)
    assert fp.weights_bytes == rep_q["weights_bytes"]
    head = TINY["vocab_size"] * TINY["hidden_size"]
    rows = -(-TINY["vocab_size"] // 16) * 16 if w8a8 else TINY["vocab_size"]
    quant_bytes = rows * TINY["hidden_size"] + TINY["vocab_size"] * 4 + (rows * 4 if w8a8 else 0)
    expected = quant_bytes - (0 if arch == "llama" else 2 * head)
    assert rep_q["weights_bytes"] - rep_b["weights_bytes"] == expected


def test_quantize_int4_rtn_round_trip_and_clip_search():
    from models.formats import dequantize
    from models.qlinear import quantize_int4_rtn

    torch.manual_seed(0)
    w = torch.randn(96, 128) * torch.linspace(0.01, 2.0, 96)[:, None]
    w[3, 7] = 40.0  # an outlier: clipping trades it for the rest of its group
    w[5] = 0.0
    qw = quantize_int4_rtn(w, 32)
    assert qw.qweight.shape == (96, 128) and qw.scales.shape == (4, 96) and qw.zeros.shape == (4, 96)
    assert int(qw.qweight.max()) <= 15
    rec = dequantize(qw).float()
    err = (rec - w).pow(2).reshape(96, 4, 32).sum(-1)
    plain_qw = quantize_int4_rtn(w, 32, clip_ratios=(1.0,))
    plain = dequantize(plain_qw).float()
    err_plain = (plain - w).pow(2).reshape(96, 4, 32).sum(-1)
    assert bool((err <= err_plain + 1e-6).all()) and float(err.sum()) < float(err_plain.sum())
    assert float(rec[5].abs().max()) == 0.0  # zero is exact (zero point on the grid)
    step = plain_qw.scales.t().repeat_interleave(32, 1).float()  # (out, in) scale of each weight
    # ratio 1: half a step from rounding, plus at most half a step where the rounded zero point clamps an end
    assert bool(((plain - w).abs() <= step + 1e-5).all())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied and untied heads
def test_load_runner_int4_head_logits_and_footprint(tiny_dirs, arch):
    path = tiny_dirs[arch]
    base = load_runner(path, dtype=torch.bfloat16, max_batch_size=2, max_seq=64)
    quant = load_runner(path, dtype=torch.bfloat16, max_batch_size=2, max_seq=64, lm_head="int4")
    assert isinstance(quant.model.lm_head, QuantLinear) and quant.model.lm_head.group_size == 32
    torch.testing.assert_close(quant.model.embed, base.model.embed, atol=0, rtol=0)
    tokens = torch.randint(0, TINY["vocab_size"], (12,), generator=torch.Generator().manual_seed(1))
    lb = base.prefill(tokens, 0, 0).float()
    lq = quant.prefill(tokens, 0, 0).float()
    assert float((lq - lb).abs().max()) < 0.15 * float(lb.abs().max())  # 4-bit: coarser than int8
    head = quant.model.lm_head
    x = torch.randn(3, TINY["hidden_size"], dtype=torch.bfloat16)
    ref = head.forward_reference(x).float() if hasattr(head, "forward_reference") else None
    if ref is not None:
        torch.testing.assert_close(head(x).float(), ref, atol=0.02 * float(ref.abs().max()), rtol=0)
    info = inspect_checkpoint(path)
    fp = predict_footprint(info, max_batch_size=2, max_seq=64, dtype=torch.bfloat16, lm_head="int4")
    assert fp.weights_bytes == quant.memory_report()["weights_bytes"]


def test_auto_head_is_int8_on_cpu_and_bf16_on_cuda(tiny_dirs):
    from models.loader import resolve_lm_head

    assert resolve_lm_head("auto", "cpu", 576) == "int8"
    assert resolve_lm_head("auto", "cpu", 40) == "bf16"  # the int8 CPU kernel needs in_features % 16 == 0
    assert resolve_lm_head("auto", "cuda", 576) == "bf16"
    assert resolve_lm_head("int4", "cuda", 576) == "int4"
    r = load_runner(tiny_dirs["llama"], dtype=torch.bfloat16, max_batch_size=1, max_seq=32, lm_head="auto")
    assert isinstance(r.model.lm_head, Int8Linear)
    info = inspect_checkpoint(tiny_dirs["llama"])
    fp = predict_footprint(info, max_batch_size=1, max_seq=32, dtype=torch.bfloat16, lm_head="auto")
    assert fp.weights_bytes == r.memory_report()["weights_bytes"]


def test_load_runner_rejects_unknown_head_option(tiny_dirs):
    with pytest.raises(ValueError, match="lm_head must be one of"):
        load_runner(tiny_dirs["llama"], max_batch_size=1, max_seq=32, lm_head="fp8")


def _rtn_sym4(w: torch.Tensor, group_size: int) -> QuantizedWeight:
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    s = (g.abs().amax(2) * 2 / 15).clamp_min(1e-8).half().float()  # (out, groups)
    q = (torch.round(g / s[..., None]) + 8).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
    zeros = torch.full((in_f // group_size, out_f), 8, dtype=torch.uint8)
    return QuantizedWeight(q, zeros, s.t().contiguous().half(), None, 4, group_size)


def _gptq_with_head(src: Path, dst: Path, *, store_head: bool) -> Path:
    """Every linear of `src` (untied) as GPTQ v1 4-bit g32; lm_head too when `store_head`, declared either way."""
    dst.mkdir()
    sd = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in sd.items():
        mod, leaf = name.rsplit(".", 1)
        quantize = leaf == "weight" and t.dim() == 2 and "embed" not in mod and (store_head or mod != "lm_head")
        if quantize:
            out.update({f"{mod}.{k}": v.contiguous() for k, v in pack_gptq(_rtn_sym4(t, 32)).items()})
        elif not (mod == "lm_head" and not store_head):
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "sym": True,
        "desc_act": False,
        "checkpoint_format": "gptq",
        "lm_head": True,
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_gptq_lm_head_flag_is_read():
    q = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True}
    assert parse_quant_config({**q, "lm_head": True}).lm_head is True
    assert parse_quant_config({**q, "lm_head": False}).lm_head is False
    assert parse_quant_config(q).lm_head is False


def test_gptq_quantized_lm_head_loads_as_quantlinear(tiny_dirs, tmp_path):
    src = tiny_dirs["qwen2_128"]
    path = _gptq_with_head(src, tmp_path / "gptq-head", store_head=True)
    runner = load_runner(path, dtype=torch.bfloat16, max_batch_size=1, max_seq=32, lm_head="int8")
    head = runner.model.lm_head
    assert isinstance(head, QuantLinear)  # the checkpoint's own quantization wins over lm_head="int8"
    w = dequantize(_rtn_sym4(load_file(str(src / "model.safetensors"))["lm_head.weight"], 32), torch.float32)
    x = torch.randn(3, 128).to(torch.bfloat16)
    ref = x.float() @ w.t()
    tol = 1e-2 * float(ref.abs().max())  # scales are kept in bf16; a wrong layout would miss by ~100%
    torch.testing.assert_close(head.forward_reference(x).float(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(head(x).float(), ref, atol=tol, rtol=0)
    fp = predict_footprint(inspect_checkpoint(path), max_batch_size=1, max_seq=32, dtype=torch.bfloat16, lm_head="int8")
    assert fp.weights_bytes == runner.memory_report()["weights_bytes"]


def test_gptq_lm_head_declared_but_missing_fails_loudly(tiny_dirs, tmp_path):
    path = _gptq_with_head(tiny_dirs["qwen2"], tmp_path / "gptq-no-head", store_head=False)
    with pytest.raises(UnsupportedFormatError, match='"lm_head": true but the checkpoint has no lm_head.qweight'):
        load_runner(path, max_batch_size=1, max_seq=32)


def test_eval_passes_the_head_option_to_the_jetserve_runtime(tiny_dirs, capsys):
    from models.evaluate.runtimes import load_runtime
    from server.cli import main

    rt = load_runtime("jetserve", tiny_dirs["llama"], torch.device("cpu"), torch.bfloat16, max_seq=32, lm_head="int8")
    assert isinstance(rt.runner.model.lm_head, Int8Linear)
    rt.close()
    assert main(["eval", str(tiny_dirs["llama"]), "--lm-head", "int8", "--runtime", "transformers"]) == 2
    assert "--lm-head int8 needs --runtime jetserve" in capsys.readouterr().err
