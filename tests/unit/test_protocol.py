"""Protocol schemas, error shaping and the auth / body-limit middleware (no model, no server)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from models.sampling import LIMITS, SamplingParams
from server.api import protocol as P
from server.api.auth import AuthMiddleware, BodyLimitMiddleware, check_bearer
from server.api.errors import from_validation_error


def test_completion_request_defaults_and_stop_forms():
    r = P.CompletionRequest(prompt="hi")
    assert (r.temperature, r.top_p, r.top_k, r.n, r.stream, r.max_tokens) == (1.0, 1.0, 0, 1, False, None)
    assert r.stop_list == [] and not r.include_usage
    assert P.CompletionRequest(prompt="hi", stop="\n").stop_list == ["\n"]
    assert P.CompletionRequest(prompt="hi", stop=["a", "b"]).stop_list == ["a", "b"]
    assert P.CompletionRequest(prompt=["only one"]).prompt == "only one"
    assert P.CompletionRequest(prompt=[[1, 2, 3]]).prompt == [1, 2, 3]
    assert P.CompletionRequest(prompt="x", stream=True, stream_options={"include_usage": True}).include_usage
    assert P.CompletionRequest(prompt="x", some_future_field=1).prompt == "x"  # unknown fields ignored


@pytest.mark.parametrize(
    "kw,param",
    [
        (dict(n=0), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=2.5), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(logprobs=21), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(stop=["s"] * 17), "stop"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(echo=True), "echo"),
        (dict(best_of=2), "best_of"),
        (dict(logit_bias={"1": 2.0}), "logit_bias"),
        (dict(response_format={"type": "xml"}), "response_format.type"),
        (dict(prompt=["a", "b"]), "prompt"),
        (dict(prompt=""), "prompt"),
        (dict(max_tokens=0), "max_tokens"),
    ],
)
def test_completion_request_refusals(kw, param):
    with pytest.raises(ValidationError) as ei:
        P.CompletionRequest(**{"prompt": "hi", **kw})
    err = from_validation_error(ei.value)
    assert err.status == 400
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    if param is not None:
        assert body["param"] == param
    assert not body["message"].startswith("Value error")


def test_chat_request():
    r = P.ChatCompletionRequest(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        max_completion_tokens=5,
        logprobs=True,
        top_logprobs=2,
    )
    assert r.template_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert r.max_new_tokens == 5 and r.num_logprobs == 2
    assert P.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).num_logprobs is None
    for bad in (
        dict(messages=[]),
        dict(messages=[{"role": "user", "content": "x"}], top_logprobs=2),
        dict(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]),
        dict(messages=[{"role": "user", "content": "x"}], top_logprobs=21, logprobs=True),
    ):
        with pytest.raises(ValidationError):
            P.ChatCompletionRequest(**bad)


# one example per refused field: a value the server cannot honour
REFUSED_EXAMPLES = {
    "logit_bias": {"1": 2.0},
    "echo": True,
    "best_of": 2,
    "suffix": "tail",
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "web_search_options": {},
}


def _request_model(endpoint):
    return P.ChatCompletionRequest if endpoint == "chat" else P.CompletionRequest


def _minimal(endpoint):
    return {"messages": [{"role": "user", "content": "x"}]} if endpoint == "chat" else {"prompt": "x"}


def test_fields_table_is_exactly_the_request_models():
    """Every field a request model declares is in FIELDS (works or is refused), and nothing else is."""
    for endpoint in ("chat", "completions"):
        table = {r.name for r in P.FIELDS if r.endpoints in ("both", endpoint)}
        assert set(_request_model(endpoint).model_fields) == table, endpoint
    assert set(REFUSED_EXAMPLES) == {r.name for r in P.FIELDS if r.allowed is not None}


@pytest.mark.parametrize("rule", [r for r in P.FIELDS if r.allowed is not None], ids=lambda r: r.name)
def test_every_refused_field_is_a_400_naming_it(rule):
    endpoints = ("chat", "completions") if rule.endpoints == "both" else (rule.endpoints,)
    for endpoint in endpoints:
        model = _request_model(endpoint)
        with pytest.raises(ValidationError) as ei:
            model(**_minimal(endpoint), **{rule.name: REFUSED_EXAMPLES[rule.name]})
        body = from_validation_error(ei.value).body()["error"]
        assert body["param"] == rule.name and body["message"] == f"{rule.name}: {rule.refusal}", body


def test_neutral_values_of_refused_fields_are_accepted():
    r = P.ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}],
        n=1,
        tools=[],
        tool_choice="none",
        logit_bias={},
        modalities=["text"],
        response_format={"type": "text"},
        parallel_tool_calls=True,
        store=False,
        metadata={"k": "v"},
    )
    assert r.response_format.type == "text"
    assert P.CompletionRequest(prompt="x", echo=False, best_of=1, suffix="").best_of == 1
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    r = P.ChatCompletionRequest(
        messages=[
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "2"},
        ]
    )
    assert r.template_messages() == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{**call, "function": {"name": "f", "arguments": {"a": 1}}}],
        },
        {"role": "tool", "content": "2", "tool_call_id": "c"},
    ]
    with pytest.raises(ValidationError) as ei:  # a tool call without its function
        P.ChatCompletionRequest(
            messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}]
        )
    assert from_validation_error(ei.value).param == "messages.0.tool_calls.0.function"


def _edges(r):
    hi = r.hi if r.hi is not None else r.lo + 1000
    return [r.lo - 1, r.lo - 1e-3, r.lo, r.lo + 1e-3, (r.lo + hi) / 2, hi, hi + 1e-3, hi + 1]


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_api_bounds_and_sampler_validation_agree(name):
    """The request models and SamplingParams.validate accept exactly the same values (both read LIMITS)."""
    r = LIMITS[name]
    integer = name in ("top_k", "logprobs")
    for v in _edges(r):
        if integer and v != int(v):
            continue
        v = int(v) if integer else float(v)
        try:
            SamplingParams(**{name: v}).validate()
            sampler_ok = True
        except ValueError:
            sampler_ok = False
        api_fields = {"logprobs": [("completions", "logprobs"), ("chat", "top_logprobs")]}.get(
            name, [("chat", name), ("completions", name)]
        )
        for endpoint, field in api_fields:
            extra = {"logprobs": True} if field == "top_logprobs" else {}
            try:
                _request_model(endpoint)(**_minimal(endpoint), **extra, **{field: v})
                api_ok = True
            except ValidationError:
                api_ok = False
            assert api_ok == sampler_ok == (v in r), (name, endpoint, v, api_ok, sampler_ok)


def test_response_builders():
    u = P.usage_dict(3, 4)
    assert u == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert P.usage_dict(3, 4, 2)["prompt_tokens_details"] == {"cached_tokens": 2}
    c = P.chat_chunk("id", 1, "m", {"content": "x"}, None, None, True)
    assert c["usage"] is None and c["choices"][0]["delta"] == {"content": "x"} and c["choices"][0]["index"] == 0
    assert "usage" not in P.completion_chunk("id", 1, "m", "x", None, None, False)
    assert P.chat_chunk("id", 1, "m", {}, "stop", None, False, 2)["choices"][0]["index"] == 2
    assert P.completion_chunk("id", 1, "m", "x", None, None, False, 1)["choices"][0]["index"] == 1
    lp = P.completion_logprobs(["a", "bc"], [-0.1, -0.2], [[("a", -0.1)], [("bc", -0.2), ("d", -3.0)]], 10)
    assert lp["text_offset"] == [10, 11] and lp["top_logprobs"][1] == {"bc": -0.2, "d": -3.0}
    clp = P.chat_logprobs(["é"], [-0.5], [[("é", -0.5)]])
    assert clp["content"][0]["bytes"] == [195, 169]


def test_n_is_accepted_and_choice_builders():
    assert P.CompletionRequest(prompt="x", n=3).n == 3
    assert P.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], n=2).n == 2
    choices = [P.completion_choice(i, t, "length", None) for i, t in enumerate(("a", "b"))]
    r = P.completion_response("id", 1, "m", choices, P.usage_dict(3, 4))
    assert [c["index"] for c in r["choices"]] == [0, 1] and r["choices"][1]["text"] == "b"
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    r = P.chat_response(
        "id", 1, "m", [P.chat_choice(0, "x", "stop", None), P.chat_choice(1, None, "tool_calls", None, [call])], {}
    )
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "x"}
    assert r["choices"][1]["message"]["tool_calls"] == [call] and r["choices"][1]["index"] == 1


class _CharTokenizer:
    """Token id i is the character chr(ord("a") + i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids)


def test_choice_group_merges_fairly_stops_per_choice_and_aborts_once():
    """Two choices: backlogs are coalesced per choice; a stop string ends its choice at once with "stop"; close()
    aborts only what still runs, once (server.api.output)."""
    import asyncio

    from server.api.output import ChoiceGroup, ChoiceOutput
    from server.engine.request import GenerationRequest, RequestHandle, TokenEvent

    async def main():
        aborts = []
        loop = asyncio.get_running_loop()
        reqs = [GenerationRequest([1, 2], SamplingParams(), 8, request_id=f"r-{i}") for i in range(2)]
        handles = [RequestHandle(r, loop, lambda rid, why: aborts.append((rid, why))) for r in reqs]
        tok = _CharTokenizer()
        group = ChoiceGroup([ChoiceOutput(i, h, tok, ["cd"], [1, 2], None) for i, h in enumerate(handles)])
        for t in (0, 1):  # "ab" on choice 0
            handles[0]._queue.put_nowait(TokenEvent(t, cached_tokens=1 if t == 0 else None))
        handles[1]._queue.put_nowait(TokenEvent(4, cached_tokens=1))  # "e" on choice 1
        got = {}
        while len(got) < 2:
            for c, evs in await group.next_events():
                got[c.index] = got.get(c.index, []) + list(evs)
        assert [e.token_id for e in got[0]] == [0, 1] and [e.token_id for e in got[1]] == [4]
        a, b = group.choices
        a.feed(got[0]), b.feed(got[1])
        handles[0]._queue.put_nowait(TokenEvent(2))
        handles[0]._queue.put_nowait(TokenEvent(3))  # "cd": the stop string
        text = ""
        while not a.done:
            for c, evs in await group.next_events():
                assert c is a
                text += c.feed(evs)[0]
        assert a.finish_reason == "stop" and aborts == [("r-0", "stop")]
        assert group.usage(2) == P.usage_dict(2, 5, 1)  # 4 tokens of choice 0, 1 of choice 1; the prompt once
        handles[1]._queue.put_nowait(TokenEvent(5, finish_reason="length"))
        (c, evs), *rest = await group.next_events()
        assert c is b and not rest and b.feed(evs)[0] == "f" and b.finish_reason == "length" and group.done
        assert await group.next_events() == []
        group.close()
        group.close()
        assert aborts == [("r-0", "stop")]  # b had finished: nothing to abort
        req = GenerationRequest([1], SamplingParams(), 8, request_id="r-2")
        running = RequestHandle(req, loop, lambda rid, why: aborts.append((rid, why)))
        lone = ChoiceGroup([ChoiceOutput(0, running, tok, [], [1], None)])
        lone.close()
        lone.close()
        assert aborts[1:] == [("r-2", "abort")]  # still running: aborted, once

    asyncio.run(main())


def test_check_bearer_constant_time_semantics():
    keys = [b"k1", b"k2"]
    assert check_bearer(b"Bearer k1", keys) and check_bearer(b"bearer k2", keys)
    for bad in (None, b"", b"Bearer", b"Bearer k3", b"Basic k1", b"k1", b"Bearer k1x"):
        assert not check_bearer(bad, keys)


def _app(metrics_require_key: bool, keys=("secret",)):
    async def ok(request):
        body = await request.body()
        return PlainTextResponse(f"ok {len(body)}")

    routes = [
        Route(p, ok, methods=["GET", "POST"]) for p in ("/health", "/ready", "/metrics", "/v1/models", "/admin/models")
    ]
    app = Starlette(routes=routes)
    return AuthMiddleware(BodyLimitMiddleware(app, 1024), api_keys=list(keys), metrics_require_key=metrics_require_key)


@pytest.mark.parametrize("metrics_require_key", [False, True])
def test_auth_middleware_open_paths(metrics_require_key):
    c = TestClient(_app(metrics_require_key))
    assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
    assert c.get("/admin/models").status_code == 200  # admin router checks the admin key itself
    r = c.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert c.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200
    assert c.get("/metrics").status_code == (401 if metrics_require_key else 200)
    assert c.get("/metrics", headers={"Authorization": "Bearer secret"}).status_code == 200


def test_no_keys_means_no_auth():
    c = TestClient(_app(True, keys=()))
    assert c.get("/v1/models").status_code == 200 and c.get("/metrics").status_code == 200


def test_body_limit_middleware():
    c = TestClient(_app(False, keys=()))
    assert c.post("/v1/models", content=b"x" * 1024).text == "ok 1024"
    r = c.post("/v1/models", content=b"x" * 1025)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_serve_flags_cover_settings_and_override_env(monkeypatch):
    import argparse

    from server.commands.serve import add_arguments, settings_from_args
    from server.config import Settings

    p = argparse.ArgumentParser()
    add_arguments(p)
    helps = {a.dest: a.help for a in p._actions if a.dest != "help"}
    assert set(helps) == set(Settings.model_fields)
    # help strings are argparse %-format strings: a description's "%" appears doubled
    assert all(h and Settings.model_fields[d].description.replace("%", "%%") in h for d, h in helps.items())

    monkeypatch.setenv("JETSERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("JETSERVE_API_KEYS", "env-a, env-b")
    s = settings_from_args(p.parse_args([]))
    assert s.max_queue == 7 and s.api_keys == ["env-a", "env-b"] and s.port == 8000
    s = settings_from_args(
        p.parse_args(
            [
                "--api-key",
                "a",
                "--api-key",
                "b",
                "--max-queue",
                "3",
                "--port",
                "0",
                "--metrics-require-key",
                "--log-level",
                "debug",
            ]
        )
    )
    assert (s.api_keys, s.max_queue, s.port, s.metrics_require_key, s.log_level) == (["a", "b"], 3, 0, True, "debug")
    monkeypatch.setenv("JETSERVE_API_KEYS", "")
    assert settings_from_args(p.parse_args([])).api_keys == []
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "int3"])


def test_server_api_never_imports_torch():
    import subprocess
    import sys

    code = (
        "import sys, server.api.app, server.api.routes, server.commands.serve; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_openapi_publishes_generation_request_schemas():
    from server.api.app import create_app
    from server.config import Settings

    doc = create_app(Settings(), manager=object(), metrics=None).openapi()
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{name}"
        assert "properties" in doc["components"]["schemas"][name]
    assert "ChatMessage" in doc["components"]["schemas"]
