"""The replica directory in Redis: which workers are alive for which model.

Workers announce themselves with a heartbeat that expires; the API counts live
replicas before it queues work, so a model with no replica fails fast with 503
instead of waiting out its timeout.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from app.keys import KeySpace

log = logging.getLogger(__name__)


@dataclass
class ReplicaInfo:
    replica_id: str
    model: str
    host: str
    pid: int
    devices: list[str]
    replica: int
    started_at: float = field(default_factory=time.time)
    state: str = "ready"
    #: The node agent that started this worker, and the launch assignment it serves
    #: ("" for workers started by hand or by `inferq up`).
    node: str = ""
    assignment: str = ""

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}"


class ReplicaAnnouncer:
    """Keeps one worker's entry alive with a heartbeat thread; removes it on stop."""

    def __init__(
        self,
        client: redis.Redis,
        keys: KeySpace,
        info: ReplicaInfo,
        interval: float,
        ttl: float,
        stats: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.stats = stats
        self._client = client
        self._keys = keys
        self.info = info
        self._interval = interval
        self._ttl = ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inferq-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        now = time.time()
        zkey = self._keys.replicas(self.info.model)
        pipe = self._client.pipeline(transaction=False)
        pipe.zadd(zkey, {self.info.replica_id: now + self._ttl})
        pipe.zremrangebyscore(zkey, "-inf", now)
        pipe.set(
            self._keys.replica_info(self.info.replica_id),
            json.dumps(asdict(self.info)),
            px=int(self._ttl * 1000),
        )
        stats = self.stats() if self.stats else {}
        if stats:
            stats_key = self._keys.replica_stats(self.info.replica_id)
            pipe.hset(stats_key, mapping=stats)
            pipe.pexpire(stats_key, int(self._ttl * 1000))  # gone with a dead replica
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except redis.RedisError as exc:  # Redis away: keep trying, the entry just expires
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        # A beat in flight would re-announce the replica after it is withdrawn.
        if self._thread.is_alive():
            self._thread.join(5)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(self._keys.replicas(self.info.model), self.info.replica_id)
            pipe.delete(self._keys.replica_info(self.info.replica_id))
            pipe.delete(self._keys.replica_stats(self.info.replica_id))
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not withdraw replica %s: %s", self.info.replica_id, exc)


async def count_alive(client: aioredis.Redis, keys: KeySpace, model: str) -> int:
    return int(await client.zcount(keys.replicas(model), time.time(), "+inf"))


async def alive_replicas(
    client: aioredis.Redis, keys: KeySpace, model: str
) -> list[dict[str, Any]]:
    ids = await client.zrangebyscore(keys.replicas(model), time.time(), "+inf")
    if not ids:
        return []
    raw = await client.mget(
        [keys.replica_info(i.decode() if isinstance(i, bytes) else i) for i in ids]
    )
    return [json.loads(r) for r in raw if r]


#: How long a load failure is remembered: a worker that keeps failing renews it on every
#: attempt, and a model that was fixed (or given up on) is not blamed for ever.
LOAD_ERROR_TTL_S = 300
#: The longest reason kept: enough for an exception's message, not a whole traceback.
LOAD_ERROR_MAX_CHARS = 1000


def load_error_record(reason: str, host: str, node: str, pid: int) -> str:
    """What a worker whose engine failed to load leaves in Redis (`keys.model_error`)."""
    record = {"reason": reason[:LOAD_ERROR_MAX_CHARS], "host": host, "node": node, "pid": pid}
    return json.dumps({**record, "time": time.time()})


def parse_load_error(raw: bytes | str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("reason") else None


def describe_load_error(model: str, record: dict[str, Any]) -> str:
    """`model 'x' failed to load on host h (node n): <reason>`: what clients are told."""
    where = f"host {record.get('host') or '?'}"
    if record.get("node"):
        where += f" (node {record['node']})"
    return f"model {model!r} failed to load on {where}: {record['reason']}"


async def read_load_errors(
    client: aioredis.Redis, keys: KeySpace, models: list[str]
) -> dict[str, dict[str, Any]]:
    """The recent load failure of each model that has one."""
    if not models:
        return {}
    raw = await client.mget([keys.model_error(m) for m in models])
    found = {model: parse_load_error(value) for model, value in zip(models, raw, strict=True)}
    return {model: record for model, record in found.items() if record}
