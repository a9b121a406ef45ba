from __future__ import annotations

from fastapi import APIRouter

from api.calls import now_s, prepare_embeddings, render_embeddings
from api.deps import REPLICA_HEADER, ServicesDep, TimeoutDep
from api.json_response import FastJSONResponse
from app.protocol.embeddings import EmbeddingRequest

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(
    body: EmbeddingRequest, services: ServicesDep, asked: TimeoutDep
) -> FastJSONResponse:
    call = await prepare_embeddings(body, services)
    timeout = services.timeout_for(call.spec, asked)
    admitted = await services.admit(call.spec, call.work, timeout)
    try:
        outcome = await services.dispatcher.call(
            call.spec, call.task, call.payload, timeout, work=call.work
        )
    finally:
        admitted.release()
    payload = render_embeddings(body, call.spec.name, outcome.result, outcome.request_id, now_s())
    return FastJSONResponse(payload, headers={REPLICA_HEADER: payload["inferq"]["replica"]})
