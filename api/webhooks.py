"""Webhook targets and delivery.

A webhook makes the server send requests wherever a caller says, so targets
are checked twice: the URL when the job is submitted, and the addresses its
host resolves to when the call is made (a name may resolve elsewhere later).
Loopback, private and link-local addresses are refused unless the operator
allows them (INFERQ_WEBHOOK_ALLOW_LOOPBACK), which single-host setups and
tests do.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.errors import InvalidRequest

USER_AGENT = "inferq-webhook/1"


def _is_internal(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified


def check_webhook_url(url: str, allow_internal: bool) -> str:
    """Refuse at submit time what can never be delivered; returns the URL unchanged."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        # RFC 3986 has no place for them; a NUL could not even be stored (PostgreSQL).
        raise InvalidRequest("webhook URL holds a space or a control character", param="webhook")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("webhook must be an http or https URL", param="webhook")
    if len(url) > 2048:
        raise InvalidRequest("webhook URL is longer than 2048 characters", param="webhook")
    if allow_internal:
        return url
    host = parts.hostname
    if host == "localhost" or host.endswith(".localhost"):
        raise InvalidRequest(
            "webhook to a loopback address is not allowed on this server", param="webhook"
        )
    try:
        internal = _is_internal(host)
    except ValueError:
        internal = False  # a name: checked again, resolved, when the call is made
    if internal:
        raise InvalidRequest(
            "webhook to a loopback or private address is not allowed on this server",
            param="webhook",
        )
    return url


async def _resolves_internal(host: str, port: int) -> bool:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return any(_is_internal(str(info[4][0])) for info in infos)


async def deliver(
    client: httpx.AsyncClient, url: str, job: dict[str, Any], allow_internal: bool
) -> str | None:
    """POST the job; None when the target took it (2xx), else why not."""
    parts = urlsplit(url)
    try:
        if not allow_internal and await _resolves_internal(
            parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        ):
            return "the webhook host resolves to a loopback or private address"
        response = await client.post(
            url,
            json=job,
            headers={"User-Agent": USER_AGENT, "X-Inferq-Job-Id": str(job["id"])},
        )
    except (httpx.HTTPError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= response.status_code < 300:
        return None
    return f"the webhook answered HTTP {response.status_code}"
