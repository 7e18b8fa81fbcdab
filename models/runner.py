"""Runner: the engine-facing API over a fused `Transformer` and its static `KVCache`.

Contract (docs/architecture.md): `prefill(tokens, slot, start_pos)`, `prefill_logits(...)`,
`decode(tokens, positions, slots)`, `copy_kv(src_slot, dst_slot, num_tokens)`, `release(slot)`,
`memory_report()`, `warmup()`. The runner never sees text and holds no per-request state: the caller owns
positions and slot ids.

Decode with SDPA attends over the first `kv_len` cache positions, where `kv_len` is a bucket (multiple of
`KV_BUCKET` on CPU, powers of two from 256 on CUDA) covering max(positions)+1; the in-place CPU attention
(models.attention) needs no bucket. The bucket is read from
the positions tensor only when it lives on the host (the engine builds it there), so it is never a device
sync; for positions already on the GPU the whole cache (`max_seq`) is used.

With `compile_cache_dir` set, `warmup()` on CPU compiles the decode step (models.compile; eager with a logged
reason where it cannot). On CUDA, `warmup()` captures one CUDA graph per (batch bucket 1/2/4/8..., kv bucket); `decode` pads the
batch to the bucket with the cache's scratch slot and replays. On CPU decode runs eager without padding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .kv_cache import KVCache
from .model import Transformer

logger = logging.getLogger(__name__)

KV_BUCKET = 64  # CPU: attention length rounded up to a multiple of this
CUDA_MIN_KV = 256  # CUDA: smallest captured attention length


def batch_buckets(max_batch_size: int) -> List[int]:
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    out.append(max_batch_size)
    return out


def kv_buckets_cuda(max_seq: int) -> List[int]:
    out, n = [], CUDA_MIN_KV
    while n < max_seq:
        out.append(n)
        n *= 2
    out.append(max_seq)
    return out


class Runner:
    """Fused runtime for one loaded checkpoint (see module docstring)."""

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        *,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_ids: Tuple[int, ...] = (),
        info=None,
        use_cuda_graphs: Optional[bool] = None,
        compile_cache_dir: Optional[Path] = None,
    ):
        self.model, self.cache, self.info = model, cache, info
        self.device, self.dtype = torch.device(device), dtype
        self.vocab_size = model.dims.vocab
        self.max_batch_size, self.max_seq = cache.max_batch_size, cache.max_seq
        self.eos_token_ids = tuple(eos_token_ids)
        self.use_cuda_graphs = (self.device.type == "cuda") if use_cuda_graphs is None else use_cuda_graphs
        self._buckets = batch_buckets(self.max_batch_size)
        self._kv_buckets = kv_buckets_cuda(self.max_seq) if self.device.type == "cuda" else []
        self._graphs: Dict[Tuple[int, int], tuple] = {}
        self._graph_pool = None
        # compiled decode (models.compile): requested with a cache dir, done in warmup(); `compiled` says if it is
        # in use and `compile_note` why not (or how long it took)
        self.compile_cache_dir = compile_cache_dir
        self.compiled = False
        self.compile_note = "off"

    # --- prefill ------------------------------------------------------------------------------------------
    def _check_prefill(self, tokens: torch.Tensor, slot: int, start_pos: int) -> torch.Tensor:
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"prefill tokens must be a non-empty 1-D tensor, got shape {tuple(tokens.shape)}")
        if not 0 <= slot < self.max_batch_size:
            raise ValueError(f"slot {slot} out of range [0, {self.max_batch_size})")
        if start_pos < 0 or start_pos + tokens.numel() > self.max_seq:
            raise ValueError(f"positions [{start_pos}, {start_pos + tokens.numel()}) exceed max_seq={self.max_seq}")
        return tokens.to(self.device, torch.long, non_blocking=True)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, slot: int, start_pos: int = 0) -> torch.Tensor:
        """Write KV for tokens (T,) at [start_pos, start_pos+T) of `slot`; float32 logits (vocab,) of the last."""
        t = self._check_prefill(tokens, slot, start_pos)
        x = self.model.prefill(t, slot, start_pos, self.cache)
        return self.model.head(x[-1:])[0]

    @torch.inference_mode()
    def prefill_logits(
        self, tokens: torch.Tensor, slot: int, start_pos: int = 0, last: Optional[int] = None
    ) -> torch.Tensor:
        """Like `prefill`, but float32 logits (T, vocab) for every position, or (last, vocab) for the last `last`
        positions only (perplexity scores only a window's new tokens; the lm_head is then run on those alone)."""
        t = self._check_prefill(tokens, slot, start_pos)
        h = self.model.prefill(t, slot, start_pos, self.cache)  # (T, hidden)
        return self.model.head(h if last is None else h[-last:])

    # --- decode -------------------------------------------------------------------------------------------
    def _kv_len(self, positions: torch.Tensor) -> Optional[int]:
        """Attention length bucket from host positions; None when positions live on the GPU."""
        if positions.device.type != "cpu":
            return None
        need = int(positions.max()) + 1  # host tensor: no device sync
        if self.device.type == "cuda":
            return next(n for n in self._kv_buckets if n >= need)
        return min(self.max_seq, -(-need // KV_BUCKET) * KV_BUCKET)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One token each for B sequences: tokens/positions/slots (B,) -> float32 logits (B, vocab)."""
        B = tokens.shape[0]
        if B > self.max_batch_size:
            raise ValueError(f"decode batch {B} > max_batch_size {self.max_batch_size}")
        # the in-place CPU attention reads each row's length from `positions` itself: no bucket to compute
        kv_len = None if self.model.decode_attention is not None else self._kv_len(positions)
        if self.use_cuda_graphs and self._graphs:
            return self._decode_graph(tokens, positions, slots, kv_len or self.max_seq)
        dev = self.device
        t = tokens.to(dev, torch.long, non_blocking=True)
        p = positions.to(dev, torch.long, non_blocking=True)
        s = slots.to(dev, torch.long, non_blocking=True)
        if self.compiled:  # inputs made outside inference mode would miss the compiled graphs' guards: copy
            p, s = p.clone(), s.clone()
        return self.model.decode(t, p, s, self.cache, kv_len or self.max_seq)

    def _decode_graph(self, tokens, positions, slots, kv_len: int) -> torch.Tensor:
        B = tokens.shape[0]
        bb = next(b for b in self._buckets if b >= B)
        g, st, sp, ss, out = self._graphs[(bb, kv_len)]
        st[:B].copy_(tokens, non_blocking=True)
        sp[:B].copy_(positions, non_blocking=True)
        ss[:B].copy_(slots, non_blocking=True)
        if B < bb:  # padding rows write position 0 of the scratch slot
            st[B:].zero_()
            sp[B:].zero_()
            ss[B:].fill_(self.cache.scratch_slot)
        g.replay()
        return out[:B].clone()

    def capture_graphs(self, batch_sizes: Optional[List[int]] = None, kv_lens: Optional[List[int]] = None) -> None:
        """Capture the decode step as CUDA graphs for each (batch bucket, kv bucket)."""
        if self.device.type != "cuda":
            return
        batch_sizes = batch_sizes or self._buckets
        kv_lens = kv_lens or self._kv_buckets
        self._graph_pool = self._graph_pool or torch.cuda.graph_pool_handle()
        dev = self.device
        # one side stream for every capture: torch keeps a cuBLAS workspace (32 MiB on sm90) per stream
        stream = torch.cuda.Stream(dev)
        with torch.inference_mode():
            for L in sorted(kv_lens, reverse=True):
                for B in sorted(batch_sizes, reverse=True):
                    st = torch.zeros(B, dtype=torch.long, device=dev)
                    sp = torch.zeros(B, dtype=torch.long, device=dev)
                    ss = torch.full((B,), self.cache.scratch_slot, dtype=torch.long, device=dev)
                    stream.wait_stream(torch.cuda.current_stream(dev))
                    with torch.cuda.stream(stream):
                        for _ in range(2):
                            self.model.decode(st, sp, ss, self.cache, L)
                    torch.cuda.current_stream(dev).wait_stream(stream)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self._graph_pool):
                        out = self.model.decode(st, sp, ss, self.cache, L)
                    self._graphs[(B, L)] = (g, st, sp, ss, out)
        torch.cuda.synchronize(dev)
        # every bucket must be present for replay; record the ones captured
        self._buckets = sorted(batch_sizes)
        self._kv_buckets = sorted(kv_lens)
        logger.info("captured %d CUDA graphs (batch %s x kv %s)", len(self._graphs), self._buckets, self._kv_buckets)

    # --- shared prefill ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def copy_kv(self, src_slot: int, dst_slot: int, num_tokens: int) -> None:
        """Make `dst_slot` hold the KV of positions [0, num_tokens) of `src_slot` (an n > 1 group shares one
        prefill). In place on the static cache (no allocation, CUDA graphs stay valid), queued on the current
        stream like the prefills around it, so no sync. `src_slot == dst_slot` or `num_tokens == 0` is a no-op."""
        for name, s in (("src_slot", src_slot), ("dst_slot", dst_slot)):
            if not 0 <= s < self.max_batch_size:
                raise ValueError(f"{name} {s} out of range [0, {self.max_batch_size})")
        if not 0 <= num_tokens <= self.max_seq:
            raise ValueError(f"num_tokens {num_tokens} out of range [0, {self.max_seq}]")
        if num_tokens and src_slot != dst_slot:
            self.cache.copy_prefix(src_slot, dst_slot, num_tokens)

    # --- lifecycle ----------------------------------------------------------------------------------------
    def release(self, slot: int) -> None:
        """The slot may be reused by another sequence; KV entries are overwritten, never reallocated."""
        if not 0 <= slot < self.max_batch_size:
            raise ValueError(f"slot {slot} out of range [0, {self.max_batch_size})")

    @torch.inference_mode()
    def warmup(self) -> None:
        """Touch weight pages and run each code path once; on CUDA capture the decode graphs."""
        self.model.prefill(torch.zeros(4, dtype=torch.long, device=self.device), 0, 0, self.cache)
        self._decode_scratch(1, min(KV_BUCKET, self.max_seq))
        if self.use_cuda_graphs and self.device.type == "cuda":
            self.capture_graphs()
        if self.compile_cache_dir is not None:
            self._compile()

    def _decode_scratch(self, batch: int, kv_len: int) -> None:
        """One decode step of `batch` rows at position 0 of the scratch slot, attending over `kv_len` positions."""
        dev = self.device
        self.model.decode(
            torch.zeros(batch, dtype=torch.long, device=dev),
            torch.zeros(batch, dtype=torch.long, device=dev),
            torch.full((batch,), self.cache.scratch_slot, dtype=torch.long, device=dev),
            self.cache,
            kv_len,
        )

    def _compile(self) -> None:
        """Compile decode (models.compile) and run every graph it needs once (inside `warmup`, so in inference
        mode): batch 1 and 2 (batch >= 2 is one dynamic graph), and each batch size from which a layer switches
        kernels (`KernelPlan.amx_min_tokens`, `dense_min_tokens`: a graph of its own from there), x the first two
        attention-length buckets (then one dynamic graph) and the whole cache."""
        from .compile import compile_decode

        # the whole cache (kv_len == max_seq) is a graph of its own: slicing all of a dimension specializes
        kv_lens = sorted({min(self.max_seq, KV_BUCKET), min(self.max_seq, 2 * KV_BUCKET), self.max_seq})
        switches = set()
        for lin in self.model.linear_modules():
            plan = getattr(lin, "plan", None)
            switches.update(
                t for t in (getattr(plan, "amx_min_tokens", None), getattr(plan, "dense_min_tokens", None)) if t
            )
        batches = [1]
        if self.max_batch_size > 1:
            batches = sorted({1, 2} | {t for t in switches if t <= self.max_batch_size})
        t0 = time.perf_counter()
        reason = compile_decode(self.model, self._decode_scratch, batches, kv_lens, self.compile_cache_dir)
        self.compiled = reason is None
        if reason is None:
            self.compile_note = f"compiled in {time.perf_counter() - t0:.1f} s"
        else:
            self.compile_note = reason
            logger.warning("decode stays eager: %s", reason)

    def memory_report(self) -> Dict[str, int]:
        m = self.model
        weights = m.embed.numel() * m.embed.element_size()
        if m.pos_embed is not None:
            weights += m.pos_embed.numel() * m.pos_embed.element_size()
        norms = [m.final_norm] + [n for b in m.blocks for n in (b.norm1, b.norm2)]
        for n in norms:
            weights += sum(p.numel() * p.element_size() for p in n.parameters())
        for lin in m.linear_modules():
            weights += lin.weight_bytes()
        head_w = getattr(m.lm_head, "weight", None)
        if not (isinstance(head_w, torch.Tensor) and head_w.data_ptr() == m.embed.data_ptr()):  # tied: counted once
            weights += m.lm_head.weight_bytes()
        workspace = 0
        if m.cos is not None:
            workspace += 2 * m.cos.numel() * m.cos.element_size()
        for _g, _st, _sp, _ss, out in self._graphs.values():
            workspace += out.numel() * out.element_size()
        return {
            "weights_bytes": int(weights),
            "kv_cache_bytes": int(self.cache.nbytes()),
            "workspace_bytes": int(workspace),
        }
