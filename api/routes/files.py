"""`/v1/files`: OpenAI's Files API, with the bytes on local (or mounted) disk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
        "expires_at": None,
    }


async def _multipart_file(request: Request, limit: int) -> tuple[str, str, AsyncIterator[bytes]]:
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

    return purpose, upload.filename or "upload", chunks()


#: The upload's form, for the OpenAPI schema (the route reads the form itself, streaming).
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
    limit = services.settings.max_upload_bytes
    purpose, filename, chunks = await _multipart_file(request, limit)
    record = await bulk.files.save_stream(owner, purpose, filename, chunks, limit)
    return JSONResponse(file_object(record))


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
