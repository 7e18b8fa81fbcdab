"""What a client's SSE chunks hold under `stream_interval_ms`, on a real uvicorn with the real SmolLM2.

Completions with `logprobs: 0` list each chunk's tokens, so the test counts tokens per chunk. Prefix caching is
off so the repeated request prefills as the first did (test_api_openai.py says why).
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
N = 48


def stream_chunks(srv):
    """The chunks with choices of one greedy N-token stream, and its wall time."""
    body = {
        "model": srv.model,
        "prompt": PROMPT,
        "max_tokens": N,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    with srv.httpx() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    return [json.loads(d) for d in data], time.perf_counter() - t0


def tokens_per_chunk(chunks):
    return [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks]


@pytest.mark.parametrize("server", [{"stream_interval_ms": 0.0, "prefix_caching": False}], indirect=True)
def test_without_an_interval_each_step_is_its_own_chunk(server):
    chunks, _ = stream_chunks(server)
    per = tokens_per_chunk(chunks)
    assert sum(per) == N and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(per) >= N // 2  # a busy event loop may take two steps' tokens at once, rarely more


@pytest.mark.parametrize("server", [{"stream_interval_ms": 100.0, "prefix_caching": False}], indirect=True)
def test_an_interval_groups_tokens_but_sends_the_first_at_once(server):
    chunks, wall = stream_chunks(server)
    per = tokens_per_chunk(chunks)
    assert sum(per) == N and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert per[0] == 1  # the first token is never held
    assert len(per) <= 2 + int(wall / 0.1)  # the first, one chunk per interval, the finish
    assert max(per) >= 2
    text = "".join(c["choices"][0]["text"] for c in chunks)
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True}
    with server.httpx() as c:
        assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == text
