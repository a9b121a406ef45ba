"""Queue a task for a model and wait for its reply on the result channel."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from api.results import ResultRouter
from app.errors import (
    BackendUnavailable,
    InferqError,
    ModelUnavailable,
    RequestTimedOut,
)
from app.keys import KeySpace
from app.registry import ModelSpec
from app.replicas import count_alive


class Dispatcher:
    def __init__(
        self,
        celery: Celery,
        router: ResultRouter,
        client: aioredis.Redis,
        keys: KeySpace,
        check_interval: float,
    ) -> None:
        self._celery = celery
        self._router = router
        self._client = client
        self._keys = keys
        self._check_interval = check_interval

    async def alive(self, model: str) -> int:
        try:
            return await count_alive(self._client, self._keys, model)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"the queue backend is unreachable: {exc}") from None

    async def call(
        self, spec: ModelSpec, task: str, payload: dict[str, Any], timeout: float
    ) -> tuple[str, dict[str, Any]]:
        """Run `task` on a replica of `spec`; returns (request id, result) or raises.

        While waiting it re-checks that some replica of the model is still alive,
        so a model whose last worker died answers 503 in seconds, not at timeout.
        """
        if not self._router.ready:
            raise BackendUnavailable("the result channel is not connected to Redis")
        if await self.alive(spec.name) == 0:
            raise ModelUnavailable(f"model {spec.name!r} has no live replica; start a worker")
        request_id = self._router.new_request_id()
        deadline = time.time() + timeout
        with self._router.inbox(request_id) as inbox:
            await self._send(spec, task, request_id, payload, deadline, timeout)
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise RequestTimedOut(f"model {spec.name!r} did not answer within {timeout:g}s")
                try:
                    reply = await asyncio.wait_for(
                        inbox.get(), min(remaining, self._check_interval)
                    )
                except TimeoutError:
                    if await self.alive(spec.name) == 0:
                        raise ModelUnavailable(
                            f"model {spec.name!r} lost its last live replica"
                        ) from None
                    continue
                if reply.get("ok"):
                    return request_id, reply["result"]
                raise InferqError.from_wire(reply.get("error") or {})

    async def _send(
        self,
        spec: ModelSpec,
        task: str,
        request_id: str,
        payload: dict[str, Any],
        deadline: float,
        timeout: float,
    ) -> None:
        kwargs = {
            "request_id": request_id,
            "model": spec.name,
            "payload": payload,
            "deadline": deadline,
        }
        expires = datetime.now(UTC) + timedelta(seconds=timeout)
        try:
            await asyncio.to_thread(
                self._celery.send_task, task, kwargs=kwargs, queue=spec.queue, expires=expires
            )
        except (OperationalError, RedisError, OSError) as exc:
            raise BackendUnavailable(f"could not queue the request: {exc}") from None
