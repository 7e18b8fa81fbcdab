"""models.tokenizer with the tiny byte-level BPE tokenizer (tests/conftest.py): incremental text, UTF-8, stop
strings, chat. SmolLM2's own eos ids, merges and template: tests/integration/test_tokenizer_smollm2.py."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from models.tokenizer import IncrementalDetokenizer, Tokenizer

EXTRA_CHARS = "éèàçñüöß€£¥©®™°±µ¿¡—–…“”‘’ 😀🚀👍🏽👨‍👩‍👧🇫🇷中文日本語한국어ไทยالعربيةעבריתрусский \n\t"


@pytest.fixture(scope="module")
def tok(tiny_llama_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_llama_dir)


@pytest.fixture(scope="module")
def corpus(builtin_texts_dir: Path) -> str:
    """Mixed-script text: the unit tier's generated `multilingual` and `wiki` built-in texts."""
    wiki = (builtin_texts_dir / "wiki.utf8").read_text(encoding="utf-8")[:200_000]
    return (builtin_texts_dir / "multilingual.utf8").read_text(encoding="utf-8") + wiki


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory, corpus) -> Tokenizer:
    """A sentencepiece-style tokenizer (Llama 2 / Mistral layout: "▁" word marker, byte-fallback <0xNN> tokens,
    decoder that strips the leading space), trained in ~1 s on real text and saved as an HF folder."""
    import json

    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    raw.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    raw.train_from_iterator(
        [corpus[-30_000:]],
        trainers.BpeTrainer(vocab_size=700, special_tokens=specials, limit_alphabet=100, show_progress=False),
    )
    d = tmp_path_factory.mktemp("sp-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        d
    )
    (d / "config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    return Tokenizer.from_dir(d)


def random_texts(corpus: str, n: int, seed: int):
    rnd = random.Random(seed)
    for _ in range(n):
        start = rnd.randrange(len(corpus) - 400)
        text = corpus[start : start + rnd.randint(1, 300)]
        # sprinkle emoji / CJK / accents so byte-level tokens split characters
        chars = list(text)
        for _ in range(rnd.randint(0, 8)):
            chars.insert(rnd.randrange(len(chars) + 1), rnd.choice(EXTRA_CHARS))
        yield "".join(chars)


def stream(detok: IncrementalDetokenizer, ids) -> list:
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finish())
    return pieces


def test_eos_and_vocab(tok):
    assert tok.eos_token_ids == (2, 0)  # <|im_end|> (generation_config, tokenizer), <|endoftext|>
    assert tok.vocab_size == 1024  # conftest's TINY_VOCAB
    assert tok.hf.convert_ids_to_tokens(list(tok.eos_token_ids)) == ["<|im_end|>", "<|endoftext|>"]


def test_incremental_equals_full_decode(tok, corpus):
    seed = random.randrange(1 << 30)
    print(f"text seed {seed}")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say something."}])
    split_chars = 0
    for text in random_texts(corpus, 150, seed):
        ids = tok.encode(text, add_special_tokens=False)
        expected = tok.decode(ids)
        for prompt_ids in (None, prompt):
            detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
            pieces = stream(detok, ids)
            assert "".join(pieces) == expected == detok.text
            assert all("\ufffd" not in p for p in pieces) or "\ufffd" in expected
        split_chars += sum(1 for i in ids if "\ufffd" in tok.decode([i]))
    assert split_chars > 50  # the texts really exercised tokens that split a character


def test_incremental_equals_full_decode_sentencepiece(sp_tok, corpus):
    """Byte-fallback pieces (<0xE4><0xB8><0xAD>) and the stripped leading "▁" of a decode window."""
    seed = random.randrange(1 << 30)
    print(f"text seed {seed}")
    prompt = sp_tok.encode("Here is some text:")
    byte_tokens = 0
    for text in random_texts(corpus, 150, seed):
        ids = sp_tok.encode(text, add_special_tokens=False)
        # alone, the decoder strips the first "▁"; after a prompt it is a real space, as in a full decode
        after_prompt = sp_tok.decode(prompt + ids)[len(sp_tok.decode(prompt)) :]
        for prompt_ids, expected in ((None, sp_tok.decode(ids)), (prompt, after_prompt)):
            detok = IncrementalDetokenizer(sp_tok, prompt_ids=prompt_ids)
            assert "".join(stream(detok, ids)) == expected
        byte_tokens += sum(1 for t in sp_tok.hf.convert_ids_to_tokens(ids) if t.startswith("<0x"))
    assert byte_tokens > 100
    ids = sp_tok.encode("Hello world", add_special_tokens=False)
    assert "".join(stream(IncrementalDetokenizer(sp_tok, prompt_ids=prompt), ids)) == " Hello world"
    assert "".join(stream(IncrementalDetokenizer(sp_tok), ids)) == "Hello world"


def test_incomplete_utf8_is_held_back(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) == 4 and all(tok.decode([i]) == "\ufffd" for i in ids)  # one token per byte
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["", "", "", "😀"]
    # flushing an unfinished character emits what the full decode gives
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:3]] == ["", "", ""]
    assert detok.finish() == tok.decode(ids[:3]) != ""


def test_special_tokens_skipped(tok):
    ids = tok.encode("Hi there", add_special_tokens=False) + [2]
    detok = IncrementalDetokenizer(tok)
    assert "".join(stream(detok, ids)) == "Hi there"
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(stream(detok, ids)) == "Hi there<|im_end|>"


def test_stop_string_across_token_boundaries(tok):
    text = "Hello world, this is the ending of it. More text follows."
    stop = "is the endi"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    starts = [sum(len(p) for p in pieces[:k]) for k in range(len(pieces) + 1)]
    at = text.index(stop)
    assert sum(1 for s in starts if at < s < at + len(stop)) >= 2  # the stop string spans 3+ tokens

    detok = IncrementalDetokenizer(tok, stop=[stop])
    out = []
    for i in ids:
        out.append(detok.add(i))
        if detok.stopped:
            break
    assert detok.stopped and detok.stop_reason == stop
    assert "".join(out) == detok.text == text[:at]
    assert detok.add(ids[-1]) == "" and detok.finish() == ""


def test_partial_stop_is_held_then_released(tok):
    text = "The STOry goes on, not a STOP here"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, stop=["STOP!"])
    emitted_after = []
    for i in ids:
        detok.add(i)
        emitted_after.append(detok.text)
    assert not detok.stopped
    # while the text ended in " STO" / " STOP" something was held back, never emitted early
    assert any(len(e) < len(tok.decode(ids[: k + 1])) for k, e in enumerate(emitted_after))
    assert all(text.startswith(e) for e in emitted_after)
    detok.finish()
    assert detok.text == text


def test_first_of_several_stop_strings(tok):
    text = "alpha beta gamma delta epsilon"
    for stops, expected in (
        (["delta", "beta", "zeta"], "alpha "),
        (["gamma d", "gamma"], "alpha beta "),
        (["epsilon", "a b"], "alph"),
    ):
        detok = IncrementalDetokenizer(tok, stop=stops)
        out = "".join(stream(detok, tok.encode(text, add_special_tokens=False)))
        assert out == expected and detok.stopped, stops


def test_stop_inside_multibyte_text(tok):
    text = "price: 5€ 😀 then 中文 more"
    ids = tok.encode(text, add_special_tokens=False)
    for stop, expected in (("😀", "price: 5€ "), ("中", "price: 5€ 😀 then "), ("€ 😀", "price: 5")):
        detok = IncrementalDetokenizer(tok, stop=[stop])
        assert "".join(stream(detok, ids)) == expected and detok.stopped


def test_stop_never_matches_when_absent(tok, corpus):
    for text in random_texts(corpus, 20, 7):
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, stop=["\x00never\x00", "ZZZZZZZZ"])
        assert "".join(stream(detok, ids)) == tok.decode(ids) and not detok.stopped


def test_thousand_stop_strings(tok, corpus):
    rnd = random.Random(3)
    words = sorted({w for w in corpus[:50_000].split() if len(w) > 3})
    text = corpus[-3000:]  # the tail of the wiki text
    ids = tok.encode(text, add_special_tokens=False)
    absent = [w + "\u2603" + str(i) for i, w in enumerate(rnd.sample(words, 999))]  # never in the text
    target = " ".join(text.split()[300:302])
    stops = absent + [target]
    t0 = time.perf_counter()
    detok = IncrementalDetokenizer(tok, stop=stops)
    out = "".join(stream(detok, ids))
    elapsed = time.perf_counter() - t0
    assert detok.stopped and out == text[: text.index(target)]
    # ~1800 tokens against 1000 stop strings: the matcher must not be quadratic in the stop list
    assert elapsed < 2.0, f"{elapsed:.2f}s"
    detok = IncrementalDetokenizer(tok, stop=absent)
    t0 = time.perf_counter()
    assert "".join(stream(detok, ids)) == tok.decode(ids)
    assert time.perf_counter() - t0 < 2.0


def test_chat_template(tok):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = tok.apply_chat_template(messages)
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # special tokens are single ids, not text
    ids2 = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + messages, add_generation_prompt=False)
    assert tok.decode(ids2, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )


def test_no_chat_template_raises(tiny_llama_dir, tmp_path):
    d = tmp_path / "no-template"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):  # no chat_template.jinja
        shutil.copy2(tiny_llama_dir / name, d / name)
    t = Tokenizer.from_dir(d)
    assert not t.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("which", ["tok", "sp_tok"])
def test_decode_is_transformers_decode(which, request, corpus):
    """`Tokenizer.decode` calls the tokenizers library directly where transformers adds nothing to it, and
    gives exactly transformers' text (special tokens kept or skipped); with space clean-up on, it goes through
    transformers."""
    t = request.getfixturevalue(which)
    assert t._backend_decode is not None
    rng = random.Random(0)
    ids = t.encode(corpus[:4000])
    pieces = [ids[i : i + rng.randint(1, 9)] for i in range(0, len(ids), 7)]
    pieces += [[rng.randrange(t.vocab_size) for _ in range(rng.randint(1, 6))] for _ in range(300)]
    for p in pieces:
        for skip in (True, False):
            assert t.decode(p, skip) == t.hf.decode(p, skip_special_tokens=skip)
    before, t.hf.clean_up_tokenization_spaces = t.hf.clean_up_tokenization_spaces, True
    try:
        assert Tokenizer(t.hf, t.eos_token_ids)._backend_decode is None
    finally:
        t.hf.clean_up_tokenization_spaces = before
