"""A leader lease in Redis for background loops that one API process runs at a time."""

from __future__ import annotations

import os

import redis.asyncio as aioredis


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
