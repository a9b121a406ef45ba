"""Request-scoped dependencies shared by the inference routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header

from api.services import Services, get_services
from app.errors import InvalidRequest

TIMEOUT_HEADER = "X-Inferq-Timeout"
REPLICA_HEADER = "X-Inferq-Replica"


def request_timeout(
    services: Annotated[Services, Depends(get_services)],
    x_inferq_timeout: Annotated[str | None, Header()] = None,
) -> float:
    """The caller may shorten the server's timeout (never lengthen it) with a header."""
    limit = services.settings.request_timeout_s
    if x_inferq_timeout is None:
        return limit
    try:
        value = float(x_inferq_timeout)
    except ValueError:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a number of seconds") from None
    if not 0 < value < float("inf"):
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be positive")
    return min(value, limit)


ServicesDep = Annotated[Services, Depends(get_services)]
TimeoutDep = Annotated[float, Depends(request_timeout)]
