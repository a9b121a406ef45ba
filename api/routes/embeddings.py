from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse

from api.services import Services, get_services
from app.celery_app import EMBEDDINGS_TASK
from app.embedding import b64_to_vector
from app.errors import InvalidRequest
from app.limits import check_input_limits
from app.protocol.embeddings import EmbeddingRequest, EmbeddingResult, EmbeddingTask

router = APIRouter()

TIMEOUT_HEADER = "X-Inferq-Timeout"
REPLICA_HEADER = "X-Inferq-Replica"


def request_timeout(services: Services, header: str | None) -> float:
    """The caller may shorten the server's timeout (never lengthen it) with a header."""
    limit = services.settings.request_timeout_s
    if header is None:
        return limit
    try:
        value = float(header)
    except ValueError:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a number of seconds") from None
    if not 0 < value < float("inf"):
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be positive")
    return min(value, limit)


@router.post("/v1/embeddings")
async def create_embeddings(
    body: EmbeddingRequest,
    services: Annotated[Services, Depends(get_services)],
    x_inferq_timeout: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    spec = services.model(body.model, kind="embedding")
    check_input_limits(body.input, services.settings)
    timeout = request_timeout(services, x_inferq_timeout)
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
