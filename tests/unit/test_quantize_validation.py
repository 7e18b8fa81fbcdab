"""Bad input to `jetserve quantize` is refused with one line on stderr and exit code 2, before heavy work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if quantization itself (GPTQModel config/load) is ever reached."""
    import models.quantize.api as api

    def forbidden(*a, **k):
        raise AssertionError("heavy work started before validation failed")

    monkeypatch.setattr(api, "_gptqmodel_config", forbidden)


def _run(capsys, *argv):
    rc = main(["quantize", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _one_line(err):
    lines = [ln for ln in err if "jetserve quantize: error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_group_size_not_dividing_names_layer_and_valid_sizes(tiny_llama_dir, tmp_path, capsys, no_heavy_work):
    rc, err = _run(capsys, tiny_llama_dir, tmp_path / "o", "--group-size", "48")
    line = _one_line(err)
    assert rc == 2
    assert "--group-size 48 does not divide in_features=128 of layer model.layers.0.mlp.down_proj" in line
    assert "valid group sizes for this model: 16, 32, 64, -1" in line


def test_unsupported_bits(tiny_llama_dir, tmp_path, capsys, no_heavy_work):
    rc, err = _run(capsys, tiny_llama_dir, tmp_path / "o", "--method", "awq", "--bits", "3")
    assert rc == 2 and "awq does not support --bits 3; supported: 4" in _one_line(err)
    rc, err = _run(capsys, tiny_llama_dir, tmp_path / "o", "--bits", "5")
    assert rc == 2 and "gptq does not support --bits 5" in _one_line(err)


def test_unknown_method(tiny_llama_dir, tmp_path, capsys, no_heavy_work):
    rc, err = _run(capsys, tiny_llama_dir, tmp_path / "o", "--method", "smoothquant")
    assert rc == 2 and "unknown method 'smoothquant'" in _one_line(err)


def test_missing_src(tmp_path, capsys, no_heavy_work):
    rc, err = _run(capsys, tmp_path / "nope", tmp_path / "o")
    assert rc == 2 and "does not exist" in _one_line(err)
    (tmp_path / "notamodel").mkdir()
    rc, err = _run(capsys, tmp_path / "notamodel", tmp_path / "o")
    assert rc == 2 and "no config.json" in _one_line(err)


def test_nonempty_out_needs_overwrite(tiny_llama_dir, tmp_path, capsys, no_heavy_work):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep me")
    rc, err = _run(capsys, tiny_llama_dir, out, "--group-size", "64")
    assert rc == 2 and "not empty; pass --overwrite" in _one_line(err)
    assert (out / "x").read_text() == "keep me"


def test_calibration_too_short(tiny_llama_dir, tmp_path, capsys, no_heavy_work):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text here.")
    rc, err = _run(
        capsys,
        tiny_llama_dir,
        tmp_path / "o",
        "--group-size",
        "64",
        "--calib",
        short,
        "--nsamples",
        "4",
        "--seqlen",
        "64",
    )
    line = _one_line(err)
    assert rc == 2 and "calibration text too short" in line and "need nsamples*seqlen = 4x64 = 256 tokens" in line
    rc, err = _run(capsys, tiny_llama_dir, tmp_path / "o", "--group-size", "64", "--calib", tmp_path / "missing.txt")
    assert rc == 2 and "neither a built-in" in _one_line(err)


def test_awq_out_features_must_be_multiple_of_64(tiny_llama_dir, tmp_path, capsys, no_heavy_work):
    # tiny_llama has 2 kv heads x head_dim 16 = 32 k/v output channels
    rc, err = _run(capsys, tiny_llama_dir, tmp_path / "o", "--method", "awq", "--group-size", "64")
    assert rc == 2 and "out_features divisible by 64" in _one_line(err)


def test_cli_subprocess_exit_code_and_single_line(tiny_llama_dir, tmp_path):
    """The real console entry point: exit status 2 and exactly one line on stderr."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "quantize",
            str(tiny_llama_dir),
            str(tmp_path / "o"),
            "--group-size",
            "100",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("jetserve quantize: error: --group-size 100"), p.stderr
    assert not (tmp_path / "o").exists()
