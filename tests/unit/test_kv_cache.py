"""models/kv_cache.py: the int8 rows (codes and a float32 scale) and the int8 cache's layout and size."""

from __future__ import annotations

import pytest
import torch

from models.kv_cache import KVCache, dequantize_rows, from_cache, quantize_rows, to_cache


def test_rows_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 64, generator=g) * torch.rand(5, 3, 1, generator=g) * 10
    rows = quantize_rows(x)
    assert rows.shape == (5, 3, 68) and rows.dtype == torch.int8
    scale = rows[..., 64:].contiguous().view(torch.float32)
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127, atol=0, rtol=0)
    codes = rows[..., :64]
    assert int(codes.abs().max()) == 127  # each row's largest value takes the full range
    err = (dequantize_rows(rows, torch.float32) - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-6)).all())


def test_rows_round_half_to_even_and_zero_rows():
    x = torch.zeros(2, 8)
    x[0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: codes 127, 0, 2, -2
    rows = quantize_rows(x)
    assert rows[0, :4].tolist() == [127, 0, 2, -2]
    assert rows[1].tolist() == [0] * 12  # an all-zero row: scale 0 and codes 0, no NaN
    assert torch.equal(dequantize_rows(rows, torch.float32)[1], torch.zeros(8))


def test_to_and_from_cache_follow_the_cache_dtype():
    x = torch.randn(2, 3, 16).bfloat16()
    float_cache = torch.zeros(4, 8, 3, 16, dtype=torch.bfloat16)
    assert to_cache(float_cache, x) is x and from_cache(x, torch.bfloat16) is x
    int8_cache = torch.zeros(4, 8, 3, 20, dtype=torch.int8)
    rows = to_cache(int8_cache, x)
    assert rows.shape == (2, 3, 20)
    torch.testing.assert_close(from_cache(rows, torch.float32), x.float(), atol=0.03, rtol=0.01)


def test_int8_cache_layout_size_and_prefix_copy():
    c = KVCache(2, 3, 10, 2, 16, device=torch.device("cpu"), dtype=torch.bfloat16, kv_dtype="int8")
    assert c.quantized and c.k[0].shape == (4, 10, 2, 20) and c.k[0].dtype == torch.int8
    assert c.k[0].stride(1) == 20 and c.k[0].stride(2) == 10 * 20  # head-major: a head's positions are contiguous
    assert c.nbytes() == KVCache.predict_bytes(2, 3, 10, 2, 16, torch.bfloat16, "int8") == 2 * 2 * 4 * 10 * 2 * 20
    bf16 = KVCache.predict_bytes(2, 3, 10, 2, 16, torch.bfloat16)
    assert bf16 == 2 * 2 * 4 * 10 * 2 * 16 * 2 and c.nbytes() / bf16 == 20 / 32
    c.k_all[:, 1, :4] = quantize_rows(torch.randn(2, 4, 2, 16))
    c.copy_prefix(1, 2, 4)
    assert torch.equal(c.k_all[:, 2, :4], c.k_all[:, 1, :4])  # scales travel with their codes


def test_bad_kv_dtype_and_head_dim():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        KVCache(1, 1, 4, 1, 16, device=torch.device("cpu"), dtype=torch.bfloat16, kv_dtype="fp8")
    with pytest.raises(ValueError, match="head_dim % 4"):
        KVCache(1, 1, 4, 1, 18, device=torch.device("cpu"), dtype=torch.bfloat16, kv_dtype="int8")
