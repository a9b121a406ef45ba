"""API keys: who is calling. With no keys configured inferq is open (one-host default).

A caller is known by a fingerprint of its key, never the key itself: that is
what the job store records as a job's owner, so a leaked database does not leak
keys, and a job is visible only to the key that submitted it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header

from api.services import Services, get_services
from app.errors import AuthenticationFailed

ANONYMOUS = ""


def key_fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def caller(
    services: Annotated[Services, Depends(get_services)],
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    keys = services.settings.api_keys
    if not keys:
        return ANONYMOUS
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "no API key: send `Authorization: Bearer <key>`", code="missing_api_key"
        )
    token = token.strip()
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise AuthenticationFailed("the API key is not valid")
    return key_fingerprint(token)


CallerDep = Annotated[str, Depends(caller)]
