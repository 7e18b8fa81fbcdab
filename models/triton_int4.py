"""W4A16 split-K GEMV/GEMM in Triton for small-batch decode on CUDA (the "cuda_triton" kernel).

Layout (ours, chosen for coalesced loads along N):
- `qweight_t` (K/8, N) int32: nibble j of word [p, n] is the code of input k = 8p + j (GPTQ's packing order).
- `scales_and_zeros` (G, N, 2): the same tensor tinygemm takes, so w[k, n] = (q - 8) * s[g, n] + z[g, n],
  g = k // group_size (act-order is handled by the caller permuting x, as for tinygemm).

Each program reduces one (BLOCK_M, BLOCK_N) output tile over a K/SPLIT_K slice and adds into an fp32
output with atomics, so small-N layers still fill the GPU; with SPLIT_K=1 it stores bf16 directly.
The config per shape is measured once on the device (`tuned_config`). `w4_matmul_reference` is the plain-PyTorch
definition the parity tests compare against (CPU tests run the kernel under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

try:  # triton is optional: absent on CPU-only installs and on some Jetson images
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


def pack_qweight_t(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) uint8 in 0..15 -> qweight_t (K/8, N) int32 in our layout."""
    n, k = codes.shape
    c = codes.to(torch.int32).t().reshape(k // 8, 8, n)  # (K/8, 8, N)
    shifts = (torch.arange(8, device=codes.device, dtype=torch.int32) * 4).view(1, 8, 1)
    return (c << shifts).sum(dim=1, dtype=torch.int32)  # nibbles don't overlap, so sum == OR


def unpack_qweight_t(qweight_t: torch.Tensor) -> torch.Tensor:
    """qweight_t (K/8, N) int32 -> codes (N, K) uint8."""
    shifts = (torch.arange(8, device=qweight_t.device, dtype=torch.int32) * 4).view(1, 8, 1)
    codes = (qweight_t.unsqueeze(1) >> shifts) & 0xF  # (K/8, 8, N)
    return codes.reshape(-1, qweight_t.shape[1]).t().to(torch.uint8)


def dequant_t(
    qweight_t: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """W^T (K, N) in `dtype`: the prefill path (dense matmul after dequantizing)."""
    codes = unpack_qweight_t(qweight_t).t()  # (K, N)
    sz = scales_and_zeros.to(dtype).repeat_interleave(group_size, dim=0)  # (K, N, 2)
    return (codes.to(dtype) - 8) * sz[..., 0] + sz[..., 1]


def w4_matmul_reference(
    x: torch.Tensor, qweight_t: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x (M, K) -> (M, N) float32: dequantize in float32, then matmul."""
    w = dequant_t(qweight_t, scales_and_zeros, group_size, torch.float32)
    return x.float() @ w


if triton is not None:

    @triton.jit
    def _w4_splitk_kernel(
        x_ptr,
        w_ptr,
        sz_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wk,
        stride_szg,
        stride_ym,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        RESHAPE: tl.constexpr,
        DOT_BF16: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_mask = offs_n < N
        m_mask = offs_m < M
        k_len = K // SPLIT_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * k_len, (pid_k + 1) * k_len, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if RESHAPE:  # one load per int32 word, unpacked to (BLOCK_K/8, 8, BLOCK_N) then flattened along k
                offs_p = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                w = tl.load(w_ptr + offs_p[:, None] * stride_wk + offs_n[None, :], mask=n_mask[None, :], other=0)
                q = (w[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF
                q = tl.reshape(q, (BLOCK_K, BLOCK_N))
            else:  # each word loaded by its 8 k rows (same cache line); DRAM still reads each byte once
                w = tl.load(w_ptr + (offs_k // 8)[:, None] * stride_wk + offs_n[None, :], mask=n_mask[None, :], other=0)
                q = (w >> ((offs_k % 8) * 4)[:, None]) & 0xF  # (BLOCK_K, BLOCK_N)
            g = k0 // GROUP  # BLOCK_K divides GROUP: one group per tile
            s = tl.load(sz_ptr + g * stride_szg + offs_n * 2, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(sz_ptr + g * stride_szg + offs_n * 2 + 1, mask=n_mask, other=0.0).to(tl.float32)
            wd = (q.to(tl.float32) - 8.0) * s[None, :] + z[None, :]
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
            if DOT_BF16:
                acc += tl.dot(xt.to(tl.bfloat16), wd.to(tl.bfloat16))
            else:  # the CPU interpreter has no bf16 arithmetic
                acc += tl.dot(xt.to(tl.float32), wd)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        if SPLIT_K == 1:  # sole owner of the tile: store in the output dtype, no zero-fill or cast kernels
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
        else:
            tl.atomic_add(y_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


# (BLOCK_N, BLOCK_K capped at the group size, SPLIT_K reduced to divide K, RESHAPE unpack, num_warps)
DEFAULT_CONFIG = (64, 128, 8, False, 4)
CANDIDATE_CONFIGS = tuple(
    (bn, bk, sk, rs, nw)
    for bn, bk, sk, nw in (
        (32, 128, 8, 4),
        (64, 128, 4, 4),
        (64, 128, 8, 4),
        (128, 128, 4, 4),
        (128, 128, 8, 8),
        (256, 128, 2, 8),
        (16, 128, 1, 4),
        (32, 128, 1, 4),
    )
    for rs in (False, True)
)


def _fit(config, k: int, group_size: int):
    block_n, block_k, split_k = config[:3]
    block_k = min(block_k, group_size)
    while group_size % block_k:
        block_k //= 2
    while split_k > 1 and (k % (split_k * block_k)):
        split_k //= 2
    return block_n, block_k, split_k


def w4_matmul(
    x: torch.Tensor, qweight_t: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, config=None
) -> torch.Tensor:
    """x (M, K) bf16 contiguous -> (M, N) bf16 through the Triton kernel.

    Fixed shapes for a given M, no host sync: safe to capture in a CUDA graph.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    m, k = x.shape
    n = qweight_t.shape[1]
    config = tuple(config or DEFAULT_CONFIG)
    block_n, block_k, split_k = _fit(config, k, group_size)
    reshape, num_warps = (config[3], config[4]) if len(config) == 5 else (False, 4)
    if k % block_k or group_size % block_k or block_k % 16:
        raise ValueError(f"K={k}, group_size={group_size} do not fit the Triton W4 kernel")
    block_m = 16
    if split_k == 1:
        y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    else:
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    _w4_splitk_kernel[grid](
        x,
        qweight_t,
        scales_and_zeros,
        y,
        m,
        n,
        k,
        x.stride(0),
        qweight_t.stride(0),
        scales_and_zeros.stride(0),
        y.stride(0),
        GROUP=group_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        RESHAPE=reshape,
        DOT_BF16=x.is_cuda,
        num_warps=num_warps,
    )
    return y if split_k == 1 else y.to(torch.bfloat16)


_tuned: dict = {}


def _time_config(x, qweight_t, scales_and_zeros, group_size, config, iters: int = 20) -> float:
    for _ in range(3):
        w4_matmul(x, qweight_t, scales_and_zeros, group_size, config=config)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        w4_matmul(x, qweight_t, scales_and_zeros, group_size, config=config)
    end.record()
    torch.cuda.synchronize(x.device)
    return start.elapsed_time(end) / iters


def tuned_config(x: torch.Tensor, qweight_t: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int):
    """Best of CANDIDATE_CONFIGS for this (M, N, K, group) on this GPU, measured once and cached.

    Never measures during CUDA-graph capture (returns the cached or default config then), so the runner's
    eager warm-up step is what tunes each shape before capture.
    """
    key = (x.shape[0], qweight_t.shape[1], x.shape[1], group_size, str(x.device))
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    if not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return DEFAULT_CONFIG
    best = min(CANDIDATE_CONFIGS, key=lambda c: _time_config(x, qweight_t, scales_and_zeros, group_size, c))
    _tuned[key] = best
    return best
