"""Request-scoped dependencies shared by the inference routes."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header

from api.services import Services, services_of
from app.errors import InvalidRequest

TIMEOUT_HEADER = "X-Inferq-Timeout"
REPLICA_HEADER = "X-Inferq-Replica"
#: The timeout header's seconds, as a plain decimal number: `30`, `2.5` (above zero, which
#: the code checks). Bounded repeats keep the match linear: an unbounded alternation
#: of digit runs backtracked quadratically on a long header (4,000 digits: 0.4 s).
TIMEOUT_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,12})?$"


async def request_timeout(
    x_inferq_timeout: Annotated[
        str | None,
        Header(
            description="Seconds this request may take: shorter than the model's timeout, "
            "or longer up to INFERQ_MAX_REQUEST_TIMEOUT_S.",
            json_schema_extra={"pattern": TIMEOUT_PATTERN},
        ),
    ] = None,
) -> float | None:
    """The seconds the caller asks for, if it does; `Services.timeout_for` bounds them by
    the model's own timeout and the server's maximum."""
    if x_inferq_timeout is None:
        return None
    if not re.fullmatch(TIMEOUT_PATTERN, x_inferq_timeout.strip()):
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a number of seconds")
    value = float(x_inferq_timeout)
    if not 0 < value < float("inf"):
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be positive")
    return value


ServicesDep = Annotated[Services, Depends(services_of)]
TimeoutDep = Annotated[float | None, Depends(request_timeout)]
