"""Celery tasks: decode the message, call `app/`, publish the reply. Nothing else.

A task never raises for bad input: every failure becomes an error reply on the
request's channel, so one bad request cannot kill the worker or touch others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from app.celery_app import EMBEDDINGS_TASK, GENERATE_TASK, RERANK_TASK
from app.errors import EngineFailure, InferqError, InvalidRequest
from app.protocol.chat import GenerationTask
from app.protocol.embeddings import EmbeddingResult, EmbeddingTask
from app.protocol.rerank import RerankResult, RerankTask
from workers.app import celery_app
from workers.runtime import WorkerRuntime, get_runtime

log = logging.getLogger("inferq.worker")


def serve(
    request_id: str,
    model: str,
    deadline: float,
    work: Callable[[WorkerRuntime], dict[str, Any]],
) -> None:
    """The part every inference task shares: deadline, acceptance, errors, reply."""
    rt = get_runtime()
    if time.time() > deadline:
        rt.count("expired")  # the caller has already had its 504: do not spend the engine
        return
    if rt.cancelled(request_id):
        rt.count("cancelled")  # the caller gave up while this waited in the queue
        return
    rt.count("received")
    rt.publish(request_id, {"accepted": rt.info.label, "replica_id": rt.info.replica_id})
    message: dict[str, Any]
    try:
        if model != rt.spec.name:
            raise InvalidRequest(f"this worker serves {rt.spec.name!r}, not {model!r}")
        message = {"ok": True, "result": work(rt)}
    except InferqError as exc:
        message = {"ok": False, "error": exc.to_wire()}
    except Exception as exc:
        log.exception("request %s failed in the engine", request_id)
        message = {"ok": False, "error": EngineFailure(f"the engine failed: {exc}").to_wire()}
    rt.publish(request_id, message)
    rt.count("answered" if message["ok"] else "failed")


@celery_app.task(
    name=EMBEDDINGS_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def embeddings(request_id: str, model: str, payload: dict[str, Any], deadline: float) -> None:
    def work(rt: WorkerRuntime) -> dict[str, Any]:
        out = rt.require_embeddings().run(EmbeddingTask.model_validate(payload), deadline)
        return EmbeddingResult(
            vectors_b64=out.vectors_b64,
            prompt_tokens=out.prompt_tokens,
            truncated=out.truncated,
            replica=rt.info.label,
        ).model_dump()

    serve(request_id, model, deadline, work)


@celery_app.task(name=RERANK_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def rerank(request_id: str, model: str, payload: dict[str, Any], deadline: float) -> None:
    def work(rt: WorkerRuntime) -> dict[str, Any]:
        out = rt.require_rerank().run(RerankTask.model_validate(payload), deadline)
        return RerankResult(
            scores=out.scores,
            input_tokens=out.input_tokens,
            truncated=out.truncated,
            replica=rt.info.label,
        ).model_dump()

    serve(request_id, model, deadline, work)


@celery_app.task(name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generate(request_id: str, model: str, payload: dict[str, Any], deadline: float) -> None:
    """Chat and completions. Streamed requests publish each piece as it is made; a
    caller that goes away sets the cancel key and generation stops within a few tokens."""

    def work(rt: WorkerRuntime) -> dict[str, Any]:
        task = GenerationTask.model_validate(payload)

        def emit(delta: dict[str, str]) -> None:
            rt.publish(request_id, {"chunk": delta})

        result = rt.require_chat().run(
            task, lambda: rt.cancelled(request_id), emit if task.stream else None
        )
        return {**result, "replica": rt.info.label}

    serve(request_id, model, deadline, work)
