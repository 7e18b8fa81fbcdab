"""Fused runtime vs transformers on tiny random Llama (GQA), Qwen2 (qkv bias) and OPT (LayerNorm, learned
positions, ReLU, biases): prefill logits, chunked prefill, and batched decode with slots at different positions."""

from __future__ import annotations

import logging

import pytest
import torch

from models.loader import inspect_checkpoint, load_runner, predict_footprint

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    root = tmp_path_factory.mktemp("tiny-archs")
    torch.manual_seed(0)
    out = {}
    out["llama"] = _save(
        LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True, rope_theta=10000.0)), root / "llama"
    )
    out["llama3"] = _save(
        LlamaForCausalLM(
            LlamaConfig(
                **{**TINY, "max_position_embeddings": 1024},
                tie_word_embeddings=False,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                rope_theta=500000.0,
            )
        ),
        root / "llama3",
    )
    out["qwen2"] = _save(Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False)), root / "qwen2")
    opt = OPTForCausalLM(
        OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        )
    )
    out["opt"] = _save(opt, root / "opt")
    out["gpt2"] = _save(
        GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128)), root / "gpt2"
    )
    return out


def _hf(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "opt"])
@pytest.mark.parametrize(
    "dtype,atol,fused",
    [(torch.float32, 2e-4, "torch"), (torch.bfloat16, 6e-2, "fused"), (torch.bfloat16, 6e-2, "torch")],
)
@pytest.mark.parametrize("attention", ["inplace", "sdpa"])
def test_prefill_and_batched_decode_match_transformers(tiny_dirs, arch, dtype, atol, fused, attention):
    """Both CPU decode attentions (models.attention): the in-place kernel and gather + SDPA; bfloat16 prefill with
    the fused ops (models.fused; OPT's LayerNorm and ReLU keep torch's) and with torch's."""
    from models.w4a8 import load

    if (attention == "inplace" or fused == "fused") and load()[0] is None:
        pytest.skip(f"C++ extension unavailable: {load()[1]}")
    path = tiny_dirs[arch]
    hf = _hf(path, dtype)
    runner = load_runner(path, dtype=dtype, max_batch_size=4, max_seq=128, cpu_attention=attention, cpu_fused=fused)
    assert type(runner).__name__ == "Runner"
    assert (runner.model.decode_attention is not None) == (attention == "inplace")
    assert (runner.model.fused_ops is not None) == (fused == "fused")
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (9, 17, 30)]
    slots = [2, 0, 3]
    for s, slot in zip(seqs, slots):
        with torch.no_grad():
            ref = hf(s[None]).logits[0].float()
        if slot == 0:  # chunked prefill through the cached prefix
            runner.prefill(s[:10], slot, 0)
            got_last = runner.prefill(s[10:], slot, 10)
        else:
            got_all = runner.prefill_logits(s, slot, 0)
            torch.testing.assert_close(got_all, ref, atol=atol, rtol=0)
            got_last = runner.prefill(s, slot, 0)
        torch.testing.assert_close(got_last, ref[-1], atol=atol, rtol=0)
    # 4 decode steps, all three sequences batched at different positions
    cur = [s.clone() for s in seqs]
    for _ in range(4):
        nxt = torch.randint(0, 256, (3,), generator=g)
        positions = torch.tensor([len(c) for c in cur])
        logits = runner.decode(nxt, positions, torch.tensor(slots))
        for b in range(3):
            cur[b] = torch.cat([cur[b], nxt[b : b + 1]])
            with torch.no_grad():
                ref = hf(cur[b][None]).logits[0, -1].float()
            torch.testing.assert_close(logits[b], ref, atol=atol, rtol=0)
            if dtype == torch.float32:
                assert int(logits[b].argmax()) == int(ref.argmax())


@pytest.mark.parametrize("attention", ["inplace", "sdpa"])
def test_int8_kv_cache_close_to_the_float_cache(tiny_dirs, attention):
    """kv_cache_dtype="int8" (models/kv_cache.py): prefill (also chunked, reading the cached prefix back) and batched
    decode stay close to the same model on a float32 cache, and both decode attentions read the int8 rows alike."""
    from models.w4a8 import load

    if attention == "inplace" and load()[0] is None:
        pytest.skip(f"C++ extension unavailable: {load()[1]}")
    path = tiny_dirs["llama"]
    kw = dict(dtype=torch.float32, max_batch_size=4, max_seq=128, cpu_attention=attention)
    ref, q8 = load_runner(path, **kw), load_runner(path, kv_cache_dtype="int8", **kw)
    assert q8.cache.k_all.dtype == torch.int8 and q8.cache.nbytes() * 4 == ref.cache.nbytes() * (16 + 4) // 16
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (12, 30)]
    for r in (ref, q8):
        r.prefill(seqs[0], 1, 0)
    outs = []
    for r in (ref, q8):
        r.prefill(seqs[1][:10], 0, 0)
        first = r.prefill(seqs[1][10:], 0, 10)  # the second chunk attends to the first through the cache
        steps = [r.decode(torch.tensor([5, 9]), torch.tensor([30 + i, 12 + i]), torch.tensor([0, 1])) for i in range(4)]
        outs.append(torch.cat([first[None], *steps]))
    torch.testing.assert_close(outs[1], outs[0], atol=5e-3, rtol=0)  # 1.1e-3 seen
    assert not torch.equal(outs[1], outs[0])  # the int8 rows are what was read


def test_int8_kv_cache_prefill_reads_what_it_stores(tiny_dirs):
    """On an int8 cache every attention reads the stored rows, a prompt's own included: prefilled whole or in two
    chunks (as after a prefix-cache hit), the logits agree to float32 summation order, and so does decode."""
    r = load_runner(tiny_dirs["llama"], dtype=torch.float32, max_batch_size=2, max_seq=128, kv_cache_dtype="int8")
    s = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(5))
    whole = r.prefill(s, 0, 0)
    r.prefill(s[:13], 1, 0)
    chunked = r.prefill(s[13:], 1, 13)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    out = r.decode(torch.tensor([7, 7]), torch.tensor([30, 30]), torch.tensor([0, 1]))
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=0)


def test_greedy_tokens_match_hf_generate(tiny_dirs):
    path = tiny_dirs["llama"]
    hf = _hf(path, torch.float32)
    runner = load_runner(path, dtype=torch.float32, max_batch_size=2, max_seq=64)
    prompt = torch.tensor([3, 14, 15, 92, 65, 35])
    with torch.no_grad():
        ref = hf.generate(prompt[None], max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(prompt) :]
    logits = runner.prefill(prompt, 1, 0)
    toks = []
    pos = len(prompt)
    for _ in range(12):
        t = int(logits.argmax())
        toks.append(t)
        logits = runner.decode(torch.tensor([t]), torch.tensor([pos]), torch.tensor([1]))[0]
        pos += 1
    assert toks == ref.tolist()


def test_kv_cache_allocated_once_and_slots_reused(tiny_dirs):
    runner = load_runner(tiny_dirs["llama"], dtype=torch.float32, max_batch_size=2, max_seq=64)
    ptrs = runner.cache.data_ptrs()
    first = runner.prefill(torch.tensor([1, 2, 3, 4]), 0, 0)
    runner.decode(torch.tensor([5]), torch.tensor([4]), torch.tensor([0]))
    runner.release(0)
    # a new request in the reused slot gets the same answer as the first one (stale entries masked out)
    runner.prefill(torch.tensor([9, 9, 9, 9, 9, 9, 9, 9]), 0, 0)
    runner.release(0)
    again = runner.prefill(torch.tensor([1, 2, 3, 4]), 0, 0)
    torch.testing.assert_close(again, first)
    assert runner.cache.data_ptrs() == ptrs
    assert runner.cache.k_all.shape == (2, 3, 64, 2, 16)  # (layers, slots + scratch, max_seq, kv_heads, head_dim)


def test_unsupported_arch_falls_back_with_warning(tiny_dirs, caplog):
    with caplog.at_level(logging.WARNING, logger="models.loader"):
        runner = load_runner(tiny_dirs["gpt2"], dtype=torch.float32, max_batch_size=8, max_seq=64)
    assert any("no fused implementation" in r.getMessage() for r in caplog.records)
    assert runner.max_batch_size == 1
    hf = _hf(tiny_dirs["gpt2"], torch.float32)
    prompt = torch.tensor([1, 2, 3, 4, 5])
    with torch.no_grad():
        ref = hf(torch.cat([prompt, torch.tensor([7])])[None]).logits[0, -1]
    runner.prefill(prompt, 0, 0)
    got = runner.decode(torch.tensor([7]), torch.tensor([5]), torch.tensor([0]))[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_inspect_and_footprint(tiny_dirs):
    info = inspect_checkpoint(tiny_dirs["qwen2"])
    assert (info.arch, info.fused, info.num_layers, info.num_kv_heads, info.head_dim) == ("qwen2", True, 2, 2, 16)
    hf = _hf(tiny_dirs["qwen2"], torch.float32)
    assert info.weight_bytes == sum(p.numel() * 4 for p in hf.state_dict().values())  # fp32 checkpoint
    fp = predict_footprint(info, max_batch_size=4, max_seq=128, dtype=torch.float32)
    runner = load_runner(tiny_dirs["qwen2"], dtype=torch.float32, max_batch_size=4, max_seq=128)
    rep = runner.memory_report()
    assert fp.kv_cache_bytes == rep["kv_cache_bytes"]
    assert fp.weights_bytes == rep["weights_bytes"]
    assert fp.total_bytes == fp.weights_bytes + fp.kv_cache_bytes + fp.workspace_bytes
    assert inspect_checkpoint(tiny_dirs["gpt2"]).fused is False
