"""Shared response shapes of the list endpoints and the leader lease of background loops."""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio as aioredis
from fastapi.responses import JSONResponse


def list_page(data: list[dict[str, Any]], has_more: bool) -> JSONResponse:
    """OpenAI's cursor page: pass `last_id` back as `after` for the next one."""
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


class RedisLease:
    """One holder at a time among API processes, for loops that must not run twice
    at once; a holder that dies loses the lease when its TTL runs out."""

    def __init__(self, client: aioredis.Redis, key: str) -> None:
        self._client = client
        self._key = key
        self._me = os.urandom(8).hex()

    async def hold(self, ttl_s: float) -> bool:
        ms = int(ttl_s * 1000)
        if await self._client.set(self._key, self._me, nx=True, px=ms):
            return True
        owner = await self._client.get(self._key)
        if owner is not None and owner.decode() == self._me:
            await self._client.pexpire(self._key, ms)
            return True
        return False
