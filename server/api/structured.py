"""Structured output: `response_format` -> a grammar the engine enforces as a token mask (llguidance).

The edge compiles the request's JSON schema here (cached per tokenizer and schema) and hands the engine an
opaque `GrammarConstraint` (the engine's `TokenConstraint` protocol): the engine never sees the schema or
text, only "fill the allowed-token mask", "accept this token" and "is the document complete".

Why llguidance (measured, see docs/api.md): no Python dependencies and one abi3 wheel per platform (aarch64
JetPack 6 and x86_64, any Python >= 3.9), a typical schema compiles in a few milliseconds, the mask costs
about 0.1-0.2 ms per step on CPU, and a schema it cannot enforce is refused with a message naming the keyword.

Nothing here imports torch: `fill_mask` writes through the row's `data_ptr()`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections import OrderedDict
from typing import Any, Optional, Tuple

from server.api.errors import APIError

GRAMMAR_CACHE_SIZE = 128  # compiled grammars kept per process (LRU)
# llguidance expands item/property counts into grammar rules before its own size limit applies (maxItems 10**7
# took > 5 GB); 10,000 costs nothing measurable and is far beyond what a context can hold
MAX_SCHEMA_COUNT = 10_000
_COUNT_KEYS = ("minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains")
MAX_SCHEMA_NESTING = 100  # JSON containers inside the schema; deeper is refused before any recursion
# compact JSON (no free whitespace): a small model cannot pad a document with newlines until max_tokens
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_lock = threading.Lock()
_tokenizers: "weakref.WeakKeyDictionary[Any, Tuple[int, Any]]" = weakref.WeakKeyDictionary()
_grammars: "OrderedDict[Tuple[int, str], Tuple[Any, Any]]" = OrderedDict()  # -> (LLTokenizer, matcher)


class GrammarConstraint:
    """One request's grammar state; implements server.engine.request.TokenConstraint (engine thread only)."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: Any):
        self._matcher = matcher

    def fill_mask(self, row: Any) -> None:
        """Write the allowed next tokens into `row` (contiguous CPU int32, ceil(V/32) words)."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.consume_token(token_id)) and not self._matcher.is_error()

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_stopped())


def schema_of(response_format: Any) -> Optional[dict]:
    """The JSON schema a `ResponseFormat` asks for; None for text (no constraint)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    return response_format.json_schema.schema_ or {}


def check_schema_size(schema: Any) -> None:
    """Raise ValueError naming the keyword when a schema nests deeper than MAX_SCHEMA_NESTING or asks for
    more than MAX_SCHEMA_COUNT items or properties (iterative: a hostile schema cannot exhaust the stack)."""
    stack = [(schema, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_SCHEMA_NESTING:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_NESTING} levels (at {path or '/'})")
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            where = f"{path}/{key}"
            if key in _COUNT_KEYS and isinstance(value, (int, float)) and value > MAX_SCHEMA_COUNT:
                raise ValueError(f"{key} {value} at {where} is above the supported {MAX_SCHEMA_COUNT}")
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1, where))


def _ll_tokenizer(tokenizer: Any, vocab: int) -> Any:
    """llguidance's view of a jetserve `Tokenizer` with `vocab` logits columns, built once (~0.3 s) per tokenizer."""
    import llguidance.hf

    with _lock:
        hit = _tokenizers.get(tokenizer)
        if hit is not None and hit[0] == vocab:
            return hit[1]
    llt = llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=vocab)
    with _lock:
        _tokenizers[tokenizer] = (vocab, llt)
    return llt


def compile_constraint(tokenizer: Any, vocab: int, schema: dict) -> GrammarConstraint:
    """A fresh constraint for `schema`; raise ValueError naming what cannot be enforced. Blocking: call it in a
    worker thread. The compiled grammar is cached per (tokenizer, schema); each request gets its own copy."""
    import llguidance

    check_schema_size(schema)

    def build() -> str:
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"invalid JSON schema: {e}") from None

    return _compiled(tokenizer, vocab, "schema:" + json.dumps(schema, sort_keys=True), build)


def json_options() -> dict:
    """The JSON layout structured output enforces (compact, fixed separators), as llguidance's `x-guidance`
    schema key: put it in a schema embedded in a Lark grammar (`%json {...}`) to get the same layout there."""
    return dict(_JSON_OPTIONS)


def compile_lark_constraint(tokenizer: Any, vocab: int, lark: str) -> GrammarConstraint:
    """A fresh constraint for a llguidance Lark grammar (embedded `%json` schemas allowed; run their schemas
    through `check_schema_size` first); ValueError with llguidance's message when it does not compile.
    Blocking, cached as `compile_constraint`."""
    import llguidance

    def build() -> str:
        try:
            return llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as e:
            raise ValueError(f"invalid grammar: {e}") from None

    return _compiled(tokenizer, vocab, "lark:" + lark, build)


def _compiled(tokenizer: Any, vocab: int, text: str, build: Any) -> GrammarConstraint:
    """A copy of the cached matcher for grammar `text`, compiling `build()` (a llguidance grammar) on a miss."""
    import llguidance

    llt = _ll_tokenizer(tokenizer, vocab)
    key = (id(llt), text)
    with _lock:
        hit = _grammars.get(key)
        template = hit[1] if hit is not None and hit[0] is llt else None  # an id can be reused after a reload
        if template is not None:
            _grammars.move_to_end(key)
    if template is None:
        grammar = build()
        error = llguidance.LLMatcher.validate_grammar(grammar, llt)
        if error:
            raise ValueError(error)
        template = llguidance.LLMatcher(llt, grammar, log_level=0)
        template.compute_bitmask()  # builds the first lexer states here (~1.5 ms), not on the engine thread
        if template.is_error():
            raise ValueError(template.get_error())
        with _lock:
            _grammars[key] = (llt, template)
            while len(_grammars) > GRAMMAR_CACHE_SIZE:
                _grammars.popitem(last=False)
    return GrammarConstraint(template.deep_copy())


async def constraint_for(lm: Any, response_format: Any) -> Optional[GrammarConstraint]:
    """The request's constraint, or None without one; an unusable schema is a 400 naming it."""
    schema = schema_of(response_format)
    if schema is None:
        return None
    vocab = int(getattr(lm.runner, "vocab_size", 0) or lm.tokenizer.vocab_size)
    try:
        return await asyncio.to_thread(compile_constraint, lm.tokenizer, vocab, schema)
    except ValueError as e:
        param = "response_format.json_schema.schema" if response_format.type == "json_schema" else "response_format"
        raise APIError(400, f"{param}: unsupported schema: {e}", param=param, code="invalid_value") from None
