"""`/v1/models`: the OpenAI model list, plus launching and terminating replicas on nodes."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from redis.exceptions import RedisError

from api.auth import CallerInfo, require
from api.cluster_reads import ClusterState, read_cluster
from api.cluster_view import model_entry, replica_view, worker_processes
from api.launcher import ModelLauncher, xinference_extras
from api.model_card import card
from api.services import Services, services_of
from app.errors import (
    BackendUnavailable,
    ModelNotFound,
    ModelUnavailable,
    RequestTimedOut,
    backend_reason,
)
from app.keyring import Caller, Scope
from app.protocol.launch import LaunchRequest
from app.registry import ModelSpec
from app.replicas import describe_load_error

log = logging.getLogger(__name__)

router = APIRouter()

ServicesDep = Annotated[Services, Depends(services_of)]


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


def _entry(
    services: Services, who: Caller, spec: ModelSpec, state: ClusterState, detail: bool = False
) -> dict[str, Any]:
    entry = model_entry(spec, _source(services, spec.name), state, services.started_at, detail)
    entry.update(card(spec, state.facts.get(spec.name), services.settings))
    entry["replica"] = entry["replicas_wanted"]  # Xinference's name
    return _for(who, entry)


@router.get("/v1/models")
async def list_models(services: ServicesDep, who: CallerInfo) -> dict[str, Any]:
    state = await _state(services)
    data = [
        _entry(services, who, spec, state)
        for spec in (services.model(name) for name in services.model_names())
    ]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model}")
async def get_model(model: str, services: ServicesDep, who: CallerInfo) -> dict[str, Any]:
    """The model's card; its replicas (hosts, devices) and registry entry (paths, options)
    only for admin keys: an inference key has no business with where models live."""
    state = await _state(services)
    return _entry(services, who, services.model(model), state, who.may(Scope.admin))


ADMIN = [Depends(require(Scope.admin))]


#: A worker that exited this often while loading is not coming up by itself.
LAUNCH_MAX_RESTARTS = 3


def _launch_failure(uid: str, views: list[dict[str, Any]]) -> str | None:
    """Why the new replicas will not come up by themselves, if that is clear already."""
    if not views:
        return f"model {uid!r} was terminated while it was being launched"
    for view in views:
        where = f"replica {view['replica_id']} on node {view['node']}"
        if view["state"] == "failed":
            return f"{where}: its worker could not be started (see the node's events)"
        if view["state"] == "node_down":
            return f"{where}: the node went down"
        if view["state"] != "ready" and view["restarts"] >= LAUNCH_MAX_RESTARTS:
            return (
                f"{where}: its worker exited {view['restarts']} times while loading "
                f"(last exit code {view['last_exit_code']})"
            )
    return None


async def _until_ready(
    services: Services,
    request: Request,
    uid: str,
    new: set[str],
    known_error: dict[str, Any] | None,
) -> None:
    """Xinference's launch answers once the model serves; so does this one, unless the
    caller says `wait_ready=false`. A load failure recorded since the launch, or
    replicas that cannot come up, end the wait with the reason (the replicas stay
    placed: terminate them, or fix the node). A caller who leaves ends it too."""
    deadline = time.monotonic() + services.settings.launch_ready_timeout_s
    views: list[dict[str, Any]] = []
    while True:
        if await request.is_disconnected():
            return
        try:
            state = await _state(services)
        except BackendUnavailable:
            state = None  # a moment without Redis: look again
        if state is not None:
            processes = worker_processes(state)
            views = [
                replica_view(a, state, processes)
                for a in state.assignments_of(uid)
                if a.assignment_id in new
            ]
            if views and all(v["state"] == "ready" for v in views):
                return
            error = state.load_errors.get(uid)
            if error and error != known_error:
                message = describe_load_error(uid, error)
                raise ModelUnavailable(
                    f"{message}; the replicas stay placed", code="model_load_failed"
                )
            failure = _launch_failure(uid, views)
            if failure:
                raise ModelUnavailable(
                    f"{failure}; the replicas stay placed", code="model_load_failed"
                )
        if time.monotonic() > deadline:
            listed = ", ".join(f"{v['replica_id']}: {v['state']}" for v in views)
            raise RequestTimedOut(
                f"model {uid!r} is not ready after {services.settings.launch_ready_timeout_s:g}s "
                f"({listed}); it is still being launched: GET /v1/models/{uid} shows its "
                "replicas",
                code="launch_not_ready",
            )
        await asyncio.sleep(LAUNCH_POLL_S)


#: How often a waiting launch looks at its replicas.
LAUNCH_POLL_S = 0.5


@router.post("/v1/models", dependencies=ADMIN)
async def launch_model(
    body: LaunchRequest, services: ServicesDep, request: Request, wait_ready: bool = True
) -> dict[str, Any]:
    """Place `replica` replicas on nodes with free devices; the nodes start them.

    Answers once the new replicas serve, as Xinference's launch does (at most
    INFERQ_LAUNCH_READY_TIMEOUT_S), or at once with `?wait_ready=false`: then
    `replicas[].state` turns `ready` when each worker has loaded its model
    (`inferq launch --wait` polls for that). `warnings` lists the fields of
    Xinference's launch request that were accepted but not used.
    """
    warnings = xinference_extras(body)
    for warning in warnings:
        log.warning("launch of %s: %s", body.uid, warning)
    known_error = (await _state(services)).load_errors.get(body.uid) if wait_ready else None
    launched = await _launcher(services).launch(body)
    new = {a.assignment_id for a in launched}
    if wait_ready and new:
        await _until_ready(services, request, body.uid, new, known_error)
    state = await _state(services)
    spec = services.model(body.uid)
    entry = model_entry(spec, _source(services, spec.name), state, services.started_at, True)
    entry.update(card(spec, state.facts.get(spec.name), services.settings))
    entry["model_uid"] = spec.name
    entry["launched_replicas"] = [r for r in entry["replicas"] if r["replica_id"] in new]
    entry["warnings"] = warnings
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
