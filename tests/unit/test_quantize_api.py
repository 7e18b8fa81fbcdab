"""jetserve quantize on tiny random Llamas: GPTQ, AWQ and RTN write checkpoints transformers loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.quantize.api import QuantSpec, quantize

FAST = dict(calib="tiny", nsamples=4, seqlen=64, seed=0)


@pytest.fixture(scope="module")
def tiny_awq_src(tmp_path_factory, tiny_tokenizer_dir, tiny_llama_writer):
    """GPTQModel's AWQ needs out_features % 64 == 0, so use hidden 128 / head_dim 32 (kv out = 64)."""
    return tiny_llama_writer(
        tmp_path_factory.mktemp("tiny128") / "tiny128",
        tiny_tokenizer_dir,
        hidden_size=128,
        head_dim=32,
        intermediate_size=256,
    )


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map="cpu")
    with torch.inference_mode():
        return m(ids[None]).logits[0].float()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _check_checkpoint(out: Path, method: str, group_size: int) -> dict:
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (
        q["quant_method"] == ("gptq" if method == "rtn" else method)
        and q["bits"] == 4
        and q["group_size"] == group_size
    )
    assert list(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    rec = json.loads((out / "jetserve-quantize.json").read_text())
    assert rec["spec"]["method"] == method and rec["seconds"] > 0
    assert "gptqmodel" in rec["versions"] and rec["versions"]["gptqmodel"] in card
    assert "time taken" in card and "Settings" in card
    leftovers = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []
    return rec


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_gptq_and_rtn_tiny_roundtrip(tiny_llama_dir, tmp_path, method):
    out = tmp_path / f"tiny-{method}"
    res = quantize(str(tiny_llama_dir), str(out), QuantSpec(method=method, group_size=32, **FAST))
    assert res.out_dir == out.resolve()
    rec = _check_checkpoint(out, method, 32)
    if method == "gptq":
        assert rec["calibration"]["nsamples"] == 4 and rec["calibration"]["seqlen"] == 64
        assert "4 samples x 64 tokens" in (out / "README.md").read_text()
    else:
        assert rec["calibration"]["data"] is None
    ids = torch.arange(10, 74)
    ref, got = _logits(tiny_llama_dir, ids), _logits(out, ids)
    assert torch.isfinite(got).all()
    # 4-bit g32 of a random model: close to bf16 but not equal.
    assert 0.0 < _rel_err(got, ref) < 0.25


def test_awq_tiny_roundtrip(tiny_awq_src, tmp_path):
    out = tmp_path / "tiny-awq"
    quantize(str(tiny_awq_src), str(out), QuantSpec(method="awq", group_size=64, zero_point=True, **FAST))
    rec = _check_checkpoint(out, "awq", 64)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["zero_point"] is True and q["version"] == "gemm"
    assert rec["spec"]["zero_point"] is True
    ids = torch.arange(10, 74)
    ref, got = _logits(tiny_awq_src, ids), _logits(out, ids)
    assert torch.isfinite(got).all()
    assert 0.0 < _rel_err(got, ref) < 0.25


def test_overwrite_replaces_atomically(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    quantize(str(tiny_llama_dir), str(out), QuantSpec(method="rtn", group_size=64), overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_failed_quantization_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    import models.quantize.api as api

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(api, "_gptqmodel_config", boom)
    with pytest.raises(RuntimeError, match="injected"):
        quantize(str(tiny_llama_dir), str(tmp_path / "q"), QuantSpec(method="rtn", group_size=64))
    assert list(tmp_path.iterdir()) == []


def test_spec_defaults_and_hash():
    s = QuantSpec(method="gptq", group_size=64)
    r = s.resolved()
    assert r.sym is not None and r.desc_act is not None and r.damp_percent is not None
    assert s.settings_hash() == QuantSpec(method="gptq", group_size=64).settings_hash()
    assert s.settings_hash() != QuantSpec(method="gptq", group_size=64, nsamples=8).settings_hash()
    awq = QuantSpec(method="awq").to_dict()
    assert "zero_point" in awq and "damp_percent" not in awq
