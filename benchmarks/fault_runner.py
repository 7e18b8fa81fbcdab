"""A test double of the runner that fails chosen requests, and `jetserve` serving with it (tests and benchmarks).

A request is chosen by a marker in its prompt text, so any HTTP client can pick it:

- `<<jetserve-fault:prefill>>`: the prefill of that request raises `InjectedFault`; the engine fails that
  request alone and the others continue.
- `<<jetserve-fault:decode>>`: its prefill succeeds (the first token goes out), then every batched decode
  that holds its slot raises; the engine fails the sequences of that batch and keeps serving.

The server holds no fault code: this module wraps the runners that `server.manager` loads, in this process
only. From the repository root:

    .venv/bin/python -m benchmarks.fault_runner serve [jetserve serve flags]
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

STAGES = ("prefill", "decode")


class InjectedFault(RuntimeError):
    """The failure `FaultyRunner` raises for a chosen request."""


def marker(stage: str) -> str:
    """The prompt text that makes `FaultyRunner` fail a request at `stage` ("prefill" or "decode")."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return f"<<jetserve-fault:{stage}>>"


class FaultyRunner:
    """Wraps a runner; `detokenize(ids) -> str` turns a slot's prompt ids back into text to find markers.

    A slot's prompt is tracked from its `start_pos == 0` prefill, so chunked prefills see the whole prompt
    so far. Every other attribute is the wrapped runner's. Called from the engine thread only.
    """

    def __init__(self, inner: Any, detokenize: Callable[[Sequence[int]], str]):
        self.inner = inner
        self._detokenize = detokenize
        self._prompts: Dict[int, List[int]] = {}
        self._decode_faults: Set[int] = set()  # slots whose next decode raises

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def prefill(self, tokens, slot: int, start_pos: int = 0):
        if start_pos == 0:
            self._prompts[slot] = []
            self._decode_faults.discard(slot)
        ids = self._prompts.setdefault(slot, [])
        ids.extend(int(t) for t in tokens.tolist())
        text = self._detokenize(ids)
        if marker("prefill") in text:
            raise InjectedFault(f"injected prefill fault (slot {slot})")
        if marker("decode") in text:
            self._decode_faults.add(slot)
        return self.inner.prefill(tokens, slot, start_pos)

    def decode(self, tokens, positions, slots):
        hit = self._decode_faults.intersection(int(s) for s in slots.tolist())
        if hit:
            raise InjectedFault(f"injected decode fault (slot {min(hit)})")
        return self.inner.decode(tokens, positions, slots)


def faulty_loader(load: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a `server.manager` runner loader `(model_dir, **kw) -> runner`: it returns `FaultyRunner`s."""

    def loader(model_dir, **kw):
        from models.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(model_dir, trust_remote_code=bool(kw.get("trust_remote_code", False)))
        return FaultyRunner(load(model_dir, **kw), tok.decode)

    return loader


def install() -> Callable[[], None]:
    """Make `server.manager` load `FaultyRunner`s in this process; returns the function that undoes it."""
    import server.manager as manager

    original = manager._default_runner_loader
    manager._default_runner_loader = faulty_loader(original)

    def undo() -> None:
        manager._default_runner_loader = original

    return undo


def main(argv: Optional[List[str]] = None) -> int:
    """`jetserve` (usually `serve`) with every loaded runner wrapped in a `FaultyRunner`."""
    install()
    from server.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
