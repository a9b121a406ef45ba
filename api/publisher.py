"""Celery task messages put on a model's queue straight from the event loop.

Celery's `send_task` publishes through kombu's Redis transport, which is
synchronous: from the API it ran in a thread, and that hop with kombu's
producer machinery cost about 1.5 ms of CPU per request (bench/overhead.py).
Here Celery still builds the task message (`amqp.as_task_v2`: protocol 2
headers and body); only kombu's Redis envelope around it is written out, and
the message is LPUSHed on the queue's list with the API's async client, as
kombu does for the anonymous exchange. `tests/test_publisher.py` checks the
envelope against the one kombu itself makes.

Task-sent events (Flower's "sent" state) are not sent for these messages;
workers still send the received/started/succeeded events Flower shows.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from celery import Celery

from app.keys import KeySpace


def envelope(
    headers: dict[str, Any],
    properties: dict[str, Any],
    body: Any,
    queue: str,
    ttl_s: float,
) -> dict[str, Any]:
    """kombu's Redis message around a Celery task message: JSON body, base64 encoded,
    delivered by the anonymous exchange with the queue's name as routing key, with
    the message TTL Celery derives from `expires`."""
    data = json.dumps(body).encode()
    return {
        "body": base64.b64encode(data).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": 2,
            "expiration": str(max(0, int(ttl_s * 1000))),
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


class TaskPublisher:
    def __init__(self, celery: Celery, client: aioredis.Redis, keys: KeySpace) -> None:
        self._amqp = celery.amqp
        self._client = client
        self._keys = keys

    def message(
        self,
        task: str,
        queue: str,
        kwargs: dict[str, Any],
        expires: datetime,
        headers: dict[str, Any] | None = None,
        summary: str = "",
    ) -> str:
        """The message as the queue's list holds it. `summary` stands in for the kwargs in
        Flower: a short line, neither the inputs nor a repr of them."""
        task_id = str(uuid.uuid4())
        built = self._amqp.as_task_v2(
            task_id,
            task,
            kwargs=kwargs,
            expires=expires,
            ignore_result=True,
            argsrepr="()",
            kwargsrepr=summary or task,
        )
        message_headers = {**built.headers, **(headers or {})}
        ttl_s = (expires - datetime.now(UTC)).total_seconds()
        return json.dumps(envelope(message_headers, built.properties, built.body, queue, ttl_s))

    async def publish(self, queue: str, message: str) -> None:
        await self._client.lpush(self._keys.queue_list(queue), message)
