from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api.services import Services, services_of
from app.errors import backend_reason
from app.replicas import count_alive

log = logging.getLogger(__name__)

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers. Readiness is /ready."""
    return {"status": "ok"}


@router.get(
    "/ready",
    responses={503: {"description": "Not ready; the body names what is missing"}},
)
async def ready(services: Annotated[Services, Depends(services_of)]) -> JSONResponse:
    """Ready when Redis answers, replies can be received, and every model has a replica."""
    body: dict[str, Any] = {"redis": False, "results": services.router.ready, "models": {}}
    try:
        await services.redis.ping()
        body["redis"] = True
        for spec in services.registry.models:
            body["models"][spec.name] = await count_alive(services.redis, services.keys, spec.name)
    except (RedisError, OSError) as exc:
        log.warning("readiness: Redis did not answer: %s", exc)
        body["detail"] = f"Redis is unreachable: {backend_reason(exc)}"
    ok = body["redis"] and body["results"] and all(n > 0 for n in body["models"].values())
    body["status"] = "ready" if ok else "not ready"
    return JSONResponse(body, status_code=200 if ok else 503)
