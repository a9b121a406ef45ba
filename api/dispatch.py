"""Queue a task for a model and wait for its reply on the result channel.

Replies come in two kinds: `{"accepted": ...}` when a worker starts the task,
then the answer. The first closes a gap in kombu's Redis transport: a worker
pops a message (BRPOP) and only then records it as unacknowledged, so a
worker killed between the two loses it for good. A request that no worker has
accepted while its queue is empty was lost in that gap, and is queued again
under the same request id; duplicates are harmless, the first answer wins.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DispatchPolicy:
    check_interval: float = 1.0
    resend_after: float = 3.0
    max_resends: int = 3


@dataclass
class Outcome:
    request_id: str
    result: dict[str, Any]
    resends: int


class Dispatcher:
    def __init__(
        self,
        celery: Celery,
        router: ResultRouter,
        client: aioredis.Redis,
        keys: KeySpace,
        policy: DispatchPolicy,
    ) -> None:
        self._celery = celery
        self._router = router
        self._client = client
        self._keys = keys
        self._policy = policy
        self._alive_cache: dict[str, tuple[float, int]] = {}

    async def alive(self, model: str, max_age: float = 0.0) -> int:
        """Live replicas of `model`; with `max_age`, a count that recent may be reused."""
        now = time.monotonic()
        cached = self._alive_cache.get(model)
        if cached and now - cached[0] <= max_age:
            return cached[1]
        try:
            count = await count_alive(self._client, self._keys, model)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"the queue backend is unreachable: {exc}") from None
        self._alive_cache[model] = (now, count)
        return count

    async def _queue_empty(self, spec: ModelSpec) -> bool:
        try:
            return int(await self._client.llen(self._keys.queue_list(spec.queue))) == 0
        except (RedisError, OSError):
            return False

    async def call(
        self, spec: ModelSpec, task: str, payload: dict[str, Any], timeout: float
    ) -> Outcome:
        """Run `task` on a replica of `spec` and return its result, or raise.

        While waiting it re-checks that some replica of the model is still alive,
        so a model whose last worker died answers 503 in seconds, not at timeout.
        """
        if not self._router.ready:
            raise BackendUnavailable("the result channel is not connected to Redis")
        # A count up to half a second old is as good as a fresh one: heartbeats
        # expire in seconds, and one round trip per request is saved under load.
        if await self.alive(spec.name, max_age=0.5) == 0:
            raise ModelUnavailable(f"model {spec.name!r} has no live replica; start a worker")
        policy = self._policy
        request_id = self._router.new_request_id()
        deadline = time.time() + timeout
        resends = 0
        with self._router.inbox(request_id) as inbox:
            await self._send(spec, task, request_id, payload, deadline)
            sent_at = time.monotonic()
            accepted = False
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise RequestTimedOut(f"model {spec.name!r} did not answer within {timeout:g}s")
                try:
                    reply = await asyncio.wait_for(
                        inbox.get(), min(remaining, policy.check_interval)
                    )
                except TimeoutError:
                    if await self.alive(spec.name) == 0:
                        raise ModelUnavailable(
                            f"model {spec.name!r} lost its last live replica"
                        ) from None
                    if (
                        not accepted
                        and resends < policy.max_resends
                        and time.monotonic() - sent_at >= policy.resend_after
                        and await self._queue_empty(spec)
                    ):
                        resends += 1
                        await self._send(spec, task, request_id, payload, deadline)
                        sent_at = time.monotonic()
                    continue
                if "accepted" in reply:
                    accepted = True
                    continue
                if reply.get("ok"):
                    return Outcome(request_id, reply["result"], resends)
                raise InferqError.from_wire(reply.get("error") or {})

    async def _send(
        self,
        spec: ModelSpec,
        task: str,
        request_id: str,
        payload: dict[str, Any],
        deadline: float,
    ) -> None:
        kwargs = {
            "request_id": request_id,
            "model": spec.name,
            "payload": payload,
            "deadline": deadline,
        }
        expires = datetime.fromtimestamp(deadline, UTC) + timedelta(seconds=1)
        try:
            # The anonymous exchange with the queue name as routing key puts the message
            # straight on the queue's list, sparing kombu a binding lookup per message.
            await asyncio.to_thread(
                self._celery.send_task,
                task,
                kwargs=kwargs,
                exchange="",
                routing_key=spec.queue,
                expires=expires,
            )
        except (OperationalError, RedisError, OSError) as exc:
            raise BackendUnavailable(f"could not queue the request: {exc}") from None
