"""`/v1/batches`: OpenAI's Batch API over inferq's job queues."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from api.auth import CallerDep
from api.calls import CALLS
from api.deps import ServicesDep
from api.pages import list_page
from app.errors import Conflict, InvalidRequest, NotFound
from app.jobs.models import Batch, BatchStatus
from app.jobs.store import epoch_s, sortable_id, utcnow
from app.protocol.values import StoredText

router = APIRouter()

WINDOWS = {"24h": timedelta(hours=24)}
OPEN = (BatchStatus.validating, BatchStatus.in_progress, BatchStatus.finalizing)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: StoredText
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def batch_object(batch: Batch) -> dict[str, Any]:
    errors = None
    if batch.errors:
        errors = {"object": "list", "data": batch.errors}
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": epoch_s(batch.created_at),
        "in_progress_at": epoch_s(batch.in_progress_at),
        "expires_at": epoch_s(batch.expires_at),
        "finalizing_at": epoch_s(batch.finalizing_at),
        "completed_at": epoch_s(batch.completed_at),
        "failed_at": epoch_s(batch.failed_at),
        "expired_at": epoch_s(batch.expired_at),
        "cancelling_at": epoch_s(batch.cancelling_at),
        "cancelled_at": epoch_s(batch.cancelled_at),
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed,
        },
        "metadata": batch.meta,
        "model": batch.model,
    }


@router.post("/v1/batches")
async def create_batch(body: BatchCreate, services: ServicesDep, owner: CallerDep) -> JSONResponse:
    bulk = services.require_bulk()
    if body.endpoint not in CALLS:
        raise InvalidRequest(
            f"endpoint must be one of {sorted(CALLS)}", param="endpoint", code="invalid_endpoint"
        )
    window = WINDOWS.get(body.completion_window)
    if window is None:
        raise InvalidRequest("completion_window must be 24h", param="completion_window")
    record = await asyncio.to_thread(bulk.files.get, body.input_file_id, owner)
    if record is None:
        raise NotFound(f"no file {body.input_file_id!r}", param="input_file_id")
    if record.purpose != "batch":
        raise InvalidRequest("the input file's purpose must be batch", param="input_file_id")
    now = utcnow()
    batch = Batch(
        id=sortable_id("batch"),
        owner=owner,
        endpoint=body.endpoint,
        input_file_id=record.id,
        completion_window=body.completion_window,
        status=BatchStatus.validating,
        meta=body.metadata,
        total=0,
        completed=0,
        failed=0,
        invalid=0,
        created_at=now,
        expires_at=now + window,
    )
    await asyncio.to_thread(bulk.store.add, batch)
    bulk.coordinator.nudge()
    return JSONResponse(batch_object(batch))


async def _owned(services: Any, batch_id: str, owner: str) -> Batch:
    batch = await asyncio.to_thread(services.require_bulk().store.get, Batch, batch_id, owner)
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}", param="batch_id")
    return batch


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, services: ServicesDep, owner: CallerDep) -> JSONResponse:
    return JSONResponse(batch_object(await _owned(services, batch_id, owner)))


@router.get("/v1/batches")
async def list_batches(
    services: ServicesDep,
    owner: CallerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JSONResponse:
    bulk = services.require_bulk()
    rows, more = await asyncio.to_thread(bulk.store.list, Batch, owner, limit, after)
    data = [batch_object(b) for b in rows]
    return list_page(data, more)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, services: ServicesDep, owner: CallerDep) -> JSONResponse:
    bulk = services.require_bulk()
    batch = await _owned(services, batch_id, owner)
    moved = await asyncio.to_thread(
        bulk.store.move, Batch, batch.id, OPEN, BatchStatus.cancelling, cancelling_at=utcnow()
    )
    if not moved and batch.status not in (BatchStatus.cancelling, BatchStatus.cancelled):
        raise Conflict(f"the batch is {batch.status}; it cannot be cancelled")
    bulk.coordinator.nudge()
    return JSONResponse(batch_object(await _owned(services, batch_id, owner)))
