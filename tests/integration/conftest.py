"""Real-server fixtures: a real uvicorn on 127.0.0.1 (free port) in a background thread of the test process.

- `serve_model`: the model the integration tests serve: the demo 4-bit model
  (`smollm2-135m-instruct-gptq-g64`) when the store has it, else the bf16 `smollm2-135m-instruct`;
  skips visibly when neither exists.
- `start_server(**settings_overrides)` (session-scoped factory; a context manager): builds `Settings`
  (model store, served model, device cpu, small context, plus the overrides), starts uvicorn with
  `server.api.app.create_app(settings)`, waits until /ready is 200 (fails at once with the load error), yields a
  `RunningServer` and shuts it down. Pass `wait_ready=False` to get it before the model is ready.
- `server`: one module-scoped server per test module. A module customises it with a module-level
  `SERVER_SETTINGS = {...}` dict, or per test with `@pytest.mark.parametrize("server", [{...}], indirect=True)`.

`RunningServer` gives `base_url`, `settings`, `app`, `engine(model=None)` (the live `Engine` of a loaded model,
for its stats), `openai()` / `async_openai()` clients and `httpx()` with the API key (if any) filled in.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import httpx as _httpx
import pytest

DEMO_QUANT = "smollm2-135m-instruct-gptq-g64"
BF16 = "smollm2-135m-instruct"

DEFAULT_TEST_SETTINGS: Dict[str, Any] = dict(
    host="127.0.0.1",
    device="cpu",
    dtype="bfloat16",
    max_context=512,
    max_batch_size=4,
    max_queue=16,
    prefill_chunk=64,
    request_timeout_s=120.0,
    shutdown_grace_s=5.0,
    memory_budget="0.8",
    log_level="warning",
)


@dataclass
class RunningServer:
    base_url: str
    settings: Any
    app: Any
    uvicorn_server: Any
    thread: threading.Thread

    @property
    def api_key(self) -> Optional[str]:
        return self.settings.api_keys[0] if self.settings.api_keys else None

    @property
    def model(self) -> str:
        return self.settings.model

    def engine(self, model: Optional[str] = None):
        lm = self.app.state.manager.get_loaded(model or self.settings.model)
        assert lm is not None, f"model {model or self.settings.model} is not loaded"
        return lm.engine

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "unused", max_retries=0, **kw)

    def async_openai(self, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "unused", max_retries=0, **kw)

    def httpx(self, **kw) -> _httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return _httpx.Client(base_url=self.base_url, headers=headers, timeout=kw.pop("timeout", 60.0), **kw)


def _run_uvicorn(server, sock: socket.socket) -> None:
    asyncio.run(server.serve(sockets=[sock]))


@contextlib.contextmanager
def run_server(settings, *, wait_ready: bool = True, ready_timeout: float = 300.0) -> Iterator[RunningServer]:
    """Start `create_app(settings)` under uvicorn on a pre-bound free port; stop it on exit."""
    import uvicorn

    from server.api.app import create_app

    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=settings.log_level, timeout_graceful_shutdown=2, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=_run_uvicorn, args=(server, sock), name=f"uvicorn-{port}", daemon=True)
    thread.start()
    rs = RunningServer(f"http://127.0.0.1:{port}", settings, app, server, thread)
    try:
        deadline = time.monotonic() + ready_timeout
        with _httpx.Client(base_url=rs.base_url, timeout=5.0) as c:
            while True:
                if not thread.is_alive():
                    raise RuntimeError("uvicorn thread died during startup")
                try:
                    r = c.get("/ready" if wait_ready else "/health")
                    if r.status_code == 200:
                        break
                    st = app.state.jetserve
                    if st.load_error:
                        raise RuntimeError(f"server failed to load its model: {st.load_error}")
                except _httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not ready within {ready_timeout}s")
                time.sleep(0.1)
        yield rs
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="session")
def serve_model(model_store: Path) -> str:
    for name in (DEMO_QUANT, BF16):
        if (model_store / name / "config.json").is_file():
            return name
    pytest.skip(f"no SmolLM2 model in {model_store}: run `jetserve demo prepare` (make test does)")


@pytest.fixture(scope="session")
def start_server(model_store: Path, serve_model: str):
    """Factory: `with start_server(max_queue=0, api_keys=["k"]) as srv: ...`."""
    from server.config import Settings

    def factory(*, wait_ready: bool = True, **overrides):
        kw = {**DEFAULT_TEST_SETTINGS, "model_store": model_store, "model": serve_model, **overrides}
        return run_server(Settings(**kw), wait_ready=wait_ready)

    return factory


@pytest.fixture(scope="module")
def server(request, start_server) -> Iterator[RunningServer]:
    overrides = dict(getattr(request.module, "SERVER_SETTINGS", {}) or {})
    overrides.update(getattr(request, "param", None) or {})
    with start_server(**overrides) as srv:
        yield srv
