"""Celery tasks: decode the message, call `app/`, publish or record the outcome.

A task never raises for bad input: every failure becomes an error reply on the
request's channel (sync calls) or an error on the job (async jobs), so one bad
request cannot kill the worker or touch others.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from celery import current_task
from sqlalchemy.exc import SQLAlchemyError

from app.batcher import BULK, INTERACTIVE
from app.celery_app import (
    BATCHED_TASK,
    CORPUS_SHARD,
    EMBEDDINGS_TASK,
    GENERATE_TASK,
    JOB_TASK,
    RERANK_TASK,
)
from app.errors import EngineFailure, InferqError, InvalidRequest, RequestTimedOut
from app.generation import StreamCoalescer
from app.jobs.corpus import read_shard, write_shard
from app.jobs.store import JobStore
from app.logs import REQUEST_ID, TRACE_HEADER
from app.protocol.chat import GenerationTask, RelayTask
from app.protocol.embeddings import EmbeddingResult, EmbeddingTask
from app.protocol.rerank import RerankResult, RerankTask
from app.worker_stats import GENERATED_TOKENS
from workers.app import celery_app
from workers.delivery import Delivery
from workers.runtime import WorkerRuntime, get_runtime

log = logging.getLogger("inferq.worker")

Work = Callable[[WorkerRuntime], dict[str, Any]]


@dataclass(frozen=True)
class Started:
    """A request whose inputs are in the batcher: `finish` waits for them and makes
    the wire result, once `future` is done."""

    future: Future[Any]
    finish: Callable[[], dict[str, Any]]


def embeddings_begin(
    rt: WorkerRuntime, payload: dict[str, Any], deadline: float, lane: int
) -> Started:
    pending = rt.require_embeddings().begin(EmbeddingTask.model_validate(payload), deadline, lane)

    def finish() -> dict[str, Any]:
        out = pending.finish()
        return dict(
            EmbeddingResult(
                vectors_b64=out.vectors_b64,
                prompt_tokens=out.prompt_tokens,
                truncated=out.truncated,
                replica=rt.info.label,
            )
        )

    return Started(pending.future, finish)


def rerank_begin(rt: WorkerRuntime, payload: dict[str, Any], deadline: float, lane: int) -> Started:
    pending = rt.require_rerank().begin(RerankTask.model_validate(payload), deadline, lane)

    def finish() -> dict[str, Any]:
        out = pending.finish()
        return dict(
            RerankResult(
                scores=out.scores,
                input_tokens=out.input_tokens,
                truncated=out.truncated,
                replica=rt.info.label,
            )
        )

    return Started(pending.future, finish)


BATCHED: dict[str, Callable[[WorkerRuntime, dict[str, Any], float, int], Started]] = {
    EMBEDDINGS_TASK: embeddings_begin,
    RERANK_TASK: rerank_begin,
}


def batched_work(task: str, payload: dict[str, Any], deadline: float, lane: int) -> Work:
    """One embeddings or rerank request, start to end (async jobs)."""
    return lambda rt: BATCHED[task](rt, payload, deadline, lane).finish()


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


def wire_error(exc: Exception, what: str) -> dict[str, Any]:
    """`{"ok": False, "error": ...}` for any failure; engine bugs are logged with their stack."""
    if isinstance(exc, InferqError):
        return {"ok": False, "error": exc.to_wire()}
    log.error("%s failed in the engine", what, exc_info=exc)
    return {"ok": False, "error": EngineFailure(f"the engine failed: {exc}").to_wire()}


def run_guarded(rt: WorkerRuntime, model: str, work: Work, what: str) -> dict[str, Any]:
    """`{"ok": True, "result": ...}` or `{"ok": False, "error": <wire error>}`; never raises."""
    try:
        if model != rt.spec.name:
            raise InvalidRequest(f"this worker serves {rt.spec.name!r}, not {model!r}")
        with rt.working():
            return {"ok": True, "result": work(rt)}
    except Exception as exc:
        return wire_error(exc, what)


def trace_of(delivery: Delivery) -> str:
    """The id on the log lines written for a request: its caller's X-Request-Id (sent as
    the message's trace header for one request, in the entry for a coalesced one)."""
    header = getattr(current_task.request, TRACE_HEADER, None) if current_task else None
    return delivery.trace or header or delivery.request_id


def take(rt: WorkerRuntime, deliveries: list[Delivery]) -> list[Delivery]:
    """The deliveries to run: live, claimed by this replica, "accepted" sent. Expired
    ones are dropped (their callers have had their 504), and copies that another
    delivery answered or runs, or whose caller gave up, get no engine time."""
    rt.hold_if_server_down()
    rt.count("messages")
    now = time.time()
    live = [d for d in deliveries if d.deadline >= now]
    if len(live) < len(deliveries):
        rt.count("expired", len(deliveries) - len(live))
    claimed = rt.deliveries.claim(live)
    if claimed.cancelled:
        rt.count("cancelled", claimed.cancelled)
    if claimed.duplicates:
        rt.count("duplicates", claimed.duplicates)
    if claimed.run:
        rt.count("received", len(claimed.run))
    return claimed.run


def answered(rt: WorkerRuntime, model: str, delivery: Delivery, message: dict[str, Any],
             started: float) -> None:  # fmt: skip
    rt.count("answered" if message["ok"] else "failed")
    token = REQUEST_ID.set(trace_of(delivery))
    try:
        outcome = "answered" if message["ok"] else f"failed ({message['error'].get('code')})"
        log.info("%s %s in %.1f ms", model, outcome, (time.monotonic() - started) * 1000)
    finally:
        REQUEST_ID.reset(token)


def serve(model: str, delivery: Delivery, work: Work) -> None:
    """A request that has a message of its own (chat): claim, run, reply."""
    rt = get_runtime()
    started = time.monotonic()
    if not take(rt, [delivery]):
        return
    token = REQUEST_ID.set(trace_of(delivery))
    try:
        message = run_guarded(rt, model, work, f"request {delivery.request_id}")
    finally:
        REQUEST_ID.reset(token)
    rt.deliveries.reply([(delivery, message)])
    answered(rt, model, delivery, message, started)


def serve_batched(model: str, task: str, deliveries: list[Delivery]) -> None:
    """Embeddings or rerank requests of one message: every request's inputs go to the
    batcher at once, so they can share batches, and replies go out as they finish,
    those that finish together in one round trip. One request's bad input is that
    request's error; the others are served."""
    rt = get_runtime()
    started = time.monotonic()
    run = take(rt, deliveries)
    if not run:
        return
    finals: list[tuple[Delivery, dict[str, Any]]] = []
    waiting: dict[Future[Any], tuple[Delivery, Started]] = {}
    batcher = rt.batcher
    with rt.working(len(run)):
        with batcher.holding() if batcher else contextlib.nullcontext():
            for d in run:
                try:
                    if model != rt.spec.name:
                        raise InvalidRequest(f"this worker serves {rt.spec.name!r}, not {model!r}")
                    begin = BATCHED.get(task)
                    if begin is None:
                        raise InvalidRequest(f"unknown batched task {task!r}")
                    one = begin(rt, d.payload, d.deadline, INTERACTIVE)
                except Exception as exc:
                    finals.append((d, wire_error(exc, f"request {d.request_id}")))
                else:
                    waiting[one.future] = (d, one)
        while True:
            if finals:
                rt.deliveries.reply(finals)
                for d, message in finals:
                    answered(rt, model, d, message, started)
                finals = []
            if not waiting:
                return
            finals = _finished(waiting)


def _finished(
    waiting: dict[Future[Any], tuple[Delivery, Started]],
) -> list[tuple[Delivery, dict[str, Any]]]:
    """Replies of the requests done by now (waiting for the first if none is); a request
    past its deadline by the batcher's grace is answered with a timeout."""
    earliest = min(d.deadline for d, _ in waiting.values())
    done, _ = futures.wait(
        list(waiting), timeout=max(0.0, earliest - time.time()) + 1.0,
        return_when=futures.FIRST_COMPLETED,
    )  # fmt: skip
    finals: list[tuple[Delivery, dict[str, Any]]] = []
    now = time.time()
    for future in list(waiting):
        d, one = waiting[future]
        if future in done:
            del waiting[future]
            try:
                finals.append((d, {"ok": True, "result": one.finish()}))
            except Exception as exc:
                finals.append((d, wire_error(exc, f"request {d.request_id}")))
        elif d.deadline + 1.0 < now:
            del waiting[future]
            late = RequestTimedOut("the request's deadline passed while it waited")
            finals.append((d, {"ok": False, "error": late.to_wire()}))
    return finals


@celery_app.task(name=BATCHED_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def batched(model: str, task: str, requests: list[dict[str, Any]]) -> None:
    """Embeddings or rerank requests that one API process sent together."""
    serve_batched(model, task, [Delivery.from_wire(r) for r in requests])


def _one(request_id: str, payload: dict[str, Any], deadline: float, attempt: int) -> Delivery:
    return Delivery(request_id, payload, deadline, attempt)


# One request per message: what API processes of earlier releases send.
@celery_app.task(
    name=EMBEDDINGS_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def embeddings(
    request_id: str, model: str, payload: dict[str, Any], deadline: float, attempt: int = 0
) -> None:
    serve_batched(model, EMBEDDINGS_TASK, [_one(request_id, payload, deadline, attempt)])


@celery_app.task(name=RERANK_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def rerank(
    request_id: str, model: str, payload: dict[str, Any], deadline: float, attempt: int = 0
) -> None:
    serve_batched(model, RERANK_TASK, [_one(request_id, payload, deadline, attempt)])


@celery_app.task(name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generate(
    request_id: str, model: str, payload: dict[str, Any], deadline: float, attempt: int = 0
) -> None:
    upstream_id = f"{request_id}-{attempt}" if attempt else request_id
    work = generate_work(request_id, payload, deadline, upstream_id)
    serve(model, _one(request_id, payload, deadline, attempt), work)


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
    if task in BATCHED:
        return batched_work(task, payload, deadline, BULK)
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
