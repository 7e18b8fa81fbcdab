"""Compiled decode (models.compile): parity with eager decode, no compiles after warm-up, logged fallbacks."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from models import compile as C
from models.loader import load_runner

pytestmark = pytest.mark.skipif(C.compile_unavailable(torch.device("cpu")) is not None, reason="no C++ compiler")


@pytest.fixture(scope="module", params=[("inplace", "auto"), ("sdpa", "auto"), ("inplace", "int8")])
def compiled_runner(request, tiny_llama_dir, tmp_path_factory):
    """Both decode attentions: the in-place kernel (no attention length in the graph) and SDPA over a bucket; and
    the in-place kernel on an int8 KV cache (the graph quantizes the rows it writes)."""
    attention, kv = request.param
    r = load_runner(
        tiny_llama_dir,
        dtype=torch.float32,
        max_batch_size=4,
        max_seq=192,
        compile_cache_dir=tmp_path_factory.mktemp("compile-cache"),
        cpu_attention=attention,
        kv_cache_dtype=kv,
    )
    r.warmup()
    assert r.compiled, r.compile_note
    return r


def _decode_both(r, tokens, positions, slots):
    fn = r.model.compiled_decode
    with torch.inference_mode():
        out_c = r.decode(tokens, positions, slots)
        r.model.compiled_decode = None
        try:
            out_e = r.decode(tokens, positions, slots)
        finally:
            r.model.compiled_decode = fn
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
    fn = r.model.compiled_decode
    r.model.compiled_decode = None
    try:
        r.decode(torch.tensor([7, 8]), torch.tensor([50, 60]), torch.tensor([0, 1]))
    finally:
        r.model.compiled_decode = fn
    if r.cache.quantized:  # int8 rows: a code may round the other way at a tie; the scales agree
        for new, old in ((k[:, :2, 40:70], kc), (v[:, :2, 40:70], vc)):
            assert int((new[..., :-4].int() - old[..., :-4].int()).abs().max()) <= 1
            torch.testing.assert_close(
                new[..., -4:].contiguous().view(torch.float32), old[..., -4:].contiguous().view(torch.float32)
            )
        return
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
    assert not r.compiled and r.model.compiled_decode is None
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
    assert not r.compiled and r.model.compiled_decode is None
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


def test_layer_group_is_the_divisor_nearest_the_target():
    assert [C.layer_group(n, 6) for n in (30, 24, 28, 32, 13, 2, 1)] == [6, 6, 7, 4, 1, 2, 1]


def _eager_vs_compiled(r, B: int, pos: int):
    g = torch.Generator().manual_seed(B * 1000 + pos)
    tokens = torch.randint(3, 500, (B,), generator=g)
    positions = torch.full((B,), pos)
    return _decode_both(r, tokens, positions, torch.arange(B))


def _prefilled(model_dir, tmp_path, max_seq: int = 128, **kw):
    r = load_runner(model_dir, dtype=torch.float32, max_batch_size=2, max_seq=max_seq, compile_cache_dir=tmp_path, **kw)
    r.warmup()
    assert r.compiled, r.compile_note
    for s in range(2):
        r.prefill(torch.arange(3, 40), s, 0)
    return r


def test_grouped_layers_and_the_one_row_int8_head_match_eager(
    tiny_llama_writer, tiny_tokenizer_dir, tmp_path, monkeypatch
):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(C, "LAYER_GROUP", 2)
    d = tiny_llama_writer(tmp_path / "four-layers", tiny_tokenizer_dir, num_hidden_layers=4)
    r = _prefilled(d, tmp_path / "cache", lm_head="int8")
    assert r.model.compiled_decode.group == 2  # two compiled calls a step
    graphs = counters["stats"]["unique_graphs"]
    for B in (1, 2):
        for pos in (37, 70, 127):
            out_c, out_e = _eager_vs_compiled(r, B, pos)
            torch.testing.assert_close(out_c, out_e, atol=2e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "decode compiled a new graph after warm-up"


def test_layer_structure_tells_blocks_apart(tiny_llama_dir):
    r = load_runner(tiny_llama_dir, dtype=torch.float32, max_batch_size=1, max_seq=64)
    a, b = r.model.blocks
    assert C.layer_structure(a) == C.layer_structure(b)
    b.norm2.eps = 0.5
    assert C.layer_structure(a) != C.layer_structure(b)
    b.norm2.eps = a.norm2.eps
    b.up.weight.data = b.up.weight.data.to(torch.bfloat16)
    assert C.layer_structure(a) != C.layer_structure(b)
    b.up.weight.data = b.up.weight.data.to(a.up.weight.dtype)
    assert C.layer_structure(a) == C.layer_structure(b)
    # a tensor outside the parameters and buffers would be a constant of the graph: told apart by identity
    a.o._table, b.o._table = torch.zeros(3), torch.zeros(3)
    assert C.layer_structure(a) != C.layer_structure(b)
    b.o._table = a.o._table
    assert C.layer_structure(a) == C.layer_structure(b)
    handle = b.norm1.register_forward_hook(lambda *args: None)
    assert C.layer_structure(a) != C.layer_structure(b)
    handle.remove()
    assert C.layer_structure(a) == C.layer_structure(b)


def test_blocks_that_differ_keep_their_guards(tiny_llama_writer, tiny_tokenizer_dir, tmp_path, caplog):
    """Block guards are skipped only when every block has one structure: here block 1's norm eps (a constant in
    the graph) differs, so a graph traced on block 0 must not run block 1."""
    d = tiny_llama_writer(tmp_path / "m", tiny_tokenizer_dir)
    r = load_runner(d, dtype=torch.float32, max_batch_size=2, max_seq=128, compile_cache_dir=tmp_path / "cache")
    r.model.blocks[1].norm1.eps = 0.5
    with caplog.at_level(logging.INFO, logger="models.compile"):
        r.warmup()
    assert r.compiled and any("block guards kept" in m for m in caplog.messages)
    r.prefill(torch.arange(3, 40), 0, 0)
    out_c, out_e = _eager_vs_compiled(r, 1, 45)
    torch.testing.assert_close(out_c, out_e, atol=2e-4, rtol=1e-4)


def test_two_models_in_one_process_keep_their_own_graphs(tiny_llama_writer, tiny_tokenizer_dir, tmp_path, caplog):
    """Same shapes, different norm eps (baked into the graphs): each model runs its own graphs, and the second
    model's graphs do not count against the first one's recompile limit (dynamo's is per code object)."""
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        r1 = _prefilled(tiny_llama_writer(tmp_path / "a", tiny_tokenizer_dir), tmp_path / "cache", 256)
        r2 = _prefilled(
            tiny_llama_writer(tmp_path / "b", tiny_tokenizer_dir, rms_norm_eps=0.5), tmp_path / "cache", 256
        )
    assert not any("recompile_limit" in m for m in caplog.messages), caplog.messages
    code = [r.model.compiled_decode.layers._torchdynamo_orig_callable.__code__ for r in (r1, r2)]
    assert code[0] is not code[1]
    for r in (r1, r2, r1):
        for B in (1, 2):
            out_c, out_e = _eager_vs_compiled(r, B, 50)
            torch.testing.assert_close(out_c, out_e, atol=2e-4, rtol=1e-4)
