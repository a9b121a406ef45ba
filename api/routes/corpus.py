"""`/v1/corpus-jobs`: embed a whole file, sharded across every replica of a model."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.auth import CallerDep
from api.deps import ServicesDep
from api.pages import list_page
from app.errors import Conflict, InvalidRequest, NotFound
from app.jobs.corpus import input_format_of
from app.jobs.models import CorpusJob, CorpusStatus, JobStatus
from app.jobs.store import epoch_s, sortable_id, utcnow
from app.protocol.values import StoredText, stored_text

router = APIRouter()

OPEN = (CorpusStatus.validating, CorpusStatus.in_progress, CorpusStatus.assembling)


class CorpusCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_id: StoredText
    model: str
    text_field: stored_text(max_length=255) | None = None
    id_field: stored_text(max_length=255) | None = None
    input_format: Literal["jsonl", "csv", "parquet", "text"] | None = None
    output_format: Literal["jsonl", "parquet", "npy"] = "jsonl"
    shard_size: int | None = Field(default=None, gt=0, le=100_000)
    metadata: dict[str, str] | None = None


def progress(
    job: CorpusJob, counts: dict[str, int], first_start: datetime | None
) -> dict[str, Any]:
    """Texts done from the number of finished shards: every shard is full but the last."""
    shards_done = counts.get(JobStatus.succeeded, 0)
    done = min(job.texts_total, shards_done * job.shard_size)
    if job.status == CorpusStatus.completed:
        done = job.texts_total
    rate = None
    eta = None
    if first_start is not None and done:
        elapsed = max(time.time() - first_start.replace(tzinfo=UTC).timestamp(), 1e-6)
        rate = done / elapsed
        eta = (job.texts_total - done) / rate if rate else None
    return {
        "texts_total": job.texts_total,
        "texts_done": done,
        "shards_total": job.shards_total,
        "shards_done": shards_done,
        "shards_running": counts.get(JobStatus.running, 0),
        "texts_per_s": None if rate is None else round(rate, 1),
        "eta_s": None if eta is None else round(eta, 1),
    }


async def corpus_object(services: Any, job: CorpusJob) -> dict[str, Any]:
    store = services.require_bulk().store
    counts = await asyncio.to_thread(store.child_counts, job.id)
    first_start = await asyncio.to_thread(store.first_child_start, job.id)
    return {
        "id": job.id,
        "object": "corpus_job",
        "file_id": job.file_id,
        "model": job.model,
        "status": job.status,
        "input_format": job.input_format,
        "text_field": job.text_field,
        "id_field": job.id_field,
        "output_format": job.output_format,
        "shard_size": job.shard_size,
        "progress": progress(job, counts, first_start),
        "output_file_id": job.output_file_id,
        "ids_file_id": job.ids_file_id,
        "error": job.error,
        "metadata": job.meta,
        "created_at": epoch_s(job.created_at),
        "started_at": epoch_s(job.started_at),
        "finished_at": epoch_s(job.finished_at),
    }


@router.post("/v1/corpus-jobs")
async def create_corpus_job(
    body: CorpusCreate, services: ServicesDep, owner: CallerDep
) -> JSONResponse:
    bulk = services.require_bulk()
    spec = services.model(body.model, kind="embedding")
    record = await asyncio.to_thread(bulk.files.get, body.file_id, owner)
    if record is None:
        raise NotFound(f"no file {body.file_id!r}", param="file_id")
    if record.purpose not in ("corpus", "batch"):
        raise InvalidRequest("the file's purpose must be corpus", param="file_id")
    job = CorpusJob(
        id=sortable_id("corpus"),
        owner=owner,
        file_id=record.id,
        model=spec.name,
        input_format=body.input_format or input_format_of(record.filename),
        text_field=body.text_field,
        id_field=body.id_field,
        output_format=body.output_format,
        shard_size=body.shard_size or services.settings.corpus_shard_size,
        status=CorpusStatus.validating,
        texts_total=0,
        shards_total=0,
        meta=body.metadata,
        created_at=utcnow(),
    )
    await asyncio.to_thread(bulk.store.add, job)
    bulk.coordinator.nudge()
    return JSONResponse(await corpus_object(services, job))


async def _owned(services: Any, job_id: str, owner: str) -> CorpusJob:
    job = await asyncio.to_thread(services.require_bulk().store.get, CorpusJob, job_id, owner)
    if job is None:
        raise NotFound(f"no corpus job {job_id!r}", param="job_id")
    return job


@router.get("/v1/corpus-jobs/{job_id}")
async def retrieve_corpus_job(job_id: str, services: ServicesDep, owner: CallerDep) -> JSONResponse:
    return JSONResponse(await corpus_object(services, await _owned(services, job_id, owner)))


@router.get("/v1/corpus-jobs")
async def list_corpus_jobs(
    services: ServicesDep,
    owner: CallerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JSONResponse:
    bulk = services.require_bulk()
    rows, more = await asyncio.to_thread(bulk.store.list, CorpusJob, owner, limit, after)
    data = [await corpus_object(services, j) for j in rows]
    return list_page(data, more)


@router.post("/v1/corpus-jobs/{job_id}/cancel")
async def cancel_corpus_job(job_id: str, services: ServicesDep, owner: CallerDep) -> JSONResponse:
    bulk = services.require_bulk()
    job = await _owned(services, job_id, owner)
    moved = await asyncio.to_thread(
        bulk.store.move, CorpusJob, job.id, OPEN, CorpusStatus.cancelled, finished_at=utcnow()
    )
    if not moved and job.status != CorpusStatus.cancelled:
        raise Conflict(f"the corpus job is {job.status}; it cannot be cancelled")
    await asyncio.to_thread(bulk.store.cancel_children, job.id)
    return JSONResponse(await corpus_object(services, await _owned(services, job_id, owner)))
