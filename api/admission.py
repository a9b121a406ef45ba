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
  overshoot the bound by more than what other API processes send in that time.
Async jobs are durable and wait in the bulk queue, up to a much larger bound.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from app.errors import AuthenticationFailed, Overloaded
from app.keyring import identify
from app.keys import KeySpace
from app.registry import ModelSpec
from app.settings import Settings

#: The routes whose requests wait for their answer while holding a connection.
SYNC_PATHS = frozenset({"/v1/embeddings", "/v1/rerank", "/v1/chat/completions", "/v1/completions"})
DEPTH_MAX_AGE_S = 0.1


@dataclass
class _Depth:
    read_at: float = 0.0
    depth: int = 0
    sent_since: int = 0
    reading: bool = False


@dataclass
class QueueAdmission:
    client: aioredis.Redis
    keys: KeySpace
    settings: Settings
    _depths: dict[str, _Depth] = field(default_factory=dict)

    async def admit(self, spec: ModelSpec) -> None:
        """Raise Overloaded if the model's queue is full; else count the request as sent."""
        limit = self.settings.max_queue_depth
        entry = self._depths.setdefault(spec.queue, _Depth())
        now = time.monotonic()
        if now - entry.read_at > DEPTH_MAX_AGE_S and not entry.reading:
            # One read at a time; concurrent requests meanwhile count on the last one.
            entry.reading = True
            counted = entry.sent_since
            try:
                depth = int(await self.client.llen(self.keys.queue_list(spec.queue)))
            except (RedisError, OSError):
                depth = entry.depth  # the send that follows reports Redis being away
            finally:
                entry.reading = False
            # Requests sent while the read was on the wire may be missing from it.
            entry.depth, entry.read_at = depth, now
            entry.sent_since -= counted
        waiting = entry.depth + entry.sent_since
        if waiting >= limit:
            raise Overloaded(
                f"model {spec.name!r} has {waiting} requests waiting (limit {limit}); "
                "retry later, or submit an async job",
                code="queue_full",
                retry_after=self.settings.overload_retry_after_s,
            )
        entry.sent_since += 1


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
