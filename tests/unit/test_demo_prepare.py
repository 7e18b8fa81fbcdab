"""`jetserve demo prepare`: ordinary path from a local folder, caching, rebuild on changed settings."""
from __future__ import annotations

import json
import time

import pytest

from models.quantize.api import QuantSpec
from models.quantize.demo import MARKER, _is_valid_bf16, prepare
from server.cli import main

FAST_SPECS = {"rtn-g32": QuantSpec(method="rtn", group_size=32),
              "gptq-g32": QuantSpec(method="gptq", group_size=32, calib="tiny", nsamples=2, seqlen=32)}


def test_prepare_from_local_folder_is_cached(tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    r1 = prepare(store, source=str(tiny_llama_dir), name="tiny", specs=FAST_SPECS, echo=lambda s: None)
    assert r1.base == (store / "tiny").resolve()
    assert set(r1.built) == {"tiny", "tiny-rtn-g32", "tiny-gptq-g32"}
    assert (store / "data" / "wiki.utf8").is_file() and (store / "data" / "c4.utf8").is_file()
    for v in r1.variants.values():
        cfg = json.loads((v / "config.json").read_text())
        assert cfg["quantization_config"]["group_size"] == 32
    rec = json.loads((r1.variants["gptq-g32"] / "jetserve-quantize.json").read_text())
    assert rec["base_origin"] == json.loads((store / "tiny" / MARKER).read_text())

    t0 = time.perf_counter()
    r2 = prepare(store, source=str(tiny_llama_dir), name="tiny", specs=FAST_SPECS, echo=lambda s: None)
    assert r2.built == [] and time.perf_counter() - t0 < 30

    changed = dict(FAST_SPECS, **{"rtn-g32": QuantSpec(method="rtn", group_size=32, sym=True)})
    r3 = prepare(store, source=str(tiny_llama_dir), name="tiny", specs=changed, echo=lambda s: None)
    assert r3.built == ["tiny-rtn-g32"]
    assert json.loads((store / "tiny-rtn-g32" / "config.json").read_text())["quantization_config"]["sym"] is True


def test_demo_command_rejects_unknown_variant(tmp_path, capsys):
    assert main(["demo", "prepare", "--store", str(tmp_path), "--variants", "fp8"]) == 2
    assert "unknown variant(s) fp8" in capsys.readouterr().err


def test_demo_store_bf16_folder_is_plain_bf16(smollm2_dir):
    """The GGUF-converted base is a plain bf16 HF folder: no quantization_config, Llama, tied embeddings."""
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert _is_valid_bf16(smollm2_dir)
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 49152
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


@pytest.mark.slow
def test_demo_prepare_second_run_is_fast(model_store):
    """On a prepared store, `jetserve demo prepare` finds everything up to date in well under 30 s."""
    from models.quantize.demo import BASE_NAME, DEMO_SPECS

    for suffix in DEMO_SPECS:
        if not (model_store / f"{BASE_NAME}-{suffix}" / "config.json").is_file():
            pytest.skip("demo store not prepared")
    t0 = time.perf_counter()
    r = prepare(model_store, echo=lambda s: None)
    assert r.built == [] and time.perf_counter() - t0 < 30
