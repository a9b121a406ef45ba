"""Worker-side bookkeeping against the real Redis: leases and the replica directory."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from app.keys import KeySpace
from app.replicas import ReplicaAnnouncer, ReplicaInfo, alive_replicas, count_alive
from workers.lease import LeaseKeeper


def test_lease_renewal_refreshes_held_messages_and_forgets_acked_ones(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    key = KeySpace(f"{key_prefix}-lease").unacked_index
    old = time.time() - 100
    redis_client.zadd(key, {"held": old, "acked": old, "someone-else": old})
    keeper = LeaseKeeper(redis_client, key, interval=60)
    keeper.hold("held")
    keeper.hold("acked")
    redis_client.zrem(key, "acked")  # kombu removes a message from the index on ack
    keeper.renew()
    assert redis_client.zscore(key, "held") > time.time() - 5
    assert redis_client.zscore(key, "someone-else") == old  # not ours: left to expire
    assert redis_client.zscore(key, "acked") is None  # never resurrected
    assert keeper.held == 1


def test_replica_heartbeat_expires_and_withdraws(
    redis_client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    keys = KeySpace(f"{key_prefix}-replicas")
    info = ReplicaInfo(replica_id="r1", model="m", host="h", pid=42, devices=["0"], replica=0)
    announcer = ReplicaAnnouncer(redis_client, keys, info, interval=0.1, ttl=0.6)

    async def alive() -> tuple[int, list[dict[str, object]]]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await count_alive(client, keys, "m"), await alive_replicas(client, keys, "m")
        finally:
            await client.aclose()

    announcer.start()
    time.sleep(0.8)  # longer than the ttl: the heartbeat keeps it alive
    count, entries = asyncio.run(alive())
    assert count == 1
    assert entries[0]["pid"] == 42 and entries[0]["devices"] == ["0"]
    announcer.stop()
    assert asyncio.run(alive())[0] == 0

    announcer2 = ReplicaAnnouncer(redis_client, keys, info, interval=10, ttl=0.3)
    announcer2.beat()  # one beat, then silence, as after SIGKILL
    assert asyncio.run(alive())[0] == 1
    time.sleep(0.4)
    assert asyncio.run(alive())[0] == 0


def test_a_leader_lease_stays_held_while_its_work_runs(redis_url: str, key_prefix: str) -> None:
    """Work longer than the lease's TTL keeps it (renewed while it runs): a second API
    process never takes it meanwhile, and takes it once the work is over."""
    from api.lease import RedisLease

    async def main() -> list[bool]:
        client = aioredis.Redis.from_url(redis_url)
        key = f"{key_prefix}:test:leader"
        first, second = RedisLease(client, key), RedisLease(client, key)
        seen: list[bool] = []

        async def work() -> None:
            for _ in range(12):  # 2.4 s, four TTLs
                seen.append(await second.hold(0.6))
                await asyncio.sleep(0.2)

        assert await first.hold(0.6)
        await first.run_held(work(), 0.6)
        await first.release()
        seen.append(await second.hold(0.6))
        await client.aclose()
        return seen

    seen = asyncio.run(main())
    assert seen == [False] * 12 + [True], seen
