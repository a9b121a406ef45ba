"""`GET /metrics`: the Prometheus exposition of the API's and the cluster's figures."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client.exposition import choose_encoder

from api.metrics import ApiMetrics
from api.services import get_services

router = APIRouter()


# No API key: scrapers on the private network read it as they read /health.
@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Read the cluster from Redis, then render every figure of this app's registry.

    The format follows the scraper's Accept header as prometheus_client's own
    exposition server does: OpenMetrics when asked for, else the classic text
    format (version 0.0.4), which every Prometheus-compatible scraper reads.
    """
    state: ApiMetrics = request.app.state.metrics
    await state.cluster.refresh(get_services(request))
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(state.registry), headers={"Content-Type": content_type})
