"""Structured output (`response_format`) on a real server with the real SmolLM2, driven by the official client.

Every answer that finishes with "stop" must parse and validate against its schema (jsonschema), on chat and
completions, streaming and not, alone and 8 at once; a max_tokens cut finishes with "length".
One server: batch 8, context 512.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

pytestmark = pytest.mark.slow

SERVER_SETTINGS = dict(max_batch_size=8)

# strings, arrays and numbers are bounded so that no sampled document can run past max_tokens
SCHEMAS = {
    "person": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "age", "city"],
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"type": "string", "maxLength": 30},
        },
    },
    "colors": {
        "type": "object",
        "additionalProperties": False,
        "required": ["colors"],
        "properties": {
            "colors": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "string", "maxLength": 15}}
        },
    },
    "choice": {
        "type": "object",
        "additionalProperties": False,
        "required": ["answer", "confident"],
        "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "confident": {"type": "boolean"}},
    },
    "nested": {
        "type": "object",
        "additionalProperties": False,
        "required": ["book"],
        "properties": {
            "book": {
                "type": "object",
                "additionalProperties": False,
                "required": ["title", "year"],
                "properties": {
                    "title": {"type": "string", "maxLength": 40},
                    "year": {"type": "integer", "minimum": 0, "maximum": 2100},
                    "rating": {"type": "integer", "minimum": 0, "maximum": 5},
                },
            }
        },
    },
    "list": {
        "type": "array",
        "maxItems": 3,
        "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["id"],
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
        },
    },
}
PROMPTS = {
    "person": "Describe a person as JSON with name, age and city.",
    "colors": "List some colors as JSON.",
    "choice": "Is the sky blue? Answer as JSON.",
    "nested": "Give me a book as JSON.",
    "list": "Give me a JSON list of items with ids.",
}


def fmt(name, strict=True):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": strict}}


def check(name, text, finish_reason):
    assert finish_reason == "stop", (name, finish_reason, text)
    jsonschema.validate(json.loads(text), SCHEMAS[name])


def chat_text(client, name, stream, **kw):
    msgs = [{"role": "user", "content": PROMPTS[name]}]
    if not stream:
        r = client.chat.completions.create(model=kw.pop("model"), messages=msgs, response_format=fmt(name), **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    parts, finish = [], None
    for chunk in client.chat.completions.create(
        model=kw.pop("model"), messages=msgs, response_format=fmt(name), stream=True, **kw
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_chat_json_schema_validates(server, name, stream):
    client = server.openai()
    for seed in range(2):
        text, finish = chat_text(client, name, stream, model=server.model, max_tokens=200, temperature=0.8, seed=seed)
        check(name, text, finish)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_json_schema_validates(server, stream):
    client = server.openai()
    for name in ("person", "list"):
        kw = dict(
            model=server.model,
            prompt=PROMPTS[name] + "\n",
            max_tokens=200,
            temperature=0.0,
            extra_body={"response_format": fmt(name, strict=False)},
        )
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            r = client.completions.create(**kw)
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        check(name, text, finish)


def test_json_object_is_an_object(server):
    """`json_object` constrains every answer to start an object; each that finishes with "stop" parses to a dict.
    Greedy answers alone can run into a repetition inside a string until max_tokens (a 135M model; which prompts
    do depends on the CPU's rounding and on prefix-cache hits), so sampled ones run too, and at least one answer
    must finish."""
    client = server.openai()
    finished = 0
    for stream in (False, True):
        for seed in (None, 0, 1, 2):
            kw = dict(
                model=server.model,
                messages=[{"role": "user", "content": "Say hello in JSON."}],
                max_tokens=200,
                temperature=0.0 if seed is None else 0.8,
                seed=seed,
                response_format={"type": "json_object"},
            )
            if stream:
                parts, finish = [], None
                for chunk in client.chat.completions.create(stream=True, **kw):
                    if chunk.choices:
                        parts.append(chunk.choices[0].delta.content or "")
                        finish = chunk.choices[0].finish_reason or finish
                text = "".join(parts)
            else:
                r = client.chat.completions.create(**kw)
                text, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert finish in ("stop", "length") and text.lstrip().startswith("{"), (stream, seed, finish, text)
            if finish == "stop":
                finished += 1
                assert isinstance(json.loads(text), dict), (stream, seed, text)
    assert finished >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_eight_at_once_with_an_unconstrained_neighbour(server, stream):
    """7 constrained requests and a greedy free-text one in one batch of 8: all 7 validate, and the free one
    stays free text (masks are per row; its exact text may differ from a run alone, as batched numerics do)."""
    client = server.async_openai()
    free = dict(
        model=server.model, messages=[{"role": "user", "content": "Name three colors."}], max_tokens=24, temperature=0.0
    )

    async def one(i):
        name = sorted(SCHEMAS)[i % len(SCHEMAS)]
        kw = dict(
            model=server.model,
            messages=[{"role": "user", "content": PROMPTS[name]}],
            response_format=fmt(name),
            max_tokens=200,
            temperature=0.8,
            seed=100 + i,
        )
        if not stream:
            r = await client.chat.completions.create(**kw)
            return name, r.choices[0].message.content, r.choices[0].finish_reason
        parts, finish = [], None
        async for chunk in await client.chat.completions.create(stream=True, **kw):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return name, "".join(parts), finish

    async def main():
        return await asyncio.gather(*[one(i) for i in range(7)], client.chat.completions.create(**free))

    results = asyncio.run(main())
    for name, text, finish in results[:7]:
        check(name, text, finish)
    text = results[7].choices[0].message.content
    assert text and text.lstrip()[0] not in "{[", text  # a leaked mask would force a JSON document
    assert server.engine().max_batch_seen >= 8


def test_sdk_parse_with_a_pydantic_model(server):
    """The SDK's own strict schema (titles, $defs / $ref, additionalProperties false) round-trips to a model."""
    from typing import List, Literal

    from pydantic import BaseModel, Field

    class Item(BaseModel):
        name: str = Field(max_length=20)
        qty: int = Field(ge=0, le=99)  # bounded: an unbounded int lets a small model emit digits until max_tokens

    class Order(BaseModel):
        items: List[Item] = Field(max_length=3)
        status: Literal["open", "closed"]

    r = server.openai().chat.completions.parse(
        model=server.model,
        response_format=Order,
        max_tokens=200,
        messages=[{"role": "user", "content": "An order as JSON."}],
        temperature=0.5,
        seed=1,
    )
    assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Order), r


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cut_is_length_and_a_prefix(server, stream):
    """Cut by max_tokens: finish_reason "length" (as OpenAI), the text is the valid start of a document but
    not a whole one, so it does not parse."""
    text, finish = chat_text(server.openai(), "person", stream, model=server.model, max_tokens=6, temperature=0.0)
    assert finish == "length" and text.startswith("{"), text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
