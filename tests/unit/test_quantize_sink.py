"""Attention-sink weighting of GPTQ's Hessian (models/quantize/sink.py) on GPTQModel's real GPTQ object."""

from __future__ import annotations

import pytest
import torch

from models.quantize.api import SINK_WEIGHT, QuantSpec, quantize
from models.quantize.sink import SinkWeightingError, sink_weighted_hessian
from server.cli import main

pytest.importorskip("gptqmodel")


def _hessian(x: torch.Tensor, name: str = "self_attn.v_proj") -> torch.Tensor:
    from gptqmodel import QuantizeConfig
    from gptqmodel.looper.named_module import NamedModule
    from gptqmodel.quantization.gptq import GPTQ

    torch.manual_seed(0)
    lin = NamedModule(
        torch.nn.Linear(x.shape[-1], 4, bias=False), name=name, full_name=f"model.layers.0.{name}", layer_index=0
    )
    g = GPTQ(lin, QuantizeConfig(bits=4, group_size=x.shape[-1]))
    g.add_batch(x, None)
    return g.finalize_hessian(torch.device("cpu"))


def test_first_token_counts_weight_times_in_the_hessian():
    torch.manual_seed(1)
    x = torch.randn(1, 6, 8)  # (1, tokens, in_features)
    X = x[0]
    plain = _hessian(x)
    assert torch.allclose(plain, 2 * X.t() @ X / 6, atol=1e-5)
    with sink_weighted_hessian(100.0):
        weighted = _hessian(x)
    expected = 2 * (100.0 * torch.outer(X[0], X[0]) + X[1:].t() @ X[1:]) / 6
    assert torch.allclose(weighted, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(x[0], X)  # the caller's activations are not modified
    assert torch.allclose(_hessian(x), plain)  # the hook is removed on exit


def test_only_attention_input_projections_are_weighted():
    torch.manual_seed(2)
    x = torch.randn(1, 6, 8)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        with sink_weighted_hessian(50.0):
            assert not torch.allclose(_hessian(x, name), _hessian(x, name + "_other"))
    for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        plain = _hessian(x, name)
        with sink_weighted_hessian(50.0):
            assert torch.allclose(_hessian(x, name), plain)


def test_hook_removed_after_an_exception_and_weight_one_is_plain_gptq():
    from gptqmodel.quantization.gptq import GPTQ

    before = GPTQ.add_batch
    with pytest.raises(KeyError):
        with sink_weighted_hessian(4.0):
            assert GPTQ.add_batch is not before
            raise KeyError("boom")
    assert GPTQ.add_batch is before
    with sink_weighted_hessian(1.0):
        assert GPTQ.add_batch is before


def test_batched_inputs_are_refused_loudly():
    with sink_weighted_hessian(4.0):
        with pytest.raises(SinkWeightingError, match=r"\(1, tokens, in_features\)"):
            _hessian(torch.randn(2, 6, 8))


def test_spec_default_and_scope():
    assert QuantSpec(method="gptq", group_size=64).to_dict()["sink_weight"] == SINK_WEIGHT
    assert QuantSpec(method="gptq", group_size=64, sink_weight=1.0).resolved().sink_weight == 1.0
    assert QuantSpec(method="gptq", sink_weight=1.0).settings_hash() != QuantSpec(method="gptq").settings_hash()
    assert "sink_weight" not in QuantSpec(method="awq").to_dict()
    assert "sink_weight" not in QuantSpec(method="rtn").to_dict()


def test_cli_refuses_a_sink_weight_below_one(tiny_llama_dir, tmp_path, capsys):
    rc = main(["quantize", str(tiny_llama_dir), str(tmp_path / "o"), "--sink-weight", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--sink-weight must be a finite number >= 1" in err
    assert not (tmp_path / "o").exists()


def test_sink_weighting_lowers_the_first_tokens_error_on_a_real_quantization(tiny_llama_dir, tmp_path):
    """End to end on a tiny random Llama: the sink-weighted checkpoint reproduces the calibration samples'
    position-0 q/k/v outputs better than plain GPTQ from the same calibration data."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from models.formats import dequantize, read_quant_config
    from models.qlinear import unpack_linear
    from models.quantize.api import validate

    fast = dict(method="gptq", group_size=32, calib="tiny", nsamples=4, seqlen=64, seed=0)
    outs = {}
    for w in (1.0, 1e4):
        out = tmp_path / f"w{int(w)}"
        quantize(str(tiny_llama_dir), str(out), QuantSpec(sink_weight=w, **fast))
        outs[w] = out
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    names = [n for n, m in ref.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))]
    mods = dict(ref.named_modules())
    _, samples, _ = validate(str(tiny_llama_dir), str(tmp_path / "probe"), QuantSpec(**fast), False, None)
    acts = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: acts[n].append(i[0][0, 0])) for n in names]
    with torch.no_grad():
        for s in samples:
            ref(torch.tensor([s]))
    for h in hooks:
        h.remove()

    def first_token_error(out) -> float:
        t = load_file(str(next(out.glob("*.safetensors"))))
        q = read_quant_config(out)
        total = 0.0
        for n in names:
            w = mods[n].weight.detach()
            wq = dequantize(unpack_linear(t, n, q, w.shape[1], w.shape[0])).float()
            total += float(((wq - w) @ torch.stack(acts[n]).t()).pow(2).sum())  # (out, samples)
        return total

    e_sink, e_plain = first_token_error(outs[1e4]), first_token_error(outs[1.0])
    assert e_sink < 0.5 * e_plain, (e_sink, e_plain)
