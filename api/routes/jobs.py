"""`/v1/jobs`: submit work now, collect the answer later."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.auth import CallerDep
from api.calls import CALLS
from api.deps import ServicesDep
from api.pages import list_page
from api.webhooks import check_webhook_url
from app.errors import Conflict, InvalidRequest, NotFound
from app.jobs.models import JobStatus
from app.jobs.store import NewJob

router = APIRouter()

MAX_METADATA_KEYS = 16


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint: str
    body: dict[str, Any]
    priority: int = Field(default=5, ge=0, le=9, description="9 runs first.")
    webhook: str | None = None
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} metadata keys")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys hold at most 64 characters, values 512")
        return value


@router.post("/v1/jobs", status_code=202)
async def create_job(
    submit: JobCreate,
    services: ServicesDep,
    owner: CallerDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    call = CALLS.get(submit.endpoint)
    if call is None:
        raise InvalidRequest(
            f"endpoint {submit.endpoint!r} cannot run as a job; use one of {sorted(CALLS)}",
            param="endpoint",
            code="unknown_endpoint",
        )
    body = call.parse(submit.body)
    if getattr(body, "stream", False):
        raise InvalidRequest(
            "a job cannot stream; leave `stream` unset and poll the job", param="body.stream"
        )
    prepared = await call.prepare(body, services)
    if submit.webhook is not None:
        check_webhook_url(submit.webhook, services.settings.webhook_allow_loopback)
    if idempotency_key is not None and not 0 < len(idempotency_key) <= 255:
        raise InvalidRequest(
            "Idempotency-Key must hold 1 to 255 characters", param="Idempotency-Key"
        )
    jobs = services.require_jobs()
    await jobs.admit(prepared.spec.name)
    new = NewJob(
        owner=owner,
        endpoint=call.path,
        model=prepared.spec.name,
        task=prepared.task,
        priority=submit.priority,
        request=submit.body,
        payload=prepared.payload,
        idempotency_key=idempotency_key,
        metadata=submit.metadata,
        webhook_url=submit.webhook,
        ttl_s=services.settings.job_queue_ttl_s,
    )
    job, created = await asyncio.to_thread(jobs.store.create, new)
    if created:
        await jobs.send(job)
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(jobs.view(job), status_code=202, headers=headers)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, services: ServicesDep, owner: CallerDep) -> JSONResponse:
    jobs = services.require_jobs()
    job = await asyncio.to_thread(jobs.store.get, job_id, owner)
    if job is None:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return JSONResponse(jobs.view(job))


@router.get("/v1/jobs")
async def list_jobs(
    services: ServicesDep,
    owner: CallerDep,
    status: str | None = None,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JSONResponse:
    if status is not None and status not in set(JobStatus):
        raise InvalidRequest(
            f"status must be one of {[s.value for s in JobStatus]}", param="status"
        )
    jobs = services.require_jobs()
    page, more = await asyncio.to_thread(
        jobs.store.list, owner, status=status, model=model, limit=limit, after=after
    )
    data = [jobs.view(job, with_result=False) for job in page]
    return list_page(data, more)


@router.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, services: ServicesDep, owner: CallerDep) -> JSONResponse:
    jobs = services.require_jobs()
    job, before = await asyncio.to_thread(jobs.store.cancel, job_id, owner)
    if job is None:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    if before == JobStatus.running:
        await jobs.stop_running(job_id)
    if job.status != JobStatus.cancelled:
        raise Conflict(f"the job has already {job.status}; it cannot be cancelled")
    return JSONResponse(jobs.view(job))
