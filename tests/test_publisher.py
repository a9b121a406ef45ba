"""The API's own publish writes the message kombu's Redis transport would have written."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import redis.asyncio as aioredis

from api.publisher import TaskPublisher
from app.celery_app import BATCHED_TASK, create_celery
from app.keys import KeySpace
from app.settings import Settings

#: Fields that differ between any two messages: ids, tags, where and when they were made.
#: (reply_to names a result queue: inferq's replies travel over pub/sub, not there.)
#: (The reprs stand for the kwargs in Flower: ours is a short summary, not the inputs.)
VARYING = {
    *("id", "root_id", "delivery_tag", "correlation_id", "origin", "expires", "expiration"),
    *("reply_to", "argsrepr", "kwargsrepr"),
}


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VARYING}
    return value


def test_the_envelope_matches_kombus(redis_url: str) -> None:
    prefix = f"iqt-pub-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, key_prefix=prefix)
    keys = KeySpace(prefix)
    celery = create_celery(settings)
    kwargs = {"model": "m", "task": "inferq.embeddings", "requests": [{"request_id": "a.b"}]}
    expires = datetime.now(UTC) + timedelta(seconds=30)
    # kombu's own path, as the API used to publish (routed by model to `model.m`).
    celery.send_task(
        BATCHED_TASK,
        kwargs=kwargs,
        exchange="",
        routing_key="model.m",
        expires=expires,
        headers={"inferq_trace": "t1"},
        ignore_result=True,
    )

    async def ours() -> None:
        client = aioredis.Redis.from_url(redis_url)
        publisher = TaskPublisher(celery, client, keys)
        message = publisher.message(
            BATCHED_TASK, "model.ours", kwargs, expires, {"inferq_trace": "t1"}, "m x1"
        )
        await publisher.publish("model.ours", message)
        await client.aclose()

    asyncio.run(ours())
    sync = redis.Redis.from_url(redis_url)
    try:
        theirs = json.loads(sync.rpop(keys.queue_list("model.m")))
        mine = json.loads(sync.rpop(keys.queue_list("model.ours")))
    finally:
        sync.delete(*sync.keys(f"{prefix}:*"))
    assert json.loads(base64.b64decode(mine["body"])) == json.loads(
        base64.b64decode(theirs["body"])
    )
    mine["properties"]["delivery_info"]["routing_key"] = "model.m"
    theirs_body, mine_body = theirs.pop("body"), mine.pop("body")
    assert theirs_body and mine_body
    assert _strip(mine) == _strip(theirs)
    assert mine["headers"]["kwargsrepr"] == "m x1"
    assert mine["properties"]["expiration"]
