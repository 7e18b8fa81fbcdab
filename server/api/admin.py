"""Admin router: load, unload and inspect models. Needs `Settings.admin_key`.

- No admin key configured: every /admin route answers 404 (the endpoints do not exist for clients).
- Key configured: `Authorization: Bearer <admin_key>` is required (constant-time compare); missing or wrong
  key -> 401 `invalid_admin_key`.

Routes (names may contain '/' for nested store folders):
- `GET  /admin/models`                 every model with state, pinned, in-flight, predicted/measured bytes,
                                       plus the budget and bytes in use.
- `POST /admin/models/{name}/load`     load now (evicting LRU idle models if needed); 404 unknown model,
                                       503 insufficient_memory (message has needed/budget/in use/evictable),
                                       422 model_load_failed (corrupt file, unsupported format).
- `POST /admin/models/{name}/unload`   unload; 409 model_busy while requests are in flight.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from fastapi import APIRouter, Request

from server.api.auth import check_bearer
from server.api.errors import APIError
from server.manager import InsufficientMemoryError, ModelBusyError
from server.store import ModelLoadError, ModelNotFoundError

router = APIRouter(prefix="/admin", include_in_schema=False)


def _manager(request: Request) -> Any:
    settings = request.app.state.settings
    if not settings.admin_key:
        raise APIError(404, "Not Found", code="not_found")
    if not check_bearer(request.headers.get("authorization", "").encode("latin-1"), [settings.admin_key.encode()]):
        raise APIError(401, "admin endpoints need 'Authorization: Bearer <admin key>'", code="invalid_admin_key")
    return request.app.state.manager


def _entry(e: Any) -> Dict[str, Any]:
    d = dataclasses.asdict(e)
    d["aliases"] = list(e.aliases)
    return d


@router.get("/models")
async def admin_models(request: Request):
    mgr = _manager(request)
    return {
        "object": "list",
        "data": [_entry(e) for e in mgr.list_models()],
        "memory_budget_bytes": mgr.budget_bytes,
        "memory_used_bytes": mgr.used_bytes(),
    }


@router.post("/models/{name:path}/load")
async def admin_load(name: str, request: Request):
    mgr = _manager(request)
    try:
        lm = await mgr.load(name)
    except ModelNotFoundError as e:
        raise APIError(404, str(e), param="name", code="model_not_found") from None
    except InsufficientMemoryError as e:
        raise APIError(503, str(e), code="insufficient_memory") from None
    except ModelLoadError as e:
        raise APIError(422, str(e), code="model_load_failed") from None
    return {
        "name": lm.name,
        "state": "loaded",
        "predicted": lm.predicted.as_dict(),
        "measured_bytes": lm.measured_bytes,
        "load_seconds": lm.load_seconds,
    }


@router.post("/models/{name:path}/unload")
async def admin_unload(name: str, request: Request):
    mgr = _manager(request)
    try:
        unloaded = await mgr.unload(name)
    except ModelNotFoundError as e:
        raise APIError(404, str(e), param="name", code="model_not_found") from None
    except ModelBusyError as e:
        raise APIError(409, str(e), code="model_busy") from None
    return {"name": mgr.store.canonical_name(name), "unloaded": unloaded}
