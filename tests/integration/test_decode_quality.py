"""benchmarks/decode_quality.py on the demo's real GPTQ model: teacher-forced perplexity through batched decode,
the kernel plans side by side (the AMX tile kernels where the CPU has them, W4A8, int4pack)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.decode_quality import VARIANTS, decode_perplexity, text_ids
from models import w4a8
from models.quantize.calibration import CalibrationError, resolve_text
from models.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


def test_decode_path_perplexity_agrees_across_kernel_plans(model_store: Path):
    model_dir = model_store / "smollm2-135m-instruct-gptq-g64"
    if not (model_dir / "config.json").is_file():
        pytest.skip(f"{model_dir} missing: run `jetserve demo prepare` (make test does)")
    try:
        text = resolve_text("wiki", model_store)
    except CalibrationError as e:
        pytest.skip(str(e))
    batch, tokens = 4, 96  # batch 4: the AMX kernels' first row count
    ids = text_ids(Tokenizer.from_dir(model_dir), text, batch * tokens)
    assert len(ids) == batch * tokens
    seqs = torch.tensor(ids).reshape(batch, tokens)
    res = {v: decode_perplexity(model_dir, seqs, v) for v in VARIANTS}
    ops = w4a8.load()[0]
    amx = ops is not None and w4a8.has_amx(ops)
    assert any("amx>=4" in p for p in res["auto"]["plans"]) == amx
    assert not any("amx>=4" in p for p in res["w4a8"]["plans"])
    base = res["int4pack"]["perplexity"]
    assert 1.0 < base < 100.0 and res["auto"]["scored_tokens"] == batch * (tokens - 2)
    for v in ("auto", "w4a8"):
        assert abs(res[v]["perplexity"] / base - 1) < 0.01, res
