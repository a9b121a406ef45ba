"""Every read and write of the job table, for the API, the workers and the sweeper.

State changes are single conditional UPDATEs (`... WHERE status = 'queued'`), so
two processes racing for the same job cannot both win: a job is claimed by one
worker, finished once, cancelled or finished but never both. That is what makes
duplicate deliveries harmless and "exactly one result" true.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, case, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, sessionmaker

from app.db import session_factory
from app.errors import Conflict
from app.jobs.models import ACTIVE, FINISHED, Job, JobStatus, WebhookStatus


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def epoch_s(moment: datetime | None) -> int | None:
    """Unix seconds of a stored (naive UTC) timestamp, as the API shows times."""
    return None if moment is None else int(moment.replace(tzinfo=UTC).timestamp())


_id_lock = threading.Lock()
_last_us = 0


def sortable_id(prefix: str) -> str:
    """`<prefix>-` + microseconds (14 hex digits) + 48 random bits.

    Ids sort by creation time, strictly within a process (two ids in the same
    microsecond are made one apart), which is what list cursors rely on.
    """
    global _last_us
    with _id_lock:
        _last_us = max(time.time_ns() // 1000, _last_us + 1)
        stamp = _last_us
    return f"{prefix}-{stamp:014x}{os.urandom(6).hex()}"


def new_job_id() -> str:
    return sortable_id("job")


def request_fingerprint(request: dict[str, Any]) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class NewJob:
    owner: str
    endpoint: str
    model: str
    task: str
    priority: int
    request: dict[str, Any]
    payload: dict[str, Any]
    idempotency_key: str | None
    metadata: dict[str, Any] | None
    webhook_url: str | None
    ttl_s: float


@dataclass(frozen=True)
class Claim:
    job: Job | None
    reason: str  # "claimed", "taken_over", or why the delivery was dropped


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions: sessionmaker[Session] = session_factory(engine)

    # ---- API side ---------------------------------------------------------------

    def create(self, new: NewJob) -> tuple[Job, bool]:
        """Insert a job; with an idempotency key already used, return that job instead.

        Returns (job, created). The same key with a different request is a 409.
        """
        fingerprint = request_fingerprint(new.request)
        now = utcnow()
        job = Job(
            id=new_job_id(),
            owner=new.owner,
            endpoint=new.endpoint,
            model=new.model,
            task=new.task,
            status=JobStatus.queued,
            priority=new.priority,
            request=new.request,
            request_hash=fingerprint,
            payload=new.payload,
            idempotency_key=new.idempotency_key,
            meta=new.metadata,
            attempts=0,
            created_at=now,
            expires_at=now + timedelta(seconds=new.ttl_s),
            webhook_url=new.webhook_url,
            webhook_attempts=0,
        )
        with self._sessions() as session:
            session.add(job)
            try:
                session.commit()
                return job, True
            except IntegrityError:
                session.rollback()
                if new.idempotency_key is None:
                    raise
        existing = self.by_idempotency_key(new.owner, new.idempotency_key)
        if existing is None:  # deleted between the insert and the read: try once more
            return self.create(new)
        if existing.request_hash != fingerprint:
            raise Conflict(
                "this Idempotency-Key was already used with a different request",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return existing, False

    def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        with self._sessions() as session:
            return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        with self._sessions() as session:
            job = session.get(Job, job_id)
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job

    def list(
        self,
        owner: str,
        *,
        status: str | None = None,
        model: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> tuple[list[Job], bool]:
        """Newest first; `after` is the last id of the previous page. Results, requests
        and payloads are not loaded: a page of 100 jobs of large vectors would fill the
        API's memory (a client fetches one job for its result)."""
        query = (
            select(Job)
            .options(defer(Job.result), defer(Job.request), defer(Job.payload))
            .where(Job.owner == owner)
        )
        if status:
            query = query.where(Job.status == status)
        if model:
            query = query.where(Job.model == model)
        if after:
            query = query.where(Job.id < after)
        query = query.order_by(Job.id.desc()).limit(limit + 1)
        with self._sessions() as session:
            jobs = list(session.scalars(query))
        return jobs[:limit], len(jobs) > limit

    def mark_sent(self, job_id: str) -> None:
        with self._sessions() as session:
            session.execute(update(Job).where(Job.id == job_id).values(sent_at=utcnow()))
            session.commit()

    def cancel(self, job_id: str, owner: str) -> tuple[Job | None, str | None]:
        """Cancel a queued or running job. Returns (job, status it had before)."""
        with self._sessions() as session:
            before = session.scalar(select(Job.status).where(Job.id == job_id, Job.owner == owner))
            if before is None:
                return None, None
            if before in ACTIVE:
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status.in_(ACTIVE))
                    .values(
                        status=JobStatus.cancelled,
                        finished_at=utcnow(),
                        error={"code": "cancelled", "message": "the job was cancelled"},
                        webhook_status=_webhook_pending(),
                        webhook_next_at=utcnow(),
                    )
                )
                session.commit()
        return self.get(job_id), before

    # ---- worker side ------------------------------------------------------------

    def claim(
        self,
        job_id: str,
        replica_id: str,
        replica_alive: Callable[[str], bool],
        max_attempts: int,
        lease_s: float,
    ) -> Claim:
        """Take a delivered job for this replica, or say why the delivery is dropped.

        A queued job is claimed outright, with a lease of `lease_s` that its worker
        renews while it runs. A running job is taken over, its attempts growing, once
        its replica no longer lives or its lease ran out (the outcome could not be
        recorded, the attempt hangs), even on the replica that held it; past
        `max_attempts` it fails instead.
        """
        now = utcnow()
        lease_until = now + timedelta(seconds=lease_s)
        with self._sessions() as session:
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.queued)
                .values(
                    status=JobStatus.running,
                    attempts=Job.attempts + 1,
                    replica_id=replica_id,
                    started_at=now,
                    lease_until=lease_until,
                )
            ).rowcount
            session.commit()
            if claimed:
                return Claim(session.get(Job, job_id), "claimed")
            job = session.get(Job, job_id)
            if job is None:
                return Claim(None, "unknown")
            if job.status != JobStatus.running:
                return Claim(None, job.status)
            holder, held_until = job.replica_id, job.lease_until
            if held_until is None or held_until > now:
                if holder == replica_id:
                    return Claim(None, "duplicate")
                if holder and replica_alive(holder):
                    return Claim(None, "held")
            same_attempt = (
                Job.id == job_id,
                Job.status == JobStatus.running,
                _holder(holder),
                _lease(held_until),
            )
            if job.attempts >= max_attempts:
                session.execute(
                    update(Job)
                    .where(*same_attempt)
                    .values(
                        status=JobStatus.failed,
                        finished_at=now,
                        error={
                            "code": "worker_lost",
                            "message": f"the job's run ended without an outcome {job.attempts} "
                            f"time(s) (its worker stopped, hung or could not record it); "
                            f"giving up after {max_attempts} attempts",
                        },
                        webhook_status=_webhook_pending(),
                        webhook_next_at=now,
                    )
                )
                session.commit()
                return Claim(None, "attempts_exhausted")
            taken = session.execute(
                update(Job)
                .where(*same_attempt)
                .values(
                    attempts=Job.attempts + 1,
                    replica_id=replica_id,
                    started_at=now,
                    lease_until=lease_until,
                )
            ).rowcount
            session.commit()
            if not taken:
                return Claim(None, "raced")
            session.expire_all()
            return Claim(session.get(Job, job_id), "taken_over")

    def renew(self, job_ids: Collection[str], replica_id: str, lease_s: float) -> int:
        """Extend the leases of the jobs this replica runs; how many it still holds."""
        if not job_ids:
            return 0
        with self._sessions() as session:
            renewed = session.execute(
                update(Job)
                .where(
                    Job.id.in_(list(job_ids)),
                    Job.status == JobStatus.running,
                    Job.replica_id == replica_id,
                )
                .values(lease_until=utcnow() + timedelta(seconds=lease_s))
            ).rowcount
            session.commit()
        return int(renewed or 0)

    def finish(
        self,
        job_id: str,
        replica_id: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Record the outcome, only if this replica still holds the running job."""
        status = JobStatus.succeeded if error is None else JobStatus.failed
        with self._sessions() as session:
            done = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.status == JobStatus.running,
                    Job.replica_id == replica_id,
                )
                .values(
                    status=status,
                    result=result,
                    error=error,
                    finished_at=utcnow(),
                    webhook_status=_webhook_pending(),
                    webhook_next_at=utcnow(),
                )
            ).rowcount
            session.commit()
        return bool(done)

    def status_of(self, job_id: str) -> str | None:
        with self._sessions() as session:
            return session.scalar(select(Job.status).where(Job.id == job_id))

    # ---- sweeper side -----------------------------------------------------------

    def expire(self, retention_s: float) -> int:
        """Queued jobs past their expiry, and finished jobs past retention, expire."""
        now = utcnow()
        with self._sessions() as session:
            stale = session.execute(
                update(Job)
                .where(Job.status == JobStatus.queued, Job.expires_at < now)
                .values(
                    status=JobStatus.expired,
                    finished_at=now,
                    error={"code": "expired", "message": "the job was not started in time"},
                    webhook_status=_webhook_pending(),
                    webhook_next_at=now,
                )
            ).rowcount
            old = session.execute(
                update(Job)
                .where(
                    Job.status.in_(FINISHED),
                    Job.finished_at < now - timedelta(seconds=retention_s),
                )
                .values(status=JobStatus.expired, result=None, request={}, payload={})
            ).rowcount
            session.commit()
        return int(stale or 0) + int(old or 0)

    def purge(self, older_than_s: float) -> int:
        """Delete expired rows long gone, so the table does not grow for ever."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self._sessions() as session:
            gone = session.execute(
                delete(Job).where(Job.status == JobStatus.expired, Job.finished_at < cutoff)
            ).rowcount
            session.commit()
        return int(gone or 0)

    def queued_never_sent(self, limit: int = 500) -> Sequence[Job]:
        """Queued jobs whose message was never sent (the broker was down at submit).
        Sending marks them, so each sweep moves past the ones it sent."""
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Job)
                    .where(Job.status == JobStatus.queued, Job.sent_at.is_(None))
                    .order_by(Job.id)
                    .limit(limit)
                )
            )

    def models_sent_long_ago(self, older_than_s: float) -> list[str]:
        """Models with queued jobs sent more than `older_than_s` ago: their messages may
        have vanished, or may just wait their turn (the sweeper asks the queue)."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Job.model)
                    .where(Job.status == JobStatus.queued, Job.sent_at < cutoff)
                    .distinct()
                )
            )

    def queued_sent_long_ago(
        self, model: str, older_than_s: float, limit: int = 500
    ) -> Sequence[Job]:
        """One model's queued jobs sent more than `older_than_s` ago, oldest first: a model
        with a long backlog never keeps another model's lost jobs from being seen."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Job)
                    .where(
                        Job.status == JobStatus.queued,
                        Job.model == model,
                        Job.sent_at < cutoff,
                    )
                    .order_by(Job.id)
                    .limit(limit)
                )
            )

    def running_unheld(self, grace_s: float, limit: int = 500) -> Sequence[Job]:
        """Running jobs not sent again within `grace_s` whose lease ran out, or, claimed
        without a lease, that started longer ago: candidates for a takeover."""
        now = utcnow()
        cutoff = now - timedelta(seconds=grace_s)
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Job)
                    .where(
                        Job.status == JobStatus.running,
                        or_(Job.sent_at.is_(None), Job.sent_at < cutoff),
                        # A leased job is a candidate once its lease ran out: healthy long
                        # runs never fill the page ahead of lost ones.
                        or_(
                            Job.lease_until < now,
                            and_(Job.lease_until.is_(None), Job.started_at < cutoff),
                        ),
                    )
                    .order_by(Job.id)
                    .limit(limit)
                )
            )

    def webhooks_due(self, limit: int = 50) -> Sequence[Job]:
        now = utcnow()
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Job)
                    .where(
                        Job.webhook_status == WebhookStatus.pending,
                        Job.webhook_next_at <= now,
                    )
                    .order_by(Job.webhook_next_at)
                    .limit(limit)
                )
            )

    def webhook_attempted(
        self, job_id: str, *, delivered: bool, error: str | None, retry_in_s: float | None
    ) -> None:
        if delivered:
            status, next_at = WebhookStatus.delivered, None
        elif retry_in_s is None:
            status, next_at = WebhookStatus.failed, None
        else:
            status, next_at = WebhookStatus.pending, utcnow() + timedelta(seconds=retry_in_s)
        with self._sessions() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    webhook_status=status,
                    webhook_next_at=next_at,
                    webhook_attempts=Job.webhook_attempts + 1,
                    webhook_error=error,
                )
            )
            session.commit()

    def count_by_status(self) -> dict[str, int]:
        with self._sessions() as session:
            rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
            return {str(status): int(n) for status, n in rows}


def _holder(replica_id: str | None) -> Any:
    return Job.replica_id.is_(None) if replica_id is None else Job.replica_id == replica_id


def _lease(until: datetime | None) -> Any:
    return Job.lease_until.is_(None) if until is None else Job.lease_until == until


def _webhook_pending() -> Any:
    """Finishing a job with a webhook queues its delivery in the same UPDATE."""
    return case((Job.webhook_url.is_not(None), WebhookStatus.pending), else_=None)
