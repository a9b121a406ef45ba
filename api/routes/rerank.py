from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import REPLICA_HEADER, ServicesDep, TimeoutDep
from app.celery_app import RERANK_TASK
from app.limits import check_input_limits
from app.protocol.rerank import RerankRequest, RerankResult, RerankTask

router = APIRouter()


@router.post("/v1/rerank")
async def rerank(body: RerankRequest, services: ServicesDep, timeout: TimeoutDep) -> JSONResponse:
    spec = services.model(body.model, kind="rerank")
    check_input_limits(body.documents, services.settings, param="documents")
    check_input_limits([body.query], services.settings, param="query")
    task = RerankTask(query=body.query, documents=body.documents, truncate=body.truncate)
    outcome = await services.dispatcher.call(spec, RERANK_TASK, task.model_dump(), timeout)
    result = RerankResult.model_validate(outcome.result)
    order = sorted(range(len(result.scores)), key=lambda i: result.scores[i], reverse=True)
    if body.top_n is not None:
        order = order[: body.top_n]
    results: list[dict[str, Any]] = [
        {
            "index": i,
            "relevance_score": result.scores[i],
            "document": {"text": body.documents[i]} if body.return_documents else None,
        }
        for i in order
    ]
    payload = {
        "id": outcome.request_id,
        "results": results,
        "meta": {
            "api_version": None,
            "billed_units": None,
            "tokens": {"input_tokens": result.input_tokens, "output_tokens": 0},
            "warnings": None,
            "truncated_documents": result.truncated,
            "replica": result.replica,
        },
    }
    return JSONResponse(payload, headers={REPLICA_HEADER: result.replica})
