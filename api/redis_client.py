"""The API's Redis client: one bounded pool per process, where a busy pool means waiting.

redis-py's default pool raises "Too many connections" past 100 connections in
use, so a burst of a few hundred waiting requests (each checking its replica,
its queue, its cancel key) turned into 503s although Redis was up. A blocking
pool waits for a free connection instead; only a real outage (or a wait past
`redis_pool_timeout_s`) is an error. The bound is also kept to a share of the
server's `maxclients`, which every API process, worker and node draws on.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.settings import Settings

log = logging.getLogger(__name__)

#: The share of the server's maxclients one API process may hold: workers, nodes,
#: Flower and other API processes need theirs.
SERVER_SHARE = 8
MIN_CONNECTIONS = 8


def api_redis(settings: Settings) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.require_redis_url(),
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        socket_connect_timeout=2,
        socket_timeout=5,
    )
    return aioredis.Redis(connection_pool=pool)


async def fit_to_server(client: aioredis.Redis) -> int:
    """Shrink the pool to this process's share of the server's `maxclients`; the bound."""
    pool = client.connection_pool
    try:
        reply = await client.config_get("maxclients")
        server_max = int(reply.get("maxclients") or 0)
    except (RedisError, OSError, ValueError) as exc:
        # Managed Redis often refuses CONFIG: keep the configured bound.
        log.debug("cannot read the Redis server's maxclients: %s", exc)
        return int(pool.max_connections)
    share = max(MIN_CONNECTIONS, server_max // SERVER_SHARE) if server_max else 0
    if share and share < pool.max_connections:
        log.warning(
            "Redis allows %d clients; this API process keeps at most %d connections "
            "(INFERQ_REDIS_MAX_CONNECTIONS is %d)",
            server_max,
            share,
            pool.max_connections,
        )
        pool.max_connections = share
    return int(pool.max_connections)
