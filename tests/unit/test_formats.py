"""models/formats.py: config reading, GPTQ/AWQ pack/unpack, reference dequant, parity with GPTQModel's code."""

from __future__ import annotations

import json

import pytest
import torch

from models.formats import (
    QuantizedWeight,
    UnsupportedFormatError,
    act_order_perm,
    dequantize,
    int4_codes_grouped,
    int4pack_scales_and_zeros,
    linear_tensor_names,
    pack_awq,
    pack_gptq,
    read_quant_config,
    unpack_awq,
    unpack_gptq,
)
from models import kernels


def random_qw(
    out_f: int,
    in_f: int,
    bits: int,
    group_size: int,
    *,
    act_order: bool = False,
    sym: bool = False,
    gen: torch.Generator,
) -> QuantizedWeight:
    """Random codes/zeros/scales in the canonical form; act_order shuffles the group of each input column."""
    maxq = (1 << bits) - 1
    groups = in_f // group_size
    q = torch.randint(0, maxq + 1, (out_f, in_f), generator=gen).to(torch.uint8)
    if sym:
        zeros = torch.full((groups, out_f), 1 << (bits - 1), dtype=torch.uint8)
    else:  # includes 0 and maxq, the values that borrow/overflow in v1 storage
        zeros = torch.randint(0, maxq + 1, (groups, out_f), generator=gen).to(torch.uint8)
        zeros[0, :4] = torch.tensor([0, maxq, 0, 0], dtype=torch.uint8)
    scales = (torch.rand(groups, out_f, generator=gen) * 0.02 + 0.001).to(torch.float16)
    g_idx = None
    if act_order:
        g_idx = (torch.arange(in_f) // group_size)[torch.randperm(in_f, generator=gen)].to(torch.int32)
    return QuantizedWeight(q, zeros, scales, g_idx, bits, group_size)


def assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.scales, b.scales)
    assert (a.g_idx is None) == (b.g_idx is None)
    if a.g_idx is not None:
        assert torch.equal(a.g_idx, b.g_idx)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


# ----------------------------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym,act_order", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("ckpt", ["gptq", "gptq_v2"])
def test_gptq_pack_unpack_roundtrip(bits, sym, act_order, ckpt, gen):
    qw = random_qw(96, 128, bits, 32, act_order=act_order, sym=sym, gen=gen)
    t = pack_gptq(qw, checkpoint_format=ckpt)
    assert t["qweight"].shape == (128 * bits // 32, 96) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (4, 96 * bits // 32)
    back = unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, group_size=32, checkpoint_format=ckpt)
    assert_same(qw, back)
    assert (back.g_idx is not None) == act_order  # sequential g_idx is recognised and dropped


def test_gptq_v1_stores_zero_minus_one(gen):
    qw = random_qw(8, 32, 4, 32, gen=gen)
    qw.zeros[:] = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12], dtype=torch.uint8)
    v1 = pack_gptq(qw, checkpoint_format="gptq")["qzeros"]
    v2 = pack_gptq(qw, checkpoint_format="gptq_v2")["qzeros"]
    assert int(v2[0, 0]) & 0xF == 5 and int(v1[0, 0]) & 0xF == 4
    assert (int(v2[0, 0]) - int(v1[0, 0])) == 0x11111111


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dequant_matches_gptqmodel(bits, act_order, gen):
    """Our v1 tensors, loaded into GPTQModel's TorchLinear (with its own v1->v2 conversion), dequantize alike."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    qw = random_qw(64, 128, bits, 32, act_order=act_order, gen=gen)
    t = pack_gptq(qw)
    layer = TorchLinear(
        bits=bits,
        group_size=32,
        sym=False,
        desc_act=act_order,
        in_features=128,
        out_features=64,
        pack_dtype=torch.int32,
        bias=False,
    )
    for k, v in t.items():
        getattr(layer, k).copy_(v)
    convert_gptq_v1_to_v2_format_module(layer, bits=bits, pack_dtype=torch.int32)
    layer.post_init()
    layer.eval()
    theirs = layer.dequantize_weight().float().t()  # (in, out) -> (out, in)
    ours = dequantize(qw)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5)


def test_gptq_three_bit_crosses_words(gen):
    """3-bit: 32 codes per 3 words; code 10 spans word 0 bits 30-31 and word 1 bit 0."""
    qw = random_qw(32, 32, 3, 32, gen=gen)
    qw.qweight[:] = 0
    qw.qweight[0, 10] = 0b111
    words = pack_gptq(qw)["qweight"][:, 0]
    assert [int(w) & 0xFFFFFFFF for w in words] == [0b11 << 30, 0b1, 0]


# ----------------------------------------------------------------------------------------------- AWQ
@pytest.mark.parametrize("bits", [4, 8, 3, 2])
@pytest.mark.parametrize("zero_point", [True, False])
def test_awq_pack_unpack_roundtrip(bits, zero_point, gen):
    qw = random_qw(128, 64, bits, 32, sym=not zero_point, gen=gen)
    t = pack_awq(qw)
    assert t["qweight"].shape == (64, 128 * bits // 32)
    back = unpack_awq(t["qweight"], t["qzeros"] if zero_point else None, t["scales"], bits, group_size=32)
    assert_same(qw, back)


@pytest.mark.parametrize("bits", [4, 8, 3])
def test_awq_matches_gptqmodel_packing(bits, gen):
    """Same words as GPTQModel's pack_awq (incl. the 4-bit interleave) and same dequant as its dequantize_gemm."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from gptqmodel.quantization.awq.utils.packing_utils import pack_awq as their_pack

    qw = random_qw(64, 96, bits, 32, gen=gen)
    t = pack_awq(qw)
    qweight, qzeros = their_pack(qw.qweight.t().to(torch.int32).contiguous(), qw.zeros.to(torch.int32), bits)
    assert torch.equal(t["qweight"], qweight) and torch.equal(t["qzeros"], qzeros)
    theirs = dequantize_gemm(qweight, qzeros, qw.scales.float(), bits, 32).t()
    torch.testing.assert_close(dequantize(qw), theirs.float(), rtol=0, atol=0)


def test_awq_interleave_order():
    """Word position j of a 4-bit AWQ word holds logical column [0, 2, 4, 6, 1, 3, 5, 7][j]."""
    qw = QuantizedWeight(
        torch.arange(8, dtype=torch.uint8).repeat(32, 1).t().contiguous(),
        torch.zeros(1, 8, dtype=torch.uint8),
        torch.ones(1, 8),
        None,
        4,
        32,
    )
    word = int(pack_awq(qw)["qweight"][0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


# ----------------------------------------------------------------------------------------------- dequant / int4pack
def test_dequantize_formula(gen):
    qw = random_qw(16, 64, 4, 32, act_order=True, gen=gen)
    w = dequantize(qw)
    o, i = 3, 17
    g = int(qw.g_idx[i])
    assert w[o, i] == pytest.approx(float(qw.scales[g, o]) * (int(qw.qweight[o, i]) - int(qw.zeros[g, o])))


@pytest.mark.parametrize("act_order", [False, True])
def test_int4pack_cpu_repack_exact(act_order, gen):
    """The CPU int4 layout holds exactly our codes, in group-contiguous (permuted) input order."""
    qw = random_qw(192, 576, 4, 64, act_order=act_order, gen=gen)
    q, perm = int4_codes_grouped(qw)
    sz = int4pack_scales_and_zeros(qw)
    packed = kernels.pack_int4(kernels.CPU_INT4PACK, q, "cpu")
    codes = kernels.int4pack_codes(kernels.CPU_INT4PACK, packed, 576)
    expect = qw.qweight if perm is None else qw.qweight[:, perm]
    assert torch.equal(codes, expect)
    assert (perm is None) != act_order
    if act_order:  # permuted g_idx is sorted: groups contiguous
        assert bool((qw.g_idx[perm][1:] >= qw.g_idx[perm][:-1]).all())
    # zero = (8 - z) * scale, tinygemm w = (q - 8) * s + zero == s * (q - z)
    assert torch.allclose(sz[..., 1].float(), ((8 - qw.zeros.float()) * qw.scales.float()).bfloat16().float())


def test_act_order_perm_rejects_uneven_groups(gen):
    qw = random_qw(8, 64, 4, 32, act_order=True, gen=gen)
    qw.g_idx[:] = 0
    qw.g_idx[-1] = 1
    with pytest.raises(UnsupportedFormatError, match="group"):
        act_order_perm(qw)


# ----------------------------------------------------------------------------------------------- config
GPTQMODEL_V1 = {
    "bits": 4,
    "checkpoint_format": "gptq",
    "desc_act": True,
    "format": "gptq",
    "group_size": 32,
    "lm_head": False,
    "method": "gptq",
    "pack_dtype": "int32",
    "quant_method": "gptq",
    "sym": False,
}
GPTQMODEL_AWQ = {
    "bits": 4,
    "checkpoint_format": "gemm",
    "desc_act": False,
    "format": "gemm",
    "group_size": 64,
    "method": "awq",
    "pack_dtype": "int32",
    "quant_method": "awq",
    "version": "gemm",
    "zero_point": False,
}
AUTOAWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "GEMM"}
AUTOGPTQ_QCJSON = {"bits": 8, "group_size": 128, "desc_act": False, "sym": True, "true_sequential": True}


def write_model(tmp_path, qcfg=None, qfile=None, name="config.json"):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if qfile is not None:
        (tmp_path / name).write_text(json.dumps(qfile))
    return tmp_path


def test_read_gptqmodel_v1(tmp_path):
    q = read_quant_config(write_model(tmp_path, GPTQMODEL_V1))
    assert (q.method, q.bits, q.group_size, q.sym, q.desc_act, q.zero_point, q.checkpoint_format) == (
        "gptq",
        4,
        32,
        False,
        True,
        True,
        "gptq",
    )
    assert q.raw["pack_dtype"] == "int32"


def test_read_awq_variants(tmp_path):
    q = read_quant_config(write_model(tmp_path, GPTQMODEL_AWQ))
    assert (q.method, q.group_size, q.zero_point, q.sym, q.checkpoint_format) == ("awq", 64, False, True, "awq_gemm")
    q = read_quant_config(write_model(tmp_path, AUTOAWQ))
    assert (q.group_size, q.zero_point, q.checkpoint_format) == (128, True, "awq_gemm")


def test_read_quantize_config_json(tmp_path):
    q = read_quant_config(
        write_model(tmp_path, None, AUTOGPTQ_QCJSON | {"quant_method": "gptq"}, "quantize_config.json")
    )
    assert (q.method, q.bits, q.sym, q.checkpoint_format) == ("gptq", 8, True, "gptq")
    other = tmp_path / "v2"
    other.mkdir()
    q = read_quant_config(
        write_model(
            other,
            None,
            {"quant_method": "gptq", "bits": 4, "group_size": 64, "checkpoint_format": "gptq_v2"},
            "quant_config.json",
        )
    )
    assert q.checkpoint_format == "gptq_v2"


def test_read_unquantized(tmp_path):
    q = read_quant_config(write_model(tmp_path))
    assert q.method == "none" and not q.is_quantized


@pytest.mark.parametrize(
    "qcfg,needle",
    [
        ({"quant_method": "exl2", "bits": 4.0}, "EXL2"),
        (GPTQMODEL_V1 | {"checkpoint_format": "marlin", "format": "marlin"}, "Marlin"),
        (GPTQMODEL_V1 | {"is_marlin_format": True}, "Marlin"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors"),
        (GPTQMODEL_V1 | {"bits": 5}, "bits=5"),
        (GPTQMODEL_V1 | {"group_size": 100}, "group_size=100"),
        (AUTOAWQ | {"version": "gemv"}, "gemv"),
        (GPTQMODEL_V1 | {"pack_dtype": "int16"}, "int16"),
        ({"quant_method": "hqq"}, "hqq"),
    ],
)
def test_unsupported_formats_fail_loudly(tmp_path, qcfg, needle):
    with pytest.raises(UnsupportedFormatError) as e:
        read_quant_config(write_model(tmp_path, qcfg))
    msg = str(e.value)
    assert needle.lower() in msg.lower()
    assert "config.json" in msg and msg.count("\n") == 0


def test_linear_tensor_names():
    from models.formats import parse_quant_config

    q = parse_quant_config(GPTQMODEL_V1)
    assert linear_tensor_names(q, "m.q") == ["m.q.qweight", "m.q.qzeros", "m.q.scales", "m.q.g_idx"]
    awq = parse_quant_config(AUTOAWQ)
    assert linear_tensor_names(awq, "m.q") == ["m.q.qweight", "m.q.qzeros", "m.q.scales"]
    assert linear_tensor_names(awq, "m.q", optional=True)[-1] == "m.q.bias"


# ----------------------------------------------------------------------------------------------- compressed-tensors
LLMCOMPRESSOR_W4A16 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "input_activations": None,
            "output_activations": None,
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 128,
                "actorder": None,
                "dynamic": False,
            },
        }
    },
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "sparsity_config": {},
}


def _with_weights(**kw):
    cfg = json.loads(json.dumps(LLMCOMPRESSOR_W4A16))
    cfg["config_groups"]["group_0"]["weights"].update(kw)
    return cfg


def test_read_compressed_tensors_w4a16(tmp_path):
    q = read_quant_config(write_model(tmp_path, LLMCOMPRESSOR_W4A16))
    assert (q.method, q.bits, q.group_size, q.sym, q.zero_point, q.checkpoint_format) == (
        "compressed_tensors",
        4,
        128,
        True,
        False,
        "pack_quantized",
    )
    asym = read_quant_config(write_model(tmp_path, _with_weights(symmetric=False, strategy="channel")))
    assert asym.zero_point and asym.group_size == -1
    assert linear_tensor_names(asym, "m.q") == [
        "m.q.weight_packed",
        "m.q.weight_scale",
        "m.q.weight_shape",
        "m.q.weight_zero_point",
    ]


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"format": "float-quantized"}, "float-quantized"),
        ({"kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "kv_cache_scheme"),
        ({"ignore": ["lm_head", "model.layers.0.mlp.down_proj"]}, "down_proj"),
        ({"sparsity_config": {"format": "sparse-24-bitmask"}}, "sparse-24"),
    ],
)
def test_compressed_tensors_unsupported(tmp_path, change, needle):
    with pytest.raises(UnsupportedFormatError, match=needle):
        read_quant_config(write_model(tmp_path, {**LLMCOMPRESSOR_W4A16, **change}))


@pytest.mark.parametrize(
    "weights,needle",
    [
        ({"type": "float", "num_bits": 8}, "type='float'"),
        ({"num_bits": 3}, "num_bits=3"),
        ({"strategy": "tensor"}, "strategy='tensor'"),
        ({"dynamic": True}, "dynamic=True"),
    ],
)
def test_compressed_tensors_unsupported_weights(tmp_path, weights, needle):
    with pytest.raises(UnsupportedFormatError, match=needle):
        read_quant_config(write_model(tmp_path, _with_weights(**weights)))


def test_compressed_tensors_activation_quant_rejected(tmp_path):
    cfg = json.loads(json.dumps(LLMCOMPRESSOR_W4A16))
    cfg["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token"}
    with pytest.raises(UnsupportedFormatError, match="activation"):
        read_quant_config(write_model(tmp_path, cfg))


@pytest.mark.parametrize("bits", [4, 8, 2])
@pytest.mark.parametrize("symmetric,strategy", [(True, "group"), (False, "group"), (False, "channel")])
def test_compressed_tensors_matches_library(bits, symmetric, strategy, gen):
    """compressed-tensors' own compressor writes the tensors; our dequant equals its decompress."""
    pq = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from models.formats import unpack_compressed

    out_f, in_f, gs = 64, 256, 64
    groups = in_f // gs if strategy == "group" else 1
    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy=strategy,
        group_size=gs if strategy == "group" else None,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    half = 1 << (bits - 1)
    state = {
        "weight": torch.randn(out_f, in_f, generator=gen),
        "weight_scale": torch.rand(out_f, groups, generator=gen) * 0.05 + 0.01,
    }
    if not symmetric:
        state["weight_zero_point"] = torch.randint(-half, half, (out_f, groups), generator=gen).to(torch.int8)
    packed = pq.PackedQuantizationCompressor.compress(state, scheme)
    theirs = pq.PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    qw = unpack_compressed(
        packed["weight_packed"],
        packed["weight_scale"],
        packed.get("weight_zero_point"),
        None,
        bits,
        group_size=gs if strategy == "group" else -1,
        in_features=in_f,
    )
    torch.testing.assert_close(dequantize(qw), theirs.float(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------- undeclared formats
def _write_safetensors(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "names,needle",
    [
        (["model.layers.0.mlp.up_proj.q_weight", "model.layers.0.mlp.up_proj.q_invperm"], "EXL2"),
        (["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight.absmax"], "bitsandbytes"),
        (["model.layers.0.mlp.up_proj.qweight", "model.layers.0.mlp.up_proj.qzeros"], "GPTQ/AWQ"),
    ],
)
def test_undeclared_quantized_tensors_fail_loudly(tmp_path, names, needle):
    write_model(tmp_path)
    _write_safetensors(tmp_path / "model.safetensors", {n: torch.zeros(4, dtype=torch.int32) for n in names})
    with pytest.raises(UnsupportedFormatError, match=needle):
        read_quant_config(tmp_path)


def test_undeclared_fp8_fails_and_dense_passes(tmp_path):
    write_model(tmp_path)
    _write_safetensors(tmp_path / "model.safetensors", {"lm_head.weight": torch.zeros(4, 4, dtype=torch.bfloat16)})
    assert read_quant_config(tmp_path).method == "none"
    _write_safetensors(tmp_path / "model.safetensors", {"lm_head.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)})
    with pytest.raises(UnsupportedFormatError, match="fp8"):
        read_quant_config(tmp_path)


def test_safetensors_header_reads_entries_and_rejects_corrupt_files(tmp_path):
    from safetensors.torch import save_file

    from models.formats import CorruptCheckpointError, safetensors_header

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 3)}, str(path), metadata={"format": "pt"})
    assert safetensors_header(path) == {"w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]}}
    data = path.read_bytes()
    cases = (
        (data[:5], "no header length"),
        (data[:-1], "outside the file"),
        ((16).to_bytes(8, "little") + b"{not json", "header length"),
        ((9).to_bytes(8, "little") + b"{not json", "unreadable"),
        ((8).to_bytes(8, "little") + b'{"w": 1}', "lacks dtype"),
    )
    for raw, needle in cases:
        path.write_bytes(raw)
        with pytest.raises(CorruptCheckpointError, match=needle) as e:
            safetensors_header(path)
        assert str(tmp_path) not in str(e.value)  # names the file, never the full path
