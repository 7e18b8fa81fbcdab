"""Prefix caching on a real uvicorn with the real SmolLM2: a repeated long system prompt is served from the KV
cache (usage.prompt_tokens_details.cached_tokens), and greedy outputs are identical with caching on and off.

Exact equality needs arithmetic that does not depend on the prefill's shape: the 4-bit kernels and bf16 round a
1-token prefill differently from a whole-prompt one (as they do for two prefill chunkings), enough to flip a
near-tied argmax. So the comparison runs the bf16 checkpoint in float32 (logits agree to ~1e-4 across
chunkings), where a reused stale KV would show as a different output, not as rounding.
"""

from __future__ import annotations

import pytest

BF16 = "smollm2-135m-instruct"  # the unquantized demo checkpoint (tests/integration/conftest.py)

pytestmark = pytest.mark.slow

SYSTEM = " ".join(f"Rule {i}: answer in one short sentence, politely, without lists." for i in range(30))
QUESTIONS = ["Name three colors.", "What is the capital of France?", "Name three colors."]


def _ask(client, model, question):
    """Greedy chat completion, streamed with usage; returns (text, usage)."""
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


def _sample(text, name, model):
    prefix = f'{name}{{model="{model}"}} '
    (line,) = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    return float(line[len(prefix) :])


def test_shared_system_prompt_is_cached_and_output_unchanged(start_server, model_store):
    if not (model_store / BF16 / "config.json").is_file():
        pytest.skip(f"no {BF16} in {model_store}: run `jetserve demo prepare`")
    outputs = {}
    for caching in (True, False):
        with start_server(model=BF16, dtype="float32", prefix_caching=caching, max_context=1024) as srv:
            c = srv.openai()
            outputs[caching] = [_ask(c, srv.model, q) for q in QUESTIONS]
            plain = c.completions.create(model=srv.model, prompt=SYSTEM, max_tokens=4, temperature=0)
            again = c.completions.create(model=srv.model, prompt=SYSTEM, max_tokens=4, temperature=0)
            metrics = srv.httpx().get("/metrics").text
        if caching:
            (first, u1), (second, u2), (third, u3) = outputs[True]
            assert u1.prompt_tokens > 300 and u1.prompt_tokens_details.cached_tokens == 0
            # the second shares the system prompt; the third repeats the first after the slot moved on
            assert 300 < u2.prompt_tokens_details.cached_tokens < u2.prompt_tokens
            assert 300 < u3.prompt_tokens_details.cached_tokens < u3.prompt_tokens
            assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
            hits = _sample(metrics, "jetserve:prefix_cache_hits_total", BF16)
            queries = _sample(metrics, "jetserve:prefix_cache_queries_total", BF16)
            assert (
                hits
                == sum(u.prompt_tokens_details.cached_tokens for _, u in outputs[True]) + again.usage.prompt_tokens - 1
            )
            assert queries == sum(u.prompt_tokens for _, u in outputs[True]) + 2 * again.usage.prompt_tokens
        else:
            assert all(u.prompt_tokens_details.cached_tokens == 0 for _, u in outputs[False])
            assert again.usage.prompt_tokens_details.cached_tokens == 0
        outputs[caching].append((plain.choices[0].text + again.choices[0].text, None))
    assert [t for t, _ in outputs[True]] == [t for t, _ in outputs[False]]
    assert all(t.strip() for t, _ in outputs[True])
