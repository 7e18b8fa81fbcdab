"""Attention-sink weighting of GPTQ's Hessian (jetserve's addition to GPTQModel's GPTQ).

Why: GPTQ minimises the output error of each linear averaged over calibration tokens, H = 2/n * sum_t x_t x_t^T.
In a decoder LM the first token of a sequence is an attention sink: most heads of every later token put most of
their attention on it, and its value vector is near zero so that attending to it is a no-op. An error on the
sink's key or value is therefore added to the attention output of every later token, but plain GPTQ weighs the
sink like any one of the `seqlen` tokens of a calibration sample and trades its accuracy away for the others.
On SmolLM2-135M, layer 20's v_proj under GPTQ g64 had a squared output error of 5.05 on the sink (round-to-nearest:
0.36; the sink's squared value norm is only 2.83) while the other positions' error was 2.6x lower than
round-to-nearest's (docs/benchmarks.md).

What: while GPTQModel accumulates the Hessian of an attention input projection (q/k/v, the layers whose error on
the sink reaches every later token through attention), the first position of every calibration sample counts
`weight` times (its row is scaled by sqrt(weight)); H = 2/n * (weight * x_0 x_0^T + sum_{t>0} x_t x_t^T).
Everything else (sample count, damping, the quantizer, the other layers) is unchanged. weight 1 is plain GPTQ.
Weighting every linear was measured worse on SmolLM2 (docs/benchmarks.md); a likely but untested reason is that the
sink's massive MLP activations then dominate those Hessians and GPTQModel's damping (a fraction of their mean
diagonal).

The hook wraps `gptqmodel.quantization.gptq.GPTQ.add_batch`, whose per-sample call receives the inputs as
(1, tokens, in_features) (batch_size=1, every token kept). The wrapper checks that contract and fails loudly if
GPTQModel changes it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Iterator, Tuple

# Module-name suffixes of the attention input projections (Llama/Mistral/Qwen2/OPT, fused qkv, GPT-2, NeoX, MPT).
ATTENTION_INPUTS: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv")


class SinkWeightingError(RuntimeError):
    """GPTQModel's Hessian hook no longer matches what the sink weighting wraps."""


@contextlib.contextmanager
def sink_weighted_hessian(weight: float, modules: Tuple[str, ...] = ATTENTION_INPUTS) -> Iterator[None]:
    """Within the block, the GPTQ Hessians of linears whose name ends with one of `modules` count each calibration
    sample's first token `weight` times."""
    if weight == 1.0:
        yield
        return
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"sink weight must be a positive number, got {weight}")
    import torch
    from gptqmodel.quantization import gptq as gptq_mod

    cls = getattr(gptq_mod, "GPTQ", None)
    original = getattr(cls, "add_batch", None)
    if original is None or list(inspect.signature(original).parameters)[:3] != ["self", "inp", "out"]:
        raise SinkWeightingError(
            "gptqmodel.quantization.gptq.GPTQ.add_batch(self, inp, out, ...) not found; "
            "sink weighting supports gptqmodel 7.6"
        )
    row_scale = math.sqrt(weight)

    def add_batch(self, inp, out, *args, **kwargs):
        if isinstance(self.module, torch.nn.Linear) and str(getattr(self, "name", "")).endswith(modules):
            if inp.dim() != 3 or inp.shape[0] != 1:
                raise SinkWeightingError(
                    f"expected per-sample inputs (1, tokens, in_features) for {self.name}, got "
                    f"{tuple(inp.shape)}; quantize with batch_size=1"
                )
            inp = inp.clone()
            inp[:, 0] *= row_scale  # (1, tokens, in): the sample's first token is the sink
        return original(self, inp, out, *args, **kwargs)

    cls.add_batch = add_batch
    try:
        yield
    finally:
        cls.add_batch = original
