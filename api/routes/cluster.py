"""`GET /v1/cluster`: nodes, workers, models, queues and jobs in one answer."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from redis.exceptions import RedisError

from api.cluster_reads import ClusterState, queue_depths, read_cluster
from api.cluster_view import cluster_view, wanted_replicas
from api.services import Services, services_of
from app.errors import BackendUnavailable, backend_reason

log = logging.getLogger(__name__)

router = APIRouter()

#: Recent events shown per node.
EVENTS_SHOWN = 20


async def history_sample(
    services: Services,
) -> tuple[ClusterState, dict[str, tuple[int, int]], dict[str, int]]:
    """What one history sample needs: the same reads as the view, without events or jobs."""
    await services.refresh_launched()
    names = services.model_names()
    state = await read_cluster(services.redis, services.keys, names)
    depths = await queue_depths(services.redis, services.keys, names)
    wanted = {n: wanted_replicas(services.model(n), state) for n in names}
    return state, depths, wanted


@router.get("/v1/cluster")
async def cluster(services: Annotated[Services, Depends(services_of)]) -> dict[str, Any]:
    try:
        await services.refresh_launched()
        names = services.model_names()
        state = await read_cluster(services.redis, services.keys, names)
        depths = await queue_depths(services.redis, services.keys, names)
        events: dict[str, list[dict[str, Any]]] = {}
        for name in state.nodes:
            raw = await services.redis.lrange(services.keys.node_events(name), 0, EVENTS_SHOWN - 1)
            events[name] = [json.loads(e) for e in raw]
    except (RedisError, OSError) as exc:
        log.warning("the cluster state is unreachable: %s", exc)
        raise BackendUnavailable(
            f"the cluster state is unreachable: {backend_reason(exc)}"
        ) from None
    jobs: dict[str, int] | None = None
    problem = services.jobs_problem
    if services.jobs is not None:
        try:
            counts = await asyncio.to_thread(services.jobs.store.count_by_status)
            statuses = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
            jobs = {status: counts.get(status, 0) for status in statuses}
        except Exception as exc:  # the database is away: the rest of the view still stands
            log.warning("the job store is unreachable: %s", exc)
            problem = f"the job store is unreachable: {backend_reason(exc)}"
    models = [
        (services.model(n), "registry" if services.registry.get(n) else "launched") for n in names
    ]
    view = cluster_view(
        state,
        models,
        depths,
        events,
        jobs,
        problem,
        services.started_at,
        services.settings.heartbeat_ttl_s,
    )
    # The last minutes per model (api/history.py), for the console's charts.
    every = services.settings.history_sample_s
    view["history"] = {"sample_s": every, "models": services.history.series()}
    return view
