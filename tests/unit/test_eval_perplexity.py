"""Sliding-window perplexity: window arithmetic and agreement with a direct per-token computation."""

from __future__ import annotations

import math

import pytest
import torch

from models.evaluate.perplexity import perplexity, windows


def test_windows_score_every_token_once():
    for n, L, s in [(10, 4, 2), (4096, 2048, 512), (2049, 2048, 512), (7, 8, 8), (100, 10, 3)]:
        scored = []
        for begin, end, first in windows(n, L, s):
            assert end - begin <= L and begin < first <= end
            scored.extend(range(first, end))
        assert scored == list(range(1, n)), (n, L, s)


def test_windows_match_hf_recipe_for_protocol():
    w = list(windows(32768, 2048, 512))
    assert w[0] == (0, 2048, 1) and w[1] == (512, 2560, 2048) and w[-1] == (30720, 32768, 32256)
    assert len(w) == 61


def test_bad_window_arguments():
    with pytest.raises(ValueError):
        list(windows(10, 4, 5))


def _bigram_logits_fn(table: torch.Tensor):
    """A 'model' whose logits at position p depend only on token p (no context), so every window agrees."""
    return lambda ids, last: table[ids[-last:]]


def test_perplexity_equals_direct_nll_for_context_free_model():
    torch.manual_seed(0)
    V = 50
    table = torch.randn(V, V)
    ids = torch.randint(0, V, (300,)).tolist()
    res = perplexity(_bigram_logits_fn(table), ids, max_length=64, stride=16)
    logp = torch.log_softmax(table, -1)
    nll = -sum(float(logp[ids[i - 1], ids[i]]) for i in range(1, len(ids)))
    assert res.scored_tokens == len(ids) - 1
    assert res.ppl == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_context_limited_by_window(monkeypatch):
    """Each call sees at most max_length tokens; later windows carry max_length - stride tokens of context."""
    seen, asked = [], []

    def fn(ids, last):
        seen.append(len(ids))
        asked.append(last)
        return torch.zeros(last, 10)

    res = perplexity(fn, list(range(10)) * 10, max_length=32, stride=8)
    assert max(seen) == 32 and res.ppl == pytest.approx(10.0)
    # only the positions predicting scored tokens (+ the final one, dropped) are asked for: 31 scored, then 8 each
    # (the last window may hold fewer)
    assert asked[0] == 32 and set(asked[1:-1]) == {9} and asked[-1] <= 9


def test_real_tiny_model_matches_full_context_when_window_covers_text(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    ids = torch.randint(0, m.config.vocab_size, (200,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hf_loss = m(ids[None], labels=ids[None]).loss.item()  # HF mean NLL over 199 shifted targets
        res = perplexity(lambda x, last: m(x[None]).logits[0, -last:], ids.tolist(), max_length=256, stride=128)
    assert res.windows == 1
    assert res.ppl == pytest.approx(math.exp(hf_loss), rel=1e-4)


def test_runtimes_last_logits_equal_the_tail_of_all_logits(tiny_llama_dir):
    """Both runtimes' all_logits(ids, last) are the last rows of the full logits (the lm_head on fewer rows)."""
    from transformers import AutoConfig

    from models.evaluate.runtimes import load_runtime

    vocab = AutoConfig.from_pretrained(str(tiny_llama_dir)).vocab_size
    ids = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(2))
    for kind in ("transformers", "jetserve"):
        rt = load_runtime(kind, tiny_llama_dir, torch.device("cpu"), torch.float32, max_seq=64)
        full, tail = rt.all_logits(ids), rt.all_logits(ids, 9)
        assert full.shape[0] == 40 and tail.shape[0] == 9
        torch.testing.assert_close(tail, full[-9:], rtol=1e-4, atol=1e-4)
        rt.close()
