"""Requests that arrive together share a queue message, and each keeps its own answer.

Concurrent callers of one model are gathered by the API (api/coalesce.py) into one
message of the batched task; the worker claims, batches and answers them together.
What a caller sees must not change: its own vectors, its own error, its own usage.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np
import redis

from app.keys import KeySpace

GOOD = [f"request number {i} about queues and batches" for i in range(40)]


def _stats(redis_client: redis.Redis, prefix: str, field: str) -> int:
    keys = KeySpace(prefix)
    return sum(
        int(redis_client.hget(key, field) or 0)
        for key in redis_client.scan_iter(match=keys.replica_stats("*"))
    )


async def _fire(api: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=api, timeout=60, limits=limits) as http:
        return await asyncio.gather(*(http.post("/v1/embeddings", json=b) for b in bodies))


def test_concurrent_requests_share_messages_and_keep_their_own_answers(
    api: str, client: Any, reference_model: Any, redis_client: redis.Redis, key_prefix: str
) -> None:
    client.embeddings.create(model="minilm", input="warm up")
    time.sleep(1.0)  # counters reach Redis with each heartbeat (0.5 s here)
    messages_before = _stats(redis_client, key_prefix, "messages")
    received_before = _stats(redis_client, key_prefix, "received")
    bodies: list[dict[str, Any]] = [
        {"model": "minilm", "input": text, "encoding_format": "float"} for text in GOOD
    ]
    # Bad in ways only the worker sees: each must fail alone, not its message.
    bodies[7] = {"model": "minilm", "input": "token " * 300, "truncate": False}
    bodies[23] = {"model": "minilm", "input": "x", "dimensions": 64}
    for _ in range(3):  # rounds: the first may meet an idle model and leave alone
        replies = asyncio.run(_fire(api, bodies))
    time.sleep(1.0)
    expected = reference_model.encode(GOOD)
    for i, resp in enumerate(replies):
        if i == 7:
            assert resp.status_code == 400
            assert resp.json()["error"]["code"] == "context_length_exceeded"
        elif i == 23:
            assert resp.status_code == 400
            assert resp.json()["error"]["param"] == "dimensions"
        else:
            assert resp.status_code == 200, resp.text
            got = np.array(resp.json()["data"][0]["embedding"], dtype=np.float32)
            assert np.abs(got - expected[i]).max() < 1e-5, i
            tokens = len(reference_model.tokenizer(GOOD[i])["input_ids"])
            assert resp.json()["usage"]["prompt_tokens"] == tokens
    received = _stats(redis_client, key_prefix, "received") - received_before
    messages = _stats(redis_client, key_prefix, "messages") - messages_before
    assert received == 3 * len(bodies)
    assert 0 < messages < received / 2, (messages, received)
