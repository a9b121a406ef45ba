"""Batches and corpus jobs in the database, and the jobs they are made of.

A batch line or a corpus shard is an ordinary job row with `parent_id` set,
so it gets everything jobs have: one claim per delivery, takeover after a
worker dies, re-sending by the sweeper. Children are written, read and
counted in pages and by SQL aggregates: nothing here holds a whole batch or
corpus in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_factory
from app.jobs.models import ACTIVE, Batch, CorpusJob, Job, JobStatus
from app.jobs.store import utcnow

Parent = TypeVar("Parent", Batch, CorpusJob)
PAGE = 500


class BulkStore:
    def __init__(self, engine: Engine) -> None:
        self._sessions: sessionmaker[Session] = session_factory(engine)

    # ---- parents ------------------------------------------------------------------

    def add(self, parent: Batch | CorpusJob) -> None:
        with self._sessions() as session:
            session.add(parent)
            session.commit()

    def get(self, kind: type[Parent], parent_id: str, owner: str | None = None) -> Parent | None:
        with self._sessions() as session:
            row = session.get(kind, parent_id)
        if row is None or (owner is not None and row.owner != owner):
            return None
        return row

    def list(
        self, kind: type[Parent], owner: str, limit: int, after: str | None
    ) -> tuple[list[Parent], bool]:
        query = select(kind).where(kind.owner == owner)
        if after:
            query = query.where(kind.id < after)
        with self._sessions() as session:
            rows = list(session.scalars(query.order_by(kind.id.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def among(self, kind: type[Parent], ids: Sequence[str], statuses: Sequence[str]) -> set[str]:
        """Which of `ids` exist in one of `statuses`."""
        with self._sessions() as session:
            return set(
                session.scalars(select(kind.id).where(kind.id.in_(ids), kind.status.in_(statuses)))
            )

    def in_status(self, kind: type[Parent], statuses: Sequence[str]) -> list[Parent]:
        with self._sessions() as session:
            return list(
                session.scalars(select(kind).where(kind.status.in_(statuses)).order_by(kind.id))
            )

    def move(
        self, kind: type[Parent], parent_id: str, from_: Sequence[str], to: str, **values: Any
    ) -> bool:
        """Change status only from one of `from_` (a conditional UPDATE: one winner)."""
        with self._sessions() as session:
            done = session.execute(
                update(kind)
                .where(kind.id == parent_id, kind.status.in_(from_))
                .values(status=to, **values)
            ).rowcount
            session.commit()
        return bool(done)

    def release_children(
        self, kind: type[Parent], parent_id: str, from_: Sequence[str], to: str, **values: Any
    ) -> bool:
        """Move the parent on (as `move`) and make its held children sendable, in one
        transaction: either the parent started and all its children can run, or neither."""
        with self._sessions() as session:
            done = session.execute(
                update(kind)
                .where(kind.id == parent_id, kind.status.in_(from_))
                .values(status=to, **values)
            ).rowcount
            if done:
                session.execute(
                    update(Job)
                    .where(Job.parent_id == parent_id, Job.status == JobStatus.held)
                    .values(status=JobStatus.queued)
                )
            session.commit()
        return bool(done)

    def set(self, kind: type[Parent], parent_id: str, **values: Any) -> None:
        with self._sessions() as session:
            session.execute(update(kind).where(kind.id == parent_id).values(**values))
            session.commit()

    # ---- children -----------------------------------------------------------------

    def add_children(self, jobs: Sequence[Job]) -> list[Job]:
        """Insert a page of children; returns those refused as duplicates (custom_id)."""
        with self._sessions() as session:
            session.add_all(jobs)
            try:
                session.commit()
                return []
            except IntegrityError:
                session.rollback()
        refused: list[Job] = []
        for job in jobs:  # one at a time, to find which ones collide
            with self._sessions() as session:
                session.add(job)
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()
                    refused.append(job)
        return refused

    def delete_children(self, parent_id: str, held_only: bool = False) -> None:
        """Start a split or validation over (the last one was cut off part way), or drop
        the held children of a parent that failed before it released them."""
        query = delete(Job).where(Job.parent_id == parent_id)
        if held_only:
            query = query.where(Job.status == JobStatus.held)
        with self._sessions() as session:
            session.execute(query)
            session.commit()

    def unsent_children(self, parent_id: str, limit: int = PAGE) -> list[Job]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Job)
                    .where(Job.parent_id == parent_id, Job.sent_at.is_(None))
                    .where(Job.status == JobStatus.queued)
                    .order_by(Job.seq)
                    .limit(limit)
                )
            )

    def child_counts(self, parent_id: str) -> dict[str, int]:
        with self._sessions() as session:
            rows = session.execute(
                select(Job.status, func.count())
                .where(Job.parent_id == parent_id)
                .group_by(Job.status)
            )
            return {str(status): int(n) for status, n in rows}

    def child_done(self, parent_id: str, seq: int) -> bool:
        with self._sessions() as session:
            status = session.scalar(
                select(Job.status).where(Job.parent_id == parent_id, Job.seq == seq)
            )
        return status == JobStatus.succeeded

    def iter_children(self, parent_id: str, statuses: Sequence[str]) -> Iterator[Job]:
        """In input order, one page at a time."""
        last = -1
        while True:
            with self._sessions() as session:
                page = list(
                    session.scalars(
                        select(Job)
                        .where(Job.parent_id == parent_id, Job.seq > last)
                        .where(Job.status.in_(statuses))
                        .order_by(Job.seq)
                        .limit(PAGE)
                    )
                )
            if not page:
                return
            yield from page
            last = page[-1].seq or 0

    def cancel_children(self, parent_id: str) -> list[str]:
        """Cancel every unfinished child; returns the ids that were running."""
        now = utcnow()
        with self._sessions() as session:
            running = list(
                session.scalars(
                    select(Job.id).where(
                        Job.parent_id == parent_id, Job.status == JobStatus.running
                    )
                )
            )
            session.execute(
                update(Job)
                .where(Job.parent_id == parent_id, Job.status.in_([*ACTIVE, JobStatus.held]))
                .values(
                    status=JobStatus.cancelled,
                    finished_at=now,
                    error={"code": "cancelled", "message": "the batch was cancelled"},
                )
            )
            session.commit()
        return running

    def first_child_start(self, parent_id: str) -> datetime | None:
        with self._sessions() as session:
            return session.scalar(
                select(func.min(Job.started_at)).where(Job.parent_id == parent_id)
            )
