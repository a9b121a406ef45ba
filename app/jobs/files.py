"""Stored files: metadata in the database, bytes on disk under the files directory.

Uploads are written in chunks to a temporary file beside the final one and
renamed when complete, so a file is either whole or absent, and memory use
does not depend on its size. A file may carry an expiry, after which the
coordinator's housekeeping deletes it (api/bulk.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_factory
from app.errors import InferqError, PayloadTooLarge
from app.jobs.models import FileRecord
from app.jobs.store import sortable_id, utcnow


def _too_large(limit: int) -> Callable[[], InferqError]:
    return lambda: PayloadTooLarge(
        f"the file is larger than {limit} bytes (INFERQ_MAX_UPLOAD_BYTES)", param="file"
    )


def new_file_id() -> str:
    return sortable_id("file")


def fsync_replace(tmp: Path, final: Path) -> None:
    """Make `tmp` durable, then atomically give it its final name."""
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    tmp.replace(final)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    def __init__(self, engine: Engine, root: Path) -> None:
        self.root = root
        self._sessions: sessionmaker[Session] = session_factory(engine)

    def path_of(self, record: FileRecord) -> Path:
        return self.root / record.path

    def _place(self, file_id: str) -> tuple[str, Path]:
        relative = f"{file_id[-2:]}/{file_id}"
        final = self.root / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        return relative, final

    async def save_stream(
        self,
        owner: str,
        purpose: str,
        filename: str,
        chunks: AsyncIterator[bytes],
        limit: int,
        expires_after: timedelta | None = None,
        too_large: Callable[[], InferqError] | None = None,
    ) -> FileRecord:
        """Write the upload beside its final place and record it; writing, fsync and the
        commit run in threads, never on the event loop."""
        file_id = new_file_id()
        relative, final = await asyncio.to_thread(self._place, file_id)
        tmp = final.with_suffix(".part")
        size = 0
        out = await asyncio.to_thread(tmp.open, "wb")
        try:
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise (too_large or _too_large(limit))()
                    await asyncio.to_thread(out.write, chunk)
            finally:
                await asyncio.to_thread(out.close)
            await asyncio.to_thread(fsync_replace, tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return await asyncio.to_thread(
            self._record, file_id, owner, purpose, filename, size, relative, expires_after
        )

    def usage(self, owner: str) -> tuple[int, int]:
        """(files, bytes) the owner keeps, uploaded and produced."""
        with self._sessions() as session:
            count, total = session.execute(
                select(func.count(), func.coalesce(func.sum(FileRecord.bytes), 0)).where(
                    FileRecord.owner == owner
                )
            ).one()
        return int(count), int(total)

    def delete_expired(self, limit: int = 500) -> int:
        """Delete files past their `expires_at`, rows and bytes; how many went."""
        with self._sessions() as session:
            expired = list(
                session.scalars(
                    select(FileRecord)
                    .where(FileRecord.expires_at.is_not(None), FileRecord.expires_at < utcnow())
                    .limit(limit)
                )
            )
            for record in expired:
                session.delete(record)
            session.commit()
        for record in expired:
            self.path_of(record).unlink(missing_ok=True)
        return len(expired)

    def adopt(self, owner: str, purpose: str, filename: str, source: Path) -> FileRecord:
        """Register a file a job produced, moving it into the store durably."""
        file_id = new_file_id()
        relative, final = self._place(file_id)
        with source.open("rb+") as handle:
            os.fsync(handle.fileno())
        shutil.move(str(source), final)
        return self._record(file_id, owner, purpose, filename, final.stat().st_size, relative)

    def _record(
        self,
        file_id: str,
        owner: str,
        purpose: str,
        filename: str,
        size: int,
        relative: str,
        expires_after: timedelta | None = None,
    ) -> FileRecord:
        created = utcnow()
        record = FileRecord(
            id=file_id,
            owner=owner,
            purpose=purpose,
            filename=filename,
            bytes=size,
            path=relative,
            created_at=created,
            # OpenAI's anchor is the file's created_at, whatever the upload took.
            expires_at=created + expires_after if expires_after else None,
        )
        with self._sessions() as session:
            session.add(record)
            session.commit()
        return record

    def get(self, file_id: str, owner: str | None = None) -> FileRecord | None:
        with self._sessions() as session:
            record = session.get(FileRecord, file_id)
        if record is None or (owner is not None and record.owner != owner):
            return None
        return record

    def list(
        self, owner: str, purpose: str | None, limit: int, after: str | None
    ) -> tuple[list[FileRecord], bool]:
        query = select(FileRecord).where(FileRecord.owner == owner)
        if purpose:
            query = query.where(FileRecord.purpose == purpose)
        if after:
            query = query.where(FileRecord.id < after)
        with self._sessions() as session:
            rows = list(session.scalars(query.order_by(FileRecord.id.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def delete(self, file_id: str, owner: str) -> bool:
        with self._sessions() as session:
            record = session.get(FileRecord, file_id)
            if record is None or record.owner != owner:
                return False
            session.delete(record)
            session.commit()
        self.path_of(record).unlink(missing_ok=True)
        return True
