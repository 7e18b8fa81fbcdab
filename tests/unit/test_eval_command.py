"""`jetserve eval` on tiny models: tables, JSON and PNG; both runtimes; bad input refused."""

from __future__ import annotations

import json

import pytest

from server.cli import main

SMALL = [
    "--ppl-tokens",
    "1024",
    "--max-length",
    "256",
    "--stride",
    "128",
    "--max-new-tokens",
    "8",
    "--runs",
    "2",
    "--ttft-tokens",
    "64",
    "--prompt-tokens",
    "8",
    "--text",
    "tiny",
]


@pytest.fixture(scope="module")
def tiny_rtn(tiny_llama_dir, tmp_path_factory):
    from models.quantize.api import QuantSpec, quantize

    out = tmp_path_factory.mktemp("rtn") / "tiny-rtn-g32"
    quantize(str(tiny_llama_dir), str(out), QuantSpec(method="rtn", group_size=32))
    return out


def test_eval_transformers_two_models(tiny_llama_dir, tiny_rtn, tmp_path, capsys):
    rc = main(["eval", str(tiny_llama_dir), str(tiny_rtn), *SMALL, "--out", str(tmp_path), "--name", "t"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "protocol: text=tiny" in out.err and "max_length=256" in out.err and "stride=128" in out.err
    res = json.loads((tmp_path / "t.json").read_text())
    assert [m["name"] for m in res["models"]] == [tiny_llama_dir.name, tiny_rtn.name]
    bf, q = res["models"]
    assert bf["quant"]["method"] == "none" and q["quant"]["method"] == "gptq" and q["quant"]["group_size"] == 32
    for m in (bf, q):
        assert m["ppl_scored_tokens"] == 1023 and m["ppl"] > 1
        assert m["decode_tok_s_min"] <= m["decode_tok_s_median"] <= m["decode_tok_s_max"]
        assert m["ttft_ms_median"] > 0 and m["ttft_prompt_tokens"] == 64 and m["runs"] == 2
        assert m["weights_bytes"] > 0 and m["peak_memory_bytes"] >= m["rss_before_load_bytes"] > 0
        assert m["weights_on_disk"] > 0
    # Random weights: 4-bit RTN moves perplexity, but the two are the same model.
    assert bf["ppl"] != q["ppl"] and abs(q["ppl"] / bf["ppl"] - 1) < 0.2
    md = (tmp_path / "t.md").read_text()
    assert md.count("| model |") == 3 and "**Perplexity**" in md and "**Speed**" in md and "**Memory**" in md
    assert "GPTQ 4-bit g32 asym" in md and md in out.out
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_jetserve_runtime(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("models.loader")
    rc = main(["eval", str(tiny_llama_dir), *SMALL, "--runtime", "jetserve", "--out", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["protocol"]["runtime"] == "jetserve"
    m = res["models"][0]
    assert m["ppl"] > 1 and m["decode_tok_s_median"] > 0


def test_runtimes_agree_on_perplexity(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("models.loader")
    ppl = {}
    for rt in ("transformers", "jetserve"):
        assert (
            main(["eval", str(tiny_llama_dir), *SMALL, "--skip-speed", "--runtime", rt, "--out", str(tmp_path / rt)])
            == 0
        )
        ppl[rt] = json.loads((tmp_path / rt / "eval.json").read_text())["models"][0]["ppl"]
    capsys.readouterr()
    assert ppl["jetserve"] == pytest.approx(ppl["transformers"], rel=0.02)


def test_cpu_fused_option_reaches_the_runtime(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """`--cpu-fused` reaches load_runner and the model (fused: the C++ kernels; torch: torch's ops); the two
    perplexities agree."""
    pytest.importorskip("models.loader")
    import models.loader
    from models import w4a8

    if w4a8.load()[0] is None:
        pytest.skip(f"extension unavailable: {w4a8.load()[1]}")
    loaded = []
    real = models.loader.load_runner

    def spy(*a, **kw):
        r = real(*a, **kw)
        loaded.append((kw.get("cpu_fused"), r.model.fused_ops is not None))
        return r

    monkeypatch.setattr(models.loader, "load_runner", spy)
    ppl = {}
    for choice in ("torch", "fused"):
        argv = ["eval", str(tiny_llama_dir), *SMALL, "--skip-speed", "--runtime", "jetserve", "--cpu-fused", choice]
        assert main([*argv, "--out", str(tmp_path / choice)]) == 0, capsys.readouterr().err
        ppl[choice] = json.loads((tmp_path / choice / "eval.json").read_text())["models"][0]["ppl"]
    capsys.readouterr()
    assert loaded == [("torch", False), ("fused", True)]
    assert ppl["fused"] == pytest.approx(ppl["torch"], rel=0.01)


def test_kv_cache_dtype_option_reaches_the_runtime(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """`--kv-cache-dtype int8` reaches load_runner (an int8 cache) and moves perplexity only a little; with the
    transformers runtime it is an error."""
    pytest.importorskip("models.loader")
    import models.loader

    loaded = []
    real = models.loader.load_runner

    def spy(*a, **kw):
        r = real(*a, **kw)
        loaded.append((kw.get("kv_cache_dtype"), str(r.cache.k_all.dtype)))
        return r

    monkeypatch.setattr(models.loader, "load_runner", spy)
    ppl = {}
    for choice in ("auto", "int8"):
        argv = [
            "eval",
            str(tiny_llama_dir),
            *SMALL,
            "--skip-speed",
            "--runtime",
            "jetserve",
            "--kv-cache-dtype",
            choice,
        ]
        assert main([*argv, "--out", str(tmp_path / choice)]) == 0, capsys.readouterr().err
        ppl[choice] = json.loads((tmp_path / choice / "eval.json").read_text())["models"][0]["ppl"]
    assert loaded == [("auto", "torch.bfloat16"), ("int8", "torch.int8")]
    assert ppl["int8"] == pytest.approx(ppl["auto"], rel=0.01)
    argv = [
        "eval",
        str(tiny_llama_dir),
        *SMALL,
        "--skip-speed",
        "--runtime",
        "transformers",
        "--kv-cache-dtype",
        "int8",
    ]
    assert main([*argv, "--out", str(tmp_path / "hf")]) == 2
    assert "needs --runtime jetserve" in capsys.readouterr().err


def test_eval_bad_inputs(tiny_llama_dir, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "neither a folder with config.json" in capsys.readouterr().err
    assert main(["eval", str(tiny_llama_dir), "--stride", "600", "--max-length", "512", "--out", str(tmp_path)]) == 2
    assert "--stride must be <= --max-length" in capsys.readouterr().err
    assert main(["eval", str(tiny_llama_dir), "--cpu-fused", "torch", "--out", str(tmp_path)]) == 2
    assert "--cpu-fused torch needs --runtime jetserve" in capsys.readouterr().err
    assert (
        main(["eval", str(tiny_llama_dir), "--text", "tiny", "--ppl-tokens", "100000000", "--out", str(tmp_path)]) == 2
    )
    assert "fewer than the 100000000 this protocol needs" in capsys.readouterr().err
