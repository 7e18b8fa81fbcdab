"""server/api/structured.py: JSON schema -> llguidance constraint, driven token by token (tiny BPE tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch

from models.sampling import unpack_token_bitmask
from models.tokenizer import Tokenizer
from server.api import structured as S

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "n"],
    "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def allowed_ids(constraint, vocab):
    row = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    constraint.fill_mask(row[0])
    return torch.nonzero(unpack_token_bitmask(row, vocab)[0]).flatten().tolist()


def test_constraint_follows_the_schema_token_by_token(tok):
    vocab = tok.vocab_size
    c = S.compile_constraint(tok, vocab, SCHEMA)
    first = allowed_ids(c, vocab)
    assert first and all(tok.decode([t]).startswith("{") for t in first), [tok.decode([t]) for t in first][:10]
    doc = json.dumps({"name": "ab", "n": 12})  # the compact form the grammar enforces: ", " and ": "
    ids = tok.encode(doc, add_special_tokens=False)
    for i, t in enumerate(ids):
        assert not c.is_terminated()
        assert t in allowed_ids(c, vocab), (i, tok.decode(ids[:i]), tok.decode([t]))
        assert c.accept(t)
    assert c.is_terminated()


def test_rejects_a_token_the_schema_forbids(tok):
    c = S.compile_constraint(tok, tok.vocab_size, SCHEMA)
    (bad,) = tok.encode("x", add_special_tokens=False)[:1]
    assert bad not in allowed_ids(c, tok.vocab_size) and not c.accept(bad)


def test_grammar_cached_per_schema_and_state_per_request(tok):
    S._grammars.clear()
    a = S.compile_constraint(tok, tok.vocab_size, SCHEMA)
    b = S.compile_constraint(tok, tok.vocab_size, dict(reversed(list(SCHEMA.items()))))  # same schema, key order
    assert len(S._grammars) == 1 and a is not b
    for t in tok.encode('{"name": "q', add_special_tokens=False):
        assert a.accept(t)
    assert allowed_ids(b, tok.vocab_size) != allowed_ids(a, tok.vocab_size)  # b did not move
    S.compile_constraint(tok, tok.vocab_size, {"type": "object"})
    assert len(S._grammars) == 2


@pytest.mark.parametrize(
    "schema,part",
    [
        ({"type": "object", "if": {}, "then": {}}, '"if"'),
        ({"$ref": "#/$defs/nope"}, "/$defs/nope"),
        ({"type": "string", "format": "bogus"}, "bogus"),
    ],
)
def test_unsupported_schema_names_the_part(tok, schema, part):
    with pytest.raises(ValueError) as ei:
        S.compile_constraint(tok, tok.vocab_size, schema)
    assert part in str(ei.value)


def _nested(depth):
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    "schema,part",
    [
        ({"type": "array", "minItems": 10**12}, "minItems 1000000000000 at /minItems"),
        ({"properties": {"a": {"type": "array", "items": {"maxItems": 10**6}}}}, "/properties/a/items/maxItems"),
        (_nested(200), "nests deeper than 100"),
    ],
)
def test_sizes_that_would_exhaust_memory_or_stack_are_refused_before_llguidance(tok, schema, part, monkeypatch):
    monkeypatch.setattr(S, "_ll_tokenizer", lambda *a: pytest.fail("reached llguidance"))
    with pytest.raises(ValueError) as ei:
        S.compile_constraint(tok, tok.vocab_size, schema)
    assert part in str(ei.value)
    S.check_schema_size({"type": "array", "maxItems": S.MAX_SCHEMA_COUNT, "items": _nested(40)})  # at the limits


def test_schema_of_response_formats():
    from server.api.protocol import ResponseFormat

    assert S.schema_of(None) is None and S.schema_of(ResponseFormat(type="text")) is None
    assert S.schema_of(ResponseFormat(type="json_object")) == {"type": "object"}
    rf = ResponseFormat(type="json_schema", json_schema={"name": "x", "schema": SCHEMA, "strict": True})
    assert S.schema_of(rf) == SCHEMA
