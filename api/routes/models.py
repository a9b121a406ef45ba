from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from api.services import Services, get_services

router = APIRouter()


def _entry(name: str, kind: str, created: int, alive: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "inferq",
        "kind": kind,
        "replicas_alive": alive,
    }


@router.get("/v1/models")
async def list_models(services: Annotated[Services, Depends(get_services)]) -> dict[str, Any]:
    data = [
        _entry(
            spec.name, spec.kind, services.started_at, await services.dispatcher.alive(spec.name)
        )
        for spec in services.registry.models
    ]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model}")
async def get_model(
    model: str, services: Annotated[Services, Depends(get_services)]
) -> dict[str, Any]:
    spec = services.model(model)
    alive = await services.dispatcher.alive(spec.name)
    return _entry(spec.name, spec.kind, services.started_at, alive)
