"""OpenAI tool calling at the API edge: render tools through the model's chat template, force calls with a
grammar, parse calls out of the generated text.

The engine never sees tools. A request with tools is planned here (`plan_tools`), its prompt rendered with the
model's own chat template (`render_chat_prompt`; a template that ignores `tools` is a 400, never a silent
prompt without them), and each choice's text goes through a `ToolCallParser` that turns the model's call
markup into OpenAI `tool_calls`.

The markup is read from the template, never guessed: `FORMATS` is the small table of formats we can parse
(start tag, end tag, JSON keys), and the first whose tags the chat template writes is the model's format. A
template that renders tools in no known format is a 400 naming the model.

tool_choice:
- "none": tools are not rendered and nothing is parsed (the model does not know them; the text is content).
- "auto" (the default with tools): free generation; calls are parsed from the text afterwards.
- "required" / a named function: forced by a llguidance grammar (server/api/structured.py), exactly
  start tag, `{"name": <a tool name>, "arguments": <that tool's parameters schema>}`, end tag; one or more
  calls when `parallel_tool_calls` is true (the default), exactly one when it is false.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from server.api.errors import APIError
from server.api.structured import (
    GrammarConstraint,
    check_schema_size,
    compile_constraint,
    compile_lark_constraint,
    json_options,
)

logger = logging.getLogger(__name__)

FINISH_TOOL_CALLS = "tool_calls"
# what `parameters` means when omitted: a function without parameters
NO_PARAMETERS: Dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model writes a tool call: `start`, then `{name_key: ..., args_key: {...}}` (JSON), then `end`;
    `start` + `inner` + JSON + `inner` + `end` is what its template writes, calls separated by `separator`."""

    name: str
    start: str
    end: str
    name_key: str = "name"
    args_key: str = "arguments"
    inner: str = "\n"
    separator: str = "\n"


# Known formats, matched by their tags in the chat template (first match wins).
FORMATS: Tuple[ToolCallFormat, ...] = (
    # Hermes 2 Pro, Qwen2.5 / Qwen3, SmolLM3: <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>
    ToolCallFormat("hermes", "<tool_call>", "</tool_call>"),
)


def format_for_template(template: str) -> Optional[ToolCallFormat]:
    """The known format whose start and end tags the chat template source contains, or None."""
    for fmt in FORMATS:
        if fmt.start in template and fmt.end in template:
            return fmt
    return None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request does with its tools. `mode` is "auto", "required" or "named" (a request with
    tool_choice "none" or no tools has no plan); `names` are the tool names a call may use (the named one
    only for "named"); `fmt` is None when the template's format is unknown (render_chat_prompt refuses it)."""

    mode: str
    tools: Sequence[Any]  # protocol.Tool
    names: Tuple[str, ...]
    parallel: bool
    fmt: Optional[ToolCallFormat]

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def parser(self) -> "ToolCallParser":
        """A fresh parser for one choice."""
        assert self.fmt is not None
        return ToolCallParser(self.fmt, self.names, max_calls=None if self.parallel else 1)


def plan_tools(body: Any, tokenizer: Any) -> Optional[ToolPlan]:
    """The request's tool plan (None: no tools, or tool_choice "none"). Field shapes are already checked by
    the request model; the rules spanning fields are checked here (400 naming tool_choice)."""
    choice = body.tool_choice
    if not body.tools or choice == "none":
        return None
    choice = choice or "auto"
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400,
            f"tool_choice: {_choice_text(choice)} cannot be combined with a JSON response_format "
            '(send tool_choice "none" or a text response_format)',
            param="tool_choice",
            code="invalid_value",
        )
    names = tuple(t.function.name for t in body.tools)
    mode = choice if isinstance(choice, str) else "named"
    if mode == "named":
        names = (choice.name,)
    parallel = body.parallel_tool_calls is not False
    fmt = format_for_template(tokenizer.chat_template_text(with_tools=True))
    return ToolPlan(mode, tuple(body.tools), names, parallel, fmt)


def _choice_text(choice: Any) -> str:
    return f'"{choice}"' if isinstance(choice, str) else f"the function {choice.name!r}"


# --------------------------------------------------------------------------------------------- prompt
def render_chat_prompt(tokenizer: Any, body: Any, plan: Optional[ToolPlan], model: str) -> List[int]:
    """Token ids of the chat prompt, tools rendered when `plan` has them. Blocking (run in a thread).

    400s: the template fails (param messages); it renders the same text with and without the tools (param
    tools: the model has no tool support); it drops the messages' `tool_calls` (param messages); its tool-call
    format is unknown or written with special tokens that decoding would drop (param tools)."""
    messages = body.template_messages()
    tools = body.template_tools() if plan is not None else None
    try:
        text = tokenizer.render_chat(messages, tools=tools)
        if tools and tokenizer.render_chat(messages) == text:
            raise APIError(
                400,
                f"tools: the chat template of model '{model}' does not render tools (it has no tool support); "
                'send no tools or tool_choice "none"',
                param="tools",
                code="tools_not_supported",
            )
        if any("tool_calls" in m for m in messages):
            bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
            if tokenizer.render_chat(bare, tools=tools) == text:
                raise APIError(
                    400,
                    f"messages: the chat template of model '{model}' does not render assistant tool_calls",
                    param="messages",
                    code="tools_not_supported",
                )
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    if plan is not None:
        fmt = plan.fmt
        if fmt is None:
            known = ", ".join(f"{f.name} ({f.start}...{f.end})" for f in FORMATS)
            raise APIError(
                400,
                f"tools: model '{model}' renders tools, but its chat template writes tool calls in a format this "
                f"server cannot parse (known: {known})",
                param="tools",
                code="tools_not_supported",
            )
        if tokenizer.is_special_token(fmt.start) or tokenizer.is_special_token(fmt.end):
            raise APIError(
                400,
                f"tools: model '{model}' writes its {fmt.name} tool-call tags as special tokens, which this server "
                "cannot parse from the text",
                param="tools",
                code="tools_not_supported",
            )
    return tokenizer.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------------------------- grammar
def _arguments_schema(tool: Any, i: int) -> Dict[str, Any]:
    schema = tool.function.parameters
    schema = NO_PARAMETERS if schema is None else schema
    if "type" not in schema:  # arguments are always a JSON object
        schema = {"type": "object", **schema}
    try:
        check_schema_size(schema)
    except ValueError as e:
        param = f"tools.{i}.function.parameters"
        raise APIError(400, f"{param}: unsupported schema: {e}", param=param, code="invalid_value") from None
    return schema


def tool_grammar(plan: ToolPlan) -> str:
    """The llguidance Lark grammar of the calls `plan` forces: start tag, `{"name": "<name>", "arguments": `
    the tool's parameters schema `}`, end tag; repeated (separator between) when parallel calls are allowed."""
    fmt = plan.fmt
    assert fmt is not None
    q = json.dumps
    rules = []
    alts = []
    for i, tool in enumerate(plan.tools):
        name = tool.function.name
        if name not in plan.names:
            continue
        schema = {**_arguments_schema(tool, i), "x-guidance": json_options()}
        head = "{" + q(fmt.name_key) + ": " + q(name) + ", " + q(fmt.args_key) + ": "
        rules.append(f"fn_{i}: {q(head)} args_{i} {q('}')}")
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
        alts.append(f"fn_{i}")
    start = "start: call" + (f" ({q(fmt.separator)} call)*" if plan.parallel else "")
    call = f"call: {q(fmt.start + fmt.inner)} ({' | '.join(alts)}) {q(fmt.inner + fmt.end)}"
    return "\n".join(["%llguidance {}", start, call] + rules) + "\n"


def compile_tool_constraint(tokenizer: Any, vocab: int, plan: ToolPlan) -> GrammarConstraint:
    """The forced-call constraint (blocking; cached like structured output). APIError 400 naming the tool
    whose parameters schema cannot be enforced."""
    lark = tool_grammar(plan)
    try:
        return compile_lark_constraint(tokenizer, vocab, lark)
    except ValueError as e:
        error = str(e)
    for i, tool in enumerate(plan.tools):  # find the culprit: compile each schema alone (error path only)
        if tool.function.name not in plan.names:
            continue
        try:
            compile_constraint(tokenizer, vocab, _arguments_schema(tool, i))
        except ValueError as e:
            param = f"tools.{i}.function.parameters"
            raise APIError(400, f"{param}: unsupported schema: {e}", param=param, code="invalid_value") from None
    raise APIError(400, f"tools: cannot force a tool call: {error}", param="tools", code="invalid_value")


async def tool_constraint(lm: Any, plan: ToolPlan) -> Optional[GrammarConstraint]:
    """The constraint forcing the plan's calls ("required" / named), None for "auto"."""
    if not plan.forced:
        return None
    vocab = int(getattr(lm.runner, "vocab_size", 0) or lm.tokenizer.vocab_size)
    return await asyncio.to_thread(compile_tool_constraint, lm.tokenizer, vocab, plan)


# --------------------------------------------------------------------------------------------- parsing
class ToolCallParser:
    """Splits one choice's generated text into content and tool calls (streaming or not).

    `feed(text)` takes the next decoded text and returns `(content, deltas)`: the content that is now safe to
    show (text that may still begin a start tag, and trailing whitespace, is held back) and one OpenAI stream
    delta (`{"index", "id", "type", "function": {"name", "arguments"}}`) per call completed by this text: a
    call arrives whole, once its end tag is generated. `finish()` flushes the rest: a call cut short (no end
    tag) is still a call if its JSON is complete. Markup that is not a valid call (bad JSON, a name not in
    `names`) stays content, as generated. After `max_calls` calls, the rest of the text is dropped.
    `calls` holds the calls so far (OpenAI `tool_calls` entries); concatenating all content equals the text
    when there is no call.
    """

    def __init__(self, fmt: ToolCallFormat, names: Sequence[str], max_calls: Optional[int] = None):
        self.fmt = fmt
        self.names = frozenset(names)
        self.max_calls = max_calls
        self.calls: List[Dict[str, Any]] = []
        self._buf = ""  # unprocessed text (outside a call: a possible start-tag prefix; inside: the call body)
        self._ws = ""  # trailing whitespace held back outside calls
        self._pre_ws = ""  # the whitespace held back when the current call started
        self._in_call = False
        self._after_call = False  # no content since the last call: its leading whitespace is layout

    @property
    def _full(self) -> bool:
        return self.max_calls is not None and len(self.calls) >= self.max_calls

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        """ "tool_calls" for a choice that stopped after calling tools; `reason` otherwise."""
        return FINISH_TOOL_CALLS if reason == "stop" and self.calls else reason

    def feed(self, text: str) -> Tuple[str, List[Dict[str, Any]]]:
        if self._full:
            return "", []
        self._buf += text
        out: List[str] = []
        deltas: List[Dict[str, Any]] = []
        start, end = self.fmt.start, self.fmt.end
        while not self._full:
            if self._in_call:
                i = self._buf.find(end)
                if i < 0:
                    break
                body, self._buf = self._buf[:i], self._buf[i + len(end) :]
                self._in_call = False
                self._close(body, start + body + end, out, deltas)
            else:
                i = self._buf.find(start)
                if i < 0:
                    hold = _prefix_hold(self._buf, start)
                    self._content(self._buf[: len(self._buf) - hold], out)
                    self._buf = self._buf[len(self._buf) - hold :]
                    break
                self._content(self._buf[:i], out)
                self._pre_ws, self._ws = self._ws, ""  # whitespace right before a call is layout
                self._buf = self._buf[i + len(start) :]
                self._in_call = True
        if self._full:
            self._buf = self._ws = ""
        return "".join(out), deltas

    def finish(self) -> Tuple[str, List[Dict[str, Any]]]:
        if self._full:
            return "", []
        out: List[str] = []
        deltas: List[Dict[str, Any]] = []
        if self._in_call:
            self._close(self._buf, self.fmt.start + self._buf, out, deltas)
        else:
            self._content(self._buf, out)
        if not self.calls and self._ws:  # plain text keeps its trailing whitespace
            out.append(self._ws)
        self._buf = self._ws = ""
        self._in_call = False
        return "".join(out), deltas

    def _content(self, text: str, out: List[str]) -> None:
        if not text:
            return
        if self._after_call:
            text = text.lstrip()  # the layout between or after calls
            if not text:
                return
            self._after_call = False
        text = self._ws + text
        stripped = text.rstrip()
        self._ws = text[len(stripped) :]
        if stripped:
            out.append(stripped)

    def _close(self, body: str, raw: str, out: List[str], deltas: List[Dict[str, Any]]) -> None:
        call = self._parse(body)
        if call is None:  # not a call after all: the model's text, as it wrote it
            logger.debug("tool-call markup that is not a valid call kept as content: %.200r", raw)
            self._content(self._pre_ws + raw, out)
            return
        self.calls.append(call)
        self._after_call = True
        deltas.append({"index": len(self.calls) - 1, **call})

    def _parse(self, body: str) -> Optional[Dict[str, Any]]:
        try:
            obj = json.loads(body.strip())
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        name = obj.get(self.fmt.name_key)
        args = obj.get(self.fmt.args_key, {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(name, str) or name not in self.names or not isinstance(args, dict):
            return None
        return {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
        }


def _prefix_hold(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
