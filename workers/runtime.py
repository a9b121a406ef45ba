"""What a worker process loads once and every task uses: settings, model, engine, Redis."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from app import worker_stats
from app.batcher import BucketBatcher
from app.db import engine_for
from app.embedding import EmbeddingRunner, build_embedding_runner
from app.engines import load_engine
from app.engines.base import ChatEngine, EmbeddingEngine, RelayEngine, RerankEngine
from app.errors import InvalidRequest
from app.generation import GenerationRunner
from app.jobs.store import JobStore
from app.keys import KeySpace
from app.model_facts import publish_facts
from app.registry import ModelKind, ModelSpec, worker_model_spec
from app.replicas import (
    LOAD_ERROR_TTL_S,
    ReplicaAnnouncer,
    ReplicaInfo,
    load_error_record,
)
from app.rerank import RerankRunner, build_rerank_runner
from app.settings import Settings
from app.worker_stats import TokenRate
from workers.delivery import Deliveries
from workers.job_leases import JobLeases
from workers.lease import LeaseKeeper

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    settings: Settings
    keys: KeySpace
    spec: ModelSpec
    engine: EmbeddingEngine | RerankEngine | ChatEngine | RelayEngine
    client: redis.Redis
    info: ReplicaInfo
    deliveries: Deliveries
    lease: LeaseKeeper
    announcer: ReplicaAnnouncer
    embeddings: EmbeddingRunner | None
    rerank: RerankRunner | None
    chat: GenerationRunner | None = None
    relay_engine: RelayEngine | None = None
    #: Set when the relay engine's server stopped: this process is on its way out.
    server_down: threading.Event = field(default_factory=threading.Event)
    counters: dict[str, int] = field(default_factory=dict)
    counter_lock: threading.Lock = field(default_factory=threading.Lock)
    token_rate: TokenRate = field(default_factory=TokenRate)
    in_flight: int = 0
    _jobs: JobStore | None = None
    _job_leases: JobLeases | None = None

    def job_store(self) -> JobStore:
        """Opened on the first job: workers that only serve sync calls need no database."""
        with self.counter_lock:
            if self._jobs is None:
                self._jobs = JobStore(engine_for(self.settings))
            return self._jobs

    def job_leases(self) -> JobLeases:
        with self.counter_lock:
            if self._job_leases is None:
                self._job_leases = JobLeases(
                    self.job_store,
                    self.info.replica_id,
                    self.settings.job_lease_s,
                    self.settings.job_run_timeout_s,
                )
            return self._job_leases

    def replica_alive(self, replica_id: str) -> bool:
        return bool(self.client.exists(self.keys.replica_info(replica_id)))

    @property
    def batcher(self) -> BucketBatcher | None:  # type: ignore[type-arg]
        runner = self.embeddings or self.rerank
        return runner.batcher if runner else None

    def require_chat(self) -> GenerationRunner:
        if self.chat is None and self.relay_engine is None:
            raise InvalidRequest(f"model {self.spec.name!r} is not a chat model")
        return self.chat

    def hold_if_server_down(self) -> None:
        """A message taken after the server stopped is neither run nor answered: it
        stays unacknowledged until the process exits, and the broker gives it to
        another replica."""
        while self.server_down.is_set():
            time.sleep(1.0)

    def cancelled(self, request_id: str) -> bool:
        return bool(self.client.exists(self.keys.cancel(request_id)))

    def require_embeddings(self) -> EmbeddingRunner:
        if self.embeddings is None:
            raise InvalidRequest(f"model {self.spec.name!r} is not an embedding model")
        return self.embeddings

    def require_rerank(self) -> RerankRunner:
        if self.rerank is None:
            raise InvalidRequest(f"model {self.spec.name!r} is not a rerank model")
        return self.rerank

    def publish(self, request_id: str, message: dict[str, Any]) -> None:
        """A reply on the request's own channel: a streamed piece."""
        self.client.publish(self.keys.result_channel(request_id), json.dumps(message))

    def count(self, what: str, amount: int = 1) -> None:
        """Counted in memory; the heartbeat writes the totals to Redis."""
        with self.counter_lock:
            self.counters[what] = self.counters.get(what, 0) + amount

    @contextmanager
    def working(self, count: int = 1) -> Iterator[None]:
        """Counts requests and jobs in the engine right now (`in_flight` in the cluster view)."""
        with self.counter_lock:
            self.in_flight += count
        try:
            yield
        finally:
            with self.counter_lock:
                self.in_flight -= count

    def stats(self) -> dict[str, float]:
        with self.counter_lock:
            totals: dict[str, float] = dict(self.counters)
            totals["in_flight"] = self.in_flight
        batching = self.batcher.stats.as_dict() if self.batcher else {}
        if self.chat is not None:
            # Called once a heartbeat, which paces the rate's samples.
            generated = totals.setdefault(worker_stats.GENERATED_TOKENS, 0)
            totals[worker_stats.TOKENS_PER_SECOND] = self.token_rate.update(generated)
        return {**batching, **totals}


_runtime: WorkerRuntime | None = None


def load_runtime(settings: Settings) -> WorkerRuntime:
    """Load the model named by the worker's settings; called once per worker process."""
    global _runtime
    if not settings.worker_model:
        raise RuntimeError("INFERQ_WORKER_MODEL is not set; start workers with `inferq worker`")
    spec = worker_model_spec(settings)
    started = time.monotonic()
    engine = load_engine(spec, settings.worker_devices)
    log.info("loaded %s (%s) in %.1fs", spec.name, spec.engine, time.monotonic() - started)
    keys = KeySpace(settings.key_prefix)
    client = redis.Redis.from_url(settings.require_redis_url(), socket_timeout=10)
    try:
        client.delete(keys.model_error(spec.name))  # loaded: no longer blame the model
    except redis.RedisError as exc:
        log.warning("could not clear the model's last load failure: %s", exc)
    publish_facts(client, keys, spec, engine)
    info = ReplicaInfo(
        replica_id=uuid.uuid4().hex[:12],
        model=spec.name,
        host=socket.gethostname(),
        pid=os.getpid(),
        devices=settings.worker_devices,
        replica=settings.worker_replica,
        node=settings.worker_node,
        assignment=settings.worker_assignment,
    )
    lease = LeaseKeeper(client, keys.unacked_index, settings.visibility_timeout_s / 4)
    embeddings: EmbeddingRunner | None = None
    rerank: RerankRunner | None = None
    chat: GenerationRunner | None = None
    relay_engine: RelayEngine | None = None
    if isinstance(engine, RelayEngine):
        relay_engine = engine
    elif isinstance(engine, ChatEngine):
        chat = GenerationRunner(engine, spec.options.get("reasoning_parser"))
    elif spec.kind == ModelKind.rerank:
        rerank = build_rerank_runner(engine, spec.options, settings.batch_max_wait_ms)
    elif isinstance(engine, EmbeddingEngine):
        embeddings = build_embedding_runner(engine, spec.options, settings.batch_max_wait_ms)
    else:
        raise RuntimeError(f"engine {spec.engine!r} cannot serve {spec.kind} models")
    announcer = ReplicaAnnouncer(
        client, keys, info, settings.heartbeat_interval_s, settings.heartbeat_ttl_s
    )
    deliveries = Deliveries(client, keys, info.replica_id, info.label)
    _runtime = WorkerRuntime(
        settings, keys, spec, engine, client, info, deliveries, lease, announcer, embeddings,
        rerank, chat, relay_engine,
    )  # fmt: skip
    announcer.stats = _runtime.stats
    if relay_engine is not None:
        relay_engine.watch(lambda reason: server_stopped(_runtime, reason))
    return _runtime


#: How long the requests in flight get to hear that their server stopped.
SERVER_EXIT_GRACE_S = 5.0


def server_stopped(rt: WorkerRuntime | None, reason: str) -> None:
    """A relay engine's server stopped while serving: this replica is gone.

    The replica leaves the cluster view at once (no new work is routed to it), the
    requests it holds are answered with an error by their own threads (their
    connections to the server broke), the reason is left where the node agent and
    the API look for why a worker failed, and the process exits non-zero so that
    the node restarts it, like any other crash. Messages it held but had not
    started are not acknowledged: the broker hands them to another replica.
    """
    log.error("%s; this worker stops", reason)
    if rt is None:
        os._exit(4)
    rt.server_down.set()
    rt.announcer.stop()
    record_load_failure(rt.settings, RuntimeError(reason))
    deadline = time.monotonic() + SERVER_EXIT_GRACE_S
    while rt.in_flight and time.monotonic() < deadline:
        time.sleep(0.1)
    rt.lease.stop()
    if rt.relay_engine is not None:
        rt.relay_engine.close()
    logging.shutdown()
    os._exit(4)


def record_load_failure(settings: Settings, exc: BaseException) -> None:
    """Leave why the engine failed to load where the API and the node agent look
    (`keys.model_error`), so clients and operators see the reason, not just a 503."""
    if not settings.worker_model or not settings.redis_url:
        return
    reason = str(exc) or type(exc).__name__
    record = load_error_record(reason, socket.gethostname(), settings.worker_node, os.getpid())
    try:
        client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=2
        )
        key = KeySpace(settings.key_prefix).model_error(settings.worker_model)
        client.set(key, record, ex=LOAD_ERROR_TTL_S)
    except redis.RedisError as error:
        log.warning("could not record the load failure in Redis: %s", error)


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the worker runtime is not loaded")
    return _runtime
