"""GET /metrics: Prometheus text exposition of the app's own registry (`app.state.metrics`).

Open by default; `Settings.metrics_require_key` puts it behind the API keys (enforced by AuthMiddleware).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.metrics import CONTENT_TYPE

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    return Response(content=m.exposition(), media_type=CONTENT_TYPE)
