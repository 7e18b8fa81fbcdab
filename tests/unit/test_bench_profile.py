"""The decode benchmark's per-op profile (benchmarks/decode.py) on the tiny random model with int4 block linears."""

from __future__ import annotations

import pytest
import torch

from benchmarks.decode import PROFILE_CLASSES, cpu_info, format_profile, profile_decode, roofline
from benchmarks.qlinear import random_layer
from models import kernels
from models.loader import load_runner


@pytest.fixture(scope="module")
def int4_runner(tiny_llama_dir):
    """The tiny model with each block linear replaced by a random int4 QuantLinear of the same shape."""
    if kernels.device_kernel(torch.device("cpu")).name not in (kernels.CPU_INT4PACK, kernels.CPU_W4A8):
        pytest.skip("no CPU int4 kernel here")
    runner = load_runner(tiny_llama_dir, max_batch_size=8, max_seq=256)
    gen = torch.Generator().manual_seed(0)
    for blk in runner.model.blocks:
        for name in ("qkv", "o", "up", "down"):
            old = getattr(blk, name)
            setattr(blk, name, random_layer(old.in_features, old.out_features, 32, torch.device("cpu"), gen))
    return runner


@pytest.mark.parametrize("batch", [1, 8])
def test_profile_classes_and_shares(int4_runner, batch):
    p = profile_decode(int4_runner, batch, context=40, steps=2, warmup=1)
    assert p["steps"] == 2 and p["batch"] == batch
    classes = p["classes"]
    assert tuple(classes) == PROFILE_CLASSES
    assert sum(v["share"] for v in classes.values()) == pytest.approx(1.0, abs=1e-6)
    # the classes partition the step: with 2 steps the per-class medians are means and add up to the mean step
    assert sum(v["ms"] for v in classes.values()) == pytest.approx(p["step_range_ms"], rel=1e-6)
    for c in ("int4 matmul", "lm_head", "attention", "norms", "KV writes"):
        assert classes[c]["share"] > 0, c
    # the tied bf16 head's aten::mm is found by its module range, not left in "rest"
    assert classes["lm_head"]["bytes"] == int4_runner.model.lm_head.weight_bytes()
    m = int4_runner.model
    assert classes["int4 matmul"]["bytes"] == sum(x.weight_bytes() for x in m.linear_modules())
    assert p["attn_len"] >= 40
    d = m.dims
    kv = batch * p["attn_len"] * 2 * d.layers * d.kv_heads * d.head_dim * 2
    assert classes["attention"]["bytes"] == kv
    assert classes["rest"]["GBps"] is None and classes["int4 matmul"]["GBps"] > 0
    assert "forward" not in vars(m.lm_head)  # the timing wrapper is removed
    table = format_profile(p)
    assert all(f"| {c} |" in table for c in PROFILE_CLASSES)


def test_roofline_and_cpu_info():
    r = roofline(10**9, 2, 10.0, 50.0)  # 1 GB a step of 2 tokens at 50 GB/s: 100 tok/s
    assert r["roofline_tok_s"] == pytest.approx(100.0)
    assert r["achieved_fraction"] == pytest.approx(0.1)
    assert r["bytes_per_token"] == 5 * 10**8
    info = cpu_info()
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["model_name"] and set(info["isa_flags"]) <= set(info["flags"])


@pytest.mark.parametrize("batch", [1, 2, 4])  # 4: the AMX kernels where the CPU has them
def test_profile_finds_the_compiled_head_and_recompiles_nothing(tiny_llama_dir, tmp_path, batch):
    from torch._dynamo.utils import counters

    from models.compile import compile_unavailable

    if compile_unavailable(torch.device("cpu")):
        pytest.skip(compile_unavailable(torch.device("cpu")))
    r = load_runner(tiny_llama_dir, max_batch_size=4, max_seq=128, lm_head="int8", compile_cache_dir=tmp_path)
    r.warmup()
    assert r.compiled, r.compile_note
    compiled = r.model.compiled_decode
    graphs = counters["stats"]["unique_graphs"]
    p = profile_decode(r, batch, context=40, steps=2, warmup=1)
    assert p["classes"]["lm_head"]["share"] > 0
    assert counters["stats"]["unique_graphs"] == graphs
    assert r.model.compiled_decode is compiled and "forward" not in vars(r.model.lm_head)


def test_ttft_against_transformers_alternates_round_by_round(tiny_llama_dir):
    """`make bench` times transformers bf16's TTFT between ours, round by round in one process, and the table
    reports the median of the per-round speed-ups."""
    import argparse

    from benchmarks.decode import HFPrefill, _fmt_table, add_arguments, bench_ours

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        ["--runs", "3", "--new-tokens", "4", "--prompt-len", "16", "--max-seq", "64", "--no-compile", "--no-profile"]
    )
    hf = HFPrefill(tiny_llama_dir, args.prompt_len)
    try:
        res = bench_ours(tiny_llama_dir, args, hf_ttft=hf)
    finally:
        hf.close()
    alt = res.pop("hf_bf16_ttft")
    rounds = alt["rounds"]
    assert len(rounds["ours_ttft_s"]) == len(rounds["hf_bf16_ttft_s"]) == 3
    speedups = sorted(h / o for o, h in zip(rounds["ours_ttft_s"], rounds["hf_bf16_ttft_s"]))
    assert alt["ttft_speedup_median"] == pytest.approx(speedups[1])
    bandwidth = {"read_GBps": 10.0, "copy_GBps": 5.0}
    table = _fmt_table({"args": {"prompt_len": 16}, "ours_gptq": res, "hf_bf16_ttft": alt, "bandwidth": bandwidth})
    assert "transformers bf16 rounds alternated" in table and f"{alt['ttft_speedup_median']:.2f}x" in table
    # batch 8 is timed in each round next to batch 1: the ratio is the median of the per-round ratios
    assert len(res["b8_over_b1_rounds"]) == 3
    assert res["b8_over_b1"] == pytest.approx(sorted(res["b8_over_b1_rounds"])[1])
    assert f"{res['b8_over_b1']:.2f}x" in table
