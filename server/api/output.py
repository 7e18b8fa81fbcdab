"""The output step of one HTTP request: each choice's engine request turned into what the client sees.

`ChoiceOutput` is the one owner of a choice's output: it consumes the `TokenEvent`s of its engine request
(`RequestHandle`), detokenizes them, finds stop strings, collects logprobs, decides the finish reason (or
the error that ends the response), splits tool calls out of the text (chat with tools) and ends its engine
request: at once with "stop" when a stop string matched (so the slot is freed and the request's stats record
"stop"), else with "abort" on `close()` when it is still running (client gone, another choice failed).

`ChoiceGroup` holds the n choices of one request (n > 1: `Engine.submit_group`) and hands their events over
fairly: whatever each handle has ready is coalesced into one batch per choice (one chunk when streaming).

Routes (server/api/routes.py) only parse, submit and format; `format_logprobs` shapes a choice's logprobs for
the endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from models.tokenizer import IncrementalDetokenizer
from server.api import protocol as P
from server.api import tools as T
from server.api.errors import APIError
from server.engine.request import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_TIMEOUT,
    RequestHandle,
    TokenEvent,
)

logger = logging.getLogger(__name__)

# (token text, logprob, [(top token text, top logprob), ...]) per generated token
TokenLogprob = Tuple[str, float, List[Tuple[str, float]]]


class ChoiceOutput:
    """One choice (`index`) of a response: its engine request `handle` in, text / logprobs / finish reason out.

    Contract:
    - `feed(events)` consumes events in order and returns the new text and logprobs. Once `done` (a finish
      reason or an error is set) further events are ignored.
    - `finish_reason` is "stop" (EOS, stop string, complete structured document) or "length"; `error` is the
      `APIError` the response must end with (timeout 504, engine abort 503, engine failure 500).
    - A stop string ends the engine request with "stop" as soon as it matches; `close()` ends it with "abort"
      when it is still running (a no-op for a finished one). The handle gets at most one abort from here.
    - With a tool-call `parser` (chat with tools), `split(text)` turns fed text into content and tool-call
      stream deltas; `tool_calls` / `chat_finish_reason` give the parsed calls and "tool_calls" when any.
    - `completion_tokens` counts generated tokens up to and including the one that finished the choice (tokens
      after a stop string are not counted); `cached_tokens` is the prompt tokens the engine reused (its first
      token event), `text_len` the characters returned so far (completions logprobs offsets).
    """

    def __init__(
        self,
        index: int,
        handle: RequestHandle,
        tokenizer: Any,
        stop: Sequence[str],
        prompt_ids: Sequence[int],
        num_logprobs: Optional[int],
        parser: Optional[T.ToolCallParser] = None,
    ):
        self.index = index
        self.handle = handle
        self.tok = tokenizer
        self.parser = parser
        self.detok = IncrementalDetokenizer(tokenizer, list(stop), prompt_ids=list(prompt_ids))
        self.num_logprobs = num_logprobs
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: Optional[str] = None
        self.error: Optional[APIError] = None
        self.text_len = 0
        self._aborted = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def _piece(self, tid: int) -> str:
        return self.tok.decode([tid], skip_special_tokens=False)

    def _abort(self, reason: str) -> None:
        if not self._aborted:
            self._aborted = True
            self.handle.abort(reason)  # a no-op once the handle has its finish event

    def feed(self, events: Sequence[TokenEvent]) -> Tuple[str, List[TokenLogprob]]:
        """Consume events; return (new text, logprobs of the tokens consumed when requested)."""
        out: List[str] = []
        lps: List[TokenLogprob] = []
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
                    self._abort(FINISH_STOP)  # the engine records "stop" and frees the slot next step
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
        if self.parser is None:
            return text, []
        content, deltas = self.parser.feed(text)
        if self.finish_reason is not None:
            more, last = self.parser.finish()
            content, deltas = content + more, deltas + last
        return content, deltas

    @property
    def tool_calls(self) -> List[Dict[str, Any]]:
        return self.parser.calls if self.parser is not None else []

    @property
    def chat_finish_reason(self) -> Optional[str]:
        return self.parser.finish_reason(self.finish_reason) if self.parser is not None else self.finish_reason

    def close(self) -> None:
        """End the engine request unless it has finished: "stop" after a stop string, else "abort"."""
        self._abort(FINISH_STOP if self.finish_reason == FINISH_STOP else FINISH_ABORT)


class ChoiceGroup:
    """The choices of one HTTP request, in index order, consumed together.

    `next_events()` waits until some not-done choice has events and returns `[(choice, events)]`: every event
    ready at that moment, one entry per choice (its backlog coalesced, in order), choices in the order their
    events arrived, so no choice starves the others. It returns [] once every choice is done. With n > 1 one
    task per handle forwards its events; `close()` ends every choice's engine request (`ChoiceOutput.close`)
    and cancels those tasks. It is idempotent and must be called once the response is over, whatever happened.
    """

    def __init__(self, choices: Sequence[ChoiceOutput]):
        assert choices, "a response has at least one choice"
        self.choices = list(choices)
        self._queue: Optional["asyncio.Queue[Tuple[int, List[TokenEvent]]]"] = None
        self._pumps: List["asyncio.Task[None]"] = []
        self._closed = False

    @property
    def done(self) -> bool:
        return all(c.done for c in self.choices)

    @property
    def error(self) -> Optional[APIError]:
        """The first error among the choices (by index), None when none failed."""
        return next((c.error for c in self.choices if c.error is not None), None)

    async def _pump(self, i: int, handle: RequestHandle) -> None:
        assert self._queue is not None
        try:
            async for ev in handle:
                self._queue.put_nowait((i, [ev] + handle.ready_events()))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave the consumer waiting on a choice that cannot finish
            logger.exception("choice %d (%s): event stream failed", i, handle.request_id)
            self._queue.put_nowait((i, [TokenEvent(-1, finish_reason=FINISH_ERROR, error=f"internal error: {e}")]))

    async def next_events(self) -> List[Tuple[ChoiceOutput, List[TokenEvent]]]:
        if self.done:
            return []
        if len(self.choices) == 1:  # no merging: read the handle directly
            c = self.choices[0]
            try:
                ev = await c.handle.__anext__()
            except StopAsyncIteration:  # cannot happen (a finish event ends every choice); never hang on it
                ev = TokenEvent(-1, finish_reason=FINISH_ERROR, error="internal error: the request's stream ended")
                return [(c, [ev])]
            return [(c, [ev] + c.handle.ready_events())]
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._pumps = [asyncio.ensure_future(self._pump(c.index, c.handle)) for c in self.choices]
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            batches: Dict[int, List[TokenEvent]] = {}
            for i, evs in items:
                if not self.choices[i].done:  # a choice ended by a stop string still gets its abort event
                    batches.setdefault(i, []).extend(evs)
            if batches:
                return [(self.choices[i], evs) for i, evs in batches.items()]

    def usage(self, prompt_tokens: int) -> Dict[str, Any]:
        """OpenAI usage: the prompt once (it was prefilled once), completion tokens summed over the choices,
        the prompt's cached tokens once (every member of a group reports its leader's)."""
        return P.usage_dict(
            prompt_tokens,
            sum(c.completion_tokens for c in self.choices),
            max(c.cached_tokens for c in self.choices),
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in self.choices:
            c.close()
        for t in self._pumps:
            t.cancel()


def format_logprobs(chat: bool, lps: List[TokenLogprob], offset: int) -> Optional[dict]:
    """OpenAI logprobs of a choice's tokens (None without any): chat's `content` list, or completions'
    legacy shape with text offsets starting at `offset` (the choice's text length before these tokens)."""
    if not lps:
        return None
    toks = [t for t, _, _ in lps]
    vals = [v for _, v, _ in lps]
    tops = [top for _, _, top in lps]
    return P.chat_logprobs(toks, vals, tops) if chat else P.completion_logprobs(toks, vals, tops, offset)
