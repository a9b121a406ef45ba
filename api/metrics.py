"""Prometheus metrics of the API and of the workers behind it, served at `GET /metrics`.

Two sources feed one registry per app (never prometheus_client's global one,
so several apps in one process, as in tests, keep their own figures):

- the API's own requests, counted by `MetricsMiddleware` as they pass;
- the cluster, read from Redis at scrape time by `ClusterCollector`: live
  replicas, queue depths, and what each live worker wrote into its
  `replica_stats` hash with its last heartbeat (field names in
  app/worker_stats.py). Workers are not scraped one by one: they may be out of
  a scraper's reach and come and go; every API process reports the same
  cluster-wide figures, so scraping any one of them is enough.

Worker figures are summed over a model's *live* replicas. When a replica
stops, its totals leave the sum, which Prometheus reads as a counter reset,
exactly as it would read a worker restart; `rate()` and `increase()` handle it.

Label values stay bounded: `endpoint` is the route's template
(`/v1/jobs/{job_id}`), never the raw path, and `model` is only ever a model the
API knows: the inference calls (api/calls.py, which jobs use too) name it with
`note_model` once it resolved, so a client cannot mint new series by sending
made-up names; other routes leave it empty.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import worker_stats as ws

if TYPE_CHECKING:
    from fastapi import FastAPI

    from api.services import Services

log = logging.getLogger(__name__)

#: Seconds; inference calls run from milliseconds (one embedding) to minutes
#: (a long streamed completion), so the buckets reach further than the defaults.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
UNMATCHED = "unmatched"
#: A scrape must answer even when Redis does not; the cluster part is left out then.
REFRESH_TIMEOUT_S = 3.0
#: A cluster read serves every scrape within this long of it.
SNAPSHOT_MAX_AGE_S = 1.0


# ---- requests -----------------------------------------------------------------------


class _RequestModel:
    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = ""


_request_model: contextvars.ContextVar[_RequestModel | None] = contextvars.ContextVar(
    "inferq_request_model", default=None
)


def note_model(name: str) -> None:
    """Label the current request with a model it resolved (a known one, so bounded).

    A mutable holder in a context variable reaches the middleware from wherever
    the route runs (its task, or a thread pool with a copied context)."""
    holder = _request_model.get()
    if holder is not None:
        holder.name = name


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("endpoint", "method", "model", "status")
        self.requests = Counter(
            "inferq_requests_total",
            "HTTP requests answered, by route template, model and status code.",
            labels,
            registry=registry,
        )
        self.errors = Counter(
            "inferq_request_errors_total",
            "HTTP requests answered with a status of 400 or more.",
            labels,
            registry=registry,
        )
        self.latency = Histogram(
            "inferq_request_duration_seconds",
            "Time from a request's arrival to the end of its response (streams included).",
            ("endpoint", "method", "model"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, endpoint: str, method: str, model: str, status: int, took: float) -> None:
        code = str(status)
        self.requests.labels(endpoint, method, model, code).inc()
        if status >= 400:
            self.errors.labels(endpoint, method, model, code).inc()
        self.latency.labels(endpoint, method, model).observe(took)


def route_template(scope: Scope) -> str:
    """The matched route's path template; the router leaves the route in the scope."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class MetricsMiddleware:
    """Counts and times every HTTP request; plain ASGI, so streamed bodies pass untouched.

    Timing ends when the app returns, i.e. after a stream's last byte. A request
    whose app raised is counted as the 500 the outer error handler answers; one
    cancelled before any response (the client left) as 499, nginx's code for it.
    """

    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        holder = _RequestModel()
        token = _request_model.set(holder)
        status: int | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            status = status or 500
            raise
        except BaseException:
            status = status or 499
            raise
        finally:
            _request_model.reset(token)
            self.metrics.observe(
                route_template(scope),
                scope.get("method", ""),
                holder.name,
                status or 500,
                time.perf_counter() - started,
            )


# ---- the cluster, from Redis --------------------------------------------------------


@dataclass
class ModelFigures:
    """What Redis says about one model at one scrape."""

    alive: int = 0
    depth: dict[str, int] = field(default_factory=dict)
    replicas: list[dict[str, float]] = field(default_factory=list)

    def total(self, name: str) -> float:
        return sum(stats.get(name, 0.0) for stats in self.replicas)

    def reports(self, name: str) -> bool:
        return any(name in stats for stats in self.replicas)

    def histogram(self, name: str) -> tuple[list[tuple[str, float]], float] | None:
        """Buckets added up over the replicas, in `le` order, and the sum; None if no
        replica reports this histogram."""
        mark = f"{name}{ws.BUCKET_MARK}"
        counts: dict[float, float] = {}
        total_sum = 0.0
        seen = False
        for stats in self.replicas:
            for key, value in stats.items():
                if key.startswith(mark):
                    seen = True
                    bound = float(key[len(mark) :])
                    counts[bound] = counts.get(bound, 0.0) + value
            total_sum += stats.get(f"{name}_sum", 0.0)
        if not seen:
            return None
        if math.inf not in counts:  # a malformed report; keep the exposition valid
            counts[math.inf] = max(counts.values(), default=0.0)
        buckets = [(floatToGoString(b), counts[b]) for b in sorted(counts)]
        return buckets, total_sum


@dataclass
class ClusterSnapshot:
    models: dict[str, ModelFigures]
    redis_up: bool


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _decode(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def read_cluster(services: Services) -> ClusterSnapshot:
    """Two pipelined round trips whatever the cluster's size, plus a key scan (the same
    reads as /v1/cluster: api/cluster_reads.py).

    Models: the registry's, the launched ones, and any other that has a live
    replica (a worker started by hand with its own registry)."""
    from api.cluster_reads import queue_depths, read_replicas

    client, keys = services.redis, services.keys
    declared = {spec.name for spec in services.registry.models}
    names: set[str] = set(declared)
    prefix = keys.replicas("")
    async for raw in client.scan_iter(match=f"{_glob_escape(prefix)}*", count=1000):
        names.add(_decode(raw)[len(prefix) :])
    names.update(_decode(uid) for uid in await client.hkeys(keys.deployments))
    ordered = sorted(names)
    replicas = await read_replicas(client, keys, ordered)
    depths = await queue_depths(client, keys, ordered)
    models: dict[str, ModelFigures] = {}
    for name in ordered:
        interactive, bulk = depths.get(name, (0, 0))
        live = replicas.get(name, [])
        figures = ModelFigures(alive=len(live), depth={"interactive": interactive, "bulk": bulk})
        # A model nobody declared or launched shows only while it has replicas.
        if figures.alive or name in declared or interactive or bulk:
            figures.replicas.extend(r["stats"] for r in live if r.get("stats"))
            models[name] = figures
    return ClusterSnapshot(models, redis_up=True)


class ClusterCollector(Collector):
    """Serves the snapshot the /metrics route refreshed just before it generated.

    Collectors are called synchronously, and the API's Redis client is async,
    so the route awaits `refresh` first; between scrapes nothing is kept fresh
    and nothing runs. A snapshot serves every scrape within a second of it."""

    def __init__(self, max_age_s: float = SNAPSHOT_MAX_AGE_S) -> None:
        self.snapshot: ClusterSnapshot | None = None
        self._max_age_s = max_age_s
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self, services: Services) -> None:
        """Read the cluster unless a read younger than `max_age_s` stands: /metrics needs
        no key, so scrapers (or anyone) hitting it in a loop cost Redis one read a second,
        and concurrent scrapes share the read in progress."""
        async with self._lock:
            if time.monotonic() - self._read_at < self._max_age_s:
                return
            try:
                self.snapshot = await asyncio.wait_for(read_cluster(services), REFRESH_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("metrics: could not read the cluster from Redis: %s", exc)
                self.snapshot = ClusterSnapshot({}, redis_up=False)
            self._read_at = time.monotonic()

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        up = GaugeMetricFamily(
            "inferq_redis_up", "1 when the last scrape could read the cluster from Redis."
        )
        up.add_metric([], 1.0 if snap and snap.redis_up else 0.0)
        yield up
        if snap is None:
            return
        yield from _cluster_families(snap.models)


def _cluster_families(models: dict[str, ModelFigures]) -> Iterator[Metric]:
    alive = GaugeMetricFamily(
        "inferq_replicas_alive", "Replicas of the model with a live heartbeat.", labels=["model"]
    )
    depth = GaugeMetricFamily(
        "inferq_queue_depth",
        "Messages waiting in the model's queue: interactive (sync calls) or bulk (jobs).",
        labels=["model", "queue"],
    )
    tasks = CounterMetricFamily(
        "inferq_worker_tasks",
        "Tasks seen by the model's live replicas, by outcome (app/worker_stats.py).",
        labels=["model", "outcome"],
    )
    generated = CounterMetricFamily(
        "inferq_generated_tokens",
        "Completion tokens generated by the model's live replicas.",
        labels=["model"],
    )
    rate = GaugeMetricFamily(
        "inferq_tokens_per_second",
        f"Tokens generated per second by the model's live replicas over the last "
        f"{ws.RATE_WINDOW_S:g}s, as the workers measure it.",
        labels=["model"],
    )
    in_flight = GaugeMetricFamily(
        "inferq_worker_in_flight",
        "Requests and jobs in the model's engines at the last heartbeat.",
        labels=["model"],
    )
    batches = CounterMetricFamily(
        "inferq_batches", "Batches the model's live replicas ran.", labels=["model"]
    )
    batch_failures = CounterMetricFamily(
        "inferq_batch_failures",
        "Batches that failed and were retried request by request.",
        labels=["model"],
    )
    batch_tokens = CounterMetricFamily(
        "inferq_batch_tokens",
        "Tokens in the model's batches: real (input) or computed (with padding).",
        labels=["model", "kind"],
    )
    sizes = HistogramMetricFamily(
        "inferq_batch_size", "Inputs per batch the model's live replicas ran.", labels=["model"]
    )
    efficiency = HistogramMetricFamily(
        "inferq_padding_efficiency",
        "Real tokens over computed (padded) tokens, per batch.",
        labels=["model"],
    )
    for name, fig in sorted(models.items()):
        alive.add_metric([name], fig.alive)
        for queue, n in fig.depth.items():
            depth.add_metric([name, queue], n)
        if not fig.replicas:
            continue
        for outcome in ws.TASK_OUTCOMES:
            tasks.add_metric([name, outcome], fig.total(outcome))
        if fig.reports(ws.GENERATED_TOKENS):
            generated.add_metric([name], fig.total(ws.GENERATED_TOKENS))
            rate.add_metric([name], fig.total(ws.TOKENS_PER_SECOND))
        if fig.reports(ws.IN_FLIGHT):
            in_flight.add_metric([name], fig.total(ws.IN_FLIGHT))
        if fig.reports(ws.BATCHES):
            batches.add_metric([name], fig.total(ws.BATCHES))
            batch_failures.add_metric([name], fig.total(ws.BATCH_FAILURES))
            batch_tokens.add_metric([name, "real"], fig.total(ws.REAL_TOKENS))
            batch_tokens.add_metric([name, "computed"], fig.total(ws.COMPUTED_TOKENS))
        for family, histogram in ((sizes, ws.BATCH_SIZE), (efficiency, ws.PADDING_EFFICIENCY)):
            found = fig.histogram(histogram)
            if found:
                family.add_metric([name], found[0], found[1])
    yield from (alive, depth, tasks, generated, rate, in_flight, batches, batch_failures)
    yield from (batch_tokens, sizes, efficiency)


# ---- wiring -------------------------------------------------------------------------


@dataclass
class ApiMetrics:
    registry: CollectorRegistry
    requests: RequestMetrics
    cluster: ClusterCollector


def install_metrics(app: FastAPI) -> ApiMetrics:
    """A registry of the app's own, the request middleware, and the cluster collector."""
    registry = CollectorRegistry(auto_describe=False)
    metrics = ApiMetrics(registry, RequestMetrics(registry), ClusterCollector())
    registry.register(metrics.cluster)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics.requests)
    return metrics
