"""Delivery of worker replies to the requests waiting for them.

Each API process pattern-subscribes once to `result:<instance>.*` and request
ids are `<instance>.<uuid>`, so a reply channel is live before any task is
queued (no per-request SUBSCRIBE round trip, no race with a fast worker), and
a reply that arrives after its request gave up finds no inbox and is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.keys import KeySpace

log = logging.getLogger(__name__)


class ResultRouter:
    def __init__(self, client: aioredis.Redis, keys: KeySpace) -> None:
        self._client = client
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

    def new_request_id(self) -> str:
        return f"{self.instance}.{uuid.uuid4().hex}"

    def open_inbox(self, request_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._inboxes[request_id] = queue
        return queue

    def close_inbox(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.psubscribe(self._pattern)
                async for message in pubsub.listen():
                    kind = message.get("type")
                    if kind == "psubscribe":
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
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _deliver(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        inbox = self._inboxes.get(name[len(self._prefix) :])
        if inbox is None:
            return  # its request has already been answered or given up
        try:
            inbox.put_nowait(json.loads(data))
        except ValueError:
            log.error("undecodable reply on %s", name)
