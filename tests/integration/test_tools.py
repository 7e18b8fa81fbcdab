"""Tool calling on a real server (uvicorn, tiny random Llama whose tokenizer has Qwen2.5's tool-capable chat
template), driven by the official openai client.

A random model rarely calls a tool by itself, so the calls here are forced (tool_choice "required" or a named
function): their arguments must validate against the tool's parameters schema, and the full loop (call ->
tool result with tool_call_id -> answer) must go through. `auto` parsing is covered by tests/unit/test_tool_parser.py;
a model without tool support (400) by tests/integration/test_bad_input.py (tiny ChatML template) and
tests/integration/test_api_openai.py (the demo model).
"""

from __future__ import annotations

import json
import shutil

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": {"type": "object", "maxProperties": 0}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory, tiny_tokenizer_dir, tiny_llama_writer):
    """A store holding a tiny random Llama with the tool-capable template (1024-token context: the tools take
    ~500 tokens of the prompt with the tiny tokenizer)."""
    from pathlib import Path

    tok = tmp_path_factory.mktemp("tool-tok") / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    shutil.copy(
        Path(__file__).resolve().parents[1] / "fixtures" / "hermes_tool_template.jinja", tok / "chat_template.jinja"
    )
    store = tmp_path_factory.mktemp("tools-store")
    tiny_llama_writer(store / "tiny-tools", tok, seed=3, max_position_embeddings=1024)
    with start_server(model_store=store, model="tiny-tools", max_context=1024, max_batch_size=4) as srv:
        yield srv


def check_calls(calls, names=None):
    assert calls, "no tool call"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_"), c
        assert names is None or c.function.name in names, c
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def create(server, **kw):
    kw = {"model": server.model, "messages": ASK, "max_tokens": 200, "temperature": 1.0, "seed": 0, **kw}
    return server.openai().chat.completions.create(**kw)


def stream_calls(server, **kw):
    """Reassemble a streamed answer: (content, {index: {id, type, name, arguments}}, finish_reason)."""
    content, calls, finish = [], {}, None
    for chunk in create(server, stream=True, **kw):
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content.append(ch.delta.content or "")
        for d in ch.delta.tool_calls or ():
            c = calls.setdefault(d.index, {"id": None, "type": None, "name": "", "arguments": ""})
            c["id"] = d.id or c["id"]
            c["type"] = d.type or c["type"]
            if d.function is not None:
                c["name"] += d.function.name or ""
                c["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
    return "".join(content), calls, finish


def test_required_call_then_tool_result_then_answer(server):
    r = create(server, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    check_calls(choice.message.tool_calls)
    call = choice.message.tool_calls[0]
    history = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
    ]
    final = create(server, messages=history, tools=[WEATHER, TIME], max_tokens=16)  # auto: the model answers
    assert final.choices[0].finish_reason in ("stop", "length")
    assert isinstance(final.choices[0].message.content, str) and not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt
    # tool_choice "none": the tools are not rendered, the call and its result still are
    final = create(server, messages=history, tools=[WEATHER, TIME], tool_choice="none", max_tokens=16)
    assert isinstance(final.choices[0].message.content, str) and not final.choices[0].message.tool_calls
    plain = create(server, messages=ASK, max_tokens=1)
    assert final.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_named_function_is_the_one_called(server):
    for name, tool in (("get_weather", WEATHER), ("get_time", TIME)):
        for seed in range(2):
            r = create(
                server,
                tools=[WEATHER, TIME],
                tool_choice={"type": "function", "function": {"name": name}},
                parallel_tool_calls=False,
                seed=seed,
            )
            assert r.choices[0].finish_reason == "tool_calls"
            check_calls(r.choices[0].message.tool_calls, names={name})
            assert len(r.choices[0].message.tool_calls) == 1


def test_parallel_calls_allowed_by_default(server):
    r = create(server, tools=[WEATHER, TIME], tool_choice="required", max_tokens=300)
    choice = r.choices[0]
    # a random model may keep calling until max_tokens; every complete call is returned and valid
    assert choice.finish_reason in ("tool_calls", "length"), choice
    check_calls(choice.message.tool_calls)
    if choice.finish_reason == "tool_calls":
        assert choice.message.content is None


@pytest.mark.parametrize("parallel", [False, True])
def test_streamed_call_equals_the_non_streamed_one(server, parallel):
    kw = dict(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel, seed=7)
    r = create(server, **kw)
    content, calls, finish = stream_calls(server, **kw)
    assert finish == r.choices[0].finish_reason
    assert "<tool_call>" not in content
    want = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == want
    assert sorted(calls) == list(range(len(calls)))
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls.values())
    if not parallel:
        assert len(calls) == 1 and finish == "tool_calls"


def test_auto_is_free_text_without_markup(server):
    for stream in (False, True):
        kw = dict(tools=[WEATHER, TIME], max_tokens=24, seed=1)
        if stream:
            content, calls, finish = stream_calls(server, **kw)
        else:
            r = create(server, **kw)
            content, calls, finish = (
                r.choices[0].message.content,
                r.choices[0].message.tool_calls,
                r.choices[0].finish_reason,
            )
        # a random model writes no call: all of it is content (a call would be parsed, see the unit tests)
        assert finish in ("stop", "length", "tool_calls") and (calls or isinstance(content, str))


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strange"}}}],
                "tool_choice": "required",
            },
            "tools.0.function.parameters",
        ),
        ({"tools": [{"type": "file_search", "function": {"name": "f"}}]}, "tools.0.type"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_tool_requests_are_400s_naming_the_field(server, kw, param, stream):
    with pytest.raises(openai.BadRequestError) as ei:
        create(server, stream=stream, **kw)
    err = ei.value.body
    assert ei.value.status_code == 400 and err["param"] == param and err["message"].startswith(param + ": "), err
