"""The demo model store that `jetserve demo prepare` built (the real SmolLM2 and its variants)."""

from __future__ import annotations

import json
import time

import pytest

from models.quantize.demo import _is_valid_bf16, prepare


def test_demo_store_bf16_folder_is_plain_bf16(smollm2_dir):
    """The GGUF-converted base is a plain bf16 HF folder: no quantization_config, Llama, tied embeddings."""
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert _is_valid_bf16(smollm2_dir)
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 49152
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


@pytest.mark.slow
def test_demo_prepare_second_run_is_fast(model_store):
    """On a prepared store, `jetserve demo prepare` finds everything up to date in well under 30 s."""
    from models.quantize.demo import ALL_VARIANTS, BASE_NAME

    present = [v for v in ALL_VARIANTS if (model_store / f"{BASE_NAME}-{v}" / "config.json").is_file()]
    if not present:
        pytest.skip("demo store not prepared")
    t0 = time.perf_counter()
    r = prepare(model_store, variants=present, echo=lambda s: None)
    assert r.built == [] and time.perf_counter() - t0 < 30
