"""Bearer API keys and the request-body size limit, as pure ASGI middleware (no per-request task hops).

- `AuthMiddleware`: when `Settings.api_keys` is non-empty, every HTTP request needs
  `Authorization: Bearer <key>` (compared with `hmac.compare_digest` against every key), except the open
  paths: /health, /ready, /admin/* (the admin router checks `Settings.admin_key` itself) and /metrics unless
  `Settings.metrics_require_key`. Failure is an OpenAI-shaped 401.
- `BodyLimitMiddleware`: bodies larger than `Settings.max_body_bytes` get 413 (by Content-Length up front,
  or while reading a chunked body).
"""

from __future__ import annotations

import hmac
import json
from typing import Iterable, List, Tuple

from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.errors import error_body

Scope = dict


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


async def _send_error(
    send, status: int, message: str, type_: str, code: str, extra_headers: Iterable[Tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    headers: List[Tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_bearer(authorization: bytes | None, keys: Iterable[bytes]) -> bool:
    """Constant-time check of an `Authorization: Bearer <key>` header against every configured key."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not token:
        return False
    token = token.strip()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(token, k)
    return ok


class AuthMiddleware:
    OPEN_PREFIXES = ("/health", "/ready", "/admin")

    def __init__(self, app, api_keys: Iterable[str], metrics_require_key: bool):
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.metrics_require_key = metrics_require_key

    def _is_open(self, path: str) -> bool:
        if path == "/metrics" or path.startswith("/metrics/"):
            return not self.metrics_require_key
        return any(path == p or path.startswith(p + "/") for p in self.OPEN_PREFIXES)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or self._is_open(scope.get("path", "")):
            return await self.app(scope, receive, send)
        if check_bearer(_header(scope, b"authorization"), self.keys):
            return await self.app(scope, receive, send)
        await _send_error(
            send,
            401,
            "Invalid or missing API key. Send 'Authorization: Bearer <key>'.",
            "invalid_request_error",
            "invalid_api_key",
            [(b"www-authenticate", b"Bearer")],
        )


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` while reading an over-limit chunked body; the app's handlers shape it (413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"Request body larger than {limit} bytes.")


class BodyLimitMiddleware:
    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cl = _header(scope, b"content-length")
        if cl is not None:
            try:
                too_big = int(cl) > self.max
            except ValueError:
                too_big = False
            if too_big:
                return await self._reject(send)
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): count as the app reads.
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max:
                    raise BodyTooLarge(self.max)
            return msg

        await self.app(scope, limited_receive, send)

    async def _reject(self, send) -> None:
        await _send_error(
            send, 413, f"Request body larger than {self.max} bytes.", "invalid_request_error", "request_too_large"
        )
