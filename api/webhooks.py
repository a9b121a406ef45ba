"""Webhook targets, delivery and signatures.

A webhook makes the server send requests wherever a caller says, so targets
are checked twice: the URL when the job is submitted, and the addresses its
host resolves to when the call is made. The call then goes to the very
address that was checked (a name that resolves elsewhere a moment later, DNS
rebinding, changes nothing). Only globally routable addresses are allowed
(`ipaddress.is_global`, with the IPv4 address inside NAT64, 6to4 and
IPv4-mapped IPv6 addresses checked too) unless the operator allows loopback
and private ones (INFERQ_WEBHOOK_ALLOW_LOOPBACK), which single-host setups and
tests do.

Each delivery has one overall deadline (INFERQ_WEBHOOK_TIMEOUT_S), covering
resolution, connection and the whole response: a target that answers a byte
at a time cannot hold it longer. With INFERQ_WEBHOOK_SECRET set, deliveries
are signed in the Standard Webhooks shape: `webhook-id`, `webhook-timestamp`
and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpx

from app.errors import InvalidRequest

USER_AGENT = "inferq-webhook/1"
#: NAT64's well-known prefix: the last 32 bits are an IPv4 address (RFC 6052).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _is_internal(address: str) -> bool:
    """True for any address that is not globally routable, however it is written."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None and not inner.is_global:
            return True
    return not ip.is_global


def _split(url: str) -> tuple[SplitResult, int]:
    """The URL's parts and its port; raises InvalidRequest for what cannot be sent to."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a port out of range, a malformed IPv6 literal
        raise InvalidRequest(f"webhook URL is not valid: {exc}", param="webhook") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("webhook must be an http or https URL", param="webhook")
    return parts, port


def check_webhook_url(url: str, allow_internal: bool) -> str:
    """Refuse at submit time what can never be delivered; returns the URL unchanged."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        # RFC 3986 has no place for them; a NUL could not even be stored (PostgreSQL).
        raise InvalidRequest("webhook URL holds a space or a control character", param="webhook")
    if len(url) > 2048:
        raise InvalidRequest("webhook URL is longer than 2048 characters", param="webhook")
    parts, _ = _split(url)
    if allow_internal:
        return url
    host = parts.hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        raise InvalidRequest(
            "webhook to a loopback address is not allowed on this server", param="webhook"
        )
    try:
        internal = _is_internal(host)
    except ValueError:
        internal = False  # a name: resolved and checked when the call is made
    if internal:
        raise InvalidRequest(
            "webhook to a loopback, private or otherwise non-public address is not allowed "
            "on this server",
            param="webhook",
        )
    return url


def signature_headers(secret: str, message_id: str, body: bytes, now: int) -> dict[str, str]:
    """Standard Webhooks headers; a `whsec_` secret is base64 after its prefix."""
    key = (
        base64.b64decode(secret.removeprefix("whsec_"))
        if secret.startswith("whsec_")
        else secret.encode()
    )
    signed = f"{message_id}.{now}.".encode() + body
    digest = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(now),
        "webhook-signature": f"v1,{digest}",
    }


async def _checked_address(host: str, port: int, allow_internal: bool) -> str:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    if not allow_internal and any(_is_internal(a) for a in addresses):
        raise PermissionError("the webhook host resolves to a non-public address")
    return addresses[0]


async def _post(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    allow_internal: bool,
) -> int:
    parts, port = _split(url)
    host = parts.hostname or ""
    address = await _checked_address(host, port, allow_internal)
    literal = f"[{address}]" if ":" in address else address
    target = parts._replace(netloc=f"{literal}:{port}").geturl()
    default_port = port == (443 if parts.scheme == "https" else 80)
    headers = {**headers, "Host": host if default_port else f"{host}:{port}"}
    # The connection goes to the address just checked; TLS still names and verifies
    # the host.
    async with client.stream(
        "POST", target, content=body, headers=headers, extensions={"sni_hostname": host}
    ) as response:
        await response.aread()
        return response.status_code


async def deliver(
    client: httpx.AsyncClient,
    url: str,
    job: dict[str, Any],
    allow_internal: bool,
    timeout_s: float,
    secret: str | None = None,
) -> str | None:
    """POST the job; None when the target took it (2xx), else why not. Never raises:
    every failure is a reason the caller records."""
    body = json.dumps(job, separators=(",", ":")).encode()
    headers = {
        "User-Agent": USER_AGENT,
        "Content-Type": "application/json",
        "X-Inferq-Job-Id": str(job["id"]),
    }
    if secret:
        headers.update(signature_headers(secret, str(job["id"]), body, int(time.time())))
    try:
        async with asyncio.timeout(timeout_s):
            status = await _post(client, url, body, headers, allow_internal)
    except TimeoutError:
        return f"the webhook did not answer within {timeout_s:g} s"
    except InvalidRequest as exc:
        return exc.message
    except PermissionError as exc:
        return str(exc)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= status < 300:
        return None
    return f"the webhook answered HTTP {status}"
