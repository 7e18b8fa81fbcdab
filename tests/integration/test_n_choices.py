"""`n > 1` choices on a real server (uvicorn, tiny random Llama in float32, batch 4), driven by the official
openai client (raw SSE through httpx where the wire format itself is checked).

The n choices of a request are one engine group (`Engine.submit_group`): the prompt is prefilled once and its
KV copied to the others; choice i samples with seed + i. float32 keeps the logits of a 1-token prefill (a
follower, or a prefix-cache hit) equal to those of a whole-prompt one, so seeded outputs compare exactly.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

PROMPT = "memory cache batch slot queue prompt"
ASK = [{"role": "user", "content": "tiny helpful brief answer"}]
BATCH = 4


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory, tiny_llama_dir):
    store = tmp_path_factory.mktemp("n-choices-store")
    shutil.copytree(tiny_llama_dir, store / "tiny")
    with start_server(model_store=store, model="tiny", dtype="float32", max_context=256, max_batch_size=BATCH) as srv:
        yield srv


def create(server, chat, **kw):
    """One request (chat or completions) with sampled, EOS-free output unless overridden."""
    c = server.openai()
    kw = {"model": server.model, "max_tokens": 12, "temperature": 1.0, **kw}
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    if chat:
        return c.chat.completions.create(extra_body=extra, **{"messages": ASK, **kw})
    return c.completions.create(extra_body=extra, **{"prompt": PROMPT, **kw})


def texts(resp, chat):
    return [c.message.content if chat else c.text for c in resp.choices]


def stream_texts(server, chat, **kw):
    """Reassemble a streamed answer per index: ({index: text}, {index: finish_reason}, usage, chunks)."""
    out, finish, usage, chunks = {}, {}, None, []
    for chunk in create(server, chat, stream=True, stream_options={"include_usage": True}, **kw):
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            piece = (ch.delta.content or "") if chat else ch.text
            out[ch.index] = out.get(ch.index, "") + piece
            if ch.finish_reason is not None:
                assert ch.index not in finish, f"two finish chunks for choice {ch.index}"
                finish[ch.index] = ch.finish_reason
    return out, finish, usage, chunks


def metric(server, name: str, **labels: str) -> float:
    text = server.httpx().get("/metrics").text
    labels = {**labels, "model": server.model}
    prefix = name + "{" + ",".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "} "  # labels sorted by name
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    return float(lines[0][len(prefix) :]) if lines else 0.0


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_n3_returns_three_choices_streaming_and_not(server, chat):
    r = create(server, chat, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    got = texts(r, chat)
    assert all(got) and len(set(got)) > 1, got  # three seeds, three different samples
    if chat:
        assert all(c.message.role == "assistant" for c in r.choices)
    streamed, finish, usage, chunks = stream_texts(server, chat, n=3, seed=5)
    assert [streamed[i] for i in range(3)] == got
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == 36 and usage.prompt_tokens == r.usage.prompt_tokens
    assert chunks[-1].usage is not None and not chunks[-1].choices  # the usage chunk once, at the end
    assert sum(c.usage is not None for c in chunks) == 1
    if chat:  # each choice opens with its own role chunk
        roles = [ch.index for c in chunks for ch in c.choices if ch.delta.role == "assistant"]
        assert sorted(roles) == [0, 1, 2]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_seed_s_with_n3_equals_n1_with_seeds_s_to_s_plus_2(server, chat):
    group = texts(create(server, chat, n=3, seed=11), chat)
    lone = [texts(create(server, chat, n=1, seed=11 + i), chat)[0] for i in range(3)]
    assert group == lone


def test_greedy_n2_gives_identical_choices(server):
    r = create(server, False, n=2, temperature=0)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text


def test_usage_sums_and_cached_tokens_once(server):
    prompt = PROMPT + " usage"
    one = create(server, False, prompt=prompt, n=1, max_tokens=5)
    hits0 = metric(server, "jetserve:prefix_cache_hits_total")
    r = create(server, False, prompt=prompt, n=3, max_tokens=5)  # the same prompt: its KV is cached
    hits = metric(server, "jetserve:prefix_cache_hits_total") - hits0
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once
    assert r.usage.completion_tokens == 15 and r.usage.total_tokens == r.usage.prompt_tokens + 15
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < r.usage.prompt_tokens and cached == hits  # counted once: the leader's lookup


def test_prompt_is_prefilled_once(server):
    """Observed through /metrics: every member counts its prompt in jetserve:prompt_tokens_total, but only the
    leader looks the prompt up (jetserve:prefix_cache_queries_total): the followers got its KV copied."""
    if not server.engine().shared_prefill:
        pytest.skip("this runner cannot copy KV between slots: every member is prefilled")
    prompt = "queue slot batch memory cache once"
    prompt0 = metric(server, "jetserve:prompt_tokens_total")
    queries0 = metric(server, "jetserve:prefix_cache_queries_total")
    r = create(server, False, prompt=prompt, n=3, max_tokens=3)
    n_prompt = r.usage.prompt_tokens
    assert metric(server, "jetserve:prompt_tokens_total") - prompt0 == 3 * n_prompt
    assert metric(server, "jetserve:prefix_cache_queries_total") - queries0 == n_prompt


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_n_out_of_range_is_400_naming_n(server, chat, stream):
    for n, says in ((BATCH + 1, f"at most {BATCH}"), (0, "")):
        with pytest.raises(openai.BadRequestError) as ei:
            create(server, chat, n=n, stream=stream)
        err = ei.value.body
        assert err["param"] == "n" and err["message"].startswith("n: ") and says in err["message"], err


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["answer", "ok"],
    "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "ok": {"type": "boolean"}},
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_json_schema_with_n2_every_choice_validates(server, chat, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}
    kw = dict(n=2, seed=3, max_tokens=64, extra_body={"ignore_eos": False, "response_format": fmt})
    if stream:
        got, finish, _, _ = stream_texts(server, chat, **kw)
        got = [got[i] for i in range(2)]
        assert finish == {0: "stop", 1: "stop"}
    else:
        r = create(server, chat, **kw)
        assert [c.finish_reason for c in r.choices] == ["stop", "stop"]
        got = texts(r, chat)
    for doc in got:
        jsonschema.validate(json.loads(doc), SCHEMA)


def _stop_for(first: str, second: str) -> str:
    """A string of `first` (not at its start) that `second` does not contain."""
    for size in (3, 2, 4, 5):
        for k in range(1, len(first) - size + 1):
            s = first[k : k + size]
            if s.strip() == s and s not in second and first.find(s) == k:
                return s
    pytest.skip(f"no stop string separates {first!r} from {second!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_one_choice_others_run_to_length(server, stream):
    """A stop string in choice 0's first 16 tokens ends that choice ("stop", the text cut before it) and ends it
    in the engine too (a "stop" finish in the metrics, no request left active), while choice 1 runs to max_tokens.
    max_tokens is ten times longer than where the stop lies, so the engine cannot end choice 0 by length before
    the edge's stop reaches it (seeded choices: a longer request's first 16 tokens are the 16-token request's)."""
    long = 160
    kw = dict(n=2, seed=21)
    free = texts(create(server, False, max_tokens=16, **kw), False)
    full = texts(create(server, False, max_tokens=long, **kw), False)
    assert [f.startswith(s) for f, s in zip(full, free)] == [True, True]
    stop = _stop_for(free[0], full[1])
    stops0 = metric(server, "jetserve:request_success_total", finish_reason="stop")
    if stream:
        got, finish, usage, _ = stream_texts(server, False, stop=[stop], max_tokens=long, **kw)
        got, finish = [got[0], got[1]], [finish[0], finish[1]]
    else:
        r = create(server, False, stop=[stop], max_tokens=long, **kw)
        got, finish, usage = texts(r, False), [c.finish_reason for c in r.choices], r.usage
    assert got == [free[0][: free[0].find(stop)], full[1]]
    assert finish == ["stop", "length"]
    assert 0 < usage.completion_tokens - long <= 16  # choice 0's tokens up to the stop string, then `long`
    deadline = time.monotonic() + 10
    while server.engine().num_active and time.monotonic() < deadline:  # the stopped choice is ended in the engine
        time.sleep(0.05)
    assert server.engine().num_active == 0
    assert metric(server, "jetserve:request_success_total", finish_reason="stop") - stops0 == 1


def test_raw_stream_wire_format(server):
    """Raw SSE: one role chunk and one finish chunk per choice, `index` on every choice, [DONE] once."""
    body = {
        "model": server.model,
        "messages": ASK,
        "n": 3,
        "max_tokens": 6,
        "seed": 1,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    with server.httpx() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        data = [ln[len("data: ") :] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = [json.loads(d) for d in data[:-1]]
    per = [ch for c in chunks for ch in c["choices"]]
    assert all(len(c["choices"]) <= 1 for c in chunks)
    assert sorted(ch["index"] for ch in per if ch["delta"].get("role") == "assistant") == [0, 1, 2]
    assert sorted(ch["index"] for ch in per if ch["finish_reason"] is not None) == [0, 1, 2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 18


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_every_choice(server, stream):
    body = {"model": server.model, "prompt": PROMPT, "n": 3, "max_tokens": 240, "ignore_eos": True, "stream": stream}
    engine = server.engine()
    aborted0 = metric(server, "jetserve:request_success_total", finish_reason="abort")
    with httpx.Client(base_url=server.base_url, timeout=httpx.Timeout(30.0, read=0.05)) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")  # running
        else:
            with pytest.raises(httpx.ReadTimeout):  # gives up while the choices are running
                c.post("/v1/completions", json=body)
    deadline = time.monotonic() + 15
    st = server.app.state.jetserve
    while (engine.num_active or st.inflight) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_active == 0 and st.inflight == 0
    assert metric(server, "jetserve:request_success_total", finish_reason="abort") - aborted0 == 3


# ----------------------------------------------------------------------------- tools
@pytest.fixture(scope="module")
def tool_server(start_server, tmp_path_factory, tiny_tokenizer_dir, tiny_llama_writer):
    """A tiny random Llama whose tokenizer has the Hermes tool template (as tests/integration/test_tools.py)."""
    tok = tmp_path_factory.mktemp("n-tool-tok") / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    shutil.copy(fixtures / "hermes_tool_template.jinja", tok / "chat_template.jinja")
    store = tmp_path_factory.mktemp("n-tools-store")
    tiny_llama_writer(store / "tiny-tools", tok, seed=3, max_position_embeddings=1024)
    with start_server(model_store=store, model="tiny-tools", max_context=1024, max_batch_size=4) as srv:
        yield srv


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_call_with_n2_each_choice_has_its_calls(tool_server, stream):
    kw = dict(
        model=tool_server.model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        n=2,
        seed=0,
        max_tokens=200,
    )
    client = tool_server.openai()
    if stream:
        calls, finish = {0: [], 1: []}, {}
        for chunk in client.chat.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                calls[ch.index] += [d.function.arguments for d in ch.delta.tool_calls or ()]
                if ch.finish_reason:
                    finish[ch.index] = ch.finish_reason
        args = [calls[0], calls[1]]
        assert finish == {0: "tool_calls", 1: "tool_calls"}
    else:
        r = client.chat.completions.create(**kw)
        assert [c.finish_reason for c in r.choices] == ["tool_calls", "tool_calls"]
        args = [[t.function.arguments for t in c.message.tool_calls] for c in r.choices]
    for per_choice in args:
        assert len(per_choice) == 1
        jsonschema.validate(json.loads(per_choice[0]), WEATHER["function"]["parameters"])
