"""Shared fixtures for the whole suite.

- `model_store`: the demo model store (env `JETSERVE_MODEL_STORE`, else `<repo>/model-store`).
  `make test` runs `jetserve demo prepare` first, so it holds `smollm2-135m-instruct` (bf16) and its
  `-gptq-g64` / `-awq-g64` variants.
- `smollm2_dir`: the bf16 SmolLM2-135M-Instruct folder in the store (skips visibly if absent).
- `tiny_llama_dir`: a tiny random LlamaForCausalLM (bf16 safetensors + SmolLM2's tokenizer) written once per
  session into a temp folder. Shape: hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads, head_dim 16,
  vocab 49152 (SmolLM2's tokenizer), tied embeddings, max_position 512. Treat it as read-only.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")

TINY_LLAMA_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=49152,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def _store_path() -> Path:
    env = os.environ.get("JETSERVE_MODEL_STORE")
    return Path(env) if env else REPO_ROOT / "model-store"


@pytest.fixture(scope="session")
def model_store() -> Path:
    """Path of the model store (may not exist; tests needing a model should use `smollm2_dir`)."""
    return _store_path()


@pytest.fixture(scope="session")
def smollm2_dir(model_store: Path) -> Path:
    """The bf16 SmolLM2-135M-Instruct HF folder; skips (visibly) when `jetserve demo prepare` has not run."""
    d = model_store / SMOLLM2
    if not (d / "config.json").is_file():
        pytest.skip(f"{d} missing: run `jetserve demo prepare` (make test does)")
    return d


def write_tiny_llama(out_dir: Path, tokenizer_src: Path, seed: int = 0, **overrides) -> Path:
    """Write a random tiny LlamaForCausalLM (bf16 safetensors) with the tokenizer files of `tokenizer_src`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY_LLAMA_CONFIG, **overrides})
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = tokenizer_src / name
        if src.is_file() and not (out_dir / name).exists():
            shutil.copy2(src, out_dir / name)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir: Path) -> Path:
    """A tiny random Llama HF folder (bf16, SmolLM2 tokenizer). Session-scoped; do not modify it."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llama_writer():
    """`write_tiny_llama` as a fixture: test modules cannot `import conftest` (two conftest.py files share the name)."""
    return write_tiny_llama
