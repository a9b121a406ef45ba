"""The API's side of async jobs: submitting, showing and sending them.

Jobs go to `model.<name>.bulk`, a second queue every worker of the model
consumes after its interactive queue, with the job's priority as the message
priority within it. The job row is written before the message is sent: if the
send fails, the row is still there and the sweeper sends it later.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
import sqlalchemy.exc
from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from api.calls import CALLS
from app.celery_app import JOB_TASK
from app.errors import Overloaded
from app.jobs.models import Job, JobStatus
from app.jobs.store import JobStore, epoch_s
from app.keys import KeySpace
from app.registry import bulk_queue
from app.settings import Settings

log = logging.getLogger(__name__)

# kombu's Redis transport keeps one list per priority step; a message with
# priority p goes to the list of the step at or below it, 0 being served first.
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
KOMBU_PRIORITY_SEP = "\x06\x16"


def kombu_priority(job_priority: int) -> int:
    """Job priority 0-9 with 9 most urgent; kombu's Redis priority has 0 most urgent."""
    return 9 - job_priority


class JobQueue:
    def __init__(
        self,
        store: JobStore,
        celery: Celery,
        redis_client: aioredis.Redis,
        keys: KeySpace,
        settings: Settings,
    ) -> None:
        self.store = store
        self._celery = celery
        self._redis = redis_client
        self._keys = keys
        self._settings = settings

    async def send(self, job: Job) -> bool:
        """Queue the job's message; False (logged) when the broker is unreachable."""
        kwargs = {"job_id": job.id, "model": job.model, "task": job.task, "payload": job.payload}
        try:
            await asyncio.to_thread(
                self._celery.send_task,
                JOB_TASK,
                kwargs=kwargs,
                exchange="",
                routing_key=bulk_queue(job.model),
                priority=kombu_priority(job.priority),
            )
        except (OperationalError, RedisError, OSError) as exc:
            log.warning("could not queue job %s yet (%s); the sweeper retries", job.id, exc)
            return False
        try:
            await asyncio.to_thread(self.store.mark_sent, job.id)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            # Queued but not marked: the sweeper may send it once more, which is harmless.
            log.warning("could not mark job %s sent: %s", job.id, exc)
        return True

    async def admit(self, model: str) -> None:
        """Refuse (429) a job for a model whose bulk queue holds `max_queued_jobs` already.

        Jobs are durable, so this bound is far above the sync one; it keeps a runaway
        client from filling Redis' memory with messages no worker will reach for days.
        """
        limit = self._settings.max_queued_jobs
        try:
            depth = await self.bulk_depth(model)
        except (RedisError, OSError):
            return  # sending the job reports Redis being away
        if depth >= limit:
            raise Overloaded(
                f"model {model!r} has {depth} jobs waiting (limit {limit}); retry later",
                code="job_queue_full",
                retry_after=self._settings.overload_retry_after_s,
            )

    async def bulk_depth(self, model: str) -> int:
        """Messages waiting in a model's bulk queue, over all its priority lists."""
        base = self._keys.queue_list(bulk_queue(model))
        names = [base] + [f"{base}{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS[1:]]
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(name)
            lengths = await pipe.execute()
        return sum(int(n) for n in lengths)

    async def stop_running(self, job_id: str) -> None:
        """A running chat job stops within a few tokens once its cancel key is set."""
        try:
            await self._redis.set(self._keys.cancel(job_id), 1, ex=24 * 3600)
        except (RedisError, OSError) as exc:
            log.warning("could not signal job %s to stop: %s", job_id, exc)

    def view(self, job: Job, with_result: bool = True) -> dict[str, Any]:
        """The job object clients see; a succeeded job carries the sync response, except
        in a listing (`with_result=False`: `result` is null there)."""
        settings = self._settings
        result: dict[str, Any] | None = None
        if with_result and job.status == JobStatus.succeeded and job.result is not None:
            call = CALLS.get(job.endpoint)
            if call is None:  # a corpus shard: its result is a reference to its files
                result = job.result
            else:
                body = call.parse(job.request)
                created = epoch_s(job.created_at) or 0
                result = call.render(body, job.model, job.result, job.id, created)
        if job.status in (JobStatus.queued, JobStatus.running):
            expires = job.expires_at
        elif job.finished_at is not None and job.status != JobStatus.expired:
            expires = job.finished_at + timedelta(seconds=settings.job_retention_s)
        else:
            expires = None
        error = None
        if job.error:
            error = {k: job.error.get(k) for k in ("code", "message", "type", "param")}
        webhook = None
        if job.webhook_url:
            webhook = {
                "url": job.webhook_url,
                "status": job.webhook_status,
                "attempts": job.webhook_attempts,
                "last_error": job.webhook_error,
            }
        return {
            "id": job.id,
            "object": "job",
            "endpoint": job.endpoint,
            "model": job.model,
            "status": job.status,
            "priority": job.priority,
            "attempts": job.attempts,
            "created_at": epoch_s(job.created_at),
            "started_at": epoch_s(job.started_at),
            "finished_at": epoch_s(job.finished_at),
            "expires_at": epoch_s(expires),
            "metadata": job.meta,
            "error": error,
            "result": result,
            "webhook": webhook,
        }
