"""OpenAI-compatible request schemas (pydantic) and response builders (plain dicts, cheap to serialize).

Request models ignore unknown fields (clients send many), but refuse fields whose meaning we would
otherwise silently change (n > 1, best_of > 1, echo, suffix, logit_bias, tools).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 5


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = Field(None, description="Model name; the server's default model when omitted.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Default: the rest of the context.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1 disables top-k.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: bool = False
    logit_bias: Optional[Dict[str, float]] = None

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

    @model_validator(mode="after")
    def _check_unsupported(self):
        if self.n != 1:
            raise ValueError("n > 1 is not supported; send separate requests")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    @property
    def stop_list(self) -> List[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
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

    @model_validator(mode="after")
    def _check_completion_unsupported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of > 1 is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[ContentPart]]] = None
    name: Optional[str] = None

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
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[List[Any]] = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.tools:
            raise ValueError("tools are not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> List[Dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# ------------------------------------------------------------------------ responses (dicts)
def usage_dict(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, created: int, model: str, text: str, finish_reason: Optional[str],
                        logprobs: Optional[dict], usage: Dict[str, int]) -> Dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": usage}


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: Optional[str],
                     logprobs: Optional[dict], with_usage: bool) -> Dict[str, Any]:
    d = {"id": rid, "object": "text_completion", "created": created, "model": model,
         "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        d["usage"] = None
    return d


def chat_response(rid: str, created: int, model: str, text: str, finish_reason: Optional[str],
                  logprobs: Optional[dict], usage: Dict[str, int]) -> Dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": usage}


def chat_chunk(rid: str, created: int, model: str, delta: Dict[str, Any], finish_reason: Optional[str],
               logprobs: Optional[dict], with_usage: bool) -> Dict[str, Any]:
    d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
         "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        d["usage"] = None
    return d


def usage_chunk(rid: str, created: int, model: str, obj: str, usage: Dict[str, int]) -> Dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def model_card(name: str, created: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
    card = {"id": name, "object": "model", "created": int(created or time.time()), "owned_by": "jetserve"}
    card.update(extra)
    return card


def _bytes(s: str) -> List[int]:
    return list(s.encode("utf-8", errors="replace"))


def completion_logprobs(tokens: Sequence[str], lps: Sequence[float], tops: Sequence[Sequence[tuple]],
                        offset0: int) -> Dict[str, Any]:
    """OpenAI legacy completions logprobs: `tops` are (token_text, logprob) pairs per position."""
    offsets, off = [], offset0
    for t in tokens:
        offsets.append(off)
        off += len(t)
    return {"tokens": list(tokens), "token_logprobs": list(lps),
            "top_logprobs": [{t: lp for t, lp in top} for top in tops], "text_offset": offsets}


def chat_logprobs(tokens: Sequence[str], lps: Sequence[float], tops: Sequence[Sequence[tuple]]) -> Dict[str, Any]:
    return {"content": [
        {"token": t, "logprob": lp, "bytes": _bytes(t),
         "top_logprobs": [{"token": tt, "logprob": tlp, "bytes": _bytes(tt)} for tt, tlp in top]}
        for t, lp, top in zip(tokens, lps, tops)]}
