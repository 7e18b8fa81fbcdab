"""`jetserve serve`: the OpenAI-compatible server (uvicorn, programmatically).

Every `server.config.Settings` field is a flag (`--max-batch-size`, ...; `--api-key` is repeatable) with the
field's description as help. Flags override `JETSERVE_*` environment variables, which override `.env` and
the defaults. With no arguments it serves the demo model on 127.0.0.1:8000.

SIGTERM / SIGINT: the first signal starts draining (new requests and /ready get 503, in-flight streams run
on for up to `shutdown_grace_s`), then uvicorn stops and the models are closed. A second signal exits now.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import typing
from typing import Any, Dict

from server.config import Settings

logger = logging.getLogger(__name__)


def _flag_type(annotation: Any):
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Literal:
        return ("choices", [str(a) for a in typing.get_args(annotation)])
    if annotation is bool:
        return ("bool", None)
    if annotation in (int, float):
        return ("type", annotation)
    return ("type", str)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unspecified flags stay unset so the environment applies."""
    for name, field in Settings.model_fields.items():
        help_text = (field.description or name).replace("%", "%%")  # argparse %-formats help strings
        default = field.default if field.default_factory is None else field.default_factory()
        if name == "api_keys":
            parser.add_argument(
                "--api-key",
                dest="api_keys",
                action="append",
                default=argparse.SUPPRESS,
                metavar="KEY",
                help=f"{help_text} (env JETSERVE_API_KEYS, comma-separated)",
            )
            continue
        flag = "--" + name.replace("_", "-")
        env = f"JETSERVE_{name.upper()}"
        kind, arg = _flag_type(field.annotation)
        if kind == "bool":
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (env {env}; default {default})",
            )
        elif kind == "choices":
            parser.add_argument(
                flag,
                dest=name,
                choices=arg,
                default=argparse.SUPPRESS,
                help=f"{help_text} (env {env}; default {default})",
            )
        else:
            parser.add_argument(
                flag,
                dest=name,
                type=arg,
                default=argparse.SUPPRESS,
                metavar=name.upper(),
                help=f"{help_text} (env {env}; default {default})",
            )


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: Dict[str, Any] = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**overrides)


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn.Server whose first exit signal drains jetserve before uvicorn starts its own shutdown."""

        def __init__(self, config, app, grace_s: float):
            super().__init__(config)
            self.jetserve_app = app
            self.grace_s = grace_s
            self._draining = False
            self._loop = None

        async def serve(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):
            if self._draining or self._loop is None:
                return super().handle_exit(sig, frame)
            self._draining = True
            logger.info("received %s: draining (grace %.1fs)", signal.Signals(sig).name, self.grace_s)
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit(sig)))

        async def _drain_then_exit(self, sig):
            from server.api.app import drain

            await drain(self.jetserve_app, self.grace_s)
            super().handle_exit(sig, None)
            # a drained shutdown is a clean exit (rc 0): don't let uvicorn re-raise the signal afterwards
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return GracefulServer


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import create_app

    settings = settings_from_args(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    logger.info(
        "serving %s from %s on http://%s:%d (device=%s, batch=%d, context=%d, auth=%s)",
        settings.model,
        settings.model_store,
        settings.host,
        settings.port,
        settings.device,
        settings.max_batch_size,
        settings.max_context,
        "on" if settings.api_keys else "off",
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        log_config=None,
    )
    server = _graceful_server_class()(config, app, settings.shutdown_grace_s)
    server.run()
    return 0
