"""Llama 2/3 (llama3 RoPE scaling), SmolLM2 (a Llama) and Mistral: RMSNorm, gated SiLU MLP, RoPE, GQA."""

from __future__ import annotations

from typing import Any, Dict

from . import ArchSpec, Dims, UnsupportedArchError, rope_params

LAYER = "model.layers.{i}."


def llama_dims(cfg: Dict[str, Any]) -> Dims:
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = rope_params(cfg)
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise UnsupportedArchError("pretraining_tp > 1 is not supported")
    return Dims(
        hidden=hidden,
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate=int(cfg["intermediate_size"]),
        vocab=int(cfg["vocab_size"]),
        max_position=int(cfg.get("max_position_embeddings", 2048)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def _llama_like(name: str, model_types, qkv_bias: bool, parse) -> ArchSpec:
    return ArchSpec(
        name=name,
        model_types=tuple(model_types),
        norm="rms",
        mlp="gated_silu",
        qkv_bias=qkv_bias,
        o_bias=False,
        mlp_bias=False,
        positions="rope",
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        layer=LAYER,
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        input_norm="input_layernorm",
        post_norm="post_attention_layernorm",
        mlp_names=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        parse_dims=parse,
    )


LLAMA = _llama_like("llama", ("llama",), False, llama_dims)
# Mistral's sliding window only matters past `sliding_window` tokens; the runner caps max_seq there.
MISTRAL = _llama_like("mistral", ("mistral",), False, llama_dims)
