"""The job sweeper: what keeps jobs moving when no request touches them.

Every few seconds one API process (whichever holds a short Redis lease) sends
jobs whose message was never sent or has vanished, sends again running jobs
whose lease ran out (worker died, hung, or could not record the outcome)
without the broker redelivering them, expires jobs past their
time, and delivers due webhooks. Each step is safe to repeat: the job store
lets only one delivery of a job run (app/jobs/store.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from api.jobs import JobQueue
from api.lease import LeaseLost, RedisLease
from api.webhooks import deliver
from app.jobs.store import utcnow
from app.keys import KeySpace
from app.settings import Settings

log = logging.getLogger(__name__)


class JobSweeper:
    def __init__(
        self,
        queue: JobQueue,
        redis_client: aioredis.Redis,
        keys: KeySpace,
        settings: Settings,
    ) -> None:
        self._queue = queue
        self._store = queue.store
        self._redis = redis_client
        self._keys = keys
        self._settings = settings
        self._lease = RedisLease(redis_client, f"{keys.prefix}:jobs:sweeper")
        self._webhook_lease = RedisLease(redis_client, f"{keys.prefix}:jobs:webhooks")
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None

    def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=self._settings.webhook_timeout_s)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._loop(), name="job-sweeper"),
            loop.create_task(self._webhook_loop(), name="job-webhooks"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http:
            await self._http.aclose()

    async def _loop(self) -> None:
        interval = self._settings.job_sweep_interval_s
        while True:
            try:
                if await self._lease.hold(interval * 3):
                    await self.sweep()
            except (RedisError, OSError, SQLAlchemyError) as exc:
                log.warning("job sweep failed: %s", exc)
            except Exception:
                log.exception("job sweep failed")
            await asyncio.sleep(interval)

    async def _webhook_loop(self) -> None:
        """Deliveries run apart from the sweep, under a lease of their own: a slow target
        delays other webhooks by its deadline at most, and never expiry or resending."""
        interval = self._settings.job_sweep_interval_s
        ttl = max(interval * 3, self._settings.webhook_timeout_s * 2)
        while True:
            try:
                if await self._webhook_lease.hold(ttl):
                    await self._webhook_lease.run_held(self._deliver_webhooks(), ttl)
            except (RedisError, OSError, SQLAlchemyError, LeaseLost) as exc:
                log.warning("webhook delivery round failed: %s", exc)
            except Exception:
                log.exception("webhook delivery round failed")
            await asyncio.sleep(interval)

    async def sweep(self) -> None:
        settings, store = self._settings, self._store
        await asyncio.to_thread(store.expire, settings.job_retention_s)
        # An expired job stays listed (without its result) for one more retention period.
        await asyncio.to_thread(store.purge, 2 * settings.job_retention_s)
        await self._resend_queued()
        await self._resend_orphaned()

    async def _resend_queued(self) -> None:
        """Never sent (the broker was down at submit), or sent but gone from the queue.

        Never-sent jobs come first, then each model on its own: a model whose queue
        holds a long backlog is skipped as a whole, so its waiting jobs never hide
        another model's lost ones."""
        store, after = self._store, self._settings.job_resend_after_s
        for job in await asyncio.to_thread(store.queued_never_sent):
            await self._queue.send(job)
        for model in await asyncio.to_thread(store.models_sent_long_ago, after):
            if await self._queue.bulk_depth(model) > 0:
                continue  # still waiting their turn, most likely
            for job in await asyncio.to_thread(store.queued_sent_long_ago, model, after):
                await self._queue.send(job)

    async def _resend_orphaned(self) -> None:
        """Running, but its replica is gone or its lease ran out (the attempt ended
        unrecorded, or hangs past the run timeout), and the broker has not redelivered it."""
        grace = self._settings.visibility_timeout_s * 2 + self._settings.job_resend_after_s
        jobs = await asyncio.to_thread(self._store.running_unheld, grace)
        now = utcnow()
        for job in jobs:
            leased = job.lease_until is None or job.lease_until > now
            replica = job.replica_id
            if leased and replica and await self._redis.exists(self._keys.replica_info(replica)):
                continue
            log.info("job %s lost its run; sending it again", job.id)
            await self._queue.send(job)

    async def _deliver_webhooks(self) -> None:
        jobs = await asyncio.to_thread(self._store.webhooks_due)
        if jobs and self._http is not None:
            await asyncio.gather(*(self._deliver(job) for job in jobs))

    async def _deliver(self, job: Any) -> None:
        settings = self._settings
        assert self._http is not None
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        try:
            view = self._queue.view(job)
        except Exception as exc:  # a job that cannot be shown is still marked attempted
            log.exception("job %s could not be rendered for its webhook", job.id)
            view, error = None, f"the job could not be rendered: {type(exc).__name__}"
        if view is not None:
            error = await deliver(
                self._http,
                job.webhook_url,
                view,
                settings.webhook_allow_loopback,
                settings.webhook_timeout_s,
                secret,
            )
        attempt = job.webhook_attempts + 1
        retry_in = None
        if error is not None and attempt < settings.webhook_max_attempts:
            retry_in = settings.webhook_backoff_s * 2 ** (attempt - 1)
        if error is not None:
            log.info("webhook for job %s failed (attempt %d): %s", job.id, attempt, error)
        await asyncio.to_thread(
            self._store.webhook_attempted,
            job.id,
            delivered=error is None,
            error=error,
            retry_in_s=retry_in,
        )
