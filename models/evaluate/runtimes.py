"""The two runtimes `jetserve eval` measures, behind one small interface.

`EvalRuntime`:
- `all_logits(ids (T,), last=None) -> (T or last, vocab) float32` — fresh sequence, logits of every position or of
  the last `last` ones (perplexity);
- `prefill(ids (T,)) -> (vocab,) float32` — start a fresh sequence, logits of its last token;
- `decode(token: LongTensor (1,), pos: int) -> (vocab,) float32` — one token at batch 1 after prefill;
- `sync()` — wait for the device; `weights_bytes`; `close()`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)


class RuntimeUnavailable(RuntimeError):
    """The requested runtime cannot evaluate this model (message says why)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TransformersRuntime:
    """transformers `AutoModelForCausalLM` (GPTQ/AWQ checkpoints through its GPTQModel integration)."""

    name = "transformers"

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map=str(device))
        self.model.eval()
        seen = set()
        total = 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        self.weights_bytes = total
        self._past = None

    @torch.inference_mode()
    def all_logits(self, ids: torch.Tensor, last: Optional[int] = None) -> torch.Tensor:
        keep = 0 if last is None else last  # transformers: logits_to_keep=0 keeps every position
        return self.model(ids.to(self.device)[None], use_cache=False, logits_to_keep=keep).logits[0].float()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self._past = DynamicCache(config=self.model.config)
        out = self.model(ids.to(self.device)[None], cache=self._past, use_cache=True, logits_to_keep=1)
        self._past = out.cache
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        out = self.model(token.view(1, 1).to(self.device), cache=self._past, use_cache=True)
        self._past = out.cache
        return out.logits[0, -1].float()

    def sync(self) -> None:
        _sync(self.device)

    def close(self) -> None:
        self._past = None
        del self.model


class JetserveRuntime:
    """jetserve's own runner (`models.loader.load_runner`), KV slot 0, batch 1."""

    name = "jetserve"

    def __init__(
        self,
        model_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        max_seq: int,
        lm_head: str = "bf16",
        cpu_int4: str = "auto",
        cpu_fused: str = "auto",
        kv_cache_dtype: str = "auto",
    ):
        try:
            from models.loader import load_runner
        except ImportError as e:
            raise RuntimeUnavailable(f"--runtime jetserve needs models.loader.load_runner ({e})") from e
        self.device = device
        self.runner = load_runner(
            str(model_dir),
            device=device,
            dtype=dtype,
            max_batch_size=1,
            max_seq=max_seq,
            lm_head=lm_head,
            cpu_int4=cpu_int4,
            cpu_fused=cpu_fused,
            kv_cache_dtype=kv_cache_dtype,
        )
        self.runner.warmup()
        self.weights_bytes = int(self.runner.memory_report().get("weights_bytes", 0))
        self._slot = 0

    def all_logits(self, ids: torch.Tensor, last: Optional[int] = None) -> torch.Tensor:
        fn = getattr(self.runner, "prefill_logits", None)
        if fn is None:
            raise RuntimeUnavailable(
                "perplexity with --runtime jetserve needs Runner.prefill_logits(tokens, slot, "
                "start_pos, last) -> (T or last, vocab); this runner does not provide it yet"
            )
        self.runner.release(self._slot)
        out = fn(ids.to(self.device), self._slot, 0, last=last).float()
        self.runner.release(self._slot)
        return out

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.runner.release(self._slot)
        return self.runner.prefill(ids.to(self.device), self._slot, 0).float()

    def decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        t = token.view(1).to(self.device)
        p = torch.tensor([pos], dtype=torch.long, device=self.device)
        s = torch.tensor([self._slot], dtype=torch.long, device=self.device)
        return self.runner.decode(t, p, s)[0].float()

    def sync(self) -> None:
        _sync(self.device)

    def close(self) -> None:
        self.runner.release(self._slot)
        del self.runner


def load_runtime(
    kind: str,
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    max_seq: Optional[int] = None,
    lm_head: str = "bf16",
    cpu_int4: str = "auto",
    cpu_fused: str = "auto",
    kv_cache_dtype: str = "auto",
):
    """The runtime `kind` for `model_dir`; a quantized lm_head ("int8", "int4") and a cpu_int4, cpu_fused or
    kv_cache_dtype other than "auto" apply to the jetserve runtime only (else ValueError)."""
    if kind == "transformers":
        if lm_head != "bf16":
            raise ValueError(f"--lm-head {lm_head} needs --runtime jetserve")
        if cpu_int4 != "auto":
            raise ValueError(f"--cpu-int4 {cpu_int4} needs --runtime jetserve")
        if cpu_fused != "auto":
            raise ValueError(f"--cpu-fused {cpu_fused} needs --runtime jetserve")
        if kv_cache_dtype != "auto":
            raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} needs --runtime jetserve")
        return TransformersRuntime(model_dir, device, dtype)
    if kind == "jetserve":
        return JetserveRuntime(
            model_dir,
            device,
            dtype,
            max_seq or 4096,
            lm_head=lm_head,
            cpu_int4=cpu_int4,
            cpu_fused=cpu_fused,
            kv_cache_dtype=kv_cache_dtype,
        )
    raise RuntimeUnavailable(f"unknown runtime {kind!r}; choose transformers or jetserve")
