"""Tool calling at the edge (server/api/tools.py): the call parser (whole text and streamed token pieces),
format detection from the chat template, request validation, prompt rendering and the forcing grammar."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.api import protocol as P
from server.api import tools as T
from server.api.errors import APIError, from_validation_error

HERMES = T.FORMATS[0]
TOOL_TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "hermes_tool_template.jinja"
REPO = Path(__file__).resolve().parents[2]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters


def call_text(name, args, fmt=HERMES):
    return f"{fmt.start}\n" + json.dumps({"name": name, "arguments": args}) + f"\n{fmt.end}"


def run(parser, pieces):
    """Feed `pieces`, then finish; return (content, deltas)."""
    content, deltas = [], []
    for p in pieces:
        c, d = parser.feed(p)
        content.append(c)
        deltas += d
    c, d = parser.finish()
    return "".join(content) + c, deltas + d


def random_pieces(text, seed):
    rnd = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rnd.randint(1, 6)
        out.append(text[i : i + n])
        i += n
    return out


def parser(names=("get_weather", "get_time"), max_calls=None):
    return T.ToolCallParser(HERMES, names, max_calls)


# ------------------------------------------------------------------------------------------- parser
def test_plain_text_is_unchanged_whole_or_in_pieces():
    text = "Hello <tool no, just text> and a < sign, trailing space \n"
    for seed in range(5):
        p = parser()
        content, deltas = run(p, random_pieces(text, seed))
        assert content == text and deltas == [] and p.calls == []
        assert p.finish_reason("stop") == "stop"


@pytest.mark.parametrize("seed", range(8))
def test_content_then_calls_streamed_in_pieces_equal_the_whole(seed):
    text = (
        "Let me check.\n" + call_text("get_weather", {"city": "Paris", "unit": "c"}) + "\n" + call_text("get_time", {})
    )
    whole_content, whole = run(parser(), [text])
    content, deltas = run(parser(), random_pieces(text, seed))
    assert content == whole_content == "Let me check."
    assert "<tool_call>" not in content
    strip = [{k: v for k, v in d.items() if k != "id"} for d in deltas]
    assert strip == [{k: v for k, v in d.items() if k != "id"} for d in whole]
    assert [d["index"] for d in deltas] == [0, 1]
    assert deltas[0]["type"] == "function" and deltas[0]["id"].startswith("call_")
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}
    assert deltas[1]["function"] == {"name": "get_time", "arguments": "{}"}


def test_streamed_content_before_a_call_is_not_held_to_the_end():
    p = parser()
    assert p.feed("Sure, ") == ("Sure,", [])  # trailing whitespace waits for what follows
    assert p.feed("one moment <tool") == (" one moment", [])  # a start-tag prefix is held
    assert p.feed('_call>\n{"name": "get_time", ') == ("", [])
    content, deltas = p.feed('"arguments": {}}\n</tool_call>')
    assert content == "" and [d["function"]["name"] for d in deltas] == ["get_time"]
    assert p.finish() == ("", [])
    assert p.finish_reason("stop") == "tool_calls" and p.finish_reason("length") == "length"
    assert p.calls[0] == {k: v for k, v in deltas[0].items() if k != "index"}


def test_text_after_calls_is_content_without_the_layout():
    text = call_text("get_time", {}) + "\n\nDone."
    content, deltas = run(parser(), [text])
    assert content == "Done." and len(deltas) == 1


def test_max_calls_keeps_the_first_call_only():
    text = call_text("get_time", {}) + "\n" + call_text("get_weather", {"city": "a", "unit": "f"}) + " more"
    p = parser(max_calls=1)
    content, deltas = run(p, random_pieces(text, 3))
    assert content == "" and [d["function"]["name"] for d in deltas] == ["get_time"] and len(p.calls) == 1


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "get_time", "arguments": {}',  # bad JSON
        '{"name": "no_such_tool", "arguments": {}}',  # unknown name
        '["get_time"]',  # not an object
        '{"name": "get_time", "arguments": [1]}',  # arguments not an object
    ],
)
def test_markup_that_is_not_a_call_stays_content(body):
    text = f"Hi\n<tool_call>\n{body}\n</tool_call>"
    p = parser()
    content, deltas = run(p, random_pieces(text, 1))
    assert content == text and deltas == [] and p.finish_reason("stop") == "stop"


def test_arguments_written_as_a_json_string_are_accepted():
    text = (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\", \\"unit\\": \\"c\\"}"}</tool_call>'
    )
    _, deltas = run(parser(), [text])
    assert json.loads(deltas[0]["function"]["arguments"]) == {"city": "Rome", "unit": "c"}


def test_a_call_cut_short():
    # complete JSON but no end tag (the model stopped right after it): still a call
    content, deltas = run(parser(), ['<tool_call>\n{"name": "get_time", "arguments": {}}\n'])
    assert content == "" and len(deltas) == 1
    # cut inside the JSON (max_tokens): the text, as generated
    cut = '<tool_call>\n{"name": "get_weather", "argum'
    p = parser()
    content, deltas = run(p, random_pieces(cut, 2))
    assert content == cut and deltas == [] and p.finish_reason("length") == "length"


# ------------------------------------------------------------------------------------------- formats
def test_format_is_read_from_the_chat_template():
    assert T.format_for_template(TOOL_TEMPLATE.read_text()) is HERMES
    smol = REPO / "model-store" / "smollm2-135m-instruct-gptq-g64" / "chat_template.jinja"
    if smol.is_file():
        assert T.format_for_template(smol.read_text()) is None
    assert T.format_for_template("{{ tools | tojson }} [TOOL_CALLS]") is None


# ------------------------------------------------------------------------------------------- validation
def chat(**kw):
    return {"messages": [{"role": "user", "content": "hi"}], **kw}


@pytest.mark.parametrize(
    "fields,param,part",
    [
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type", '"function"'),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "pattern"),
        ({"tools": [{"type": "function"}]}, "tools.0.function", "required"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "duplicate tool name 'get_weather'"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", '"required"'),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope'",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [], "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice", "expected"),
        ({"messages": [{"role": "tool", "content": "1"}]}, "messages.0", "tool_call_id"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "x",
                        "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}],
                    }
                ]
            },
            "messages.0",
            "only assistant",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "[1]"}}]}
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
            "JSON object",
        ),
    ],
)
def test_bad_tool_fields_are_400s_naming_the_field(fields, param, part):
    with pytest.raises(ValidationError) as ei:
        P.ChatCompletionRequest(**{**chat(), **fields})
    err = from_validation_error(ei.value).body()["error"]
    assert err["param"] == param and err["message"].startswith(param + ": ") and part in err["message"], err


def test_legacy_functions_stay_refused():
    for field, value in (("functions", [{"name": "f"}]), ("function_call", "auto")):
        with pytest.raises(ValidationError) as ei:
            P.ChatCompletionRequest(**chat(**{field: value}))
        assert from_validation_error(ei.value).param == field


class _Tok:
    def __init__(self, template):
        self._t = template

    def chat_template_text(self, with_tools=False):
        return self._t


def test_plan():
    tok = _Tok(TOOL_TEMPLATE.read_text())
    assert T.plan_tools(P.ChatCompletionRequest(**chat()), tok) is None
    assert T.plan_tools(P.ChatCompletionRequest(**chat(tools=[WEATHER], tool_choice="none")), tok) is None
    plan = T.plan_tools(P.ChatCompletionRequest(**chat(tools=[WEATHER, TIME])), tok)
    assert (plan.mode, plan.names, plan.parallel, plan.fmt, plan.forced) == (
        "auto",
        ("get_weather", "get_time"),
        True,
        HERMES,
        False,
    )
    named = {"type": "function", "function": {"name": "get_time"}}
    plan = T.plan_tools(
        P.ChatCompletionRequest(**chat(tools=[WEATHER, TIME], tool_choice=named, parallel_tool_calls=False)), tok
    )
    assert (plan.mode, plan.names, plan.parallel, plan.forced) == ("named", ("get_time",), False, True)
    assert T.plan_tools(P.ChatCompletionRequest(**chat(tools=[WEATHER])), _Tok("{{ x }}")).fmt is None


@pytest.mark.parametrize("choice", [None, "auto", "required"])
def test_tool_choice_with_a_json_response_format_is_a_400(choice):
    body = P.ChatCompletionRequest(**chat(tools=[WEATHER], tool_choice=choice, response_format={"type": "json_object"}))
    with pytest.raises(APIError) as ei:
        T.plan_tools(body, _Tok(TOOL_TEMPLATE.read_text()))
    assert ei.value.param == "tool_choice" and ei.value.message.startswith("tool_choice: ")


# ------------------------------------------------------------------------------------------- rendering and grammar
@pytest.fixture(scope="module")
def tool_tokenizer(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny tokenizer with Qwen2.5's tool-capable chat template."""
    from models.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tool-tok") / "tok"
    shutil.copytree(tiny_tokenizer_dir, d)
    shutil.copy(TOOL_TEMPLATE, d / "chat_template.jinja")
    return Tokenizer.from_dir(d)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_tokenizer_dir):
    from models.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_tokenizer_dir)


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
]


def test_render_passes_tools_and_tool_messages_through_the_template(tool_tokenizer):
    body = P.ChatCompletionRequest(messages=HISTORY, tools=[WEATHER])
    plan = T.plan_tools(body, tool_tokenizer)
    text = tool_tokenizer.decode(T.render_chat_prompt(tool_tokenizer, body, plan, "m"), skip_special_tokens=False)
    assert json.dumps(WEATHER) in text  # the tool, as the template writes it (tojson)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n22 C\n</tool_response>" in text
    # tool_choice "none": the tools are not rendered, the history still is
    body = P.ChatCompletionRequest(messages=HISTORY, tools=[WEATHER], tool_choice="none")
    text = tool_tokenizer.decode(T.render_chat_prompt(tool_tokenizer, body, None, "m"), skip_special_tokens=False)
    assert "# Tools" not in text and "<tool_response>" in text


def test_a_template_without_tool_support_is_a_400(plain_tokenizer):
    body = P.ChatCompletionRequest(**chat(tools=[WEATHER]))
    plan = T.plan_tools(body, plain_tokenizer)
    with pytest.raises(APIError) as ei:
        T.render_chat_prompt(plain_tokenizer, body, plan, "tiny")
    assert ei.value.status == 400 and ei.value.param == "tools" and "does not render tools" in ei.value.message
    # tools are not needed with tool_choice "none": a plain prompt, as asked
    body = P.ChatCompletionRequest(**chat(tools=[WEATHER], tool_choice="none"))
    assert T.render_chat_prompt(plain_tokenizer, body, None, "tiny")
    # a history with tool calls the template would drop
    body = P.ChatCompletionRequest(messages=HISTORY)
    with pytest.raises(APIError) as ei:
        T.render_chat_prompt(plain_tokenizer, body, None, "tiny")
    assert ei.value.param == "messages" and "tool_calls" in ei.value.message


def test_a_template_that_renders_tools_in_an_unknown_format_is_a_400(tiny_tokenizer_dir):
    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    tok.hf.chat_template = "{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}"
    body = P.ChatCompletionRequest(**chat(tools=[WEATHER]))
    with pytest.raises(APIError) as ei:
        T.render_chat_prompt(tok, body, T.plan_tools(body, tok), "odd")
    assert ei.value.param == "tools" and "cannot parse" in ei.value.message and "hermes" in ei.value.message


def feed(constraint, tokenizer, text):
    """Feed `text`'s tokens; False at the first token the grammar rejects."""
    return all(constraint.accept(t) for t in tokenizer.encode(text, add_special_tokens=False))


def compile_plan(tok, **fields):
    plan = T.plan_tools(P.ChatCompletionRequest(**chat(**fields)), tok)
    return T.compile_tool_constraint(tok, tok.vocab_size, plan)


def test_required_grammar_allows_exactly_the_calls(tool_tokenizer):
    tok = tool_tokenizer
    good = call_text("get_weather", {"city": "Paris", "unit": "c"})
    assert good == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    c = compile_plan(tok, tools=[WEATHER, TIME], tool_choice="required")
    assert feed(c, tok, good) and not c.is_terminated()  # parallel: another call may follow
    assert feed(c, tok, "\n" + call_text("get_time", {}))
    assert not feed(compile_plan(tok, tools=[WEATHER, TIME], tool_choice="required"), tok, "Sure")
    bad_args = call_text("get_weather", {"city": "Paris", "unit": "k"})
    assert not feed(compile_plan(tok, tools=[WEATHER], tool_choice="required"), tok, bad_args)
    assert not feed(compile_plan(tok, tools=[WEATHER], tool_choice="required"), tok, call_text("nope", {}))
    # no parameters: only {}
    assert not feed(compile_plan(tok, tools=[TIME], tool_choice="required"), tok, call_text("get_time", {"a": 1}))


def test_named_grammar_with_one_call(tool_tokenizer):
    tok = tool_tokenizer
    named = {"type": "function", "function": {"name": "get_time"}}
    c = compile_plan(tok, tools=[WEATHER, TIME], tool_choice=named, parallel_tool_calls=False)
    assert not feed(c, tok, call_text("get_weather", {"city": "a", "unit": "c"}))
    c = compile_plan(tok, tools=[WEATHER, TIME], tool_choice=named, parallel_tool_calls=False)
    assert feed(c, tok, call_text("get_time", {})) and c.is_terminated()


@pytest.mark.parametrize(
    "parameters,part",
    [({"type": "strange"}, "strange"), ({"type": "array", "minItems": 10**12}, "minItems")],
)
def test_a_parameters_schema_that_cannot_be_enforced_is_a_400_naming_the_tool(tool_tokenizer, parameters, part):
    bad = {"type": "function", "function": {"name": "bad", "parameters": parameters}}
    with pytest.raises(APIError) as ei:
        compile_plan(tool_tokenizer, tools=[WEATHER, bad], tool_choice="required")
    assert ei.value.param == "tools.1.function.parameters" and part in ei.value.message, ei.value.message
