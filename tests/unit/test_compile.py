"""Compiled decode (models.compile): parity with eager decode, no compiles after warm-up, logged fallbacks."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from models import compile as C
from models.loader import load_runner

pytestmark = pytest.mark.skipif(C.compile_unavailable(torch.device("cpu")) is not None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def compiled_runner(tiny_llama_dir, tmp_path_factory):
    r = load_runner(
        tiny_llama_dir,
        dtype=torch.float32,
        max_batch_size=4,
        max_seq=192,
        compile_cache_dir=tmp_path_factory.mktemp("compile-cache"),
    )
    r.warmup()
    assert r.compiled, r.compile_note
    return r


def _decode_both(r, tokens, positions, slots):
    fn = r.model.decode_layer_fn
    with torch.inference_mode():
        out_c = r.decode(tokens, positions, slots)
        r.model.decode_layer_fn = None
        try:
            out_e = r.decode(tokens, positions, slots)
        finally:
            r.model.decode_layer_fn = fn
    return out_c, out_e


def test_compiled_decode_matches_eager_at_every_shape_without_recompiling(compiled_runner):
    from torch._dynamo.utils import counters

    r = compiled_runner
    g = torch.Generator().manual_seed(0)
    for s in range(4):
        r.prefill(torch.randint(3, 500, (40,), generator=g), s, 0)
    graphs = counters["stats"]["unique_graphs"]
    for B in (1, 2, 3, 4):
        for pos in (40, 63, 64, 100, 150, 191):  # buckets 64, 128, 192 (the whole cache)
            tokens = torch.randint(3, 500, (B,), generator=g)
            positions = torch.full((B,), pos)
            positions[0] = 41  # rows with different lengths in one batch
            slots = torch.arange(B).flip(0)
            out_c, out_e = _decode_both(r, tokens, positions, slots)
            torch.testing.assert_close(out_c, out_e, atol=2e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "decode compiled a new graph after warm-up"


def test_compiled_decode_writes_the_same_kv(compiled_runner):
    r = compiled_runner
    k, v = r.cache.k_all, r.cache.v_all
    r.decode(torch.tensor([7, 8]), torch.tensor([50, 60]), torch.tensor([0, 1]))
    kc, vc = k[:, :2, 40:70].clone(), v[:, :2, 40:70].clone()
    fn = r.model.decode_layer_fn
    r.model.decode_layer_fn = None
    try:
        r.decode(torch.tensor([7, 8]), torch.tensor([50, 60]), torch.tensor([0, 1]))
    finally:
        r.model.decode_layer_fn = fn
    torch.testing.assert_close(k[:, :2, 40:70], kc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v[:, :2, 40:70], vc, atol=1e-5, rtol=1e-5)


def test_bf16_compiled_decode_is_close_to_eager(tiny_llama_dir, tmp_path):
    r = load_runner(tiny_llama_dir, max_batch_size=2, max_seq=128, compile_cache_dir=tmp_path)
    r.warmup()
    assert r.compiled
    r.prefill(torch.arange(3, 30), 0, 0)
    out_c, out_e = _decode_both(r, torch.tensor([5]), torch.tensor([27]), torch.tensor([0]))
    span = (out_e.max() - out_e.min()).item()
    assert (out_c - out_e).abs().max().item() <= 0.02 * span + 0.02  # bf16 rounding of the fused ops


def test_cache_dir_is_set_unless_the_operator_set_one(tmp_path, monkeypatch):
    monkeypatch.delenv(C.CACHE_ENV, raising=False)
    assert C.set_cache_dir(tmp_path / "a") == tmp_path / "a"
    assert os.environ[C.CACHE_ENV] == str(tmp_path / "a") and (tmp_path / "a").is_dir()
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "op"))
    assert C.set_cache_dir(tmp_path / "b") == tmp_path / "op"


def test_no_compiler_keeps_eager_decode_with_a_logged_reason(tiny_llama_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    r = load_runner(tiny_llama_dir, max_batch_size=2, max_seq=64, compile_cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="models.runner"):
        r.warmup()
    assert not r.compiled and r.model.decode_layer_fn is None
    assert "no C++ compiler" in r.compile_note
    assert any("decode stays eager" in m and "no C++ compiler" in m for m in caplog.messages)
    assert r.decode(torch.tensor([5]), torch.tensor([0]), torch.tensor([0])).shape == (1, r.vocab_size)


def test_a_failing_compile_keeps_eager_decode(tiny_llama_dir, tmp_path, monkeypatch):
    def broken(*a, **kw):
        def fn(*a, **kw):
            raise RuntimeError("inductor exploded")

        return fn

    monkeypatch.setattr(C.torch, "compile", broken)
    r = load_runner(tiny_llama_dir, max_batch_size=2, max_seq=64, compile_cache_dir=tmp_path)
    r.warmup()
    assert not r.compiled and r.model.decode_layer_fn is None
    assert "inductor exploded" in r.compile_note
    assert r.decode(torch.tensor([5]), torch.tensor([0]), torch.tensor([0])).shape == (1, r.vocab_size)


def test_compile_is_cpu_only():
    assert "CPU-only" in C.compile_unavailable(torch.device("cuda"))


def test_compiled_decode_is_in_the_footprint(tiny_llama_dir):
    from models.loader import COMPILE_CONSTANT_BYTES, inspect_checkpoint, predict_footprint

    info = inspect_checkpoint(tiny_llama_dir)
    eager = predict_footprint(info, max_batch_size=2, max_seq=64)
    compiled = predict_footprint(info, max_batch_size=2, max_seq=64, compile_decode=True)
    assert compiled.workspace_bytes - eager.workspace_bytes == COMPILE_CONSTANT_BYTES


def test_prewarm_compiles_once_and_reports_a_missing_compiler(tmp_path, monkeypatch):
    assert C.prewarm(tmp_path) is None
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in C.prewarm(tmp_path)
