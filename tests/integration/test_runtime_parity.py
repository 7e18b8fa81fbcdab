"""Real SmolLM2-135M checkpoints through our fused runtime vs transformers on the same files:
bf16 dense, GPTQ g64 and AWQ g64 (transformers + GPTQModel). Greedy tokens (teacher-forced, decisive steps),
logits, and perplexity on a short real text (1024 tokens of the wiki calibration text shipped with exllamav2;
short to keep the suite fast) within 0.5%, for quantized models with both CPU int4 kernels (the default W4A8,
whose int8 activations cost +0.34% here, and torch's int4pack). Quantized references run transformers +
GPTQModel in float32."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

N_TOKENS = 1024


def _wiki_text() -> str:
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("exllamav2 calibration text not installed")
    path = Path(spec.submodule_search_locations[0]) / "conversion" / "standard_cal_data" / "wiki.utf8"
    return path.read_text(encoding="utf-8")[:20000]


def _model_dir(model_store: Path, name: str) -> Path:
    d = model_store / name
    if not (d / "config.json").is_file():
        pytest.skip(f"{d} missing: run `jetserve demo prepare` (make test does)")
    return d


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:])
    return float(torch.exp(nll))


@pytest.mark.parametrize(
    "name",
    [
        "smollm2-135m-instruct",
        "smollm2-135m-instruct-gptq-g64",
        "smollm2-135m-instruct-awq-g64",
        "smollm2-135m-instruct-awq-g64-l2",
    ],
)
def test_smollm2_runtime_matches_transformers(model_store, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.loader import load_runner

    path = _model_dir(model_store, name)
    quant = "-g64" in name
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = torch.tensor(tok(_wiki_text())["input_ids"][:N_TOKENS])
    # quantized checkpoints: transformers + GPTQModel in float32 is the exact reference of the checkpoint (its bf16
    # path rounds differently from ours: on the GPTQ demo model ours is -0.42% and its own bf16 +0.29% from fp32)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path), **({"device_map": "cpu", "dtype": torch.float32} if quant else {"dtype": torch.bfloat16})
    )
    hf.eval()
    with torch.inference_mode():
        ref_logits = hf(ids[None]).logits[0].float()
    ppl_ref = _ppl(ref_logits, ids)
    if quant:  # the exact kernel too (the default is checked below)
        exact = load_runner(path, dtype=torch.bfloat16, max_batch_size=1, max_seq=N_TOKENS, cpu_int4="int4pack")
        ppl_exact = _ppl(exact.prefill_logits(ids, 0, 0), ids)
        del exact
        assert abs(ppl_exact / ppl_ref - 1) < 0.005, ("int4pack", ppl_exact, ppl_ref)
    runner = load_runner(path, dtype=torch.bfloat16, max_batch_size=2, max_seq=N_TOKENS)
    if quant:
        assert all(type(m).__name__ == "QuantLinear" for m in runner.model.linear_modules())
    ppl_ours = _ppl(runner.prefill_logits(ids, 0, 0), ids)
    assert abs(ppl_ours / ppl_ref - 1) < 0.005, (ppl_ours, ppl_ref)

    # greedy continuation: transformers generates, our runtime decodes the same tokens step by step
    prompt = ids[:48]
    with torch.inference_mode():
        gen = hf.generate(prompt[None], max_new_tokens=24, min_new_tokens=24, do_sample=False)[0]
        ref = hf(gen[None]).logits[0, len(prompt) - 1 : -1].float()
    got = [runner.prefill(prompt, 1, 0)]
    for i in range(len(prompt), len(gen) - 1):
        got.append(runner.decode(gen[i : i + 1], torch.tensor([i]), torch.tensor([1]))[0])
    got = torch.stack(got)
    err = (got - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    assert rel < 0.06, f"max logit diff {rel:.3f} of the logit range"
    # steps where transformers' top-2 margin exceeds our worst logit error must pick the same token
    top2 = ref.topk(2, -1).values
    decisive = (top2[:, 0] - top2[:, 1]) > max(1.0, err)
    assert int(decisive.sum()) >= 3, f"only {int(decisive.sum())} decisive steps (max err {err:.3f})"
    assert torch.equal(got.argmax(-1)[decisive], ref.argmax(-1)[decisive])


def test_compiled_decode_matches_eager_on_the_gptq_demo(model_store, tmp_path):
    """The default compiled decode (models.compile) against eager decode on the real GPTQ g64 model: the same
    teacher-forced tokens into two slots, one step compiled and one eager each time; logits within bf16 noise and
    the same greedy token wherever eager's top-2 margin is decisive. Each step reads the same history (eager's rows,
    copied into the compiled slot), so the bound is on one step's difference, not on two caches drifting apart:
    the int8 rounding of W4A8's activations turns float noise into whole quanta, which compound over steps (up to
    2.5% of the logits' span in one step on an AMD EPYC, 3.1% with the caches apart; decoding at a position 3 off
    moved them by 24%)."""
    from models.compile import compile_unavailable
    from models.loader import load_runner

    if compile_unavailable(torch.device("cpu")):
        pytest.skip(compile_unavailable(torch.device("cpu")))
    r = load_runner(
        _model_dir(model_store, "smollm2-135m-instruct-gptq-g64"),
        max_batch_size=2,
        max_seq=256,
        compile_cache_dir=tmp_path,
    )
    r.warmup()
    assert r.compiled, r.compile_note
    fn = r.model.compiled_decode
    from models.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(model_store / "smollm2-135m-instruct-gptq-g64").encode(_wiki_text()[:2000])[:80]
    prompt, forced = torch.tensor(ids[:48]), ids[48:80]
    for slot in (0, 1):
        r.prefill(prompt, slot, 0)
    decisive = 0
    for i, tok in enumerate(forced):
        pos = torch.tensor([48 + i])
        r.model.compiled_decode = fn
        lc = r.decode(torch.tensor([tok]), pos, torch.tensor([0]))[0]
        r.model.compiled_decode = None
        le = r.decode(torch.tensor([tok]), pos, torch.tensor([1]))[0]
        r.model.compiled_decode = fn
        r.copy_kv(1, 0, 49 + i)
        span = float(le.max() - le.min())
        assert float((lc - le).abs().max()) <= 0.05 * span, f"step {i}"
        top2 = le.topk(2).values
        if float(top2[0] - top2[1]) > 0.05 * span:
            decisive += 1
            assert int(lc.argmax()) == int(le.argmax()), f"step {i}"
    assert decisive >= 8
