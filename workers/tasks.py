"""Celery tasks: decode the message, call `app/`, publish the reply. Nothing else.

A task never raises for bad input: every failure becomes an error reply on the
request's channel, so one bad request cannot kill the worker or touch others.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from app.celery_app import EMBEDDINGS_TASK
from app.errors import EngineFailure, InferqError, InvalidRequest
from app.protocol.embeddings import EmbeddingResult, EmbeddingTask
from workers.app import celery_app
from workers.runtime import get_runtime

log = logging.getLogger("inferq.worker")


@celery_app.task(
    name=EMBEDDINGS_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def embeddings(request_id: str, model: str, payload: dict[str, Any], deadline: float) -> None:
    rt = get_runtime()
    if time.time() > deadline:
        rt.count("expired")  # the caller has already had its 504: do not spend the engine
        return
    rt.count("received")
    rt.publish(request_id, {"accepted": rt.info.label})
    message: dict[str, Any]
    try:
        if model != rt.spec.name:
            raise InvalidRequest(f"this worker serves {rt.spec.name!r}, not {model!r}")
        out = rt.embeddings.run(EmbeddingTask.model_validate(payload), deadline)
        result = EmbeddingResult(
            vectors_b64=out.vectors_b64,
            prompt_tokens=out.prompt_tokens,
            truncated=out.truncated,
            replica=rt.info.label,
        )
        message = {"ok": True, "result": result.model_dump()}
    except InferqError as exc:
        message = {"ok": False, "error": exc.to_wire()}
    except Exception as exc:
        log.exception("embedding request %s failed in the engine", request_id)
        message = {"ok": False, "error": EngineFailure(f"the engine failed: {exc}").to_wire()}
    rt.publish(request_id, message)
    rt.count("answered" if message["ok"] else "failed")
