"""models.tokenizer on SmolLM2's real tokenizer: its eos ids, vocabulary, merged byte pieces and chat template.

The behaviour checks (incremental text, stop strings) run on the tiny tokenizer in tests/unit/test_tokenizer.py.
"""

from __future__ import annotations

import pytest

from models.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def test_eos_and_vocab(tok):
    assert tok.eos_token_ids == (2, 0)  # <|im_end|> (generation_config, tokenizer), <|endoftext|>
    assert tok.vocab_size == 49152
    assert tok.hf.convert_ids_to_tokens(list(tok.eos_token_ids)) == ["<|im_end|>", "<|endoftext|>"]


def test_incomplete_utf8_is_held_back(tok):
    """ "😀" is 3 tokens, one of them a merge holding 2 of its 4 bytes: still held back until complete."""
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) == 3 and all(tok.decode([i]) == "\ufffd" for i in ids)
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["", "", "😀"]
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[0]) == "" and detok.add(ids[1]) == ""
    assert detok.finish() == tok.decode(ids[:2])


def test_chat_template(tok):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = tok.apply_chat_template(messages)
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # special tokens are single ids, not text
