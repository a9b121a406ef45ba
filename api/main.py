"""The FastAPI app factory: `uvicorn api.main:create_app --factory`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline
from redis.exceptions import RedisError

from api.admission import InflightLimit, QueueAdmission
from api.auth import require
from api.bulk import BulkCoordinator
from api.dispatch import Dispatcher, DispatchPolicy
from api.errors import ERROR_RESPONSES, install_error_handlers
from api.history import keep_sampling
from api.job_sweeper import JobSweeper
from api.jobs import JobQueue
from api.launcher import ModelLauncher
from api.metrics import install_metrics
from api.redis_client import api_redis, fit_to_server
from api.request_guard import RequestGuard
from api.request_ids import RequestIds
from api.results import ResultRouter
from api.routes import (
    batches,
    chat,
    cluster,
    corpus,
    embeddings,
    files,
    health,
    jobs,
    models,
    rerank,
    ui,
    xinference,
)
from api.routes.metrics import router as metrics_router
from api.services import BulkServices, Services
from app import __version__, logs
from app.celery_app import create_celery
from app.db import engine_for
from app.jobs.bulk_store import BulkStore
from app.jobs.files import FileStore
from app.jobs.migrate import SchemaBehind, schema_problem
from app.jobs.store import JobStore
from app.keyring import KeyRing, Scope
from app.keys import KeySpace
from app.registry import Registry, load_registry
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


def open_job_store(settings: Settings) -> JobStore:
    """The job store, once its database is at the newest schema revision."""
    engine = engine_for(settings)
    try:
        problem = schema_problem(engine, settings.resolved_database_url())
    except Exception:
        engine.dispose()
        raise
    if problem:
        engine.dispose()
        raise SchemaBehind(problem)
    return JobStore(engine)


async def _refresh_launched(services: Services) -> None:
    """Keep the launched-model catalog current, so any API process routes a model
    launched through another one within a second."""
    while True:
        try:
            await services.refresh_launched()
        except (RedisError, OSError) as exc:
            log.debug("could not refresh launched models: %s", exc)
        await asyncio.sleep(1.0)


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or get_settings()
    # At uvicorn's --log-level, which it has set on its own logger by now.
    logs.configure(settings.log_format, logging.getLogger("uvicorn.error").level or logging.INFO)
    registry = registry or load_registry(settings.registry)
    keyring = KeyRing.load(settings.api_keys, settings.api_keys_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = KeySpace(settings.key_prefix)
        client = api_redis(settings)
        await fit_to_server(client)
        router = ResultRouter(client, keys)
        await router.start()
        celery = create_celery(settings)
        policy = DispatchPolicy(
            check_interval=settings.replica_check_interval_s,
            resend_after=settings.resend_unaccepted_after_s,
            max_resends=settings.max_resends,
            coalesce_ms=settings.coalesce_ms,
            batch_wait_ms=settings.batch_max_wait_ms,
        )
        dispatcher = Dispatcher(celery, router, client, keys, policy)
        services = Services(settings, registry, keys, client, router, dispatcher)
        services.keyring = keyring
        services.admission = QueueAdmission(client, keys, settings)
        services.admission.start()
        services.launcher = ModelLauncher(client, keys, registry, celery, settings)
        refresher = asyncio.create_task(_refresh_launched(services))
        sampler = asyncio.create_task(
            keep_sampling(
                services.history,
                lambda: cluster.history_sample(services),
                settings.history_sample_s,
            )
        )
        sweepers: list[JobSweeper] = []
        coordinators: list[BulkCoordinator] = []

        def open_jobs() -> tuple[JobQueue, BulkServices]:
            store = open_job_store(settings)
            queue = JobQueue(store, celery, client, keys, settings)
            sweeper = JobSweeper(queue, client, keys, settings)
            files = FileStore(store.engine, settings.resolved_files_dir())
            bulk = BulkStore(store.engine)
            coordinator = BulkCoordinator(services, queue, bulk, files, client, keys, settings)
            sweeper.start()
            coordinator.start()
            sweepers.append(sweeper)
            coordinators.append(coordinator)
            return queue, BulkServices(files, bulk, coordinator)

        services.open_jobs = open_jobs
        services.try_open_jobs()
        if services.jobs_problem:
            log.warning("async jobs are unavailable: %s", services.jobs_problem)
        app.state.services = services
        try:
            yield
        finally:
            refresher.cancel()
            sampler.cancel()
            await services.admission.stop()
            for sweeper in sweepers:
                await sweeper.stop()
            for coordinator in coordinators:
                await coordinator.stop()
            await router.stop()
            await client.aclose()

    # /docs and /redoc from assets in a package, not a CDN: VACC sites are often offline.
    app = FastAPIOffline(
        title="inferq", version=__version__, lifespan=lifespan, static_url="/docs-assets"
    )
    install_error_handlers(app)
    app.add_middleware(
        InflightLimit,
        limit=settings.max_inflight_requests,
        retry_after_s=settings.overload_retry_after_s,
    )
    app.add_middleware(
        RequestGuard,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        upload_max_bytes=settings.max_upload_bytes,
    )
    install_metrics(app)
    app.add_middleware(RequestIds)  # outermost: every line of the request carries its id
    app.include_router(health.router)
    app.include_router(ui.router)  # the cluster web page; its script sends the API key
    app.include_router(metrics_router)  # no API key, like /health (see its route)
    app.include_router(xinference.router)  # no API key: clients ask it whether to send one
    # Every /v1 route needs an API key with the route's scope when keys are configured;
    # launching and terminating models (in the models router) need admin.
    scoped = {
        Scope.inference: (models, embeddings, rerank, chat),
        Scope.jobs: (jobs, files, batches, corpus),
        Scope.admin: (cluster,),
    }
    for scope, modules in scoped.items():
        for module in modules:
            app.include_router(
                module.router,
                dependencies=[Depends(require(scope))],
                responses=ERROR_RESPONSES,
            )
    return app
