"""`jetserve generate` as a real subprocess on the real SmolLM2-135M-Instruct (bf16 and the GPTQ g64 demo model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

JETSERVE = Path(sys.executable).with_name("jetserve")


def run_generate(store: Path, *argv: str) -> subprocess.CompletedProcess:
    cmd = [str(JETSERVE)] if JETSERVE.exists() else [sys.executable, "-m", "server.cli"]
    env = dict(os.environ, JETSERVE_MODEL_STORE=str(store))
    return subprocess.run(
        cmd + ["generate", *argv, "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300
    )


def test_bf16_greedy_knows_paris(smollm2_dir):
    out = run_generate(
        smollm2_dir.parent, smollm2_dir.name, "--prompt", "The capital of France is", "--max-tokens", "4"
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tok/s" in out.stderr and "prompt 5 tokens" in out.stderr


def test_gptq_chat_stream(model_store):
    d = model_store / "smollm2-135m-instruct-gptq-g64"
    if not (d / "config.json").is_file():
        pytest.skip(f"{d} missing: run `jetserve demo prepare`")
    out = run_generate(
        model_store,
        d.name,
        "--chat",
        "--stream",
        "--prompt",
        "Name a colour.",
        "--max-tokens",
        "12",
        "--temperature",
        "0.7",
        "--seed",
        "1",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), out.stderr
    assert "gptq" in out.stderr  # the loader logs the quantization it read from the checkpoint
    assert "generated" in out.stderr and "tok/s" in out.stderr
