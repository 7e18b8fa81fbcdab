"""OPT: pre-LayerNorm, learned positions (offset 2), ReLU fc1/fc2 MLP, biases everywhere, MHA."""

from __future__ import annotations

from typing import Any, Dict

from . import ArchSpec, Dims, UnsupportedArchError

LAYER = "model.decoder.layers.{i}."


def opt_dims(cfg: Dict[str, Any]) -> Dims:
    hidden = int(cfg["hidden_size"])
    if int(cfg.get("word_embed_proj_dim", hidden)) != hidden:
        raise UnsupportedArchError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
    if not cfg.get("do_layer_norm_before", True):
        raise UnsupportedArchError("post-LayerNorm OPT (do_layer_norm_before=false) is not supported")
    if cfg.get("activation_function", "relu") != "relu":
        raise UnsupportedArchError(f"OPT activation {cfg.get('activation_function')!r} is not supported")
    heads = int(cfg["num_attention_heads"])
    return Dims(
        hidden=hidden,
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=heads,
        head_dim=hidden // heads,
        intermediate=int(cfg["ffn_dim"]),
        vocab=int(cfg["vocab_size"]),
        max_position=int(cfg.get("max_position_embeddings", 2048)),
        norm_eps=1e-5,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=bool(cfg.get("enable_bias", True)),
        mlp_bias=bool(cfg.get("enable_bias", True)),
    )


OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    norm="layer",
    mlp="relu",
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    positions="learned",
    pos_offset=2,
    embed="model.decoder.embed_tokens",
    pos_embed="model.decoder.embed_positions",
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
    layer=LAYER,
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    input_norm="self_attn_layer_norm",
    post_norm="final_layer_norm",
    mlp_names=("fc1", "fc2"),
    parse_dims=opt_dims,
)
