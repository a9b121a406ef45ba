"""`X-Request-Id`: taken from the caller (a proxy's or the app's id) or made here, put on
every log line written for the request, sent to the worker with its task, and
returned on the response, so one request can be followed across API and workers."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import REQUEST_ID, request_id_from

log = logging.getLogger("inferq.api.requests")

HEADER = b"x-request-id"


class RequestIds:
    """Pure ASGI, so the id is set before any other middleware and streamed bodies
    keep it (a BaseHTTPMiddleware would run the app in another task)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == HEADER), None)
        request_id = request_id_from(given.decode("latin-1") if given else None)
        token = REQUEST_ID.set(request_id)
        started = time.monotonic()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The path as sent (percent-encoded): a decoded one could forge log lines.
            raw = scope.get("raw_path") or scope["path"].encode()
            log.info(
                "%s %s %s %.1f ms",
                scope["method"],
                raw.decode("latin-1").encode("unicode_escape").decode(),
                status,
                (time.monotonic() - started) * 1000,
            )
            REQUEST_ID.reset(token)
