"""OpenAI-compatible routes: parse -> tokenize -> submit to the engine -> detokenize -> format.

No tensors here: token ids come back from the engine thread through each request's `RequestHandle`, and
`IncrementalDetokenizer` turns them into text (and finds stop strings) at this edge. A stop string ends
the request in the engine with finish reason "stop" (what its stats record, as the client sees it), so its
KV slot is freed at the next step.

max_tokens policy: omitted means "the rest of the context"; a prompt that leaves no room, or
prompt + max_tokens beyond the context, is refused with 400 `context_length_exceeded` giving the numbers
(OpenAI's behaviour; nothing is silently clamped).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from contextlib import AsyncExitStack
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from models.sampling import SamplingParams
from models.tokenizer import IncrementalDetokenizer
from server.api import protocol as P
from server.api import tools as T
from server.api.errors import APIError, error_body, from_validation_error
from server.api.structured import constraint_for
from server.engine.request import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_TIMEOUT,
    EngineStoppedError,
    GenerationRequest,
    QueueFullError,
    TokenEvent,
    new_request_id,
)

logger = logging.getLogger(__name__)
router = APIRouter()
M = TypeVar("M", bound=BaseModel)


def _state(request: Request):
    return request.app.state.jetserve


# ----------------------------------------------------------------------------- probes / models
@router.get("/health")
async def health() -> Dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """Readiness: 200 once the default model is loaded and warmed up; 503 before that and while draining."""
    st = _state(request)
    if st.draining:
        return JSONResponse(error_body("server is shutting down", "server_error", None, "shutting_down"), 503)
    if not st.ready:
        msg = f"model failed to load: {st.load_error}" if st.load_error else "model is loading"
        return JSONResponse(error_body(msg, "server_error", None, "not_ready"), 503)
    return {"status": "ready", "model": st.default_model}


@router.get("/v1/models")
async def list_models(request: Request):
    st = _state(request)
    data = []
    for e in st.manager.list_models():
        data.append(
            P.model_card(e.name, int(e.loaded_at) if e.loaded_at else None, state=e.state, aliases=list(e.aliases))
        )
    return {"object": "list", "data": data}


# ----------------------------------------------------------------------------- generation
async def _parse(request: Request, model: Type[M]) -> M:
    ct = request.headers.get("content-type", "")
    if ct and "json" not in ct.split(";")[0].lower():
        raise APIError(415, f"Content-Type must be application/json, got {ct!r}", code="unsupported_media_type")
    raw = await request.body()
    try:
        data = json.loads(raw)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\\ud800") fail here
    except (ValueError, UnicodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


@router.post("/v1/completions")
async def completions(request: Request):
    body = await _parse(request, P.CompletionRequest)
    return await _generate(request, body, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await _parse(request, P.ChatCompletionRequest)
    return await _generate(request, body, chat=True)


def _map_model_error(e: Exception, name: str) -> APIError:
    from server.store import ModelLoadError, ModelNotFoundError  # no torch

    if isinstance(e, ModelNotFoundError):
        return APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    if isinstance(e, ModelLoadError):
        return APIError(503, str(e), code="model_unavailable")
    if type(e).__name__ == "InsufficientMemoryError":
        return APIError(503, str(e), code="insufficient_memory", headers={"Retry-After": "5"})
    raise e


async def _tokenize(lm: Any, body: Any, chat: bool, tools: Optional[T.ToolPlan] = None) -> List[int]:
    tok = lm.tokenizer
    if chat:  # the chat template, with the tools when the request has a tool plan (400s: see tools.py)
        return await asyncio.to_thread(T.render_chat_prompt, tok, body, tools, lm.name)
    prompt = body.prompt
    if isinstance(prompt, str):
        return await asyncio.to_thread(tok.encode, prompt)
    vocab = int(getattr(lm.runner, "vocab_size", 0) or tok.vocab_size)
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
    return list(prompt)


def _budget(n_prompt: int, ctx: int, max_tokens: Optional[int], chat: bool) -> int:
    where = "messages" if chat else "prompt"
    if n_prompt >= ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, your {where} has "
            f"{n_prompt} tokens, which leaves no room for the completion.",
            param=where,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return ctx - n_prompt
    if n_prompt + max_tokens > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {where}, {max_tokens} in the "
            f"completion). Please reduce the length of the {where} or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


class _Decoder:
    """Turns a request's TokenEvents into text, logprobs and a finish state; with a `tools` parser (a chat
    request with tools) `split` turns that text into content and tool calls."""

    def __init__(
        self,
        tokenizer: Any,
        stop: List[str],
        prompt_ids: List[int],
        num_logprobs: Optional[int],
        tools: Optional[T.ToolCallParser] = None,
    ):
        self.tok = tokenizer
        self.tools = tools
        self.detok = IncrementalDetokenizer(tokenizer, stop, prompt_ids=prompt_ids)
        self.num_logprobs = num_logprobs
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens the engine reused from its prefix cache
        self.finish_reason: Optional[str] = None
        self.error: Optional[APIError] = None
        self.text_len = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def _piece(self, tid: int) -> str:
        return self.tok.decode([tid], skip_special_tokens=False)

    def feed(self, events: List[TokenEvent]) -> Tuple[str, List[tuple]]:
        """Consume events; return (new text, [(token_text, logprob, [(top_text, top_logprob)...])])."""
        out: List[str] = []
        lps: List[tuple] = []
        for ev in events:
            if self.done:
                break
            if ev.cached_tokens is not None:
                self.cached_tokens = ev.cached_tokens
            if ev.token_id >= 0:
                self.completion_tokens += 1
                out.append(self.detok.add(ev.token_id))
                if self.num_logprobs is not None and ev.logprob is not None:
                    lps.append((self._piece(ev.token_id), ev.logprob, [(self._piece(t), lp) for t, lp in ev.top]))
                if self.detok.stopped:
                    self.finish_reason = FINISH_STOP
                    break
            if ev.finish_reason in (FINISH_STOP, FINISH_LENGTH):
                out.append(self.detok.finish())
                self.finish_reason = ev.finish_reason
            elif ev.finish_reason == FINISH_TIMEOUT:
                self.error = APIError(504, "request timed out", code="request_timeout")
            elif ev.finish_reason == FINISH_ABORT:
                self.error = APIError(503, ev.error or "request aborted", code=ev.error_code or "aborted")
            elif ev.finish_reason is not None:
                self.error = APIError(500, ev.error or "internal error", code=ev.error_code or "internal_error")
        text = "".join(out)
        self.text_len += len(text)
        return text, lps

    def split(self, text: str) -> Tuple[str, List[Dict[str, Any]]]:
        """(content, tool call stream deltas) of text `feed` returned; flushes the parser once finished."""
        if self.tools is None:
            return text, []
        content, deltas = self.tools.feed(text)
        if self.finish_reason is not None:
            more, last = self.tools.finish()
            content, deltas = content + more, deltas + last
        return content, deltas

    @property
    def tool_calls(self) -> List[Dict[str, Any]]:
        return self.tools.calls if self.tools is not None else []

    @property
    def chat_finish_reason(self) -> Optional[str]:
        return self.tools.finish_reason(self.finish_reason) if self.tools is not None else self.finish_reason


def _format_logprobs(chat: bool, lps: List[tuple], offset: int) -> Optional[dict]:
    if not lps:
        return None
    toks = [t for t, _, _ in lps]
    vals = [v for _, v, _ in lps]
    tops = [top for _, _, top in lps]
    return P.chat_logprobs(toks, vals, tops) if chat else P.completion_logprobs(toks, vals, tops, offset)


async def _generate(request: Request, body: Any, chat: bool):
    st = _state(request)
    if st.draining:
        raise APIError(503, "server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
    name = body.model or st.default_model
    stack = AsyncExitStack()
    try:
        try:
            lm = await stack.enter_async_context(st.manager.acquire(name))
        except Exception as e:
            raise _map_model_error(e, name) from None
        tools = T.plan_tools(body, lm.tokenizer) if chat else None  # None: no tools, or tool_choice "none"
        prompt_ids = await _tokenize(lm, body, chat, tools)
        engine = lm.engine
        max_tokens = _budget(len(prompt_ids), engine.max_seq, body.max_new_tokens if chat else body.max_tokens, chat)
        num_lp = body.num_logprobs if chat else body.logprobs
        try:
            params = SamplingParams(
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                min_p=body.min_p,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                seed=body.seed,
                logprobs=num_lp,
            ).validate()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        constraint = await constraint_for(lm, body.response_format)  # structured output; None for text
        if tools is not None and tools.forced:  # tool_choice required / named (never with a JSON format)
            constraint = await T.tool_constraint(lm, tools)
        req = GenerationRequest(
            prompt_ids=prompt_ids,
            params=params,
            max_tokens=max_tokens,
            request_id=new_request_id("chatcmpl" if chat else "cmpl"),
            ignore_eos=body.ignore_eos,
            constraint=constraint,
        )
        try:
            handle = engine.submit(req)
        except QueueFullError as e:
            raise APIError(
                429,
                str(e),
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))},
            ) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), code="shutting_down", headers={"Retry-After": "5"}) from None
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
    except APIError as e:
        await stack.aclose()
        if st.metrics is not None:
            st.metrics.on_error(e.code or str(e.status), name)
        raise
    except BaseException:
        await stack.aclose()
        raise

    st.inflight += 1
    closed = False
    dec = _Decoder(lm.tokenizer, body.stop_list, prompt_ids, num_lp, tools.parser() if tools is not None else None)

    async def cleanup() -> None:
        nonlocal closed
        if closed:
            return
        closed = True
        # no-op when the engine already finished it; a stop string is recorded as "stop", anything else as abort
        handle.abort(FINISH_STOP if dec.finish_reason == FINISH_STOP else FINISH_ABORT)
        st.inflight -= 1
        await stack.aclose()

    created = int(time.time())
    model_name = lm.name
    if body.stream:
        return EventSourceResponse(
            _stream(
                handle, dec, chat, req.request_id, created, model_name, body.include_usage, len(prompt_ids), cleanup
            ),
            sep="\n",
            background=BackgroundTask(cleanup),
        )
    try:
        return await _complete(request, handle, dec, chat, req.request_id, created, model_name, len(prompt_ids))
    finally:
        await cleanup()


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _complete(
    request: Request, handle, dec: _Decoder, chat: bool, rid: str, created: int, model: str, n_prompt: int
):
    async def consume() -> Tuple[str, List[tuple]]:
        texts: List[str] = []
        lps: List[tuple] = []
        async for ev in handle:
            t, lp = dec.feed([ev])
            texts.append(t)
            lps.extend(lp)
            if dec.done:
                break
        return "".join(texts), lps

    gen = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({gen, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not gen.done():  # the client went away: abort (frees the slot next step)
        handle.abort()
        gen.cancel()
        logger.info("request %s: client disconnected", rid)
        return JSONResponse(error_body("client disconnected", "invalid_request_error", None, "client_closed"), 499)
    text, lps = gen.result()
    if dec.error is not None:
        raise dec.error
    usage = P.usage_dict(n_prompt, dec.completion_tokens, dec.cached_tokens)
    if chat:
        content, _ = dec.split(text)
        calls = dec.tool_calls
        return P.chat_response(
            rid,
            created,
            model,
            None if calls and not content.strip() else content,
            dec.chat_finish_reason,
            _format_logprobs(True, lps, 0),
            usage,
            calls,
        )
    return P.completion_response(rid, created, model, text, dec.finish_reason, _format_logprobs(False, lps, 0), usage)


async def _stream(
    handle, dec: _Decoder, chat: bool, rid: str, created: int, model: str, include_usage: bool, n_prompt: int, cleanup
):
    dumps = json.dumps
    try:
        if chat:
            yield dumps(
                P.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, None, None, include_usage)
            )
        async for ev in handle:
            offset = dec.text_len
            text, lps = dec.feed([ev] + handle.ready_events())  # coalesce a backlog into one chunk
            text, calls = dec.split(text) if chat else (text, [])
            if text or lps or dec.finish_reason or calls:
                lp = _format_logprobs(chat, lps, offset)
                if chat:
                    delta: Dict[str, Any] = {"content": text} if text else {}
                    if calls:
                        delta["tool_calls"] = calls
                    yield dumps(P.chat_chunk(rid, created, model, delta, dec.chat_finish_reason, lp, include_usage))
                else:
                    yield dumps(P.completion_chunk(rid, created, model, text, dec.finish_reason, lp, include_usage))
            if dec.error is not None:
                yield dumps(dec.error.body())
                break
            if dec.done:
                break
        if include_usage and dec.error is None:
            yield dumps(
                P.usage_chunk(
                    rid,
                    created,
                    model,
                    "chat.completion.chunk" if chat else "text_completion",
                    P.usage_dict(n_prompt, dec.completion_tokens, dec.cached_tokens),
                )
            )
        yield "[DONE]"
    except Exception as e:  # never let a formatting bug kill the connection silently
        logger.exception("stream %s failed", rid)
        yield dumps(error_body(f"internal error: {e}", "server_error", None, "internal_error"))
        yield "[DONE]"
    finally:
        await cleanup()
