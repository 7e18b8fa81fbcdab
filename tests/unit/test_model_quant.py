"""Quantized parity: tiny random Llama / Qwen2 / OPT checkpoints in GPTQ (sym, asym, act-order) and AWQ (with and
without zero point) format, run by our runtime and by transformers + GPTQModel on the same files.

The checkpoints are written here with round-to-nearest codes packed by models.formats (pack_gptq / pack_awq), so
the test exercises the real on-disk layouts without running a calibration. Greedy decoding is compared with
teacher forcing: at every step our argmax must equal transformers' wherever transformers' top-2 margin exceeds
the bf16 noise. The prompt is chosen by the references alone so that half of the steps or more have margins above
twice the logit tolerance: the greedy check then never depends on one CPU's rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import kernels
from models.formats import QuantizedWeight, pack_awq, pack_gptq
from models.loader import inspect_checkpoint, load_runner, predict_footprint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LINEAR_SUFFIXES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "out_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "fc1",
    "fc2",
)


def rtn(w: torch.Tensor, group_size: int, sym: bool, act_order: bool, gen: torch.Generator) -> QuantizedWeight:
    """Round-to-nearest 4-bit codes of w (out, in); act_order scatters each group over random input columns."""
    out_f, in_f = w.shape
    w = w.float()
    if act_order:
        perm = torch.randperm(in_f, generator=gen)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // group_size).int()
    else:
        g_idx = (torch.arange(in_f) // group_size).int()
    groups = in_f // group_size
    scales = torch.empty(groups, out_f)
    zeros = torch.empty(groups, out_f, dtype=torch.uint8)
    q = torch.empty(out_f, in_f, dtype=torch.uint8)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols]
        if sym:
            s = (wg.abs().amax(1) * 2 / 15).clamp_min(1e-8)
            z = torch.full((out_f,), 8.0)
        else:
            lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
            s = ((hi - lo) / 15).clamp_min(1e-8)
            z = torch.round(-lo / s).clamp(0, 15)
        s = s.half().float()
        q[:, cols] = torch.clamp(torch.round(wg / s[:, None]) + z[:, None], 0, 15).to(torch.uint8)
        scales[g] = s
        zeros[g] = z.to(torch.uint8)
    return QuantizedWeight(q, zeros, scales.half(), g_idx if act_order else None, 4, group_size)


def write_rtn_checkpoint(
    src: Path,
    dst: Path,
    method: str,
    group_size: int = 32,
    sym: bool = True,
    act_order: bool = False,
    zero_point: bool = True,
    seed: int = 0,
) -> Path:
    """Copy HF folder `src` to `dst` with every block linear stored as GPTQ v1 or AWQ GEMM tensors."""
    dst.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        sd.update(load_file(f))
    out = {}
    for name, t in sd.items():
        mod, leaf = name.rsplit(".", 1)
        is_linear = mod.rsplit(".", 1)[-1] in LINEAR_SUFFIXES
        if is_linear and leaf == "weight":
            qw = rtn(t, group_size, sym if method == "gptq" else not zero_point, act_order, gen)
            packed = pack_gptq(qw) if method == "gptq" else pack_awq(qw)
            out.update({f"{mod}.{k}": v.contiguous() for k, v in packed.items()})
        elif is_linear and leaf == "bias":
            out[name] = t.half()
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(src) / "config.json").read_text())
    if method == "gptq":
        cfg["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "sym": sym,
            "desc_act": act_order,
            "checkpoint_format": "gptq",
        }
    else:
        cfg["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": zero_point,
            "version": "gemm",
        }
    cfg["dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    for p in Path(src).iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name != "config.json":
            shutil.copy2(p, dst / p.name)
    return dst


VARIANTS = {
    "gptq_sym": dict(method="gptq", sym=True),
    "gptq_asym": dict(method="gptq", sym=False),
    "gptq_act_order": dict(method="gptq", sym=False, act_order=True),
    "awq_zp": dict(method="awq", zero_point=True),
    "awq_no_zp": dict(method="awq", zero_point=False),
}
CASES = [("llama", v) for v in VARIANTS] + [
    ("qwen2", "gptq_act_order"),
    ("qwen2", "awq_zp"),
    ("opt", "gptq_asym"),
    ("opt", "awq_no_zp"),
]


def _tiny(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed({"llama": 0, "qwen2": 1, "opt": 2}[arch])
    common = dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, max_position_embeddings=256
    )
    if arch == "opt":
        m = OPTForCausalLM(OPTConfig(**common, ffn_dim=256, word_embed_proj_dim=128, init_std=0.1))
    elif arch == "qwen2":
        m = Qwen2ForCausalLM(
            Qwen2Config(
                **common, intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.1
            )
        )
    else:
        m = LlamaForCausalLM(
            LlamaConfig(
                **common, intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.1
            )
        )
    return m.to(torch.float16)


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-quant")
    out = {}
    for arch in ("llama", "qwen2", "opt"):
        src = root / arch
        _tiny(arch).save_pretrained(src, safe_serialization=True)
        for variant in {v for a, v in CASES if a == arch}:
            out[(arch, variant)] = write_rtn_checkpoint(
                src, root / f"{arch}-{variant}", group_size=32, **VARIANTS[variant]
            )
    return out


def _prompt_with_clear_margins(hf32, hf16, new_tokens: int = 10, tries: int = 32, tol_scale: float = 1.0):
    """The first of a fixed series of random prompts whose greedy continuation, by the references alone, has a
    top-2 margin above twice the logit tolerance at half of its steps or more, so the greedy comparison never
    hinges on one CPU's rounding. The tolerance is 2% of the logit range + 0.01, or 1.5x transformers' own bf16
    error against its float32 logits where bf16 alone is noisier than that (random tiny models are close), times
    `tol_scale`. Returns (prompt, reference ids, float32 teacher-forced logits, tolerance)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(tries):
        prompt = torch.randint(0, hf32.config.vocab_size, (8,), generator=gen)
        with torch.no_grad():
            ids = hf32.generate(prompt[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)[0]
            logits = hf32(ids[None]).logits[0].float()  # (len, vocab)
            bf16_err = (hf16(ids[None]).logits[0].float() - logits).abs().max().item()
        tol = max(0.02 * logits.abs().max().item() + 0.01, 1.5 * bf16_err) * tol_scale
        top2 = logits[len(prompt) - 1 : -1].topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol + 1e-3
        if int(clear.sum()) >= len(top2) // 2:
            return prompt, ids, logits, tol
    raise AssertionError(f"no prompt among {tries} has clear greedy margins: the tiny model is too flat")


# W4A8 rounds activations to int8 per block of 8 (up to ~0.2% of a block's max per input): twice the tolerance
ACT_TOLERANCE = {"int4pack": 1.0, "w4a8": 2.0}


@pytest.mark.parametrize("cpu_int4", ["int4pack", "w4a8"])
@pytest.mark.parametrize("arch,variant", CASES)
def test_quantized_greedy_and_logits_match_gptqmodel(quant_dirs, arch, variant, cpu_int4):
    from transformers import AutoModelForCausalLM

    path = quant_dirs[(arch, variant)]
    # float32 is the exact reference of the checkpoint; its bf16 path measures what bf16 rounding alone costs
    hf = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.float32).eval()
    hf16 = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.bfloat16).eval()
    runner = load_runner(path, dtype=torch.bfloat16, max_batch_size=2, max_seq=64, cpu_int4=cpu_int4)
    assert type(runner).__name__ == "Runner"
    assert all(type(m).__name__ in ("QuantLinear", "Concat") for m in runner.model.linear_modules())
    want = {"int4pack": kernels.CPU_INT4PACK, "w4a8": kernels.CPU_W4A8}[cpu_int4]
    assert {m.plan.name for m in runner.model.linear_modules() if hasattr(m, "plan")} == {want}
    prompt, ref_ids, ref_logits, tol = _prompt_with_clear_margins(hf, hf16, tol_scale=ACT_TOLERANCE[cpu_int4])
    got = [runner.prefill(prompt, 1, 0)]
    for i in range(len(prompt), len(ref_ids) - 1):
        got.append(runner.decode(ref_ids[i : i + 1], torch.tensor([i]), torch.tensor([1]))[0])
    got = torch.stack(got)  # predictions after each prefix, like ref_logits[len(prompt)-1:-1]
    ref = ref_logits[len(prompt) - 1 : -1]
    err = (got - ref).abs().max().item()
    assert err < tol, f"max |logit diff| {err} (tolerance {tol})"
    top2 = ref.topk(2, -1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * err + 1e-3
    assert int(decisive.sum()) >= len(ref) // 2, "too few decisive steps to compare greedy tokens"
    assert torch.equal(got.argmax(-1)[decisive], ref.argmax(-1)[decisive])


def test_quantized_footprint_prediction_matches_loaded(quant_dirs):
    path = quant_dirs[("llama", "gptq_act_order")]
    info = inspect_checkpoint(path)
    assert info.qcfg.method == "gptq" and info.qcfg.desc_act
    runner = load_runner(path, dtype=torch.bfloat16, max_batch_size=2, max_seq=64)
    rep = runner.memory_report()
    fp = predict_footprint(info, max_batch_size=2, max_seq=64, dtype=torch.bfloat16)
    assert fp.kv_cache_bytes == rep["kv_cache_bytes"]
    assert abs(fp.weights_bytes - rep["weights_bytes"]) <= 0.1 * rep["weights_bytes"], (
        fp.weights_bytes,
        rep["weights_bytes"],
    )


def test_unsupported_quant_format_fails_loudly(quant_dirs, tmp_path):
    from models.formats import UnsupportedFormatError

    src = quant_dirs[("llama", "gptq_sym")]
    bad = tmp_path / "exl2"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "exl2", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedFormatError, match="exl2|EXL2"):
        load_runner(bad, max_batch_size=1, max_seq=32)


def test_footprint_counts_the_dense_prefill_weight(quant_dirs, monkeypatch):
    """Where the plan prefills dense (CPUs with AMX or AVX512-BF16, CUDA), the workspace holds the largest layer's
    bf16 weight (fused gate+up here) once the prefill chunk reaches dense_min_tokens; W4A8 elsewhere needs none."""
    from models.loader import dense_prefill_bytes

    info = inspect_checkpoint(quant_dirs[("llama", "gptq_act_order")])
    chunk = kernels.CPU_DENSE_MIN_TOKENS
    monkeypatch.setattr(kernels, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(kernels, "cpu_has_avx512_bf16", lambda: False)
    plan = kernels.device_kernel(torch.device("cpu"))
    if plan.name != kernels.CPU_W4A8:
        pytest.skip(f"the CPU plan here is {plan.name}")
    assert plan.dense_min_tokens is None and dense_prefill_bytes(info, prefill_chunk=chunk) == 0
    without = predict_footprint(info, max_batch_size=2, max_seq=64, prefill_chunk=chunk)
    monkeypatch.setattr(kernels, "cpu_has_amx", lambda: True)
    gate_up = 2 * info.intermediate * info.hidden * 2  # bf16
    assert dense_prefill_bytes(info, prefill_chunk=chunk) == gate_up
    assert dense_prefill_bytes(info, prefill_chunk=chunk - 1) == 0  # the chunk never reaches the dense path
    with_amx = predict_footprint(info, max_batch_size=2, max_seq=64, prefill_chunk=chunk)
    assert with_amx.workspace_bytes - without.workspace_bytes == gate_up
    monkeypatch.setattr(kernels, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(kernels, "cpu_has_avx512_bf16", lambda: True)  # dense from a larger chunk
    assert dense_prefill_bytes(info, prefill_chunk=kernels.CPU_BF16_DENSE_MIN_TOKENS) == gate_up
    assert dense_prefill_bytes(info, prefill_chunk=kernels.CPU_BF16_DENSE_MIN_TOKENS - 1) == 0
