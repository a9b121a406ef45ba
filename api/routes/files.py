"""`/v1/files`: OpenAI's Files API, with the bytes on local (or mounted) disk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from api.auth import CallerDep
from api.deps import ServicesDep
from api.pages import list_page
from app.errors import InvalidRequest, NotFound, PayloadTooLarge
from app.jobs.models import FileRecord
from app.jobs.store import epoch_s

router = APIRouter()

UPLOAD_PURPOSES = ("batch", "corpus")
CHUNK = 1024 * 1024
MAX_FILENAME = 512


#: OpenAI's bounds on `expires_after[seconds]`: an hour to 30 days.
EXPIRES_AFTER_S = (3600, 30 * 24 * 3600)


def file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": epoch_s(record.created_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": epoch_s(record.expires_at),
    }


def _expires_after(form: Any, default_ttl_s: float | None) -> timedelta | None:
    """OpenAI's `expires_after[anchor]=created_at` with `expires_after[seconds]=N`."""
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return timedelta(seconds=default_ttl_s) if default_ttl_s else None
    if anchor != "created_at":
        raise InvalidRequest(
            "expires_after[anchor] must be 'created_at'", param="expires_after.anchor"
        )
    low, high = EXPIRES_AFTER_S
    if not isinstance(seconds, str) or not seconds.isdigit() or not low <= int(seconds) <= high:
        raise InvalidRequest(
            f"expires_after[seconds] must be a whole number from {low} to {high}",
            param="expires_after.seconds",
        )
    return timedelta(seconds=int(seconds))


async def _multipart_file(
    request: Request, limit: int, default_ttl_s: float | None
) -> tuple[str, str, timedelta | None, AsyncIterator[bytes]]:
    """The `purpose` field and the `file` part of a multipart upload.

    Starlette's parser spools each part to a temporary file past 1 MB, so the
    upload is on disk, not in memory, by the time this reads it.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise PayloadTooLarge(
            f"the upload is larger than {limit} bytes (INFERQ_MAX_UPLOAD_BYTES)", param="file"
        )
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("upload a file as multipart/form-data", param="file")
    # The request guard counts the body's bytes as they arrive, chunked or not, so the
    # spool never grows past the upload limit (api/request_guard.py).
    form = await request.form(max_files=1, max_fields=10, max_part_size=1024 * 1024)
    purpose = form.get("purpose")
    upload = form.get("file")
    if not isinstance(purpose, str) or purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"purpose must be one of {list(UPLOAD_PURPOSES)}", param="purpose")
    if upload is None or isinstance(upload, str):
        raise InvalidRequest("the `file` part is missing", param="file")
    name = upload.filename or ""
    if "\x00" in name or len(name) > MAX_FILENAME:  # the job store could not hold it
        raise InvalidRequest(
            f"the file's name holds a NUL or is longer than {MAX_FILENAME} characters",
            param="file",
        )

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await upload.read(CHUNK):
                yield chunk
        finally:
            await upload.close()

    expires_after = _expires_after(form, default_ttl_s)
    return purpose, upload.filename or "upload", expires_after, chunks()


#: The upload's form, for the OpenAPI schema (the route reads the form itself, streaming).
#: OpenAI's optional `expires_after[anchor]` / `expires_after[seconds]` fields are read
#: too; they stay out of the schema, where a form field cannot say "one value, or none".
UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                        "file": {"type": "string", "format": "binary"},
                    },
                    "required": ["purpose", "file"],
                }
            }
        },
    }
}


@router.post("/v1/files", openapi_extra=UPLOAD_FORM)
async def create_file(request: Request, services: ServicesDep, owner: CallerDep) -> JSONResponse:
    bulk = services.require_bulk()
    settings = services.settings
    count, used = await asyncio.to_thread(bulk.files.usage, owner)
    room = settings.files_max_bytes_per_owner - used
    if count >= settings.files_max_per_owner or room <= 0:
        raise _over_quota(settings, count, used)
    limit = min(settings.max_upload_bytes, room)
    purpose, filename, expires_after, chunks = await _multipart_file(
        request, settings.max_upload_bytes, settings.file_default_ttl_s
    )
    too_large = None
    if room < settings.max_upload_bytes:
        too_large = lambda: _over_quota(settings, count, used)  # noqa: E731
    record = await bulk.files.save_stream(
        owner, purpose, filename, chunks, limit, expires_after, too_large
    )
    # Uploads of one key that ran side by side each saw the same room: counted again
    # now that this one is recorded, the one that went past the quota is undone.
    count, used = await asyncio.to_thread(bulk.files.usage, owner)
    if count > settings.files_max_per_owner or used > settings.files_max_bytes_per_owner:
        await asyncio.to_thread(bulk.files.delete, record.id, owner)
        raise _over_quota(settings, count - 1, used - record.bytes)
    return JSONResponse(file_object(record))


def _over_quota(settings: Any, count: int, used: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"this key keeps {count} files of {used} bytes; the quota is "
        f"{settings.files_max_per_owner} files (INFERQ_FILES_MAX_PER_OWNER) and "
        f"{settings.files_max_bytes_per_owner} bytes (INFERQ_FILES_MAX_BYTES_PER_OWNER): "
        "delete files, or let them expire",
        param="file",
        code="storage_quota_exceeded",
    )


@router.get("/v1/files")
async def list_files(
    services: ServicesDep,
    owner: CallerDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
) -> JSONResponse:
    bulk = services.require_bulk()
    rows, more = await asyncio.to_thread(bulk.files.list, owner, purpose, limit, after)
    data = [file_object(r) for r in rows]
    return list_page(data, more)


async def _owned(services: Any, file_id: str, owner: str) -> FileRecord:
    record = await asyncio.to_thread(services.require_bulk().files.get, file_id, owner)
    if record is None:
        raise NotFound(f"no file {file_id!r}", param="file_id")
    return record


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, services: ServicesDep, owner: CallerDep) -> JSONResponse:
    return JSONResponse(file_object(await _owned(services, file_id, owner)))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, services: ServicesDep, owner: CallerDep) -> FileResponse:
    record = await _owned(services, file_id, owner)
    path = services.require_bulk().files.path_of(record)
    if not path.is_file():
        raise NotFound(f"the content of file {file_id!r} is gone", param="file_id")
    return FileResponse(path, media_type="application/octet-stream", filename=record.filename)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, services: ServicesDep, owner: CallerDep) -> JSONResponse:
    await _owned(services, file_id, owner)
    await asyncio.to_thread(services.require_bulk().files.delete, file_id, owner)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})
