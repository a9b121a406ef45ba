"""Stored files: metadata in the database, bytes on disk under the files directory.

Uploads are written in chunks to a temporary file beside the final one and
renamed when complete, so a file is either whole or absent, and memory use
does not depend on its size.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_factory
from app.errors import PayloadTooLarge
from app.jobs.models import FileRecord
from app.jobs.store import sortable_id, utcnow


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
    ) -> FileRecord:
        file_id = new_file_id()
        relative, final = self._place(file_id)
        tmp = final.with_suffix(".part")
        size = 0
        try:
            with tmp.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(
                            f"the file is larger than {limit} bytes (INFERQ_MAX_UPLOAD_BYTES)",
                            param="file",
                        )
                    out.write(chunk)
            fsync_replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._record(file_id, owner, purpose, filename, size, relative)

    def adopt(self, owner: str, purpose: str, filename: str, source: Path) -> FileRecord:
        """Register a file a job produced, moving it into the store durably."""
        file_id = new_file_id()
        relative, final = self._place(file_id)
        with source.open("rb+") as handle:
            os.fsync(handle.fileno())
        shutil.move(str(source), final)
        return self._record(file_id, owner, purpose, filename, final.stat().st_size, relative)

    def _record(
        self, file_id: str, owner: str, purpose: str, filename: str, size: int, relative: str
    ) -> FileRecord:
        record = FileRecord(
            id=file_id,
            owner=owner,
            purpose=purpose,
            filename=filename,
            bytes=size,
            path=relative,
            created_at=utcnow(),
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
