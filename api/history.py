"""The last minutes of every model, for the console's charts: queue depth, requests and
tokens per second, batch size, padding efficiency and replicas alive against wanted.

Each API process samples what it already reads for `/v1/cluster` (replica counters
from the heartbeats, queue lengths) every `SAMPLE_S` and keeps `KEEP` samples in
memory: no store of its own, and an API that restarts starts its charts afresh.
Rates come from the counters' growth per replica between two samples, so a
replica that restarts (its counters start again at zero) counts from its next
sample on rather than as a negative rate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from app import worker_stats as ws

log = logging.getLogger(__name__)

#: Seconds between samples, and samples kept: ten minutes.
SAMPLE_S = 5.0
KEEP = 120

#: The counters whose growth the charts show, per replica.
COUNTED = ("answered", "failed", ws.GENERATED_TOKENS, ws.REAL_TOKENS, ws.COMPUTED_TOKENS)
BATCHING = (ws.BATCHES, ws.BATCHED_ITEMS)


class Replicas(Protocol):
    """What a sample reads of the cluster state (api.cluster_reads.ClusterState), named
    by shape: that module's imports reach api.services, which holds this history."""

    replicas: dict[str, list[dict[str, Any]]]


@dataclass
class _Seen:
    time: float
    counters: dict[str, float]


def _grown(now: dict[str, float], before: dict[str, float], name: str) -> float:
    return max(0.0, now.get(name, 0.0) - before.get(name, 0.0))


class ClusterHistory:
    def __init__(self, keep: int = KEEP) -> None:
        self._keep = keep
        self._series: dict[str, deque[dict[str, Any]]] = {}
        self._seen: dict[str, _Seen] = {}

    def record(
        self,
        now: float,
        state: Replicas,
        depths: dict[str, tuple[int, int]],
        wanted: dict[str, int],
    ) -> None:
        alive_ids: set[str] = set()
        for model, want in wanted.items():
            grown = dict.fromkeys((*COUNTED, *BATCHING), 0.0)
            span = 0.0
            replicas = state.replicas.get(model, [])
            for replica in replicas:
                rid = str(replica.get("replica_id"))
                alive_ids.add(rid)
                counters = {k: float(v) for k, v in (replica.get("stats") or {}).items()}
                seen = self._seen.get(rid)
                self._seen[rid] = _Seen(now, counters)
                if seen is None:
                    continue
                span = max(span, now - seen.time)
                for name in grown:
                    grown[name] += _grown(counters, seen.counters, name)
            interactive, bulk = depths.get(model, (0, 0))
            sample: dict[str, Any] = {
                "t": round(now, 3),
                "queue_depth": interactive,
                "bulk_queue_depth": bulk,
                "replicas_alive": len(replicas),
                "replicas_wanted": want,
                "requests_per_s": None,
                "tokens_per_s": None,
                "batch_size": None,
                "padding_efficiency": None,
            }
            if span > 0:
                sample["requests_per_s"] = round((grown["answered"] + grown["failed"]) / span, 3)
                tokens = grown[ws.GENERATED_TOKENS] or grown[ws.REAL_TOKENS]
                sample["tokens_per_s"] = round(tokens / span, 1)
            if grown[ws.BATCHES]:
                sample["batch_size"] = round(grown[ws.BATCHED_ITEMS] / grown[ws.BATCHES], 2)
            if grown[ws.COMPUTED_TOKENS]:
                efficiency = grown[ws.REAL_TOKENS] / grown[ws.COMPUTED_TOKENS]
                sample["padding_efficiency"] = round(efficiency, 4)
            self._series.setdefault(model, deque(maxlen=self._keep)).append(sample)
        for rid in set(self._seen) - alive_ids:
            del self._seen[rid]
        for model in set(self._series) - set(wanted):
            del self._series[model]

    def series(self) -> dict[str, list[dict[str, Any]]]:
        return {model: list(samples) for model, samples in self._series.items()}


async def keep_sampling(
    history: ClusterHistory,
    read: Callable[[], Awaitable[tuple[Replicas, dict[str, tuple[int, int]], dict[str, int]]]],
    every: float = SAMPLE_S,
) -> None:
    """Sample until cancelled; a sample Redis cannot give is skipped, not fatal."""
    while True:
        try:
            state, depths, wanted = await read()
            history.record(time.time(), state, depths, wanted)
        except (RedisError, OSError) as exc:
            log.debug("no history sample: %s", exc)
        except Exception:  # a model terminated mid-read, say: the next sample is whole
            log.exception("no history sample")
        await asyncio.sleep(every)
