"""Predicted vs measured memory on the real SmolLM2 (bf16 and, when prepared, GPTQ) through the ModelManager.

Runs benchmarks/memory_prediction.py, which loads each model in a fresh subprocess with the real runtime,
tokenizer and warmup; the prediction comes from config.json + safetensors headers only. Target: |error| <= 5%.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_prediction_within_5_percent_on_smollm2(model_store, smollm2_dir):
    models = [
        m
        for m in ("smollm2-135m-instruct", "smollm2-135m-instruct-gptq-g64")
        if (model_store / m / "config.json").is_file()
    ]
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "memory_prediction.py"),
            "--store",
            str(model_store),
            "--models",
            *models,
            "--max-batch-size",
            "4",
            "--max-context",
            "1024",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=480,
    )
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["model"] for r in rows] == models, p.stderr[-3000:]
    for r in rows:
        pred = r["predicted"]
        # the prediction is the contract formula (headers + KV + workspace), not the runner's own report
        assert pred["total_bytes"] == pred["weights_bytes"] + pred["kv_cache_bytes"] + pred["workspace_bytes"]
        assert pred["kv_cache_bytes"] == r["runner_report"]["kv_cache_bytes"]
        assert r["measured_bytes"] > pred["weights_bytes"] + pred["kv_cache_bytes"] * 0.9
        assert abs(r["error"]) <= 0.05, r
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]


@pytest.mark.gpu
def test_prediction_within_5_percent_on_cuda(model_store, smollm2_dir):
    """Same check on a CUDA device: measured = torch.cuda.memory_allocated growth (graphs captured)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "memory_prediction.py"),
            "--store",
            str(model_store),
            "--models",
            "smollm2-135m-instruct",
            "--device",
            "cuda",
            "--max-batch-size",
            "8",
            "--max-context",
            "2048",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=480,
    )
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert rows and rows[0]["device"] == "cuda", p.stderr[-3000:]
    assert abs(rows[0]["error"]) <= 0.05, rows[0]
