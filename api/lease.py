"""A leader lease in Redis for background loops that one API process runs at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

#: Take the lease if it is free, or extend it if it is ours: one step, so no other
#: process can take it between the check and the extension.
_HOLD = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class LeaseLost(Exception):
    """The lease ran out or was taken while work under it was still running."""


class RedisLease:
    """One holder at a time among API processes, for loops that must not run twice
    at once; a holder that dies loses the lease when its TTL runs out."""

    def __init__(self, client: aioredis.Redis, key: str) -> None:
        self._client = client
        self._key = key
        self._me = os.urandom(8).hex()

    async def hold(self, ttl_s: float) -> bool:
        ms = max(1, int(ttl_s * 1000))
        return bool(await self._client.eval(_HOLD, 1, self._key, self._me, ms))

    async def release(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.eval(_RELEASE, 1, self._key, self._me)

    async def run_held(self, work: Awaitable[None], ttl_s: float) -> None:
        """Run `work` while renewing the lease every third of its TTL; if a renewal
        fails, the work is cancelled before another holder's TTL could start, so two
        processes never run it at once. Raises LeaseLost then."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=ttl_s / 3)
                if done:
                    task.result()
                    return
                try:
                    held = await self.hold(ttl_s)
                except (RedisError, OSError) as exc:
                    log.warning("could not renew the lease %s: %s", self._key, exc)
                    held = False
                if not held:
                    raise LeaseLost(f"lost the lease {self._key} while its work ran")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
