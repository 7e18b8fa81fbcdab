"""`jetserve generate` on the tiny random Llama (real loader, runner, sampling and tokenizer)."""

from __future__ import annotations

import pytest

from server.cli import main

PROMPT = "Hello world, here is a story:"


def generate(capsys, *argv):
    rc = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def hf_greedy(tiny_llama_dir):
    """Greedy continuation from transformers (fp32) for the same prompt: ids and text."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = tok.encode(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    new = out[0, ids.shape[1] :].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


def test_greedy_matches_transformers(capsys, tiny_llama_dir, hf_greedy):
    rc, out, err = generate(
        capsys,
        tiny_llama_dir,
        "--prompt",
        PROMPT,
        "--max-tokens",
        12,
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--ignore-eos",
    )
    assert rc == 0, err
    assert out == hf_greedy[1] + "\n"
    assert "generated 12 tokens (length)" in err and "tok/s" in err and "time to first token" in err


def test_stream_prints_the_same_text(capsys, tiny_llama_dir):
    args = (tiny_llama_dir, "--prompt", PROMPT, "--max-tokens", 10, "--ignore-eos", "--device", "cpu")
    rc1, plain, _ = generate(capsys, *args)
    rc2, streamed, _ = generate(capsys, *args, "--stream")
    assert rc1 == rc2 == 0
    assert streamed == plain and plain.strip()


def test_prompt_from_stdin(capsys, monkeypatch, tiny_llama_dir):
    import io

    args = (tiny_llama_dir, "--max-tokens", 6, "--ignore-eos")
    from_flag = generate(capsys, *args, "--prompt", PROMPT)[1]
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    assert generate(capsys, *args)[1] == from_flag


def test_seeded_sampling_is_reproducible(capsys, tiny_llama_dir):
    args = (
        tiny_llama_dir,
        "--prompt",
        PROMPT,
        "--max-tokens",
        6,
        "--ignore-eos",
        "--temperature",
        1.0,
        "--top-p",
        0.95,
        "--device",
        "cpu",
    )
    a = generate(capsys, *args, "--seed", 5)[1]
    b = generate(capsys, *args, "--seed", 5)[1]
    c = generate(capsys, *args, "--seed", 6)[1]
    greedy = generate(capsys, tiny_llama_dir, "--prompt", PROMPT, "--max-tokens", 6, "--ignore-eos")[1]
    assert a == b
    assert a != c and a != greedy  # near-uniform random model: different seeds give different text


def test_stop_string_cuts_output(capsys, tiny_llama_dir, hf_greedy):
    text = hf_greedy[1]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop in text
    rc, out, err = generate(
        capsys,
        tiny_llama_dir,
        "--prompt",
        PROMPT,
        "--max-tokens",
        12,
        "--dtype",
        "float32",
        "--ignore-eos",
        "--stop",
        stop,
        "--stop",
        "\x00unused",
    )
    assert rc == 0
    assert out == text[: text.index(stop)] + "\n"
    assert "(stop)" in err


def test_chat_and_store_name(capsys, tiny_llama_dir):
    rc, out, err = generate(
        capsys,
        tiny_llama_dir.name,
        "--store",
        tiny_llama_dir.parent,
        "--chat",
        "--system",
        "Be brief.",
        "--prompt",
        "hi",
        "--max-tokens",
        4,
        "--ignore-eos",
    )
    from models.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(tiny_llama_dir).apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    )
    assert rc == 0, err
    assert f"prompt {len(ids)} tokens" in err and len(ids) > 10  # the chat template was applied


@pytest.mark.parametrize(
    "extra, msg",
    [
        (("--temperature", "-1"), "temperature must be in [0, 2]"),
        (("--top-p", "0"), "top_p must be in"),
        (("--max-tokens", "0"), "--max-tokens must be >= 1"),
        (("--max-seq", "8", "--max-tokens", "20"), "exceeds the context"),
    ],
)
def test_bad_arguments(capsys, tiny_llama_dir, extra, msg):
    rc, out, err = generate(capsys, tiny_llama_dir, "--prompt", PROMPT, *extra)
    assert rc == 2 and msg in err and out == ""


def test_unknown_model(capsys, tmp_path):
    rc, _, err = generate(capsys, "no-such-model", "--store", tmp_path, "--prompt", "x")
    assert rc == 2 and "no-such-model" in err
