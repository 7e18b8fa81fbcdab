"""Shared fixtures for the whole suite.

- `model_store`: the demo model store (env `JETSERVE_MODEL_STORE`, else `<repo>/model-store`).
  `make test` runs `jetserve demo prepare` first, so it holds `smollm2-135m-instruct` (bf16) and its
  `-gptq-g64` / `-awq-g64` variants. Only tests/integration uses it; tests/unit runs with an empty store
  (tests/unit/conftest.py).
- `smollm2_dir`: the bf16 SmolLM2-135M-Instruct folder in the store (skips visibly if absent).
- `tiny_tokenizer_dir`: a tiny byte-level BPE tokenizer (`TINY_VOCAB` ids), built in the session with the
  `tokenizers` library, no download and no store. It loads with `AutoTokenizer.from_pretrained(folder)`, has a
  ChatML chat template (`chat_template.jinja`, default system prompt `TINY_SYSTEM_PROMPT`) and SmolLM2's id
  layout: 0 `<|endoftext|>` (unk), 1 `<|im_start|>` (bos), 2 `<|im_end|>` (eos, pad), 3..16 reserved
  specials, then the 256 byte-level symbols in code-point order (ids 17..110 are ASCII "!".."~", so id 35 is
  "3"), then BPE merges.
- `tiny_llama_dir`: a tiny random LlamaForCausalLM (bf16 safetensors + the tiny tokenizer) written once per
  session into a temp folder. Shape: hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads, head_dim 16,
  vocab `TINY_VOCAB` (the tokenizer's length), tied embeddings, max_position 512. Treat it as read-only.
- `tiny_llama_writer` / `write_tiny_llama(out, tokenizer_src, seed, **overrides)`: more such models; the vocab
  follows `tokenizer_src` (49152 with SmolLM2's folder, as some integration tests pass).

Servers and managers in the suite decode eager: `JETSERVE_COMPILE_DECODE=0` is set here (the default is on) so
that each of the suite's many loads does not compile; tests/unit/test_compile.py and the tests that ask for it
turn it on.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m-instruct"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)

TINY_VOCAB = 1024

os.environ.setdefault("JETSERVE_COMPILE_DECODE", "0")
TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|reserved_{i}|>" for i in range(3, 17))
TINY_SYSTEM_PROMPT = "You are a tiny test model."
# ChatML, as SmolLM2's template: a default system turn when the chat does not start with one.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + TINY_SYSTEM_PROMPT + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Training text for the merges: common English words, shuffled with a fixed seed (the vocabulary is stable), so
# English prompts take about as many tokens as with a real tokenizer.
_WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "not word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find any new work part take get place made live where after back little only round "
    "man year came show every good me give our under name very through just form sentence great think say help "
    "low line differ turn cause much mean before move right boy old too same tell does set three want air well "
    "also play small end put home read hand port large spell add even land here must big high such follow act "
    "why ask men change went light kind off need house picture try us again animal point mother world near "
    "build self earth father head stand own page should country found answer school grow study still learn "
    "plant cover food sun four between state keep eye never last let thought city tree cross farm hard start "
    "might story saw far sea draw left late run while press close night real life few north open seem together "
    "next white children begin got walk example ease paper group always music those both mark often letter "
    "until mile river car feet care second book carry took science eat room friend began idea fish mountain "
    "stop once base hear horse cut sure watch color face wood main enough plain girl usual young ready above "
    "ever red list though feel talk bird soon body dog family direct pose leave song measure door product "
    "black short numeral class wind question happen complete ship area half rock order fire south problem "
    "piece told knew pass since top whole king space heard best hour better true during hundred five remember "
    "step early hold west ground interest reach fast verb sing listen six table travel less morning ten simple "
    "several vowel toward war lay against pattern slow center love person money serve appear road map rain "
    "rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine note wait "
    "plan figure star box noun field rest correct able pound done beauty drive stood contain front teach week "
    "final gave green oh quick develop ocean warm free minute strong special mind behind clear tail produce "
    "fact street inch multiply nothing course stay wheel full force blue object decide surface deep moon island "
    "foot system busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran check "
    "game shape equate hot miss brought heat snow tire bring yes distant fill east paint language among count "
    "seven eight nine zero hello story once upon model server token request stream chat text "
    "memory cache batch slot queue prompt user assistant brief helpful tiny"
).split()


def _tiny_corpus(seed: int = 0, n_lines: int = 400) -> list:
    """Seeded lines of 4-14 `_WORDS`, a punctuation mark and a number: the tokenizer's training text."""
    rnd = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rnd.choice(_WORDS) for _ in range(rnd.randint(4, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rnd.choice(".,!?:") + f" {rnd.randint(0, 999)}")
    return lines


def write_tiny_tokenizer(out_dir: Path) -> Path:
    """Train the tiny byte-level BPE tokenizer (exactly `TINY_VOCAB` ids) and save it as an HF folder."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=list(TINY_SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(_tiny_corpus(), trainer)
    assert raw.get_vocab_size() == TINY_VOCAB, f"tiny corpus gave {raw.get_vocab_size()} ids, want {TINY_VOCAB}"
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
    )
    hf.chat_template = TINY_CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)  # writes the template to chat_template.jinja, not tokenizer_config.json
    return out_dir


TINY_LLAMA_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
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
    """Write a random tiny LlamaForCausalLM (bf16 safetensors) with the tokenizer files of `tokenizer_src`.

    `vocab_size` is the length of `tokenizer_src`'s tokenizer, so every id it encodes has an embedding;
    `overrides` change `TINY_LLAMA_CONFIG` (and may set `vocab_size`).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_src), local_files_only=True))
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY_LLAMA_CONFIG, "vocab_size": vocab, **overrides})
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = tokenizer_src / name
        if src.is_file() and not (out_dir / name).exists():
            shutil.copy2(src, out_dir / name)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny tokenizer's HF folder (tokenizer files only). Session-scoped; do not modify it."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer") / "tiny-tokenizer")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny random Llama HF folder (bf16, tiny tokenizer). Session-scoped; do not modify it."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_writer():
    """`write_tiny_llama` as a fixture: test modules cannot `import conftest` (two conftest.py files share the name)."""
    return write_tiny_llama
