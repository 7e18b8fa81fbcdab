"""Text side of the runtime: tokenizer, chat template and an incremental detokenizer.

The runner never sees text; these classes turn text into ids before it and ids into text after it.
`IncrementalDetokenizer` uses the prefix-offset / read-offset technique of vLLM and TGI: each new token is
decoded together with a few tokens before it and only the text past the previously decoded window is
emitted, so byte-level BPE pieces and sentencepiece byte-fallback tokens that split a UTF-8 character are
held back until the character is complete (their decode ends in U+FFFD).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

# Prompt tokens decoded before the first generated token so that leading-space rules match a full decode.
INITIAL_PREFIX_TOKENS = 5
# Special tokens that end a document; if the vocabulary has one as a special token it also ends generation.
_DOCUMENT_END_TOKENS = ("<|endoftext|>",)


def _as_ids(value) -> List[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def config_eos_token_ids(model_dir: Union[str, Path]) -> Tuple[int, ...]:
    """`eos_token_id` of generation_config.json, then of config.json (an int or a list each), without repeats.

    The runner's eos ids (what the engine stops on); `Tokenizer.eos_token_ids` starts from these.
    """
    model_dir = Path(model_dir)
    ids: List[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                ids += _as_ids(json.load(f).get("eos_token_id"))
    return tuple(dict.fromkeys(ids))


def _backend_decode(hf_tokenizer):
    """The `tokenizers` library's own decode where transformers' `decode` adds nothing to it (a fast tokenizer
    that does not override `_decode` and does not clean up spaces): the same text without transformers' per-call
    Python layers, which the streaming detokenizer pays twice a token. None otherwise."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(hf_tokenizer, "_tokenizer", None)
    if (
        backend is None
        or not isinstance(hf_tokenizer, PreTrainedTokenizerFast)
        or type(hf_tokenizer)._decode is not PreTrainedTokenizerFast._decode
        or getattr(hf_tokenizer, "clean_up_tokenization_spaces", True)
    ):
        return None
    return backend.decode


class Tokenizer:
    """A Hugging Face tokenizer with the few operations jetserve needs.

    `eos_token_ids` unions generation_config.json's and config.json's `eos_token_id`, the tokenizer's eos token
    and a special `<|endoftext|>` (SmolLM2: `<|im_end|>` = 2 and `<|endoftext|>` = 0).
    """

    def __init__(self, hf_tokenizer, eos_token_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        self._backend_decode = _backend_decode(hf_tokenizer)
        ids = list(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.append(int(hf_tokenizer.eos_token_id))
        special = set(getattr(hf_tokenizer, "all_special_ids", ()) or ())
        for tok in _DOCUMENT_END_TOKENS:
            tid = hf_tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid in special:
                ids.append(tid)
        self.eos_token_ids: Tuple[int, ...] = tuple(dict.fromkeys(ids))
        self.vocab_size: int = len(hf_tokenizer)

    @classmethod
    def from_dir(cls, model_dir: Union[str, Path], trust_remote_code: bool = False) -> "Tokenizer":
        """Load the tokenizer files of an HF model folder (offline; never downloads)."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
        return cls(hf, config_eos_token_ids(model_dir))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_template_text(self, with_tools: bool = False) -> str:
        """The chat template's source ("" without one). A tokenizer with several named templates gives the one
        `apply_chat_template` uses: "tool_use" when `with_tools` and it exists, else "default"."""
        t = getattr(self.hf, "chat_template", None)
        if isinstance(t, dict):
            return str(t.get("tool_use") if with_tools and "tool_use" in t else t.get("default", ""))
        return str(t or "")

    def is_special_token(self, text: str) -> bool:
        """Whether `text` is one of the tokenizer's special tokens (decoding drops those)."""
        return text in set(getattr(self.hf, "all_special_tokens", ()) or ())

    def render_chat(
        self, messages: List[dict], add_generation_prompt: bool = True, tools: Optional[List[dict]] = None
    ) -> str:
        """The chat template applied to `messages` (and `tools`, OpenAI tool dicts, passed as the template's
        `tools` variable), as text. ValueError if the model has no chat template or the template fails (a
        template's `raise_exception` included)."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use the completions endpoint with a plain prompt")
        from jinja2 import TemplateError

        try:
            return self.hf.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except TemplateError as e:
            raise ValueError(f"the model's chat template failed: {e}") from None

    def apply_chat_template(
        self, messages: List[dict], add_generation_prompt: bool = True, tools: Optional[List[dict]] = None
    ) -> List[int]:
        """Token ids of the rendered chat (the template writes its own special tokens, so none are added)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas, with stop strings.

    `add(token_id)` returns the newly safe text: it holds back an incomplete UTF-8 character and the longest
    suffix that could be the start of a stop string. When a stop string completes, `stopped` becomes True and
    the text returned ends right before it (the stop string is never emitted); later calls return "".
    `finish()` flushes what was held back. The concatenation of everything returned equals
    `tokenizer.decode(generated_ids)` when no stop string matched.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        prompt_ids: Optional[Sequence[int]] = None,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        prompt = list(prompt_ids or ())
        self._ids: List[int] = prompt[max(0, len(prompt) - INITIAL_PREFIX_TOKENS) :]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        stops = sorted({s for s in stop if s}, key=lambda s: (len(s), s))
        self.stop = tuple(stops)
        self._stop_re = re.compile("|".join(re.escape(s) for s in stops)) if stops else None
        self._stop_prefixes = frozenset(s[:i] for s in stops for i in range(1, len(s)))
        self._max_hold = max((len(s) for s in stops), default=1) - 1
        self._held = ""
        self.stopped = False
        self.stop_reason: Optional[str] = None  # the stop string that matched
        self.text = ""

    def _decode_new(self) -> str:
        """Text of tokens past read_offset, or "" while it ends in an incomplete character."""
        decode = self.tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        full = decode(self._ids[self._prefix_offset :], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def _emit(self, new: str, final: bool) -> str:
        buf = self._held + new
        if self._stop_re is not None:
            m = self._stop_re.search(buf)
            if m is not None:
                self.stopped = True
                self.stop_reason = m.group(0)
                self._held = ""
                out = buf[: m.start()]
                self.text += out
                return out
        hold = 0
        if not final and self._stop_prefixes:
            for k in range(min(len(buf), self._max_hold), 0, -1):
                if buf[-k:] in self._stop_prefixes:
                    hold = k
                    break
        out, self._held = (buf[:-hold], buf[-hold:]) if hold else (buf, "")
        self.text += out
        return out

    def add(self, token_id: int) -> str:
        """Feed one generated token id; return the text that became safe to show."""
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        new = self._decode_new()
        if not new and not self._held:
            return ""
        return self._emit(new, final=False)

    def finish(self) -> str:
        """Flush held-back text (an incomplete character is emitted as decoded, U+FFFD included)."""
        if self.stopped:
            return ""
        decode = self.tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        full = decode(self._ids[self._prefix_offset :], self.skip_special_tokens)
        rest = full[len(prefix) :] if len(full) > len(prefix) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._emit(rest, final=True)
