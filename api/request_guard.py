"""What every request must be before a route sees it: a URL without NUL, and a body of
bounded size that arrives in time and keeps to JSON's own rules.

uvicorn times out idle keep-alive connections but not a body that trickles in: a
client sending a byte a second would hold a connection, and the memory of its
half-read body, for as long as it liked. This middleware sits in front of every
route and

- counts a body's bytes as they arrive and answers 413 as soon as they pass
  INFERQ_MAX_BODY_BYTES, or at once, before reading anything, when the request's
  Content-Length says so. Uploads (`POST /v1/files`) are spooled to disk and
  bounded the same way by INFERQ_MAX_UPLOAD_BYTES (and a little for their
  multipart framing), chunked ones included: the spool never outgrows it;
- answers 408 when the whole body has not arrived INFERQ_BODY_TIMEOUT_S after
  the request's headers did. An upload may take as long as it needs while its
  bytes keep coming: for it the timeout runs between two chunks;
- refuses a JSON body that is not UTF-8 (400), checking each chunk as it arrives:
  Python's parser would take UTF-16, or UTF-8-encoded surrogates, which JSON
  between systems must not be (RFC 8259);
- refuses the `NaN` and `Infinity` literals that Python's JSON parser accepts and
  JSON does not, and strings holding a lone UTF-16 surrogate (`"\\ud800"`), which
  JSON's escapes allow and Unicode does not (400): they would pass into numbers,
  tokenizers, job records and responses that cannot carry them. Only a body
  holding such bytes (`NaN`, `Infinity`, `\\uD800`-`\\uDFFF`, pairs included) is
  parsed a second time to look.

A URL holding a NUL byte (`%00`) is refused with 400 before anything else:
no id, name or cursor inferq knows holds one, and PostgreSQL cannot even
compare a text column with one (the query would fail with a server error).

A response sent before its request's body was read (a 429 or 401 decided from
the headers) first reads and drops the rest of the body, bounded by the size
limit and the timeout; past those, it closes the connection instead, so the
unread rest is never taken for the next request.

Slow headers are uvicorn's business, not this middleware's: the app sees a
request only once all its headers are in. uvicorn (h11 or httptools) keeps no
header deadline of its own; a connection that never completes its headers
waits until the client gives up. Put a proxy in front of inferq where that
matters (nginx's `client_header_timeout`).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import BodyRejected, error_response
from app.errors import BodyTimedOut, InferqError, InvalidRequest, PayloadTooLarge

#: Routes whose bodies are uploads (multipart, spooled to disk, with their own limit).
UPLOAD_ROUTES = frozenset({("POST", "/v1/files")})
UPLOAD_FRAMING = 64 * 1024

#: Bytes that may start what JSON's grammar allows Python but not text or numbers:
#: a non-finite literal, or a surrogate's escape.
_SUSPECT = re.compile(rb"NaN|Infinity|\\u[dD][89a-fA-F]")
_OVERLAP = len(b"Infinity") - 1  # one split across two chunks is still seen
_INLINE_CHECK_BYTES = 64 * 1024


class _NotJsonValue(ValueError):
    pass


def _refuse_constant(literal: str) -> Any:
    raise _NotJsonValue(f"the request body holds {literal}: send a finite number, or null")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class RequestGuard:
    """ASGI middleware: see the module's docstring."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, timeout_s: float, upload_max_bytes: int
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.upload_max_bytes = upload_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _GuardedRequest(self, scope, receive, send).run()


class _GuardedRequest:
    def __init__(self, guard: RequestGuard, scope: Scope, receive: Receive, send: Send) -> None:
        self.app = guard.app
        self.scope = scope
        self._receive = receive
        self._send = send
        self.timeout_s = guard.timeout_s
        self.deadline = asyncio.get_running_loop().time() + guard.timeout_s
        self.upload = (scope["method"], scope["path"]) in UPLOAD_ROUTES
        # An upload's multipart framing and form fields come on top of the file's bytes.
        self.limit = guard.upload_max_bytes + UPLOAD_FRAMING if self.upload else guard.max_bytes
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "").strip()
        self.declared = int(declared) if declared.isdigit() else None
        self.body_done = not (self.declared or "transfer-encoding" in headers)
        self.json = _is_json(headers.get("content-type", ""))
        self.utf8 = codecs.getincrementaldecoder("utf-8")() if self.json else None
        self.received = 0
        self.chunks: list[bytes] = []
        self.tail = b""
        self.suspect = False
        self.started = False

    def too_large(self) -> PayloadTooLarge:
        if self.upload:
            return PayloadTooLarge(
                f"the upload is larger than {self.limit - UPLOAD_FRAMING} bytes "
                "(INFERQ_MAX_UPLOAD_BYTES)",
                param="file",
            )
        return PayloadTooLarge(
            f"the request body is larger than {self.limit} bytes (INFERQ_MAX_BODY_BYTES)"
        )

    async def run(self) -> None:
        if "\x00" in self.scope["path"] or b"%00" in self.scope["query_string"]:
            await self.reply(InvalidRequest("the URL holds a NUL byte (%00)", code="invalid_url"))
            return
        if self.declared is not None and self.declared > self.limit:
            await self.reply(self.too_large())
            return
        try:
            await self.app(self.scope, self.receive, self.send)
        except BodyRejected as exc:  # raised where no route's error handling saw it
            if self.started:
                raise
            await self.reply(exc.error)

    async def reply(self, error: InferqError) -> None:
        response = error_response(error, headers={"Connection": "close"})
        await response(self.scope, self._receive, self._send)

    async def receive(self) -> Message:
        if self.body_done:
            return await self._receive()
        try:
            if self.upload:
                async with asyncio.timeout(self.timeout_s):
                    message = await self._receive()
            else:
                async with asyncio.timeout_at(self.deadline):
                    message = await self._receive()
        except TimeoutError:
            raise BodyRejected(
                BodyTimedOut(
                    f"the request body did not arrive within {self.timeout_s:g} s "
                    "(INFERQ_BODY_TIMEOUT_S)"
                )
            ) from None
        if message["type"] != "http.request":
            return message
        chunk: bytes = message.get("body", b"")
        self.received += len(chunk)
        if self.received > self.limit:
            raise BodyRejected(self.too_large())
        more = message.get("more_body", False)
        # Set before any check can refuse this chunk: a refused last chunk leaves nothing
        # to drain, and waiting for more would hold the 400 back by the body timeout.
        self.body_done = not more
        if self.utf8 is not None:
            try:
                self.utf8.decode(chunk, final=not more)
            except UnicodeDecodeError:
                raise BodyRejected(
                    InvalidRequest("the request body is not valid UTF-8 JSON")
                ) from None
        if self.json:
            self.note(chunk)
        if not more:
            chunks, self.chunks = self.chunks, []
            if self.suspect:
                body = b"".join(chunks)
                if len(body) > _INLINE_CHECK_BYTES:  # a large parse would stall the loop
                    await asyncio.to_thread(self.check_values, body)
                else:
                    self.check_values(body)
        return message

    def note(self, chunk: bytes) -> None:
        """Keep a JSON body's chunks (the same objects the app keeps: no copy) and watch
        for suspect bytes."""
        self.chunks.append(chunk)
        if not self.suspect:
            seam = self.tail + chunk[:_OVERLAP]
            self.suspect = bool(_SUSPECT.search(chunk) or _SUSPECT.search(seam))
            self.tail = (self.tail + chunk[-_OVERLAP:])[-_OVERLAP:]

    @staticmethod
    def check_values(body: bytes) -> None:
        try:
            value = json.loads(body, parse_constant=_refuse_constant)
            # Surrogate pairs decode to one character; a lone surrogate stays and
            # cannot be encoded.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except _NotJsonValue as exc:
            raise BodyRejected(InvalidRequest(str(exc))) from None
        except UnicodeEncodeError:
            raise BodyRejected(
                InvalidRequest(
                    "the request body holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF "
                    "without its pair), which is not text"
                )
            ) from None
        except (ValueError, RecursionError):
            pass  # not JSON at all: the route's own parsing says so

    async def drain(self) -> bool:
        """Read the rest of a body the app answered without reading; True once all of it is in.

        Closing a connection while the client still sends makes the kernel answer the
        late bytes with a reset, which can destroy the response before the client reads
        it (a 429 or 401 sent early would be lost). A body within the size limit is
        read, within the body timeout, and dropped; a larger one closes the connection.
        """
        if self.upload:
            return False
        self.json, self.utf8, self.chunks = False, None, []  # dropped unread: nothing to check
        try:
            while not self.body_done:
                if (await self.receive())["type"] != "http.request":
                    return False  # the client went away
        except BodyRejected:
            return False
        return True

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if not self.body_done and not await self.drain():
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
        await self._send(message)
