"""Celery tasks: decode the message, call `app/`, publish or record the outcome.

A task never raises for bad input: every failure becomes an error reply on the
request's channel (sync calls) or an error on the job (async jobs), so one bad
request cannot kill the worker or touch others.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import current_task
from sqlalchemy.exc import SQLAlchemyError

from app.batcher import BULK, INTERACTIVE
from app.celery_app import CORPUS_SHARD, EMBEDDINGS_TASK, GENERATE_TASK, JOB_TASK, RERANK_TASK
from app.errors import EngineFailure, InferqError, InvalidRequest
from app.generation import StreamCoalescer
from app.jobs.corpus import read_shard, write_shard
from app.jobs.store import JobStore
from app.logs import REQUEST_ID, TRACE_HEADER
from app.protocol.chat import GenerationTask, RelayTask
from app.protocol.embeddings import EmbeddingResult, EmbeddingTask
from app.protocol.rerank import RerankResult, RerankTask
from app.worker_stats import GENERATED_TOKENS
from workers.app import celery_app
from workers.runtime import WorkerRuntime, get_runtime

log = logging.getLogger("inferq.worker")

Work = Callable[[WorkerRuntime], dict[str, Any]]


def embeddings_work(payload: dict[str, Any], deadline: float, lane: int) -> Work:
    def work(rt: WorkerRuntime) -> dict[str, Any]:
        task = EmbeddingTask.model_validate(payload)
        out = rt.require_embeddings().run(task, deadline, lane)
        return EmbeddingResult(
            vectors_b64=out.vectors_b64,
            prompt_tokens=out.prompt_tokens,
            truncated=out.truncated,
            replica=rt.info.label,
        ).model_dump()

    return work


def rerank_work(payload: dict[str, Any], deadline: float, lane: int) -> Work:
    def work(rt: WorkerRuntime) -> dict[str, Any]:
        out = rt.require_rerank().run(RerankTask.model_validate(payload), deadline, lane)
        return RerankResult(
            scores=out.scores,
            input_tokens=out.input_tokens,
            truncated=out.truncated,
            replica=rt.info.label,
        ).model_dump()

    return work


def generate_work(
    request_id: str, payload: dict[str, Any], deadline: float, upstream_id: str | None = None
) -> Work:
    """Chat and completions. Streamed requests publish each piece as it is made; a
    caller that goes away (or cancels the job) sets the cancel key and generation
    stops within a few tokens."""

    def work(rt: WorkerRuntime) -> dict[str, Any]:
        if rt.relay_engine is not None:
            return relay_work(rt, request_id, payload, deadline, upstream_id or request_id)
        task = GenerationTask.model_validate(payload)

        def emit(delta: dict[str, str]) -> None:
            rt.publish(request_id, {"chunk": delta})

        stream = StreamCoalescer(emit, rt.settings.stream_coalesce_ms / 1000.0)
        result = rt.require_chat().run(
            task, lambda: rt.cancelled(request_id), stream.add if task.stream else None
        )
        stream.flush()
        rt.count(GENERATED_TOKENS, int(result["completion_tokens"]))
        return {**result, "replica": rt.info.label}

    return work


def relay_work(
    rt: WorkerRuntime, request_id: str, payload: dict[str, Any], deadline: float, upstream_id: str
) -> dict[str, Any]:
    """Forward the body to the replica's own server; its events go out as it wrote them."""
    if "path" not in payload:
        raise InvalidRequest("this request was queued for another kind of chat engine")
    task = RelayTask.model_validate(payload)
    engine = rt.relay_engine
    assert engine is not None

    def emit(events: str) -> None:
        rt.publish(request_id, {"sse": events})

    result = engine.relay.run(
        task.path,
        task.upstream_body(),
        request_id=upstream_id,
        stream=task.stream,
        should_stop=lambda: rt.cancelled(request_id),
        deadline=deadline,
        emit=emit if task.stream else None,
        window_s=rt.settings.stream_coalesce_ms / 1000.0,
        reasoning=engine.reasoning,
    )
    rt.count(GENERATED_TOKENS, int(result["completion_tokens"]))
    return {**result, "replica": rt.info.label}


def run_guarded(rt: WorkerRuntime, model: str, work: Work, what: str) -> dict[str, Any]:
    """`{"ok": True, "result": ...}` or `{"ok": False, "error": <wire error>}`; never raises."""
    try:
        if model != rt.spec.name:
            raise InvalidRequest(f"this worker serves {rt.spec.name!r}, not {model!r}")
        with rt.working():
            return {"ok": True, "result": work(rt)}
    except InferqError as exc:
        return {"ok": False, "error": exc.to_wire()}
    except Exception as exc:
        log.exception("%s failed in the engine", what)
        return {"ok": False, "error": EngineFailure(f"the engine failed: {exc}").to_wire()}


def serve(
    request_id: str,
    model: str,
    deadline: float,
    work: Work,
    attempt: int = 0,
) -> None:
    """The part every sync inference task shares: deadline, acceptance, errors, reply.

    `attempt` rises when the API lost its result channel and asks again: the reply
    of an earlier attempt may have gone out unheard, so it does not count as one.
    The message's trace header is the request's X-Request-Id: every line logged while
    serving it has it."""
    trace = getattr(current_task.request, TRACE_HEADER, None) if current_task else None
    token = REQUEST_ID.set(trace or request_id)
    try:
        _serve(request_id, model, deadline, work, attempt)
    finally:
        REQUEST_ID.reset(token)


def _serve(request_id: str, model: str, deadline: float, work: Work, attempt: int) -> None:
    rt = get_runtime()
    started = time.monotonic()
    rt.hold_if_server_down()
    if time.time() > deadline:
        rt.count("expired")  # the caller has already had its 504: do not spend the engine
        return
    skip = rt.claim(request_id, deadline, attempt)
    if skip:
        # The caller gave up while this waited, or this is a copy of a request that
        # another delivery answered or is running: no engine time for it.
        rt.count("cancelled" if skip == "cancelled" else "duplicates")
        return
    rt.count("received")
    rt.publish(request_id, {"accepted": rt.info.label, "replica_id": rt.info.replica_id})
    message = run_guarded(rt, model, work, f"request {request_id}")
    rt.publish_final(request_id, message, attempt)
    rt.count("answered" if message["ok"] else "failed")
    outcome = "answered" if message["ok"] else f"failed ({message['error'].get('code')})"
    log.info("%s %s in %.1f ms", model, outcome, (time.monotonic() - started) * 1000)


@celery_app.task(
    name=EMBEDDINGS_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def embeddings(
    request_id: str,
    model: str,
    payload: dict[str, Any],
    deadline: float,
    attempt: int = 0,
) -> None:
    serve(request_id, model, deadline, embeddings_work(payload, deadline, INTERACTIVE), attempt)


@celery_app.task(name=RERANK_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def rerank(
    request_id: str,
    model: str,
    payload: dict[str, Any],
    deadline: float,
    attempt: int = 0,
) -> None:
    serve(request_id, model, deadline, rerank_work(payload, deadline, INTERACTIVE), attempt)


@celery_app.task(name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generate(
    request_id: str,
    model: str,
    payload: dict[str, Any],
    deadline: float,
    attempt: int = 0,
) -> None:
    upstream_id = f"{request_id}-{attempt}" if attempt else request_id
    serve(
        request_id,
        model,
        deadline,
        generate_work(request_id, payload, deadline, upstream_id),
        attempt,
    )


def corpus_shard_work(payload: dict[str, Any], deadline: float) -> Work:
    """Embed one shard of a corpus file and write its vectors beside it, durably.

    Running a shard twice (a redelivery) rewrites the same files; the job store
    records it done once."""

    def work(rt: WorkerRuntime) -> dict[str, Any]:
        root = rt.settings.resolved_files_dir()
        ids, texts = read_shard(root / payload["input"], payload["start"], payload["end"])
        runner = rt.require_embeddings()
        prepared = runner.prepare(texts, truncate=True)
        vectors = runner.vectors(prepared, deadline, BULK)
        write_shard(root / payload["dir"], int(payload["index"]), ids, vectors)
        return {
            "shard": payload["index"],
            "count": len(ids),
            "tokens": prepared.token_count,
            "truncated": len(prepared.truncated),
            "replica": rt.info.label,
        }

    return work


def job_work(job_id: str, task: str, payload: dict[str, Any], deadline: float) -> Work:
    if task == EMBEDDINGS_TASK:
        return embeddings_work(payload, deadline, BULK)
    if task == RERANK_TASK:
        return rerank_work(payload, deadline, BULK)
    if task == GENERATE_TASK:
        # A job may run again after a takeover: each run is a new request upstream.
        upstream_id = f"{job_id}-{uuid.uuid4().hex[:8]}"
        return generate_work(job_id, {**payload, "stream": False}, deadline, upstream_id)
    if task == CORPUS_SHARD:
        return corpus_shard_work(payload, deadline)
    raise InvalidRequest(f"unknown job task {task!r}")


@celery_app.task(name=JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def job(job_id: str, model: str, task: str, payload: dict[str, Any]) -> None:
    """Run an async job and record its outcome in the job store.

    The store decides whether this delivery runs at all (app/jobs/store.py):
    duplicates, cancelled jobs and jobs held by a live replica are dropped here,
    before the engine sees them. A redelivery after a worker died takes the
    job over. Only if the store cannot be reached does the task raise; the
    message is then acknowledged and the API's sweeper sends the job again. While
    it runs its lease in the store is renewed; an attempt whose outcome could not
    be recorded, or that runs past the run timeout, loses it and is taken over.
    """
    rt = get_runtime()
    rt.hold_if_server_down()
    store = rt.job_store()
    settings = rt.settings
    claim = store.claim(
        job_id,
        rt.info.replica_id,
        rt.replica_alive,
        settings.job_max_attempts,
        settings.job_lease_s,
    )
    if claim.job is None:
        rt.count("jobs_skipped")
        log.info("job %s not run: %s", job_id, claim.reason)
        return
    rt.count("jobs_started")
    with rt.job_leases().holding(job_id):
        try:
            work = job_work(job_id, task, payload, time.time() + settings.job_run_timeout_s)
        except InferqError as exc:
            outcome: dict[str, Any] = {"ok": False, "error": exc.to_wire()}
        else:
            outcome = run_guarded(rt, model, work, f"job {job_id}")
        try:
            recorded = record_outcome(store, job_id, rt.info.replica_id, outcome)
        except SQLAlchemyError as exc:
            # The lease is no longer renewed: once it runs out the sweeper sends the
            # job again and the next delivery takes it over.
            log.error("job %s ran but its outcome could not be recorded: %s", job_id, exc)
            rt.count("jobs_unrecorded")
            return
    if recorded:
        rt.count("jobs_succeeded" if outcome["ok"] else "jobs_failed")
    else:
        rt.count("jobs_discarded")  # cancelled while it ran, or taken over elsewhere


def record_outcome(store: JobStore, job_id: str, replica_id: str, outcome: dict[str, Any]) -> bool:
    if outcome["ok"]:
        return store.finish(job_id, replica_id, result=outcome["result"])
    error = InferqError.from_wire(outcome["error"])
    return store.finish(
        job_id,
        replica_id,
        error={
            "type": error.type,
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "status": error.status,
        },
    )
