"""`/v1/models`: the OpenAI model list, plus launching and terminating replicas on nodes."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from redis.exceptions import RedisError

from api.auth import CallerInfo, require
from api.cluster_reads import ClusterState, read_cluster
from api.cluster_view import model_entry
from api.launcher import ModelLauncher
from api.services import Services, get_services
from app.errors import BackendUnavailable, ModelNotFound, backend_reason
from app.keyring import Caller, Scope
from app.protocol.launch import LaunchRequest

log = logging.getLogger(__name__)

router = APIRouter()

ServicesDep = Annotated[Services, Depends(get_services)]


async def _state(services: Services) -> ClusterState:
    try:
        await services.refresh_launched()
        return await read_cluster(services.redis, services.keys, services.model_names())
    except (RedisError, OSError) as exc:
        log.warning("the cluster state is unreachable: %s", exc)
        raise BackendUnavailable(
            f"the cluster state is unreachable: {backend_reason(exc)}"
        ) from None


def _launcher(services: Services) -> ModelLauncher:
    assert services.launcher is not None
    return services.launcher


def _source(services: Services, name: str) -> str:
    return "registry" if services.registry.get(name) else "launched"


def _for(who: Caller, entry: dict[str, Any]) -> dict[str, Any]:
    """Where a model failed to load (host, node) is for admins; its reason is every
    caller's, as the 503 `model_load_failed` tells it too."""
    if entry.get("load_error") and not who.may(Scope.admin):
        entry["load_error"] = {k: entry["load_error"][k] for k in ("reason", "time")}
    return entry


@router.get("/v1/models")
async def list_models(services: ServicesDep, who: CallerInfo) -> dict[str, Any]:
    state = await _state(services)
    data = [
        _for(who, model_entry(spec, _source(services, spec.name), state, services.started_at))
        for spec in (services.model(name) for name in services.model_names())
    ]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model}")
async def get_model(model: str, services: ServicesDep, who: CallerInfo) -> dict[str, Any]:
    """The model's card; its replicas (hosts, devices) and registry entry (paths, options)
    only for admin keys: an inference key has no business with where models live."""
    state = await _state(services)
    spec = services.model(model)
    detail = who.may(Scope.admin)
    return _for(
        who, model_entry(spec, _source(services, model), state, services.started_at, detail)
    )


ADMIN = [Depends(require(Scope.admin))]


@router.post("/v1/models", dependencies=ADMIN)
async def launch_model(body: LaunchRequest, services: ServicesDep) -> dict[str, Any]:
    """Place `replica` replicas on nodes with free devices; the nodes start them.

    Answers once the placement is recorded; `replicas[].state` turns `ready` when
    each worker has loaded its model (`inferq launch --wait` polls for that).
    """
    launched = await _launcher(services).launch(body)
    state = await _state(services)
    spec = services.model(body.uid)
    entry = model_entry(spec, _source(services, spec.name), state, services.started_at, True)
    new = {a.assignment_id for a in launched}
    entry["model_uid"] = spec.name
    entry["launched_replicas"] = [r for r in entry["replicas"] if r["replica_id"] in new]
    return entry


@router.delete("/v1/models/{model}", dependencies=ADMIN)
async def terminate_model(model: str, services: ServicesDep) -> dict[str, Any]:
    """Stop every node-launched replica of the model (workers finish in-flight work)."""
    stopped = await _launcher(services).terminate(model)
    await services.refresh_launched()
    return {
        "id": model,
        "object": "model",
        "deleted": True,
        "replicas_terminated": [a.assignment_id for a in stopped],
    }


@router.delete("/v1/models/{model}/replicas/{replica_id}", dependencies=ADMIN)
async def terminate_replica(model: str, replica_id: str, services: ServicesDep) -> dict[str, Any]:
    if services.find_model(model) is None:
        await services.refresh_launched()
        if services.find_model(model) is None:
            raise ModelNotFound(f"the model {model!r} does not exist", param="model")
    stopped = await _launcher(services).terminate(model, replica_id)
    await services.refresh_launched()
    return {
        "id": replica_id,
        "object": "model.replica",
        "model": model,
        "deleted": True,
        "replicas_terminated": [a.assignment_id for a in stopped],
    }
