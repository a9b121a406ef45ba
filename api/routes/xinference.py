"""The calls Xinference's clients make before any model call, so they start against inferq.

xinference-client asks `/v1/cluster/auth` in its constructor, without a key, to
learn whether to send one; Dify and other integrations read the version. Both
answer without a key, like /health: they tell nothing a caller could misuse.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from api.services import Services, services_of
from app import __version__

router = APIRouter()


@router.get("/v1/cluster/auth")
async def cluster_auth(services: Annotated[Services, Depends(services_of)]) -> dict[str, bool]:
    """Whether calls need `Authorization: Bearer <key>` (API keys are configured)."""
    return {"auth": not services.keyring.open}


@router.get("/v1/cluster/version")
async def cluster_version() -> dict[str, Any]:
    return {"version": __version__, "full-revisionid": None, "dirty": False, "error": None}
