from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import REPLICA_HEADER, ServicesDep, TimeoutDep
from app.celery_app import EMBEDDINGS_TASK
from app.embedding import b64_to_vector
from app.limits import check_input_limits
from app.protocol.embeddings import EmbeddingRequest, EmbeddingResult, EmbeddingTask

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(
    body: EmbeddingRequest, services: ServicesDep, timeout: TimeoutDep
) -> JSONResponse:
    spec = services.model(body.model, kind="embedding")
    check_input_limits(body.input, services.settings)
    task = EmbeddingTask(inputs=body.input, truncate=body.truncate, dimensions=body.dimensions)
    outcome = await services.dispatcher.call(spec, EMBEDDINGS_TASK, task.model_dump(), timeout)
    result = EmbeddingResult.model_validate(outcome.result)
    data: list[dict[str, Any]] = []
    for index, b64 in enumerate(result.vectors_b64):
        vector: Any = b64 if body.encoding_format == "base64" else b64_to_vector(b64).tolist()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    payload = {
        "object": "list",
        "data": data,
        "model": spec.name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        "inferq": {"truncated_inputs": result.truncated, "replica": result.replica},
    }
    return JSONResponse(payload, headers={REPLICA_HEADER: result.replica})
