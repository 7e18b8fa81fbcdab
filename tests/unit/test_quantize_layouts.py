"""Checkpoint layouts written by AutoGPTQ (GPTQ v1, with and without act-order) and AutoAWQ (GEMM) load in
transformers + GPTQModel and compute what the layout means.

Each test packs a tiny random Llama by hand, exactly as those tools lay tensors out, and checks that the
loaded model's logits match a dense model holding the same dequantized weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
G = 32


def rtn_groups(w: torch.Tensor, g_idx: torch.Tensor, n_groups: int, sym: bool):
    """Per-group 4-bit RTN of w (out, in) with groups given per input channel -> q (out,in), zeros, scales (groups,out)."""
    w = w.float()
    scales = torch.empty(n_groups, w.shape[0])
    zeros = torch.empty(n_groups, w.shape[0], dtype=torch.int64)
    for g in range(n_groups):
        cols = w[:, g_idx == g]
        if sym:
            s = cols.abs().amax(dim=1).clamp_min(1e-8) / 7.0
            z = torch.full_like(s, 8, dtype=torch.int64)
        else:
            lo, hi = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
            s = ((hi - lo) / 15.0).clamp_min(1e-8)
            z = torch.round(-lo / s).to(torch.int64).clamp(1, 15)  # v1 stores z-1: keep z >= 1
        scales[g], zeros[g] = s, z
    s_full = scales.half().float()[g_idx].t()  # (out, in)
    z_full = zeros[g_idx].t()
    q = torch.clamp(torch.round(w / s_full) + z_full, 0, 15).to(torch.int64)
    return q, zeros, scales.half()


def dequant(q, zeros, scales, g_idx):
    return (q - zeros[g_idx].t()).float() * scales.float()[g_idx].t()


def pack_rows(vals: torch.Tensor) -> torch.Tensor:
    """(R, C) 4-bit values -> (R/8, C) int32, value r=8i+k in bits 4k (GPTQ qweight)."""
    r, c = vals.shape
    v = vals.view(r // 8, 8, c).to(torch.int64)
    out = torch.zeros(r // 8, c, dtype=torch.int64)
    for k in range(8):
        out |= (v[:, k, :] & 0xF) << (4 * k)
    return _to_i32(out)


def pack_cols(vals: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """(R, C) 4-bit values -> (R, C/8) int32, column 8j+order[k] in bits 4k."""
    r, c = vals.shape
    out = torch.zeros(r, c // 8, dtype=torch.int64)
    for k in range(8):
        out |= (vals[:, order[k] :: 8].to(torch.int64) & 0xF) << (4 * k)
    return _to_i32(out)


def _to_i32(x: torch.Tensor) -> torch.Tensor:
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _linears(state):
    return [
        k[: -len(".weight")]
        for k, v in state.items()
        if ".layers." in k and k.endswith("_proj.weight") and v.dim() == 2
    ]


def write_layout(src: Path, out: Path, kind: str, desc_act: bool = False, sym: bool = False, seed: int = 0):
    """Write an AutoGPTQ-v1 (`kind="gptq"`) or AutoAWQ-GEMM (`kind="awq"`) checkpoint of `src`, plus a dense
    reference folder `out.ref` with the dequantized weights."""
    state = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    qstate, ref = {}, dict(state)
    for name in _linears(state):
        w = state[name + ".weight"]
        n_out, n_in = w.shape
        n_groups = n_in // G
        if desc_act:
            perm = torch.randperm(n_in, generator=gen)
            g_idx = torch.empty(n_in, dtype=torch.int64)
            g_idx[perm] = torch.arange(n_in) // G
        else:
            g_idx = torch.arange(n_in) // G
        q, zeros, scales = rtn_groups(w, g_idx, n_groups, sym)
        ref[name + ".weight"] = dequant(q, zeros, scales, g_idx).to(w.dtype)
        if kind == "gptq":
            qstate[name + ".qweight"] = pack_rows(q.t().contiguous())  # (in/8, out)
            qstate[name + ".qzeros"] = pack_cols(zeros - 1)  # (groups, out/8), v1 stores z-1
            qstate[name + ".scales"] = scales  # (groups, out) fp16
            qstate[name + ".g_idx"] = g_idx.to(torch.int32)
        else:
            qstate[name + ".qweight"] = pack_cols(q.t().contiguous(), AWQ_ORDER)  # (in, out/8)
            qstate[name + ".qzeros"] = pack_cols(zeros, AWQ_ORDER)  # (groups, out/8)
            qstate[name + ".scales"] = scales
    for k, v in state.items():
        if not any(k.startswith(n + ".") for n in _linears(state)):
            qstate[k] = v
    cfg = json.loads((src / "config.json").read_text())
    if kind == "gptq":
        cfg["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": G,
            "desc_act": desc_act,
            "sym": sym,
            "checkpoint_format": "gptq",
            "true_sequential": True,
            "damp_percent": 0.01,
            "static_groups": False,
        }
    else:
        cfg["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": G,
            "zero_point": True,
            "version": "gemm",
        }
    for d, tensors, c in ((out, qstate, cfg), (Path(str(out) + ".ref"), ref, None)):
        d.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"}
        )
        for f in src.iterdir():
            if f.name not in ("model.safetensors", "config.json"):
                shutil.copy2(f, d / f.name)
        (d / "config.json").write_text(
            json.dumps(c if c is not None else json.loads((src / "config.json").read_text()))
        )
    return out, Path(str(out) + ".ref")


def _logits(d: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16, device_map="cpu")
    with torch.inference_mode():
        return m(ids[None]).logits[0].float()


@pytest.fixture(scope="module")
def src128(tmp_path_factory, tiny_tokenizer_dir, tiny_llama_writer):
    return tiny_llama_writer(
        tmp_path_factory.mktemp("src128") / "m",
        tiny_tokenizer_dir,
        hidden_size=128,
        head_dim=32,
        intermediate_size=256,
        seed=3,
    )


def test_pack_helpers_roundtrip():
    v = torch.randint(0, 16, (16, 24))
    p = pack_rows(v).to(torch.int64) & 0xFFFFFFFF
    back = torch.stack([(p >> (4 * k)) & 0xF for k in range(8)], 1).reshape(16, 24)
    assert torch.equal(back, v)
    p = pack_cols(v, AWQ_ORDER).to(torch.int64) & 0xFFFFFFFF
    assert int(p[0, 0] & 0xF) == int(v[0, 0]) and int((p[0, 0] >> 4) & 0xF) == int(v[0, 2])


@pytest.mark.parametrize(
    "desc_act,sym",
    [(False, False), (True, True), (True, False)],
    ids=["gptq-v1-asym", "gptq-v1-act-order-sym", "gptq-v1-act-order-asym"],
)
def test_autogptq_v1_layout_loads(src128, tmp_path, desc_act, sym):
    q, ref = write_layout(src128, tmp_path / "q", "gptq", desc_act=desc_act, sym=sym)
    ids = torch.arange(5, 69)
    want, got = _logits(ref, ids), _logits(q, ids)
    err = float((got - want).norm() / want.norm())
    assert err < 0.02, f"GPTQ v1 layout (desc_act={desc_act}, sym={sym}) mismatch: rel err {err:.4f}"


def test_autoawq_gemm_layout_loads(src128, tmp_path):
    q, ref = write_layout(src128, tmp_path / "q", "awq")
    ids = torch.arange(5, 69)
    want, got = _logits(ref, ids), _logits(q, ids)
    err = float((got - want).norm() / want.norm())
    assert err < 0.02, f"AWQ GEMM layout mismatch: rel err {err:.4f}"


def test_gptqmodel_writes_gptq_v1(tiny_llama_dir, tmp_path):
    """What GPTQModel writes is the GPTQ v1 layout (checkpoint_format 'gptq', int32 qweight (in/8, out))."""
    from models.quantize.api import QuantSpec, quantize

    out = tmp_path / "rtn"
    quantize(str(tiny_llama_dir), str(out), QuantSpec(method="rtn", group_size=32))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq"
    st = load_file(str(out / "model.safetensors"))
    qw = st["model.layers.0.self_attn.q_proj.qweight"]
    assert qw.dtype == torch.int32 and tuple(qw.shape) == (64 // 8, 64)
    assert tuple(st["model.layers.0.self_attn.q_proj.qzeros"].shape) == (64 // 32, 64 // 8)
    assert tuple(st["model.layers.0.self_attn.q_proj.g_idx"].shape) == (64,)
