"""Who is calling, and whether its key may do this: API keys and their scopes.

With no keys configured inferq is open (the one-host default); with keys, every
/v1 call needs `Authorization: Bearer <key>`: 401 without a valid one, 403 when
the key lacks the route's scope. A caller is known by a fingerprint of its key,
never the key itself: that is what the job store records as a job's owner, so
a leaked database does not leak keys, and a job is visible only to its key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Request

from api.services import Services, services_of
from app.errors import PermissionDenied
from app.keyring import Caller, Scope, identify


async def authenticate(
    services: Annotated[Services, Depends(services_of)],
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    return identify(services.keyring, authorization)


CallerInfo = Annotated[Caller, Depends(authenticate)]


def require(scope: Scope) -> Callable[..., Awaitable[Caller]]:
    """A dependency admitting only keys with `scope` (admin keys have every scope)."""

    async def check(request: Request, who: CallerInfo) -> Caller:
        if not who.may(scope):
            raise PermissionDenied(
                f"the key {who.name!r} may not do this: it needs the {scope.value!r} scope"
            )
        request.state.caller = who.name
        return who

    return check


async def caller(who: CallerInfo) -> str:
    """The owner of the jobs and files a call creates or may see."""
    return who.fingerprint


CallerDep = Annotated[str, Depends(caller)]
