"""Backpressure: refuse work the cluster cannot take soon, instead of queueing it forever.

Two bounds, both answered with 429 and `Retry-After` (OpenAI JSON, which the
`openai` client retries on its own):
- sync requests in flight in this API process (each holds a connection, a
  reply inbox and its body in memory), checked before the body is parsed (the
  request guard then reads and drops it, so the 429 is never lost to a reset).
  Only callers with a valid key count: a request without one is answered 401
  at once, so clients without a key cannot fill the slots of those with one;
- messages waiting in a model's interactive queue, checked before a request is
  queued. The depth is read from Redis at most every 100 ms per model; requests
  this process queued since the last read are added to it, so a burst cannot
  overshoot the bound by more than what other API processes send in that time;
- for embeddings and rerank, the work queued: the inputs of every unanswered
  request (each API process writes its own total beside the others' in Redis)
  against the live replicas' measured inputs per second. A request that could
  not finish within its deadline (a fraction of it, for safety) is refused at
  once, with a Retry-After for when the backlog will have drained, instead of
  waiting to end in 504. The bound counts inputs, not tokens: a mix of very long
  and short texts is planned at the rate of the latest batches.
Async jobs are durable and wait in the bulk queue, up to a much larger bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from app import worker_stats as ws
from app.errors import AuthenticationFailed, Overloaded
from app.keyring import identify
from app.keys import KeySpace
from app.registry import ModelSpec
from app.settings import Settings

#: The routes whose requests wait for their answer while holding a connection.
SYNC_PATHS = frozenset(
    {"/v1/embeddings", "/v1/rerank", "/v2/rerank", "/v1/chat/completions", "/v1/completions"}
)
DEPTH_MAX_AGE_S = 0.1
#: How often the replicas' measured rate is read again.
RATE_MAX_AGE_S = 1.0
#: A process's planned work older than this is a process that stopped: not counted.
WORK_STALE_S = 5.0
#: ... and after this long, gone: its share is removed from the hash.
WORK_GONE_S = 60.0
#: A refused caller is asked back after this share of the backlog's drain time.
RETRY_SPREAD = (0.25, 0.5)
#: The openai client waits out a Retry-After of up to a minute; longer, it gives up.
MAX_RETRY_AFTER_S = 60.0


@dataclass
class _Depth:
    read_at: float = 0.0
    depth: int = 0
    sent_since: int = 0
    reading: asyncio.Future[None] | None = None
    #: Inputs of this process's requests for the model that are not answered yet.
    local_work: int = 0
    #: The same figure of the other API processes, as they last wrote it.
    other_work: int = 0
    #: The model's live replicas' measured inputs per second (None: not measured yet).
    rate: float | None = None
    rate_read_at: float = 0.0


@dataclass
class Admitted:
    """A request's place in its model's planned work, given back when it is answered."""

    entry: _Depth | None = None
    work: int = 0

    def release(self) -> None:
        if self.entry is not None:
            self.entry.local_work -= self.work
            self.entry = None


@dataclass
class QueueAdmission:
    client: aioredis.Redis
    keys: KeySpace
    settings: Settings
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    _depths: dict[str, _Depth] = field(default_factory=dict)
    #: Model name by queue, for the planned-work hash each entry writes.
    _models: dict[str, str] = field(default_factory=dict)
    _publisher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._publisher = asyncio.get_running_loop().create_task(
            self._publish(), name="admission-work"
        )

    async def stop(self) -> None:
        """Stop writing this process's share, and withdraw it: its requests are gone."""
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        with contextlib.suppress(RedisError, OSError):
            pipe = self.client.pipeline(transaction=False)
            for model in self._models.values():
                pipe.hdel(self.keys.admission_work(model), self.instance)
            await pipe.execute()

    async def _publish(self) -> None:
        """Keep this process's share fresh while it has unanswered work, even when no new
        request comes to refresh it: other processes count only fresh shares."""
        while True:
            await asyncio.sleep(WORK_STALE_S / 5)
            busy = [(q, e) for q, e in self._depths.items() if e.local_work > 0]
            if not busy:
                continue
            with contextlib.suppress(RedisError, OSError):
                pipe = self.client.pipeline(transaction=False)
                for queue, entry in busy:
                    key = self.keys.admission_work(self._models[queue])
                    pipe.hset(key, self.instance, f"{entry.local_work}:{time.time():.3f}")
                    pipe.expire(key, int(WORK_STALE_S * 4))
                await pipe.execute()

    async def admit(self, spec: ModelSpec, work: int = 0, timeout: float | None = None) -> Admitted:
        """Raise Overloaded if the model's queue is full, or if its queued work (`work` is
        this request's inputs) cannot finish within `timeout`; else count the request."""
        limit = self.settings.max_queue_depth
        entry = self._depths.setdefault(spec.queue, _Depth())
        self._models[spec.queue] = spec.name
        now = time.monotonic()
        if now - entry.read_at > DEPTH_MAX_AGE_S and entry.reading is None:
            # One read at a time, which every request arriving meanwhile waits for (one
            # round trip): a burst is judged on fresh figures, not admitted blind.
            entry.reading = asyncio.ensure_future(self._refresh(spec, entry, now))
            entry.reading.add_done_callback(lambda _: setattr(entry, "reading", None))
        if entry.reading is not None:
            await asyncio.shield(entry.reading)
        waiting = entry.depth + entry.sent_since
        if waiting >= limit:
            raise Overloaded(
                f"model {spec.name!r} has {waiting} requests waiting (limit {limit}); "
                "retry later, or submit an async job",
                code="queue_full",
                retry_after=self.settings.overload_retry_after_s,
            )
        if work and timeout:
            self._check_work(spec, entry, work, timeout)
        entry.sent_since += 1
        entry.local_work += work
        return Admitted(entry, work)

    def _check_work(self, spec: ModelSpec, entry: _Depth, work: int, timeout: float) -> None:
        """Refuse at once what would end in a 504: the inputs ahead of this request and its
        own, at the replicas' measured rate, past the share of its deadline it may use."""
        ahead = entry.local_work + entry.other_work
        if ahead <= 0:
            return  # an idle model takes any request: its rate gets measured on it
        budget = timeout * self.settings.admit_deadline_fraction
        if entry.rate is None:
            # No replica has run a batch yet: nothing to plan with, and refusing a fresh
            # model's first burst on a guess would be worse. The depth bound still holds;
            # the rate is known a heartbeat after the first batch.
            return
        finish_s = (ahead + work) / entry.rate
        if finish_s <= budget:
            return
        # Past the excess, callers come back spread over a share of the time the backlog
        # takes to drain: all of them told "in 1 s" would return together and spend the
        # replicas' CPU on refusals.
        excess_s = (ahead + work - entry.rate * budget) / entry.rate
        spread_s = ahead / entry.rate * random.uniform(*RETRY_SPREAD)
        retry_after = max(1.0, excess_s, spread_s)
        expected = f"about {finish_s:.0f}s at {entry.rate:.0f} inputs/s"
        raise Overloaded(
            f"model {spec.name!r} has {ahead} inputs ahead of this request's {work}; "
            f"finishing them takes {expected}, past this request's {timeout:g}s deadline. "
            "Retry later, or submit an async job",
            code="backlog_exceeds_deadline",
            retry_after=min(MAX_RETRY_AFTER_S, retry_after),
        )

    async def _refresh(self, spec: ModelSpec, entry: _Depth, now: float) -> None:
        """Queue depth, and the planned work of every API process, in one round trip;
        the replicas' rate once a second."""
        counted = entry.sent_since
        work_key = self.keys.admission_work(spec.name)
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.keys.queue_list(spec.queue))
        pipe.hset(work_key, self.instance, f"{entry.local_work}:{time.time():.3f}")
        pipe.expire(work_key, int(WORK_STALE_S * 4))
        pipe.hgetall(work_key)
        try:
            depth, _, _, shares = await pipe.execute()
        except (RedisError, OSError):
            return  # the send that follows reports Redis being away
        # Requests sent while the read was on the wire may be missing from it.
        entry.depth, entry.read_at = int(depth), now
        entry.sent_since -= counted
        entry.other_work, gone = _others_work(shares, self.instance)
        if gone:
            with contextlib.suppress(RedisError, OSError):
                await self.client.hdel(work_key, *gone)
        if entry.rate is None or now - entry.rate_read_at >= RATE_MAX_AGE_S:
            entry.rate_read_at = now
            entry.rate = await self._measured_rate(spec.name, entry.rate)

    async def _measured_rate(self, model: str, last: float | None) -> float | None:
        """The sum of the live replicas' inputs per second; the last figure if none
        reported one (idle replicas keep their last batches' rate)."""
        try:
            ids = await self.client.zrangebyscore(self.keys.replicas(model), time.time(), "+inf")
            if not ids:
                return last
            pipe = self.client.pipeline(transaction=False)
            for replica in ids:
                pipe.hget(self.keys.replica_stats(replica.decode()), ws.ITEMS_PER_SECOND)
            rates = [float(r) for r in await pipe.execute() if r is not None]
        except (RedisError, OSError, ValueError):
            return last
        measured = sum(r for r in rates if r > 0)
        return measured if measured > 0 else last


def _others_work(shares: dict[bytes, bytes], instance: str) -> tuple[int, list[bytes]]:
    """The other API processes' planned work, skipping processes gone silent; and the
    shares of processes silent so long they are gone, to be removed."""
    total, gone, now = 0, [], time.time()
    for name, value in shares.items():
        if name.decode() == instance:
            continue
        try:
            work, written = value.decode().split(":")
            age = now - float(written)
        except ValueError:
            gone.append(name)
            continue
        if age <= WORK_STALE_S:
            total += max(0, int(work))
        elif age > WORK_GONE_S:
            gone.append(name)
    return total, gone


class InflightLimit:
    """ASGI middleware capping sync requests in flight; the excess gets 429 at once,
    before its body is parsed."""

    def __init__(self, app: ASGIApp, limit: int, retry_after_s: float) -> None:
        self.app = app
        self.limit = limit
        self.retry_after = str(max(1, math.ceil(retry_after_s)))
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Only the routes' own method: any other is the router's 405, key or not.
        if (
            scope["type"] != "http"
            or scope.get("path") not in SYNC_PATHS
            or scope.get("method") != "POST"
        ):
            await self.app(scope, receive, send)
            return
        refused = self._unauthenticated(scope)
        if refused is not None:
            # Checked before counting: callers without a valid key never take a slot.
            await error_response(refused)(scope, receive, send)
            return
        if self.inflight >= self.limit:
            await self._refuse(send)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1

    @staticmethod
    def _unauthenticated(scope: Scope) -> AuthenticationFailed | None:
        services = getattr(scope["app"].state, "services", None)
        if services is None:
            return None  # not started: the route answers
        try:
            identify(services.keyring, Headers(scope=scope).get("authorization"))
        except AuthenticationFailed as exc:
            return exc
        return None

    async def _refuse(self, send: Send) -> None:
        error = Overloaded(
            f"this API process has {self.inflight} requests in flight (limit {self.limit}); "
            "retry later",
            code="too_many_requests_in_flight",
        )
        body = json.dumps(error.to_openai()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", self.retry_after.encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
