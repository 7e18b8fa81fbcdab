"""FastAPI app factory.

`create_app(settings)` wires: OpenAI routes, /health, /ready, /v1/models (server/api/routes.py), the admin
and /metrics routers when present (server/api/admin.py, server/api/metrics_route.py), OpenAI-shaped errors,
API-key auth and the body-size limit. The lifespan starts the `ModelManager` in the background (so /health
answers at once and /ready turns 200 when the default model is loaded and warmed) and closes it on exit.

Graceful shutdown: `await drain(app, grace_s)` makes new generation requests and /ready answer 503, then
waits for in-flight requests to finish (up to grace_s). `jetserve serve` calls it on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import FastAPI

from server.api.admin import router as admin_router
from server.api.auth import AuthMiddleware, BodyLimitMiddleware
from server.api.errors import install_error_handlers
from server.api.metrics_route import router as metrics_router
from server.api.routes import router as openai_router
from server.config import Settings

logger = logging.getLogger(__name__)

OPTIONAL_ROUTERS = ("server.api.admin", "server.api.metrics_route")


@dataclass
class ServerState:
    settings: Settings
    manager: Any
    metrics: Any
    default_model: str
    ready: bool = False
    draining: bool = False
    inflight: int = 0  # generation requests between submit and their last byte
    load_error: Optional[str] = None
    load_task: Optional[asyncio.Task] = field(default=None, repr=False)


def _engine_factory(runner, settings, **kw):
    from server.engine.engine import make_engine  # the engine (and torch) live outside server/api

    return make_engine(runner, settings, **kw)


def _default_metrics() -> Any:
    from server.metrics import Metrics

    return Metrics()


def _default_manager(settings: Settings, metrics: Any) -> Any:
    from server.manager import ModelManager

    return ModelManager(settings, metrics, engine_factory=_engine_factory)


async def _start_models(st: ServerState) -> None:
    try:
        await st.manager.start(preload=True)
        lm = st.manager.get_loaded(st.default_model)
        if lm is None:
            st.load_error = f"default model {st.default_model!r} is not in the model store {st.settings.model_store}"
            logger.error("%s", st.load_error)
            return
        st.default_model = lm.name
        st.ready = True
        logger.info("ready: serving %s", lm.name)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        st.load_error = f"{type(e).__name__}: {e}"
        logger.exception("loading the default model failed")


def create_app(settings: Settings, *, manager: Any = None, metrics: Any = None) -> FastAPI:
    """Build the app. `manager` / `metrics` default to `ModelManager(settings, Metrics())`."""
    metrics = metrics if metrics is not None else _default_metrics()
    manager = manager if manager is not None else _default_manager(settings, metrics)
    state = ServerState(settings=settings, manager=manager, metrics=metrics, default_model=settings.model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.load_task = asyncio.create_task(_start_models(state), name="jetserve-load")
        try:
            yield
        finally:
            state.draining = True
            state.ready = False
            if not state.load_task.done():
                state.load_task.cancel()
            try:
                await state.load_task
            except (asyncio.CancelledError, Exception):
                pass
            await state.manager.close()
            logger.info("models closed")

    app = FastAPI(
        title="jetserve",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible LLM serving for NVIDIA Jetson",
    )
    app.state.jetserve = state
    app.state.settings = settings
    app.state.manager = manager
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(admin_router)
    app.include_router(metrics_router)
    _install_openapi(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_keys=settings.api_keys, metrics_require_key=settings.metrics_require_key)
    return app


_BODY_MODELS = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}


def _install_openapi(app: FastAPI) -> None:
    """The generation routes parse their JSON by hand (for 415/400 control); publish their request schemas."""
    from fastapi.openapi.utils import get_openapi

    from server.api import protocol

    def openapi():
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for path, name in _BODY_MODELS.items():
                op = doc.get("paths", {}).get(path, {}).get("post")
                if op is None:
                    continue
                js = getattr(protocol, name).model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(js.pop("$defs", {}))
                schemas[name] = js
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
                }
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


async def drain(app: FastAPI, grace_s: float) -> bool:
    """Refuse new work (503) and wait up to `grace_s` for in-flight requests. True if all finished."""
    st: ServerState = app.state.jetserve
    st.draining = True
    deadline = time.monotonic() + grace_s
    if st.inflight:
        logger.info("draining: %d request(s) in flight, grace %.1fs", st.inflight, grace_s)
    while st.inflight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if st.inflight:
        logger.warning("grace period over with %d request(s) still in flight", st.inflight)
    return st.inflight == 0
