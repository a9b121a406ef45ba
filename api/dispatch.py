"""Queue a task for a model and follow its replies on the result channel.

Replies come in three kinds: `{"accepted": ...}` when a worker starts the
task, `{"chunk": ...}` for each streamed piece (`{"sse": ...}` when a relay
engine's server wrote the events itself), and the final `{"ok": ...}`.

Acceptance closes a gap in kombu's Redis transport: a worker pops a message
(BRPOP) and only then records it as unacknowledged, so a worker killed between
the two loses it for good. A request that no worker has accepted while its
queue is empty was lost in that gap, and is queued again under the same
request id; duplicates are harmless, the first answer wins. Once a stream has
started, only the replica that accepted it may continue it: if that replica
dies the stream ends with an error rather than restarting elsewhere.

When the result channel's connection to Redis breaks, replies published
meanwhile are lost: a waiting request is queued again once the channel is back
(within a second), and answered 503 at once if it is not, or if it streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from redis.exceptions import RedisError

from api.coalesce import Coalescer
from api.publisher import TaskPublisher
from api.results import ResultRouter
from app.celery_app import BATCHED_TASK, EMBEDDINGS_TASK, RERANK_TASK
from app.errors import (
    BackendUnavailable,
    InferqError,
    ModelUnavailable,
    RequestTimedOut,
    backend_reason,
)
from app.keys import KeySpace
from app.logs import REQUEST_ID, TRACE_HEADER
from app.registry import ModelSpec
from app.replicas import count_alive, describe_load_error, parse_load_error

log = logging.getLogger(__name__)

#: How long a request waits for the result channel to come back (after its
#: connection to Redis dropped) before it is answered 503.
LOST_WAIT_S = 1.0


#: Tasks whose requests may share a queue message (api/coalesce.py).
BATCHED_TASKS = frozenset({EMBEDDINGS_TASK, RERANK_TASK})
#: Inputs one message gathers when the model's registry entry names no batch size.
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class DispatchPolicy:
    check_interval: float = 1.0
    resend_after: float = 3.0
    max_resends: int = 3
    cancel_ttl_s: int = 3600
    #: Longest a request waits for others to share its message (0: never waits).
    coalesce_ms: float = 2.0
    #: The batcher's own wait, which a model's `max_wait_ms` option overrides; the
    #: coalescing window never exceeds it.
    batch_wait_ms: float = 5.0


@dataclass
class Outcome:
    request_id: str
    result: dict[str, Any]
    resends: int


class WorkerLost(InferqError):
    status = 503
    type = "service_unavailable"
    default_code = "worker_lost"


@dataclass
class Exchange:
    """One queued request and the replies that come back for it."""

    dispatcher: Dispatcher
    spec: ModelSpec
    task: str
    payload: dict[str, Any]
    request_id: str
    timeout: float
    inbox: asyncio.Queue[dict[str, Any]]
    streaming: bool
    #: Inputs the engine will run: what a coalesced message is sized by.
    work: int = 1
    resends: int = 0
    #: Rises each time the result channel dropped while this request waited: the
    #: worker then runs it again even if it answered (to nobody) before.
    attempt: int = 0
    accepted_by: str | None = None
    finished: bool = False
    deadline: float = 0.0
    last_send: float = 0.0

    async def replies(self) -> AsyncIterator[dict[str, Any]]:
        """Chunks (if streaming), then the final result; raises a domain error on failure.

        The timeout bounds the wait for the final reply, or, when streaming, each
        wait for the next piece.
        """
        policy = self.dispatcher.policy
        self.deadline = time.time() + self.timeout
        while True:
            remaining = self.deadline - time.time()
            if remaining <= 0:
                raise RequestTimedOut(
                    f"model {self.spec.name!r} did not answer within {self.timeout:g}s"
                )
            try:
                reply = await asyncio.wait_for(
                    self.inbox.get(), min(remaining, policy.check_interval)
                )
            except TimeoutError:
                await self._check_progress()
                continue
            if "lost" in reply:
                await self._resend_after_loss()
                continue
            if "accepted" in reply:
                if self.accepted_by is None:
                    self.accepted_by = str(reply.get("replica_id") or reply["accepted"])
                continue
            if "chunk" in reply or "sse" in reply:
                if self.streaming:
                    self.deadline = time.time() + self.timeout
                yield reply
                continue
            self.finished = True
            if reply.get("ok"):
                yield reply
                return
            raise InferqError.from_wire(reply.get("error") or {})

    async def _check_progress(self) -> None:
        """Called whenever a reply is slow to come: is anyone still working on it?"""
        dispatcher, policy = self.dispatcher, self.dispatcher.policy
        if self.accepted_by is not None:
            if await dispatcher.replica_alive(self.accepted_by):
                return
            if self.streaming:
                raise WorkerLost(f"the worker streaming this reply for {self.spec.name!r} stopped")
            # The broker redelivers an unfinished request; wait for a new acceptance.
            self.accepted_by = None
            self.last_send = time.monotonic()
            return
        if await dispatcher.alive(self.spec.name) == 0:
            raise await dispatcher.unavailable(
                self.spec, f"model {self.spec.name!r} lost its last live replica"
            )
        if (
            self.resends < policy.max_resends
            and time.monotonic() - self.last_send >= policy.resend_after
            and await dispatcher.queue_empty(self.spec)
        ):
            self.resends += 1
            await dispatcher.send(self)

    async def _resend_after_loss(self) -> None:
        """The result channel dropped: this request's reply may have gone with it."""
        dispatcher, policy = self.dispatcher, self.dispatcher.policy
        if self.streaming:
            raise BackendUnavailable("the connection to Redis broke while this reply was streaming")
        if self.resends >= policy.max_resends or not await dispatcher.router.wait_ready(
            min(LOST_WAIT_S, max(0.0, self.deadline - time.time()))
        ):
            raise BackendUnavailable("the connection to Redis broke while this request waited")
        self.resends += 1
        self.attempt += 1
        self.accepted_by = None
        await dispatcher.send(self)

    async def result(self) -> Outcome:
        final: dict[str, Any] = {}
        async for reply in self.replies():
            final = reply
        return Outcome(self.request_id, final["result"], self.resends)

    async def close(self) -> None:
        """Forget the inbox; tell the worker to stop if the request did not finish."""
        if self.dispatcher.router.close_inbox(self.request_id):
            self.dispatcher.ended(self.spec.name)
        if not self.finished:
            await self.dispatcher.cancel(self.request_id)


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
        self.router = router
        self._client = client
        self._keys = keys
        self.policy = policy
        self._alive_cache: dict[str, tuple[float, int]] = {}
        self._publisher = TaskPublisher(celery, client, keys)
        self._coalescer = Coalescer(self._send_batched, self._window_s, self._capacity, self._busy)
        #: Requests of each model this process has queued and not yet closed.
        self._open: dict[str, int] = {}

    def _window_s(self, spec: ModelSpec) -> float:
        batch_wait = float(spec.options.get("max_wait_ms", self.policy.batch_wait_ms))
        return max(0.0, min(self.policy.coalesce_ms, batch_wait)) / 1000.0

    @staticmethod
    def _capacity(spec: ModelSpec) -> int:
        return max(1, int(spec.options.get("batch_size", DEFAULT_BATCH_SIZE)))

    def _busy(self, model: str) -> bool:
        """Others in flight besides the request asking: company is likely soon."""
        return self._open.get(model, 0) > 1

    def ended(self, model: str) -> None:
        left = self._open.get(model, 0) - 1
        if left > 0:
            self._open[model] = left
        else:
            self._open.pop(model, None)

    async def alive(self, model: str, max_age: float = 0.0) -> int:
        """Live replicas of `model`; with `max_age`, a count that recent may be reused."""
        now = time.monotonic()
        cached = self._alive_cache.get(model)
        if cached and now - cached[0] <= max_age:
            return cached[1]
        try:
            count = await count_alive(self._client, self._keys, model)
        except (RedisError, OSError) as exc:
            log.warning("Redis did not answer a replica count: %s", exc)
            raise BackendUnavailable(
                f"the queue backend is unreachable: {backend_reason(exc)}"
            ) from None
        self._alive_cache[model] = (now, count)
        return count

    async def unavailable(self, spec: ModelSpec, otherwise: str) -> ModelUnavailable:
        """The 503 for a model without a live replica: why its engine failed to load, if a
        worker said so lately (read only here, off the path of a served request)."""
        try:
            record = parse_load_error(await self._client.get(self._keys.model_error(spec.name)))
        except (RedisError, OSError):
            record = None
        if record is None:
            return ModelUnavailable(otherwise)
        return ModelUnavailable(describe_load_error(spec.name, record), code="model_load_failed")

    async def replica_alive(self, replica_id: str) -> bool:
        try:
            return bool(await self._client.exists(self._keys.replica_info(replica_id)))
        except (RedisError, OSError):
            return True  # cannot tell; the timeout still bounds the wait

    async def queue_empty(self, spec: ModelSpec) -> bool:
        try:
            return int(await self._client.llen(self._keys.queue_list(spec.queue))) == 0
        except (RedisError, OSError):
            return False

    async def cancel(self, request_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.set(self._keys.cancel(request_id), 1, ex=self.policy.cancel_ttl_s)

    async def start(
        self,
        spec: ModelSpec,
        task: str,
        payload: dict[str, Any],
        timeout: float,
        streaming: bool = False,
        work: int = 1,
    ) -> Exchange:
        """Check a replica lives, open the reply inbox and queue the task."""
        # A dropped connection is back within a fraction of a second; an outage is not.
        if not await self.router.wait_ready(LOST_WAIT_S):
            raise BackendUnavailable("the result channel is not connected to Redis")
        # A count up to half a second old is as good as a fresh one: heartbeats
        # expire in seconds, and one round trip per request is saved under load.
        if await self.alive(spec.name, max_age=0.5) == 0:
            raise await self.unavailable(
                spec, f"model {spec.name!r} has no live replica; start a worker"
            )
        request_id = self.router.new_request_id()
        inbox = self.router.open_inbox(request_id)
        self._open[spec.name] = self._open.get(spec.name, 0) + 1
        exchange = Exchange(
            self, spec, task, payload, request_id, timeout, inbox, streaming, max(1, work)
        )
        try:
            await self.send(exchange)
        except BaseException:
            if self.router.close_inbox(request_id):
                self.ended(spec.name)
            raise
        return exchange

    async def call(
        self, spec: ModelSpec, task: str, payload: dict[str, Any], timeout: float, work: int = 1
    ) -> Outcome:
        """Run `task` on a replica of `spec` and return its final result, or raise."""
        exchange = await self.start(spec, task, payload, timeout, work=work)
        try:
            return await exchange.result()
        finally:
            await exchange.close()

    async def send(self, exchange: Exchange) -> None:
        deadline = time.time() + exchange.timeout
        if exchange.task in BATCHED_TASKS:
            entry = {
                "request_id": exchange.request_id,
                "payload": exchange.payload,
                "deadline": deadline,
                "attempt": exchange.attempt,
                "trace": REQUEST_ID.get(),
            }
            await self._coalescer.send(exchange.spec, exchange.task, entry, exchange.work)
        else:
            kwargs = {
                "request_id": exchange.request_id,
                "model": exchange.spec.name,
                "payload": exchange.payload,
                "deadline": deadline,
                "attempt": exchange.attempt,
            }
            # A message header, not a task argument: workers of an older release ignore
            # it instead of refusing the task.
            headers = {TRACE_HEADER: REQUEST_ID.get()}
            await self._publish(
                exchange.task, exchange.spec, kwargs, deadline, headers, exchange.spec.name
            )
        exchange.last_send = time.monotonic()

    async def _send_batched(
        self, spec: ModelSpec, task: str, entries: list[dict[str, Any]]
    ) -> None:
        kwargs = {"model": spec.name, "task": task, "requests": entries}
        deadline = max(entry["deadline"] for entry in entries)
        await self._publish(
            BATCHED_TASK, spec, kwargs, deadline, None, f"{spec.name} {task} x{len(entries)}"
        )

    async def _publish(
        self,
        task: str,
        spec: ModelSpec,
        kwargs: dict[str, Any],
        deadline: float,
        headers: dict[str, Any] | None,
        summary: str,
    ) -> None:
        expires = datetime.fromtimestamp(deadline + 1, UTC)
        message = self._publisher.message(task, spec.queue, kwargs, expires, headers, summary)
        try:
            await self._publisher.publish(spec.queue, message)
        except (RedisError, OSError) as exc:
            log.warning("could not queue a request: %s", exc)
            raise BackendUnavailable(
                f"could not queue the request: {backend_reason(exc)}"
            ) from None
