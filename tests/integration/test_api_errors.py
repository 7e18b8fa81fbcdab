"""Error shapes, overload (429), per-request failures and API-key auth on a real server.

One server: 2 KV slots, no waiting queue, context 64, 4 KiB body limit, two API keys. Its runner is the test
double `benchmarks.fault_runner.FaultyRunner`, which fails requests whose prompt carries a fault marker.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest

from benchmarks.fault_runner import install as install_faulty_runner
from benchmarks.fault_runner import marker

pytestmark = pytest.mark.slow

KEYS = ["sk-test-one", "sk-test-two"]
SERVER_SETTINGS = dict(max_batch_size=2, max_queue=0, max_context=64, max_body_bytes=4096, api_keys=KEYS)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module", autouse=True)
def faulty_runner():
    """The module's server loads `FaultyRunner`s (autouse: set up before the module-scoped `server`)."""
    undo = install_faulty_runner()
    yield
    undo()


def assert_error_shape(r: httpx.Response, status: int, code=None, param=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def post(server, path, body, **kw):
    with server.httpx() as c:
        return c.post(path, json=body, **kw)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": PROMPT, "temperature": 5}, "temperature"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "top_p": 0}, "top_p"),
        ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
        ({"prompt": PROMPT, "stop": 3}, "stop"),
        ({}, "prompt"),
    ],
)
def test_validation_is_400_not_422(server, body, param):
    err = assert_error_shape(post(server, "/v1/completions", {"model": server.model, **body}), 400)
    assert err["param"] is not None and err["param"].startswith(param)
    assert err["type"] == "invalid_request_error"


def test_n_above_the_batch_size_refused_clearly(server):
    with pytest.raises(openai.BadRequestError) as ei:
        server.openai().completions.create(model=server.model, prompt=PROMPT, max_tokens=2, n=3)
    assert ei.value.body["param"] == "n" and "at most 2" in ei.value.body["message"], ei.value.body


def test_chat_validation(server):
    assert_error_shape(post(server, "/v1/chat/completions", {"model": server.model, "messages": []}), 400)
    assert_error_shape(
        post(server, "/v1/chat/completions", {"model": server.model, "messages": [{"role": "wizard", "content": "x"}]}),
        400,
    )
    err = assert_error_shape(
        post(
            server,
            "/v1/chat/completions",
            {
                "model": server.model,
                "messages": [{"role": "user", "content": "x"}],
                "top_logprobs": 21,
                "logprobs": True,
            },
        ),
        400,
    )
    assert err["param"] == "top_logprobs"


def test_invalid_json_and_content_type(server):
    with server.httpx() as c:
        assert_error_shape(
            c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
            400,
            code="invalid_json",
        )
        assert_error_shape(
            c.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}),
            400,
            code="invalid_json",
        )
        r = c.post(
            "/v1/completions", content=b"prompt=hi", headers={"content-type": "application/x-www-form-urlencoded"}
        )
        assert_error_shape(r, 415, code="unsupported_media_type")


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError):
        server.openai().completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert_error_shape(
        post(server, "/v1/chat/completions", {"model": "../etc", "messages": [{"role": "user", "content": "x"}]}),
        404,
        code="model_not_found",
        param="model",
    )


def test_unknown_route_and_method(server):
    with server.httpx() as c:
        assert_error_shape(c.get("/v1/nothing-here"), 404)
        assert_error_shape(c.get("/v1/completions"), 405)


def test_prompt_longer_than_context_gives_numbers(server):
    long_prompt = "word " * 200
    err = assert_error_shape(
        post(server, "/v1/completions", {"model": server.model, "prompt": long_prompt}),
        400,
        code="context_length_exceeded",
    )
    assert "64" in err["message"] and "tokens" in err["message"]
    ids = [100] * 60
    err = assert_error_shape(
        post(server, "/v1/completions", {"model": server.model, "prompt": ids, "max_tokens": 10}),
        400,
        code="context_length_exceeded",
        param="max_tokens",
    )
    assert "64" in err["message"] and "70" in err["message"] and "60" in err["message"]
    assert_error_shape(post(server, "/v1/completions", {"model": server.model, "prompt": [10**9]}), 400, param="prompt")


def test_default_max_tokens_is_rest_of_context(server):
    r = post(
        server, "/v1/completions", {"model": server.model, "prompt": [100] * 54, "temperature": 0, "ignore_eos": True}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert 0 <= usage.pop("prompt_tokens_details")["cached_tokens"] <= 53  # a shared server may have cached [100]*k
    assert usage == {"prompt_tokens": 54, "completion_tokens": 10, "total_tokens": 64}


def test_body_too_large_is_413(server):
    big = {"model": server.model, "prompt": "x" * 5000}
    assert_error_shape(post(server, "/v1/completions", big), 413, code="request_too_large")

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    with server.httpx() as c:
        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error_shape(r, 413, code="request_too_large")


# ----------------------------------------------------------------------------- overload
def test_queue_full_is_429_with_retry_after(server):
    engine = server.engine()
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 50, "temperature": 0, "stream": True}
    started = threading.Barrier(3)
    results = []

    def hold():
        with server.httpx() as c, c.stream("POST", "/v1/completions", json=body) as r:
            results.append(r.status_code)
            lines = r.iter_lines()
            next(lines)
            started.wait(30)
            for _ in lines:
                pass

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait(30)
    assert engine.num_active == 2
    r = post(server, "/v1/completions", {"model": server.model, "prompt": PROMPT, "max_tokens": 2})
    err = assert_error_shape(r, 429, code="rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1
    assert "capacity" in err["message"]
    with pytest.raises(openai.RateLimitError):
        server.openai().completions.create(model=server.model, prompt=PROMPT, max_tokens=2)
    for t in threads:
        t.join(60)
    assert results == [200, 200]


# ----------------------------------------------------------------------------- per-request failures
def test_fault_in_one_request_is_500_and_others_continue(server):
    async def go():
        c = server.async_openai()
        good = asyncio.ensure_future(
            c.completions.create(
                model=server.model, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
            )
        )
        await asyncio.sleep(0.3)
        with pytest.raises(openai.InternalServerError) as ei:
            await c.completions.create(model=server.model, prompt=PROMPT + marker("prefill"), max_tokens=5)
        r = await good
        await c.close()
        return ei.value, r

    exc, good = asyncio.run(go())
    assert exc.status_code == 500 and exc.body["code"] == "internal_error"
    assert good.choices[0].finish_reason == "length" and good.usage.completion_tokens == 20


def test_error_after_stream_started_is_sse_error_then_done(server):
    body = {"model": server.model, "prompt": marker("decode") + PROMPT, "max_tokens": 10, "stream": True}
    with server.httpx() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    err = json.loads(data[-2])["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "internal_error"
    assert "choices" in json.loads(data[0])  # the first token went out before the failure
    # the server keeps serving
    ok = server.openai().completions.create(model=server.model, prompt=PROMPT, max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens == 3


def test_fault_marker_in_prompt(server):
    r = post(
        server,
        "/v1/chat/completions",
        {"model": server.model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi " + marker("prefill")}]},
    )
    assert_error_shape(r, 500, code="internal_error")


# ----------------------------------------------------------------------------- auth
def test_auth_required_with_keys(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200  # metrics_require_key is off
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {KEYS[0]}"},
            {"Authorization": "Bearer"},
        ):
            err = assert_error_shape(c.get("/v1/models", headers=headers), 401, code="invalid_api_key")
            assert err["type"] == "invalid_request_error"
            assert_error_shape(c.post("/v1/completions", json={"prompt": "x"}, headers=headers), 401)
        for key in KEYS:
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEYS[1], max_retries=0)
    assert good.completions.create(model=server.model, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
