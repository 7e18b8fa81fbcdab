"""`jetserve demo prepare`: ordinary path from a local folder, caching, rebuild on changed settings."""

from __future__ import annotations

import json
import time

import pytest
import torch

from models.quantize.api import QuantSpec
from models.quantize.demo import MARKER, prepare
from server.cli import main

FAST_SPECS = {
    "rtn-g32": QuantSpec(method="rtn", group_size=32),
    "gptq-g32": QuantSpec(method="gptq", group_size=32, calib="tiny", nsamples=2, seqlen=32),
}


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


def test_layer_subset_variant_is_the_base_cut_and_cached(tiny_llama_dir, tmp_path):
    """A LAYER_SUBSETS-style variant quantizes the base's first layers (real weights) and is cached like any other."""
    from safetensors.torch import load_file

    from models.loader import load_runner

    store = tmp_path / "store"
    subsets = {"rtn-g32-l1": ("rtn-g32", 1)}
    r1 = prepare(
        store,
        source=str(tiny_llama_dir),
        name="tiny",
        specs=FAST_SPECS,
        variants=["rtn-g32-l1"],
        subsets=subsets,
        echo=lambda s: None,
    )
    assert r1.built == ["tiny", "tiny-l1", "tiny-rtn-g32-l1"]
    cut = store / "tiny-l1"
    assert json.loads((cut / "config.json").read_text())["num_hidden_layers"] == 1
    full, kept = load_file(str(tiny_llama_dir / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert set(kept) == {k for k in full if not k.startswith("model.layers.1.")}
    assert all(kept[k].equal(full[k]) for k in kept)
    vcfg = json.loads((store / "tiny-rtn-g32-l1" / "config.json").read_text())
    assert vcfg["num_hidden_layers"] == 1 and vcfg["quantization_config"]["group_size"] == 32
    runner = load_runner(store / "tiny-rtn-g32-l1", max_batch_size=1, max_seq=32)
    assert runner.prefill_logits(torch.tensor([1, 2, 3]), 0, 0).isfinite().all()
    r2 = prepare(
        store,
        source=str(tiny_llama_dir),
        name="tiny",
        specs=FAST_SPECS,
        variants=["rtn-g32-l1"],
        subsets=subsets,
        echo=lambda s: None,
    )
    assert r2.built == []
    with pytest.raises(ValueError, match="unknown demo variant"):
        prepare(
            store,
            source=str(tiny_llama_dir),
            name="tiny",
            specs=FAST_SPECS,
            variants=["nope"],
            subsets=subsets,
            echo=lambda s: None,
        )


def test_demo_command_rejects_unknown_variant(tmp_path, capsys):
    assert main(["demo", "prepare", "--store", str(tmp_path), "--variants", "fp8"]) == 2
    assert "unknown variant(s) fp8" in capsys.readouterr().err
