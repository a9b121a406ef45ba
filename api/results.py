"""Delivery of worker replies to the requests waiting for them.

Each API process pattern-subscribes once to `result:<instance>.*` and request
ids are `<instance>.<uuid>`, so a reply channel is live before any task is
queued (no per-request SUBSCRIBE round trip, no race with a fast worker), and
a reply that arrives after its request gave up finds no inbox and is dropped.

A reply published while the subscription is down is lost, so when the
connection to Redis breaks every open inbox is told (`{"lost": True}`), and
its request is queued again or answered 503 at once instead of waiting out its
timeout (api/dispatch.py). The subscription has a connection of its own that
never retries behind the router's back, so no break goes unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from app.keys import KeySpace

log = logging.getLogger(__name__)

#: What an inbox receives when replies may have been lost with the connection.
LOST: dict[str, Any] = {"lost": True}

#: Longest wait between attempts to subscribe again.
MAX_BACKOFF_S = 1.0


#: The name the subscription's connection goes by in Redis's CLIENT LIST.
CLIENT_NAME = "inferq-result-router"


def _without_retries(client: aioredis.Redis) -> aioredis.Redis:
    """A client to the same server whose connections never retry or reconnect silently."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0), "client_name": CLIENT_NAME}
    return aioredis.Redis(
        connection_pool=aioredis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )


class ResultRouter:
    def __init__(self, client: aioredis.Redis, keys: KeySpace) -> None:
        self._client = _without_retries(client)
        self.instance = uuid.uuid4().hex[:12]
        self._pattern = keys.result_channel(f"{self.instance}.*")
        self._prefix = keys.result_channel("")
        self._inboxes: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def start(self, wait: float = 2.0) -> None:
        self._task = asyncio.create_task(self._run(), name="inferq-result-router")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), wait)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._client.aclose()

    async def wait_ready(self, timeout: float) -> bool:
        """True once replies can be received, False if not within `timeout` seconds."""
        if not self.ready:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), max(0.0, timeout))
        return self.ready

    def new_request_id(self) -> str:
        return f"{self.instance}.{uuid.uuid4().hex}"

    def open_inbox(self, request_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._inboxes[request_id] = queue
        return queue

    def close_inbox(self, request_id: str) -> bool:
        """False if it was closed already."""
        return self._inboxes.pop(request_id, None) is not None

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.psubscribe(self._pattern)
                async for message in pubsub.listen():
                    kind = message.get("type")
                    if kind == "psubscribe":
                        if self._ready.is_set():  # subscribed again: the connection broke
                            self._lost()
                        self._ready.set()
                        backoff = 0.1
                    elif kind == "pmessage":
                        self._deliver(message["channel"], message["data"])
            except asyncio.CancelledError:
                self._ready.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except (RedisError, OSError) as exc:
                if self._ready.is_set():
                    log.warning("result channel lost (%s); reconnecting", exc)
                    self._ready.clear()
                    self._lost()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _lost(self) -> None:
        """Replies published while the subscription was down never arrive: say so."""
        for inbox in self._inboxes.values():
            inbox.put_nowait(LOST)

    def _deliver(self, channel: bytes | str, data: bytes | str) -> None:
        """A reply on a request's own channel (a streamed piece), or replies to several
        requests at once on `<instance>.group` (`{"many": {request_id: reply}}`)."""
        name = channel.decode() if isinstance(channel, bytes) else channel
        try:
            reply = json.loads(data)
        except ValueError:
            log.error("undecodable reply on %s", name)
            return
        many = reply.get("many") if isinstance(reply, dict) else None
        if many is None:
            inbox = self._inboxes.get(name[len(self._prefix) :])
            if inbox is not None:  # else its request was answered or gave up already
                inbox.put_nowait(reply)
            return
        for request_id, one in many.items():
            inbox = self._inboxes.get(request_id)
            if inbox is not None:
                inbox.put_nowait(one)
