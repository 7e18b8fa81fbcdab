"""Hostile and malformed input against a real server (uvicorn on 127.0.0.1, tiny random Llama, 128-token
context): every answer is a 4xx with an OpenAI-shaped error (or a normal 200), never a 5xx, never a hang."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

pytestmark = pytest.mark.slow

TIMEOUT = httpx.Timeout(30.0)


def assert_openai_error(r: httpx.Response, *statuses: int) -> dict:
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    err = body.get("error")
    assert isinstance(err, dict), body
    assert isinstance(err.get("message"), str) and err["message"], body
    assert isinstance(err.get("type"), str) and err["type"], body
    assert "param" in err and "code" in err, body
    return err


def chat(model, content="Hello", **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory, tiny_llama_dir):
    """The shared real-uvicorn server over a store holding a copy of the tiny Llama, 128-token context."""
    store = tmp_path_factory.mktemp("bad-input-store")
    shutil.copytree(tiny_llama_dir, store / "tiny")
    with start_server(model_store=store, model="tiny", max_context=128, max_body_bytes=1_000_000) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT, trust_env=False) as c:
        yield c


def test_sanity_valid_request_works(http, server):
    r = http.post("/v1/chat/completions", json=chat(server.model))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_beyond_context(http, server, endpoint, stream):
    long = "hello world " * 400  # ~800 tokens > 128-token context
    if endpoint == "chat":
        r = http.post("/v1/chat/completions", json=chat(server.model, long, stream=stream))
    else:
        r = http.post(
            "/v1/completions", json={"model": server.model, "prompt": long, "max_tokens": 4, "stream": stream}
        )
    err = assert_openai_error(r, 400)
    assert "context" in err["message"].lower() or "token" in err["message"].lower(), err


def test_invalid_utf8_body(http, server):
    raw = b'{"model": "' + server.model.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe\xc3("}]}'
    r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


@pytest.mark.parametrize("escape", ["\\ud800", "abc\\udfff", "\\udc00\\ud800x"])
def test_lone_surrogates(http, server, escape):
    raw = '{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": "%s"}]}' % (server.model, escape)
    r = http.post("/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    r = http.post(
        "/v1/completions",
        content=raw.replace('"messages": [{"role": "user", "content": ', '"prompt": ').replace("}]}", "}").encode(),
        headers={"content-type": "application/json"},
    )
    assert_openai_error(r, 400)
    pair = raw.replace(escape, "\\ud83d\\ude00")  # a valid surrogate pair (an emoji) is fine
    assert (
        http.post(
            "/v1/chat/completions", content=pair.encode(), headers={"content-type": "application/json"}
        ).status_code
        == 200
    )


@pytest.mark.parametrize("value", [0, -1, -(2**31), 2**63, 2**70, "ten", 1.5, None])
def test_bad_max_tokens(http, server, value):
    body = chat(server.model)
    body["max_tokens"] = value
    r = http.post("/v1/chat/completions", json=body)
    if value is None:
        assert r.status_code == 200, r.text  # null = the rest of the context
        return
    assert_openai_error(r, 400)


@pytest.mark.parametrize("value", [10**6, 10**9])
def test_huge_max_tokens_is_refused(http, server, value):
    """More than the context can hold: 400 naming the context, never an unbounded generation."""
    r = http.post("/v1/chat/completions", json=chat(server.model, max_tokens=value, ignore_eos=True))
    err = assert_openai_error(r, 400)
    assert str(server.settings.max_context) in err["message"], err


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "repetition_penalty"])
def test_non_finite_floats(http, server, field, literal):
    raw = '{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (
        server.model,
        field,
        literal,
    )
    r = http.post("/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_thousand_stop_strings(http, server):
    r = http.post("/v1/chat/completions", json=chat(server.model, stop=[f"stop{i}" for i in range(1000)]))
    assert_openai_error(r, 400)


def test_stop_strings_of_wrong_type(http, server):
    for stop in ([1, 2], [""], {"a": 1}, [None]):
        r = http.post("/v1/chat/completions", json=chat(server.model, stop=stop))
        assert_openai_error(r, 400)


@pytest.mark.parametrize("depth", [100, 5000, 100000])
def test_deeply_nested_json(http, server, depth):
    nested = "[" * depth + "]" * depth
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "metadata": %s}' % (
        server.model,
        nested,
    )
    r = http.post("/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
    if r.status_code != 200:  # ignored unknown field at a depth Python parses is fine; otherwise a clean 400/413
        assert_openai_error(r, 400, 413)
    nested_msg = '{"role": "user", "content": ' + "[" * depth + "]" * depth + "}"
    raw = '{"model": "%s", "messages": [%s]}' % (server.model, nested_msg)
    r = http.post("/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
    assert_openai_error(r, 400, 413)


def test_ten_megabyte_body(http, server):
    big = "a" * (10 * 1024 * 1024)
    r = http.post("/v1/chat/completions", json=chat(server.model, big))
    err = assert_openai_error(r, 413)
    assert str(server.settings.max_body_bytes) in err["message"]


def test_ten_megabyte_chunked_body(http, server):
    def gen():
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"a" * (1024 * 1024)
        yield b'"}]}'

    r = http.post("/v1/chat/completions", content=gen(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml", None]
)
def test_wrong_content_type(http, server, ctype):
    headers = {"content-type": ctype} if ctype else {}
    raw = json.dumps(chat(server.model)).encode()
    r = http.post("/v1/chat/completions", content=raw, headers=headers)
    if ctype is None:  # no content type: the body is read as JSON
        assert r.status_code == 200, r.text
    else:
        assert_openai_error(r, 415)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"string"',
        b"42",
        b'{"messages": "hi"}',
        b'{"messages": []}',
        b'{"messages": [{"role": "wizard", "content": "x"}]}',
        b'{"messages": [{"content": "x"}]}',
        b"\x00\x01\x02",
    ],
)
def test_malformed_bodies(http, server, raw):
    r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_unknown_model(http):
    for endpoint, body in (
        ("/v1/chat/completions", chat("no-such-model")),
        ("/v1/completions", {"model": "no-such-model", "prompt": "hi", "max_tokens": 2}),
    ):
        err = assert_openai_error(http.post(endpoint, json=body), 404)
        assert "no-such-model" in err["message"]
    assert_openai_error(http.get("/v1/models/no-such-model"), 404)


@pytest.mark.parametrize(
    "name",
    [
        "../../etc",
        "../../etc/passwd",
        "/etc",
        "/etc/passwd",
        "..",
        ".",
        "a/../../etc",
        "..\\..\\etc",
        "%2e%2e/%2e%2e/etc",
        "\u0000",
        "~root",
        "x" * 5000,
    ],
)
def test_model_path_traversal(http, server, name):
    r = http.post("/v1/chat/completions", json=chat(name))
    err = assert_openai_error(r, 400, 404)
    assert "root:" not in r.text
    assert "passwd" not in err.get("message", "") or name.endswith("passwd")


def test_traversal_via_models_route(http):
    for path in ("/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/../../etc/passwd", "/v1/models/%2e%2e"):
        r = http.get(path)
        assert r.status_code in (400, 404), (path, r.status_code)
        assert "root:" not in r.text


def test_unknown_route_and_method(http):
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)
    assert_openai_error(http.delete("/v1/models"), 405)


UNSUPPORTED = [  # (endpoint, field, a value the server cannot honour): each must be a 400 naming the field
    ("chat", "n", 5),  # above the batch size (4)
    ("completions", "n", 64),
    ("chat", "n", 0),
    ("chat", "logit_bias", {"50256": -100}),
    ("completions", "logit_bias", {"1": 5}),
    ("completions", "echo", True),
    ("completions", "best_of", 2),
    ("completions", "suffix", "end"),
    ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]),  # the tiny template has no tool support
    ("chat", "tools", [{"type": "retrieval", "function": {"name": "f"}}]),
    ("chat", "tool_choice", "required"),  # without tools
    ("chat", "tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("chat", "messages", [{"role": "tool", "content": "1"}]),  # no tool_call_id
    ("chat", "functions", [{"name": "f"}]),
    ("chat", "function_call", "auto"),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "prediction", {"type": "content", "content": "x"}),
    ("chat", "reasoning_effort", "high"),
    ("chat", "web_search_options", {}),
    ("chat", "response_format", {"type": "yaml"}),
    ("completions", "response_format", {"type": "json_schema"}),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint,field,value", UNSUPPORTED, ids=lambda x: str(x)[:20])
def test_unsupported_field_is_400_naming_it(http, server, endpoint, field, value, stream):
    """Never a 200 that silently ignores the field (the client would trust an answer it did not get)."""
    body = chat(server.model) if endpoint == "chat" else {"model": server.model, "prompt": "hi", "max_tokens": 4}
    body.update({field: value, "stream": stream})
    r = http.post(f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", json=body)
    err = assert_openai_error(r, 400)
    assert err["param"].split(".")[0] == field and err["message"].startswith(err["param"] + ": "), err


@pytest.mark.parametrize(
    "schema,part",
    [
        ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, '"if"'),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "/$defs/missing"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"type": "strange"}, "strange"),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 10**12}, "minItems"),
    ],
)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_schema_that_cannot_be_enforced_is_400_naming_the_part(http, server, schema, part, endpoint):
    body = chat(server.model) if endpoint == "chat" else {"model": server.model, "prompt": "hi", "max_tokens": 4}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    err = assert_openai_error(http.post(f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", json=body), 400)
    assert err["param"] == "response_format.json_schema.schema" and part in err["message"], err


def test_neutral_values_are_accepted(http, server):
    r = http.post(
        "/v1/chat/completions",
        json=chat(
            server.model, n=1, tools=[], tool_choice="none", response_format={"type": "text"}, parallel_tool_calls=False
        ),
    )
    assert r.status_code == 200, r.text
    # tools with tool_choice "none" are not rendered, so a model without tool support answers
    tool = {"type": "function", "function": {"name": "f"}}
    r = http.post("/v1/chat/completions", json=chat(server.model, tools=[tool], tool_choice="none"))
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"], r.text


def test_server_still_healthy_after_abuse(http, server):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/chat/completions", json=chat(server.model))
    assert r.status_code == 200, r.text
