"""Rerank: `/v1/rerank` (Xinference, Jina, Cohere v1) and `/v2/rerank` (Cohere v2) take
the same request and give the same answer, which each of those clients reads."""

from __future__ import annotations

from fastapi import APIRouter

from api.calls import now_s, prepare_rerank, render_rerank
from api.deps import REPLICA_HEADER, ServicesDep, TimeoutDep
from api.json_response import FastJSONResponse
from app.protocol.rerank import RerankRequest

router = APIRouter()


@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def rerank(body: RerankRequest, services: ServicesDep, asked: TimeoutDep) -> FastJSONResponse:
    call = await prepare_rerank(body, services)
    timeout = services.timeout_for(call.spec, asked)
    admitted = await services.admit(call.spec, call.work, timeout)
    try:
        outcome = await services.dispatcher.call(
            call.spec, call.task, call.payload, timeout, work=call.work
        )
    finally:
        admitted.release()
    payload = render_rerank(body, call.spec.name, outcome.result, outcome.request_id, now_s())
    return FastJSONResponse(payload, headers={REPLICA_HEADER: payload["meta"]["replica"]})
