"""The FastAPI app factory: `uvicorn api.main:create_app --factory`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from api.dispatch import Dispatcher, DispatchPolicy
from api.errors import install_error_handlers
from api.results import ResultRouter
from api.routes import chat, embeddings, health, models, rerank
from api.services import Services
from app import __version__
from app.celery_app import create_celery
from app.keys import KeySpace
from app.registry import Registry, load_registry
from app.settings import Settings, get_settings


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or get_settings()
    registry = registry or load_registry(settings.registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = KeySpace(settings.key_prefix)
        client = aioredis.Redis.from_url(
            settings.require_redis_url(), socket_connect_timeout=2, socket_timeout=5
        )
        router = ResultRouter(client, keys)
        await router.start()
        celery = create_celery(settings)
        policy = DispatchPolicy(
            check_interval=settings.replica_check_interval_s,
            resend_after=settings.resend_unaccepted_after_s,
            max_resends=settings.max_resends,
        )
        dispatcher = Dispatcher(celery, router, client, keys, policy)
        app.state.services = Services(settings, registry, keys, client, router, dispatcher)
        try:
            yield
        finally:
            await router.stop()
            await client.aclose()

    app = FastAPI(title="inferq", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(embeddings.router)
    app.include_router(rerank.router)
    app.include_router(chat.router)
    return app
