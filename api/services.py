"""Services built once per API process (in the lifespan) and handed to routes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request

from api.dispatch import Dispatcher
from api.results import ResultRouter
from app.errors import InvalidRequest, ModelNotFound
from app.keys import KeySpace
from app.prompt_size import PromptSizer, sizer_for
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
    _sizers: dict[str, PromptSizer | None] = field(default_factory=dict)
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def prompt_sizer(self, spec: ModelSpec) -> PromptSizer | None:
        if spec.name not in self._sizers:
            self._sizers[spec.name] = sizer_for(spec)
        return self._sizers[spec.name]

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run clean-up outside the current (possibly cancelled) task, keeping a reference."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
