"""Services built once per API process (in the lifespan) and handed to routes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from fastapi import Request

if TYPE_CHECKING:
    from api.bulk import BulkCoordinator
    from api.launcher import ModelLauncher

from api.admission import Admitted, QueueAdmission
from api.dispatch import Dispatcher
from api.history import ClusterHistory
from api.jobs import JobQueue
from api.results import ResultRouter
from app.errors import BackendUnavailable, InvalidRequest, ModelNotFound, backend_reason
from app.jobs.bulk_store import BulkStore
from app.jobs.files import FileStore
from app.jobs.migrate import SchemaBehind
from app.keyring import KeyRing
from app.keys import KeySpace
from app.prompt_size import PromptSizer, PromptSizers
from app.registry import ModelSpec, Registry
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class BulkServices:
    """Files, batches and corpus jobs: they share the job store's database."""

    files: FileStore
    store: BulkStore
    coordinator: BulkCoordinator


@dataclass
class Services:
    settings: Settings
    registry: Registry
    keys: KeySpace
    redis: aioredis.Redis
    router: ResultRouter
    dispatcher: Dispatcher
    # Async jobs need the job database; the sync API does not, so it serves without
    # one and the job routes answer 503 with what to do until `open_jobs` succeeds.
    keyring: KeyRing = field(default_factory=lambda: KeyRing([]))
    history: ClusterHistory = field(default_factory=ClusterHistory)
    launcher: ModelLauncher | None = None
    admission: QueueAdmission | None = None
    #: Models launched on nodes (POST /v1/models), refreshed from Redis every second.
    launched: dict[str, ModelSpec] = field(default_factory=dict)
    open_jobs: Callable[[], tuple[JobQueue, BulkServices]] | None = None
    jobs: JobQueue | None = None
    bulk: BulkServices | None = None
    jobs_problem: str | None = "the job store is not configured"
    started_at: int = field(default_factory=lambda: int(time.time()))
    _jobs_checked: float = 0.0
    _sizers: PromptSizers = field(default_factory=PromptSizers)
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def prompt_sizer(self, spec: ModelSpec) -> PromptSizer | None:
        return self._sizers.get(spec)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run clean-up outside the current (possibly cancelled) task, keeping a reference."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def try_open_jobs(self) -> JobQueue | None:
        if self.jobs is None and self.open_jobs is not None:
            self._jobs_checked = time.monotonic()
            try:
                self.jobs, self.bulk = self.open_jobs()
                self.jobs_problem = None
            except SchemaBehind as exc:
                self.jobs_problem = str(exc)
            except Exception as exc:
                # The driver's text names hosts and users: the log gets it, clients do not.
                log.warning("the job database cannot be opened: %s", exc)
                self.jobs_problem = f"the job database is unreachable: {backend_reason(exc)}"
        return self.jobs

    def require_jobs(self) -> JobQueue:
        if self.jobs is None and time.monotonic() - self._jobs_checked > 5.0:
            self.try_open_jobs()
        if self.jobs is None:
            raise BackendUnavailable(
                f"async jobs are unavailable: {self.jobs_problem}", code="job_store_unavailable"
            )
        return self.jobs

    def require_bulk(self) -> BulkServices:
        self.require_jobs()
        assert self.bulk is not None
        return self.bulk

    async def admit(self, spec: ModelSpec, work: int = 0, timeout: float | None = None) -> Admitted:
        """Refuse (429) a sync request for a model whose queue is full, or whose queued
        work would not let this one (`work` inputs) finish within `timeout`."""
        if self.admission is None:
            return Admitted()
        return await self.admission.admit(spec, work, timeout)

    def model_names(self) -> list[str]:
        """Registry models, then launched ones: every name a request may use."""
        return list(dict.fromkeys([*(m.name for m in self.registry.models), *self.launched]))

    def find_model(self, name: str) -> ModelSpec | None:
        return self.registry.get(name) or self.launched.get(name)

    async def refresh_launched(self) -> None:
        from api.cluster_reads import read_deployments

        deployments = await read_deployments(self.redis, self.keys)
        launched: dict[str, ModelSpec] = {}
        for uid, deployment in deployments.items():
            try:
                launched[uid] = ModelSpec.model_validate(deployment.spec)
            except ValueError as exc:  # written by another version; not servable here
                log.warning("ignoring launched model %r: %s", uid, exc)
        self.launched = launched

    def timeout_for(self, spec: ModelSpec, asked: float | None) -> float:
        """The model's request timeout (its registry entry's, else INFERQ_REQUEST_TIMEOUT_S);
        a caller's `X-Inferq-Timeout` may shorten it, or lengthen it up to
        INFERQ_MAX_REQUEST_TIMEOUT_S (a long reasoning answer needs minutes)."""
        own = spec.request_timeout_s or self.settings.request_timeout_s
        if asked is None:
            return own
        return min(asked, max(own, self.settings.max_request_timeout_s))

    def model(self, name: str, kind: str | None = None) -> ModelSpec:
        spec = self.find_model(name)
        if spec is None:
            raise ModelNotFound(f"the model {name!r} does not exist", param="model")
        if kind is not None and spec.kind != kind:
            raise InvalidRequest(
                f"the model {name!r} is a {spec.kind} model, not a {kind} model",
                param="model",
                code="wrong_model_kind",
            )
        return spec


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def services_of(request: Request) -> Services:
    """`get_services` as a dependency: async, so FastAPI calls it on the event loop
    instead of sending it to a worker thread (about 0.1 ms a request)."""
    return get_services(request)
