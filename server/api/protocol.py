"""OpenAI-compatible request schemas (pydantic) and response builders (plain dicts, cheap to serialize).

`FIELDS` is the one table of the request fields we know: each either works (within the numeric limits of
`models.sampling.LIMITS`, from which the models' bounds are derived) or is refused with a 400 naming it
unless it has its neutral value (best_of > 1, echo, suffix, logit_bias, functions, ...). Unknown fields
(clients send many) are ignored; docs/api.md lists the table (`fields_markdown`). Tool calling (`tools`,
`tool_choice`, tool messages) is validated here field by field; the rules that need the model's chat template
or several fields at once live in server/api/tools.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from models.sampling import LIMITS

MAX_STOP_SEQUENCES = 16


@dataclass(frozen=True)
class FieldRule:
    """One request field: where it is accepted and what works. A rule with `allowed` is refused (400 naming the
    field, message `refusal`) for any value `allowed(value)` rejects; defaults are never checked."""

    name: str
    endpoints: str  # "both", "chat" or "completions"
    accepts: str
    allowed: Optional[Callable[[Any], bool]] = None
    refusal: str = ""


def _lim(name: str) -> str:
    r = LIMITS[name]
    return f"number {r}" + (f" ({r.note})" if r.note else "")


def _off(v: Any) -> bool:
    return not v


FIELDS: List[FieldRule] = [
    FieldRule("model", "both", "string; the server's default model when omitted"),
    FieldRule(
        "max_tokens",
        "both",
        "integer >= 1; default the rest of the context; prompt + max_tokens beyond "
        "the context is a 400 `context_length_exceeded`",
    ),
    FieldRule("temperature", "both", _lim("temperature")),
    FieldRule("top_p", "both", _lim("top_p")),
    FieldRule("top_k", "both", "integer " + str(LIMITS["top_k"]) + f" ({LIMITS['top_k'].note})"),
    FieldRule("min_p", "both", _lim("min_p")),
    FieldRule("presence_penalty", "both", _lim("presence_penalty")),
    FieldRule("frequency_penalty", "both", _lim("frequency_penalty")),
    FieldRule("repetition_penalty", "both", _lim("repetition_penalty")),
    FieldRule("stop", "both", f"a string or up to {MAX_STOP_SEQUENCES} non-empty strings; not returned"),
    FieldRule(
        "seed", "both", "integer; same seed, prompt and settings give the same output, whatever else is in the batch"
    ),
    FieldRule("stream", "both", "boolean; server-sent events"),
    FieldRule("stream_options", "both", "`include_usage`"),
    FieldRule("ignore_eos", "both", "boolean (benchmarks)"),
    FieldRule("user", "both", "string; informational, no effect"),
    FieldRule(
        "n",
        "both",
        "integer from 1 to the server's `--max-batch-size` (a larger n is a 400 giving the limit); n choices of "
        "one prompt, prefilled once; with `seed`, choice i samples with seed + i (see n > 1)",
    ),
    FieldRule("logit_bias", "both", "empty", _off, "logit_bias is not supported"),
    FieldRule(
        "response_format",
        "both",
        '`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", '
        '"json_schema": {"name", "schema", "strict"}}`; JSON is enforced by a token '
        "mask (see Structured output); a schema that cannot be enforced is a 400",
    ),
    FieldRule(
        "prompt",
        "completions",
        "a string, a list of token ids, or a list holding one of these (one prompt per request)",
    ),
    FieldRule("logprobs", "completions", "integer " + str(LIMITS["logprobs"]) + " (top tokens per position)"),
    FieldRule("echo", "completions", "false", _off, "echo is not supported"),
    FieldRule("best_of", "completions", "1", lambda v: v in (None, 1), "best_of > 1 is not supported"),
    FieldRule("suffix", "completions", "empty", _off, "suffix is not supported"),
    FieldRule(
        "messages",
        "chat",
        "roles system, developer (as system), user, assistant, tool; content a string "
        "or text parts; rendered with the model's chat template; assistant messages may carry "
        "`tool_calls` (arguments a JSON object string) and tool messages need `tool_call_id` "
        "(see Tool calling); a template that drops `tool_calls` is a 400",
    ),
    FieldRule("max_completion_tokens", "chat", "as `max_tokens` (wins over it)"),
    FieldRule("logprobs", "chat", "boolean"),
    FieldRule("top_logprobs", "chat", "integer " + str(LIMITS["logprobs"]) + "; needs `logprobs: true`"),
    FieldRule(
        "parallel_tool_calls",
        "chat",
        "boolean, default true; false: at most one tool call (the first; `required` and a named "
        "function are then forced to exactly one)",
    ),
    FieldRule("metadata", "chat", "informational, no effect"),
    FieldRule("store", "chat", "boolean; no effect (nothing is stored)"),
    FieldRule("service_tier", "chat", "informational, no effect"),
    FieldRule(
        "tools",
        "chat",
        'up to 128 `{"type": "function", "function": {"name", "description", "parameters"}}` with unique '
        "names (`[a-zA-Z0-9_-]{1,64}`); rendered with the model's chat template (see Tool calling); a model "
        "whose template has no tool support, or a tool-call format the server cannot parse, is a 400",
    ),
    FieldRule(
        "tool_choice",
        "chat",
        '`"none"` (tools not rendered, nothing parsed), `"auto"` (default with tools; calls parsed from the '
        'text), `"required"` or `{"type": "function", "function": {"name"}}` (forced by a token mask; the '
        "arguments follow the tool's `parameters` schema); not with a JSON `response_format`",
    ),
    FieldRule("functions", "chat", "empty", _off, "functions are not supported"),
    FieldRule("function_call", "chat", '"none"', lambda v: v in (None, "none"), "function_call is not supported"),
    FieldRule(
        "modalities",
        "chat",
        '`["text"]`',
        lambda v: v in (None, ["text"]),
        'modalities other than ["text"] are not supported',
    ),
    FieldRule("audio", "chat", "null", lambda v: v is None, "audio output is not supported"),
    FieldRule("prediction", "chat", "null", lambda v: v is None, "predicted outputs are not supported"),
    FieldRule("reasoning_effort", "chat", "null", lambda v: v is None, "reasoning_effort is not supported"),
    FieldRule("web_search_options", "chat", "null", lambda v: v is None, "web search is not supported"),
]
_REFUSED: Dict[str, FieldRule] = {r.name: r for r in FIELDS if r.allowed is not None}


def fields_markdown() -> str:
    """The `FIELDS` table as markdown (docs/api.md holds exactly this)."""
    rows = ["| field | endpoints | accepted |", "| --- | --- | --- |"]
    for r in FIELDS:
        what = r.accepts if r.allowed is None else f"only {r.accepts}; anything else is a 400"
        rows.append(f"| `{r.name}` | {r.endpoints} | {what} |")
    return "\n".join(rows) + "\n"


def _limited(name: str, default: Any, description: Optional[str] = None) -> Any:
    """A pydantic Field bounded by `LIMITS[name]`."""
    r = LIMITS[name]
    bounds: Dict[str, float] = {"gt" if r.lo_open else "ge": r.lo}
    if r.hi is not None:
        bounds["le"] = r.hi
    return Field(default, description=description or r.note or None, **bounds)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object')
        return self


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = Field(None, description="Model name; the server's default model when omitted.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Default: the rest of the context.")
    temperature: float = _limited("temperature", 1.0)
    top_p: float = _limited("top_p", 1.0)
    top_k: int = _limited("top_k", 0)
    min_p: float = _limited("min_p", 0.0)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = _limited("presence_penalty", 0.0)
    frequency_penalty: float = _limited("frequency_penalty", 0.0)
    repetition_penalty: float = _limited("repetition_penalty", 1.0)
    n: int = Field(1, ge=1, description="Choices to generate (1 to the server's max batch size).")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: bool = False
    logit_bias: Optional[Dict[str, float]] = None
    response_format: Optional[ResponseFormat] = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator(*_REFUSED, mode="after", check_fields=False)
    @classmethod
    def _refuse(cls, v: Any, info: ValidationInfo) -> Any:
        rule = _REFUSED[info.field_name]
        if v is not None and not rule.allowed(v):
            raise ValueError(rule.refusal)
        return v

    @property
    def stop_list(self) -> List[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    logprobs: Optional[int] = _limited("logprobs", None)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) == 0:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], list) or isinstance(v[0], str):
                if len(v) != 1:
                    raise ValueError("batched prompts are not supported; send one prompt per request")
                v = v[0]
        if isinstance(v, str) and v == "":
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


MAX_TOOLS = 128
TOOL_CHOICE_SHAPES = '"none", "auto", "required" or {"type": "function", "function": {"name": "..."}} expected'
_TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., pattern=_TOOL_NAME)
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None  # a JSON schema; omitted means no parameters
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    function: FunctionDefinition

    @field_validator("type")
    @classmethod
    def _function_only(cls, v):
        if v != "function":
            raise ValueError(f'only tools of type "function" are supported, got {v!r}')
        return v


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., min_length=1)
    arguments: str  # a JSON object, as text (OpenAI's wire format)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v):
        try:
            ok = isinstance(json.loads(v), dict)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("arguments must be a JSON object encoded as a string")
        return v


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(..., min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: Dict[str, Any]

    @field_validator("function")
    @classmethod
    def _has_name(cls, v):
        if not isinstance(v.get("name"), str) or not v["name"]:
            raise ValueError('needs {"name": "<a tool name>"}')
        return v

    @property
    def name(self) -> str:
        return self.function["name"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def template_message(self) -> Dict[str, Any]:
        """The message as chat templates expect it: developer as system, content text, tool call arguments as
        a dict (templates write them with `tojson`), `tool_call_id` on tool messages."""
        m: Dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.role == "tool":
            m["tool_call_id"] = self.tool_call_id
            if self.name:
                m["name"] = self.name
        return m

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: List[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = _limited("logprobs", None)
    parallel_tool_calls: Optional[bool] = None
    metadata: Optional[Any] = None
    store: Optional[bool] = None
    service_tier: Optional[Any] = None
    tools: Optional[List[Tool]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Optional[Union[str, NamedToolChoice]] = None
    functions: Optional[List[Any]] = None
    function_call: Optional[Any] = None
    modalities: Optional[List[str]] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    reasoning_effort: Optional[Any] = None
    web_search_options: Optional[Any] = None

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, v):
        seen = set()
        for t in v or ():
            if t.function.name in seen:
                raise ValueError(f"duplicate tool name {t.function.name!r}")
            seen.add(t.function.name)
        return v

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _check_tool_choice(cls, v: Any, info: ValidationInfo):
        if v is None:
            return v
        if isinstance(v, dict):
            try:
                v = NamedToolChoice.model_validate(v)
            except ValidationError:
                raise ValueError(TOOL_CHOICE_SHAPES) from None
        elif v not in ("none", "auto", "required"):
            raise ValueError(TOOL_CHOICE_SHAPES)
        if v == "none" or v == "auto":
            return v
        tools = info.data.get("tools")
        if "tools" in info.data and not tools:
            raise ValueError('tool_choice other than "none" or "auto" needs tools')
        if isinstance(v, NamedToolChoice) and tools and v.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names the function {v.name!r}, which is not in tools")
        return v

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> List[Dict[str, Any]]:
        return [m.template_message() for m in self.messages]

    def template_tools(self) -> List[Dict[str, Any]]:
        """The tools as the chat template gets them (OpenAI's shape, unset fields left out)."""
        return [t.model_dump(exclude_none=True) for t in self.tools or ()]


# ------------------------------------------------------------------------ responses (dicts)
def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Dict[str, Any]:
    """OpenAI usage; `cached_tokens` counts prompt tokens served from the prefix cache (a part of prompt_tokens)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _body(rid: str, obj: str, created: int, model: str, choices: List[Dict[str, Any]], **usage: Any) -> Dict[str, Any]:
    """The envelope every response and chunk shares; `usage=` (a dict, or None in a chunk of a stream that will
    end with a usage chunk) is added only when given."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **usage}


def _chunk_usage(with_usage: bool) -> Dict[str, Any]:
    return {"usage": None} if with_usage else {}


def completion_choice(index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict]) -> Dict[str, Any]:
    """One entry of a completion's `choices`."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(
    rid: str, created: int, model: str, choices: List[Dict[str, Any]], usage: Dict[str, Any]
) -> Dict[str, Any]:
    """A text completion; `choices` are `completion_choice` dicts in index order."""
    return _body(rid, "text_completion", created, model, choices, usage=usage)


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: Optional[str],
    logprobs: Optional[dict],
    with_usage: bool,
    index: int = 0,
) -> Dict[str, Any]:
    """One streamed piece of choice `index`."""
    choice = completion_choice(index, text, finish_reason, logprobs)
    return _body(rid, "text_completion", created, model, [choice], **_chunk_usage(with_usage))


def chat_choice(
    index: int,
    text: Optional[str],
    finish_reason: Optional[str],
    logprobs: Optional[dict],
    tool_calls: Optional[List[Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """One entry of a chat completion's `choices`; `tool_calls` (OpenAI tool call dicts) are added to the
    message when non-empty."""
    message: Dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_response(
    rid: str, created: int, model: str, choices: List[Dict[str, Any]], usage: Dict[str, Any]
) -> Dict[str, Any]:
    """A chat completion; `choices` are `chat_choice` dicts in index order."""
    return _body(rid, "chat.completion", created, model, choices, usage=usage)


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: Dict[str, Any],
    finish_reason: Optional[str],
    logprobs: Optional[dict],
    with_usage: bool,
    index: int = 0,
) -> Dict[str, Any]:
    """One streamed delta of choice `index`."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _body(rid, "chat.completion.chunk", created, model, [choice], **_chunk_usage(with_usage))


def usage_chunk(rid: str, created: int, model: str, obj: str, usage: Dict[str, int]) -> Dict[str, Any]:
    return _body(rid, obj, created, model, [], usage=usage)


def model_card(name: str, created: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
    card = {"id": name, "object": "model", "created": int(created or time.time()), "owned_by": "jetserve"}
    card.update(extra)
    return card


def _bytes(s: str) -> List[int]:
    return list(s.encode("utf-8", errors="replace"))


def completion_logprobs(
    tokens: Sequence[str], lps: Sequence[float], tops: Sequence[Sequence[tuple]], offset0: int
) -> Dict[str, Any]:
    """OpenAI legacy completions logprobs: `tops` are (token_text, logprob) pairs per position."""
    offsets, off = [], offset0
    for t in tokens:
        offsets.append(off)
        off += len(t)
    return {
        "tokens": list(tokens),
        "token_logprobs": list(lps),
        "top_logprobs": [{t: lp for t, lp in top} for top in tops],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: Sequence[str], lps: Sequence[float], tops: Sequence[Sequence[tuple]]) -> Dict[str, Any]:
    return {
        "content": [
            {
                "token": t,
                "logprob": lp,
                "bytes": _bytes(t),
                "top_logprobs": [{"token": tt, "logprob": tlp, "bytes": _bytes(tt)} for tt, tlp in top],
            }
            for t, lp, top in zip(tokens, lps, tops)
        ]
    }
