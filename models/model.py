"""A decoder-only transformer built from an `ArchSpec` table, with explicit positions and KV slots.

The model holds weights only. Every call gets its tokens, positions and KV slots as arguments and writes
keys/values into a `KVCache` in place; nothing here keeps per-request state. Activations are 2-D
(tokens, hidden) throughout so any linear (dense or `QuantLinear`) sees a matrix.

- `prefill(tokens (T,), slot, start_pos, cache)`: one sequence, T new tokens at [start_pos, start_pos+T).
- `decode(tokens (B,), positions (B,), slots (B,), cache, kv_len)`: one new token for each of B sequences,
  each attending over its first positions[b] + 1 cache positions: in place with the CPU kernel, or over the
  first `kv_len` with a mask built from `positions` (fixed shapes; models.attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ArchSpec, Dims, rope_inv_freq
from .attention import AttentionOp, decode_mask
from .attention import reference as attention_reference
from .fused import FusedOps
from .kv_cache import KVCache, from_cache, to_cache

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
_HAS_RMS = hasattr(F, "rms_norm")


@dataclass(frozen=True)
class CompiledDecode:
    """The compiled pieces of `Transformer.decode` (built by models.compile): `layers` is a compiled
    `Transformer.decode_layers`, called once per `group` consecutive blocks (`group` divides the layer count, so
    every call has the same graph), and `head` a compiled `Transformer.head` used at batch 1."""

    layers: Callable[..., torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    group: int


class DenseLinear(nn.Module):
    """y = x @ W.T + b for an unquantized checkpoint; `fuse` concatenates along the output axis."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    forward_reference = forward

    def weight_bytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    @staticmethod
    def fuse(parts: Sequence["DenseLinear"]) -> "DenseLinear":
        w = torch.cat([p.weight.data for p in parts], 0)
        if all(p.bias is None for p in parts):
            return DenseLinear(w)
        b = torch.cat(
            [
                p.bias.data if p.bias is not None else torch.zeros(p.out_features, dtype=w.dtype, device=w.device)
                for p in parts
            ]
        )
        return DenseLinear(w, b)


class Concat(nn.Module):
    """Runs several linears on the same input and concatenates (used when quantized parts cannot fuse)."""

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], -1)

    def weight_bytes(self) -> int:
        return sum(p.weight_bytes() for p in self.parts)


def fuse_linears(parts: Sequence[nn.Module]) -> nn.Module:
    """One module computing cat([p(x) for p in parts], -1): fused weights when the type allows, else Concat."""
    if all(isinstance(p, DenseLinear) for p in parts):
        return DenseLinear.fuse(parts)
    fuse = getattr(type(parts[0]), "fuse", None)
    fused = fuse(list(parts)) if fuse is not None else None
    return fused if fused is not None else Concat(parts)


class Norm(nn.Module):
    """RMSNorm (weight) or LayerNorm (weight, bias), computed like transformers does for parity."""

    def __init__(self, kind: str, hidden: int, eps: float):
        super().__init__()
        self.kind, self.eps, self.shape = kind, eps, (hidden,)
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden), requires_grad=False) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        if _HAS_RMS:  # one fused op; differs from transformers' float32 path by <= 1 ulp of the dtype
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Block(nn.Module):
    """One pre-norm decoder block. `qkv`, `o`, `up` (gate+up or fc1) and `down` are set by the loader."""

    def __init__(self, spec: ArchSpec, dims: Dims):
        super().__init__()
        self.norm1 = Norm(spec.norm, dims.hidden, dims.norm_eps)
        self.norm2 = Norm(spec.norm, dims.hidden, dims.norm_eps)
        self.qkv: nn.Module = nn.Identity()
        self.o: nn.Module = nn.Identity()
        self.up: nn.Module = nn.Identity()
        self.down: nn.Module = nn.Identity()


class Transformer(nn.Module):
    """Weights of one checkpoint plus the prefill/decode math. Build under `torch.device("meta")`."""

    def __init__(self, spec: ArchSpec, dims: Dims):
        super().__init__()
        self.spec, self.dims = spec, dims
        self.embed = nn.Parameter(torch.empty(dims.vocab, dims.hidden), requires_grad=False)
        self.pos_embed = (
            nn.Parameter(torch.empty(dims.max_position + spec.pos_offset, dims.hidden), requires_grad=False)
            if spec.positions == "learned"
            else None
        )
        self.blocks = nn.ModuleList([Block(spec, dims) for _ in range(dims.layers)])
        self.final_norm = Norm(spec.norm, dims.hidden, dims.norm_eps)
        self.lm_head: nn.Module = nn.Identity()
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self._gated = spec.mlp == "gated_silu"
        self.compiled_decode: Optional[CompiledDecode] = None  # set by models.compile; None: eager decode
        # set by the loader (models.attention): the in-place CPU kernel; None: gather + SDPA (`attention.reference`)
        self.decode_attention: Optional[AttentionOp] = None
        # set by the loader (models.fused): C++ kernels for the eager norms, RoPE and activation; None: torch's ops
        self.fused_ops: Optional[FusedOps] = None

    def init_rope(self, max_seq: int, device: torch.device, dtype: torch.dtype) -> None:
        """Precompute cos/sin tables (max_seq, head_dim/2) in the activation dtype (as transformers casts them)."""
        if self.spec.positions != "rope":
            return
        inv = rope_inv_freq(self.dims).to(device)
        freqs = torch.outer(torch.arange(max_seq, device=device, dtype=torch.float32), inv)
        self.cos = freqs.cos().to(dtype)
        self.sin = freqs.sin().to(dtype)

    # --- pieces -------------------------------------------------------------------------------------------
    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.embed)
        if self.pos_embed is not None:
            x = x + F.embedding(positions + self.spec.pos_offset, self.pos_embed)
        return x

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x (N, heads, D); cos/sin (N, 1, D/2); rotate-half convention of transformers
        x1, x2 = x.chunk(2, -1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    def _mlp(self, blk: Block, h: torch.Tensor, fz: Optional[FusedOps] = None) -> torch.Tensor:
        u = blk.up(h)
        if self._gated:
            if fz is not None:
                return blk.down(fz.silu_mul(u))
            g, u = u.chunk(2, -1)
            u = F.silu(g) * u
        else:
            u = F.relu(u)
        return blk.down(u)

    def _heads(self, qkv: torch.Tensor, cos, sin, fz: Optional[FusedOps] = None):
        """qkv (N, (heads + 2 kv_heads) D) -> q (N, heads, D), k and v (N, kv_heads, D), RoPE applied to q and k
        (cos/sin (N, 1, D/2)): in one pass, in place in `qkv` with the fused kernel `fz`."""
        n = qkv.shape[0]
        dims = self.dims
        hq = dims.heads + dims.kv_heads
        v = qkv[:, hq * dims.head_dim :].view(n, dims.kv_heads, dims.head_dim)
        if cos is not None and fz is not None:
            fz.rope_(qkv, cos[:, 0], sin[:, 0], hq, dims.head_dim)
            cos = None
        qk = qkv[:, : hq * dims.head_dim].view(n, hq, dims.head_dim)
        if cos is not None:
            qk = self._rope(qk, cos, sin)
        return qk[:, : dims.heads], qk[:, dims.heads :], v

    def _qkv(self, blk: Block, x: torch.Tensor, cos, sin):
        """(N, hidden) -> q (N, heads, D), k and v (N, kv_heads, D) (`_heads` of the normed projection)."""
        return self._heads(blk.qkv(blk.norm1(x)), cos, sin)

    @staticmethod
    def _add_norm(norm: Norm, x: torch.Tensor, delta: Optional[torch.Tensor], fz: Optional[FusedOps]) -> torch.Tensor:
        """x += delta in place (when given: the residual add), then norm(x); one fused pass with `fz` (RMSNorm)."""
        if fz is not None and norm.kind == "rms":
            if delta is None:
                return fz.rms_norm(x, norm.weight, norm.eps)
            return fz.add_rms_norm_(x, delta, norm.weight, norm.eps)
        if delta is not None:
            x.add_(delta)
        return norm(x)

    @staticmethod
    def _to_cache(cache: torch.Tensor, x: torch.Tensor, fz: Optional[FusedOps]) -> torch.Tensor:
        """Rows x (N, KVH, D) as `cache` stores them (`kv_cache.to_cache`); an int8 cache's with the fused kernel
        `fz` when given (the same bytes in one pass)."""
        if fz is not None and cache.dtype == torch.int8 and x.dtype == torch.bfloat16:
            return fz.kv_rows(x)
        return to_cache(cache, x)

    @staticmethod
    def _from_cache(rows: torch.Tensor, dtype: torch.dtype, fz: Optional[FusedOps]) -> torch.Tensor:
        """`kv_cache.from_cache`; an int8 cache's values with the fused kernel `fz` when given."""
        if fz is not None and rows.dtype == torch.int8 and dtype == torch.bfloat16:
            return fz.kv_values(rows)
        return from_cache(rows, dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head: (N, hidden) -> float32 logits (N, vocab). A head with `forward_float` (the int8
        head) writes float32 itself. Eager, the final RMSNorm is the fused op (`fused_ops`)."""
        h = self._add_norm(self.final_norm, x, None, None if torch.compiler.is_compiling() else self.fused_ops)
        to_float = getattr(self.lm_head, "forward_float", None)
        return to_float(h) if to_float is not None else self.lm_head(h).float()

    # --- entry points -------------------------------------------------------------------------------------
    def prefill(self, tokens: torch.Tensor, slot: int, start_pos: int, cache: KVCache) -> torch.Tensor:
        """tokens (T,) of one sequence at positions [start_pos, start_pos+T) -> hidden states (T, hidden)."""
        T = tokens.shape[0]
        end = start_pos + T
        dims = self.dims
        pos = torch.arange(start_pos, end, device=tokens.device)
        x = self._embed(tokens, pos)
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos[start_pos:end, None], self.sin[start_pos:end, None]
        # chunked prefill: causal mask offset by start_pos over the cached prefix
        mask = None
        if start_pos > 0:
            mask = torch.arange(end, device=tokens.device)[None, :] <= pos[:, None]  # (T, end)
        rep = dims.heads // dims.kv_heads
        fz = self.fused_ops
        delta = None  # the previous block's MLP output: the next norm adds it to x (x is this call's own tensor)
        for i, blk in enumerate(self.blocks):
            q, k, v = self._heads(blk.qkv(self._add_norm(blk.norm1, x, delta, fz)), cos, sin, fz)
            kc, vc = cache.k[i], cache.v[i]
            kc[slot, start_pos:end] = self._to_cache(kc, k, fz)
            vc[slot, start_pos:end] = self._to_cache(vc, v, fz)
            # (end, kv, D) views of a float cache's prefix; of an int8 cache, the stored values of every position,
            # this chunk's too: prefill reads what the cache holds, as decode does
            if start_pos > 0 or kc.dtype == torch.int8:
                k, v = self._from_cache(kc[slot, :end], x.dtype, fz), self._from_cache(vc[slot, :end], x.dtype, fz)
            q, k, v = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, heads, T|end, D)
            if rep > 1 and not _HAS_GQA:
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            kw = {"enable_gqa": True} if rep > 1 and _HAS_GQA else {}
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **kw)
            h = self._add_norm(blk.norm2, x, blk.o(a[0].transpose(0, 1).reshape(T, dims.heads * dims.head_dim)), fz)
            delta = self._mlp(blk, h, fz)
        return x if delta is None else x.add_(delta)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache, kv_len: int
    ) -> torch.Tensor:
        """One token for each of B sequences -> float32 logits (B, vocab). Fixed shapes for fixed (B, kv_len)."""
        x = self._embed(tokens, positions)
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, D/2)
        mask = None if self.decode_attention is not None else decode_mask(positions, kv_len)  # (B, 1, 1, kv_len)
        c = self.compiled_decode
        blocks = tuple(self.blocks)
        if c is None:
            x = self.decode_layers(blocks, x, cos, sin, mask, slots, positions, tuple(cache.k), tuple(cache.v), kv_len)
            return self.head(x)
        for i in range(0, len(blocks), c.group):
            j = i + c.group
            ks, vs = tuple(cache.k[i:j]), tuple(cache.v[i:j])
            x = c.layers(blocks[i:j], x, cos, sin, mask, slots, positions, ks, vs, kv_len)
        return c.head(x) if x.shape[0] == 1 else self.head(x)

    def decode_layers(
        self,
        blocks: Tuple[Block, ...],
        x: torch.Tensor,
        cos: Optional[torch.Tensor],
        sin: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        slots: torch.Tensor,
        positions: torch.Tensor,
        kcs: Tuple[torch.Tensor, ...],
        vcs: Tuple[torch.Tensor, ...],
        kv_len: int,
    ) -> torch.Tensor:
        """`decode_layer` over consecutive blocks with their cache tensors: the unit models.compile compiles (one
        call per group of blocks instead of one per block, so dynamo's per-call cost is paid a few times a step)."""
        for blk, kc, vc in zip(blocks, kcs, vcs):
            x = self.decode_layer(blk, x, cos, sin, mask, slots, positions, kc, vc, kv_len)
        return x

    def decode_layer(
        self,
        blk: Block,
        x: torch.Tensor,
        cos: Optional[torch.Tensor],
        sin: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        slots: torch.Tensor,
        positions: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        kv_len: int,
    ) -> torch.Tensor:
        """One block of `decode`: x (B, hidden) -> (B, hidden), writing this layer's K/V (kc, vc) in place.

        Everything a layer differs by (its block, its cache tensors) is an argument, so one compiled graph of
        `decode_layers` serves every group of layers (`compiled_decode`, see models.compile). `mask` is None
        when the in-place kernel runs (it reads positions[b] + 1 keys of each row's slot itself). Eager, the
        fused ops (`fused_ops`) run the norms, RoPE and activation and update x in place; a compiled graph traces
        torch's ops, which inductor fuses itself."""
        B = x.shape[0]
        dims = self.dims
        fz = None if torch.compiler.is_compiling() else self.fused_ops
        if fz is None:
            q, k, v = self._qkv(blk, x, cos, sin)  # q (B, heads, D)
        else:
            q, k, v = self._heads(blk.qkv(self._add_norm(blk.norm1, x, None, fz)), cos, sin, fz)
        kc.index_put_((slots, positions), self._to_cache(kc, k, fz))
        vc.index_put_((slots, positions), self._to_cache(vc, v, fz))
        if self.decode_attention is not None:
            a = self.decode_attention(q, kc, vc, slots, positions, dims.head_dim**-0.5)
        else:
            a = attention_reference(q, kc, vc, slots, mask, kv_len)
        o = blk.o(a.reshape(B, dims.heads * dims.head_dim))
        if fz is not None:  # x is this step's own tensor (`decode` embeds it)
            return x.add_(self._mlp(blk, self._add_norm(blk.norm2, x, o, fz), fz))
        x = x + o
        return x + self._mlp(blk, blk.norm2(x))

    def linear_modules(self) -> List[nn.Module]:
        out: List[nn.Module] = []
        for blk in self.blocks:
            out += [blk.qkv, blk.o, blk.up, blk.down]
        return out
