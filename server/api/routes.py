"""OpenAI-compatible routes: parse -> tokenize -> submit to the engine -> format.

No tensors here: token ids come back from the engine thread through each request's `RequestHandle`; what the
client sees of them (text, stop strings, logprobs, finish reason, tool calls) is decided by the output step,
server/api/output.py (`ChoiceOutput`, one per choice). A stop string ends that choice's request in the engine
with finish reason "stop" (what its stats record, as the client sees it), so its KV slot is freed at the next
step.

n > 1: the n choices are one `Engine.submit_group` (the prompt prefilled once, its KV copied to the others),
n at most the engine's batch size (else 400 naming `n`); choice i samples with seed + i when `seed` is set.

max_tokens policy: omitted means "the rest of the context"; a prompt that leaves no room, or
prompt + max_tokens beyond the context, is refused with 400 `context_length_exceeded` giving the numbers
(OpenAI's behaviour; nothing is silently clamped).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from contextlib import AsyncExitStack
from typing import Any, Dict, List, Optional, Type, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from models.sampling import SamplingParams
from server.api import protocol as P
from server.api import tools as T
from server.api.errors import APIError, error_body, from_validation_error
from server.api.output import ChoiceGroup, ChoiceOutput, TokenLogprob, format_logprobs
from server.api.structured import constraint_for
from server.engine.request import EngineStoppedError, GenerationRequest, QueueFullError, new_request_id

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


def _check_n(n: int, max_batch_size: int) -> None:
    """n choices run as one group in the engine's batch: at most its batch size (400 naming `n`)."""
    if n > max_batch_size:
        raise APIError(
            400,
            f"n: at most {max_batch_size} choices per request (the server's max batch size), got {n}",
            param="n",
            code="invalid_value",
        )


def _choice_params(params: SamplingParams, n: int) -> List[SamplingParams]:
    """Each choice's sampling params: choice i uses seed + i when a seed is given (so n choices equal n lone
    requests with seeds seed, seed + 1, ...); without one every choice draws from its own random stream."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


async def _constraints(lm: Any, body: Any, tools: Optional[T.ToolPlan], n: int) -> List[Any]:
    """One fresh constraint per choice (a grammar's state is per request), or None each for free text:
    structured output (`response_format`), or the forced tool call of tool_choice required / named (never
    both: plan_tools refuses tools with a JSON format)."""
    out: List[Any] = []
    for _ in range(n):
        c = await constraint_for(lm, body.response_format)
        if tools is not None and tools.forced:
            c = await T.tool_constraint(lm, tools)
        out.append(c)
    return out


async def _generate(request: Request, body: Any, chat: bool):
    """Parse -> tokenize -> submit the n choices as one engine group -> answer (JSON or SSE).

    Every engine request is ended exactly once (`ChoiceGroup.close` in `cleanup`) whatever happens: after the
    JSON answer, when the stream ends or the client goes away (the generator's `finally` and the response's
    background task, whichever runs first), and on any error after submission.
    """
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
        engine = lm.engine
        _check_n(body.n, engine.max_batch_size)
        tools = T.plan_tools(body, lm.tokenizer) if chat else None  # None: no tools, or tool_choice "none"
        prompt_ids = await _tokenize(lm, body, chat, tools)
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
        constraints = await _constraints(lm, body, tools, body.n)
        rid = new_request_id("chatcmpl" if chat else "cmpl")
        reqs = [
            GenerationRequest(
                prompt_ids=prompt_ids,
                params=p,
                max_tokens=max_tokens,
                request_id=rid if body.n == 1 else f"{rid}-{i}",
                ignore_eos=body.ignore_eos,
                constraint=c,
            )
            for i, (p, c) in enumerate(zip(_choice_params(params, body.n), constraints))
        ]
        try:
            handles = engine.submit_group(reqs)
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

    try:
        group = ChoiceGroup(
            [
                ChoiceOutput(
                    i,
                    h,
                    lm.tokenizer,
                    body.stop_list,
                    prompt_ids,
                    num_lp,
                    tools.parser() if tools is not None else None,
                )
                for i, h in enumerate(handles)
            ]
        )
    except BaseException:
        for h in handles:
            h.abort()
        await stack.aclose()
        raise
    st.inflight += 1  # HTTP requests, not choices
    closed = False

    async def cleanup() -> None:
        nonlocal closed
        if closed:
            return
        closed = True
        group.close()  # ends what still runs: "stop" after a stop string, else "abort"
        st.inflight -= 1
        await stack.aclose()

    created = int(time.time())
    model_name = lm.name
    if body.stream:
        return EventSourceResponse(
            _stream(group, chat, rid, created, model_name, body.include_usage, len(prompt_ids), cleanup),
            sep="\n",
            background=BackgroundTask(cleanup),
        )
    try:
        return await _complete(request, group, chat, rid, created, model_name, len(prompt_ids))
    finally:
        await cleanup()


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _complete(
    request: Request, group: ChoiceGroup, chat: bool, rid: str, created: int, model: str, n_prompt: int
):
    """The JSON answer once every choice is done; the first choice's error is the HTTP error; 499 when the
    client went away (the caller's cleanup aborts every choice)."""
    texts: List[List[str]] = [[] for _ in group.choices]
    lps: List[List[TokenLogprob]] = [[] for _ in group.choices]

    async def consume() -> None:
        while not group.done:
            for choice, events in await group.next_events():
                text, lp = choice.feed(events)
                texts[choice.index].append(text)
                lps[choice.index].extend(lp)
                if choice.error is not None:
                    return

    gen = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({gen, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not gen.done():  # the client went away
        gen.cancel()
        logger.info("request %s: client disconnected", rid)
        return JSONResponse(error_body("client disconnected", "invalid_request_error", None, "client_closed"), 499)
    gen.result()
    if group.error is not None:
        raise group.error
    choices = []
    for c in group.choices:
        text = "".join(texts[c.index])
        lp = format_logprobs(chat, lps[c.index], 0)
        if chat:
            content, _ = c.split(text)
            calls = c.tool_calls
            content = None if calls and not content.strip() else content
            choices.append(P.chat_choice(c.index, content, c.chat_finish_reason, lp, calls))
        else:
            choices.append(P.completion_choice(c.index, text, c.finish_reason, lp))
    build = P.chat_response if chat else P.completion_response
    return build(rid, created, model, choices, group.usage(n_prompt))


async def _stream(
    group: ChoiceGroup, chat: bool, rid: str, created: int, model: str, include_usage: bool, n_prompt: int, cleanup
):
    """SSE data: per choice a role chunk (chat), its deltas (a backlog coalesced into one chunk) and its finish
    chunk, `choices[0].index` naming the choice; then the usage chunk (sums over the choices) and [DONE] once
    all are done. A choice's error is sent as an error event then [DONE] (the others are aborted)."""
    dumps = json.dumps
    try:
        if chat:
            for c in group.choices:
                delta = {"role": "assistant", "content": ""}
                yield dumps(P.chat_chunk(rid, created, model, delta, None, None, include_usage, c.index))
        failed = False
        while not group.done and not failed:
            for c, events in await group.next_events():
                offset = c.text_len
                text, lps = c.feed(events)
                text, calls = c.split(text) if chat else (text, [])
                if text or lps or c.finish_reason or calls:
                    lp = format_logprobs(chat, lps, offset)
                    if chat:
                        delta: Dict[str, Any] = {"content": text} if text else {}
                        if calls:
                            delta["tool_calls"] = calls
                        chunk = P.chat_chunk(
                            rid, created, model, delta, c.chat_finish_reason, lp, include_usage, c.index
                        )
                    else:
                        chunk = P.completion_chunk(
                            rid, created, model, text, c.finish_reason, lp, include_usage, c.index
                        )
                    yield dumps(chunk)
                if c.error is not None:
                    yield dumps(c.error.body())
                    failed = True
                    break
        if include_usage and not failed:
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield dumps(P.usage_chunk(rid, created, model, obj, group.usage(n_prompt)))
        yield "[DONE]"
    except Exception as e:  # never let a formatting bug kill the connection silently
        logger.exception("stream %s failed", rid)
        yield dumps(error_body(f"internal error: {e}", "server_error", None, "internal_error"))
        yield "[DONE]"
    finally:
        await cleanup()
