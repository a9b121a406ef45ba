"""Services built once per API process (in the lifespan) and handed to routes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from fastapi import Request

from api.dispatch import Dispatcher
from api.results import ResultRouter
from app.errors import InvalidRequest, ModelNotFound
from app.keys import KeySpace
from app.registry import ModelSpec, Registry
from app.settings import Settings


@dataclass
class Services:
    settings: Settings
    registry: Registry
    keys: KeySpace
    redis: aioredis.Redis
    router: ResultRouter
    dispatcher: Dispatcher
    started_at: int = field(default_factory=lambda: int(time.time()))

    def model(self, name: str, kind: str | None = None) -> ModelSpec:
        spec = self.registry.get(name)
        if spec is None:
            raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        if kind is not None and spec.kind != kind:
            raise InvalidRequest(
                f"the model {name!r} is a {spec.kind} model, not a {kind} model",
                param="model",
                code="wrong_model_kind",
            )
        return spec


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
