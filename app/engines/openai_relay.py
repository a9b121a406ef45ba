"""Forwarding a request to an OpenAI-compatible server on loopback, and its answer back.

One event loop in a thread of its own holds one HTTP client for every request
of the worker: each Celery task thread hands its request over and follows what
comes back through a queue, so hundreds of streams cost hundreds of sockets,
not hundreds of event loops. The task thread does everything that needs it:
it joins streamed events that come close together into one Redis message
(each message costs a publish here and a JSON round in the API), looks for the
caller's cancel key every tenth of a second, and when the caller has gone,
cancels the upstream request, which closes its connection: vLLM aborts a
request whose client disconnects.

Streamed events are passed on as the server wrote them (bytes of `data: {...}`
blocks); only events that carry usage, an error, or reasoning to rename are
parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from app.errors import (
    EngineFailure,
    InferqError,
    InvalidRequest,
    ModelUnavailable,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestCancelled,
    RequestTimedOut,
)

#: How often a waiting task thread looks for its caller's cancel key.
CHECK_EVERY_S = 0.1

#: The upstream server's status -> the error the caller gets (same status).
STATUS_ERRORS: dict[int, type[InferqError]] = {
    400: InvalidRequest,
    404: NotFound,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: Overloaded,
    503: ModelUnavailable,
    504: RequestTimedOut,
}


def upstream_error(status: int, raw: bytes | dict[str, Any]) -> InferqError:
    """The server's error as inferq's: its message and param, the status it chose."""
    try:
        body = json.loads(raw) if isinstance(raw, bytes | bytearray) else raw
    except ValueError:
        body = {"message": raw.decode("utf-8", "replace")[:2000]}
    detail = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(detail, dict):
        detail = {"message": str(detail)}
    message = str(detail.get("message") or f"the model server answered {status}")
    param = detail.get("param") if isinstance(detail.get("param"), str) else None
    code = detail.get("code") if isinstance(detail.get("code"), str) else None
    if "maximum context length" in message or "context length" in message.lower():
        code = code or "context_length_exceeded"
    if isinstance(detail.get("code"), int) and status == 200:
        status = int(detail["code"])  # an error event inside a stream carries its status
    cls = STATUS_ERRORS.get(status, EngineFailure)
    return cls(message, param=param, code=code)


def add_reasoning_content(message: dict[str, Any]) -> None:
    """vLLM names the reasoning `reasoning`; DeepSeek's API and the clients built on
    it (Xinference, Dify, LangChain's DeepSeek chat model) read `reasoning_content`.
    Both are given."""
    if message.get("reasoning") is not None and "reasoning_content" not in message:
        message["reasoning_content"] = message["reasoning"]


def _rename_in_event(data: bytes) -> bytes:
    chunk = json.loads(data)
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if isinstance(delta, dict):
            add_reasoning_content(delta)
    return json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode()


class OpenAIRelay:
    def __init__(self, base_url: str, max_connections: int) -> None:
        import httpx

        self.base_url = base_url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="inferq-relay-loop", daemon=True
        )
        self._thread.start()

        async def make() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=base_url,
                # No read timeout: a long prefill or a long think is not a failure; the
                # caller's deadline and cancel key end a request that waits too long.
                timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
                limits=httpx.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
            )

        self._client = asyncio.run_coroutine_threadsafe(make(), self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):  # closing: a client already broken is fine
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _exchange(
        self,
        path: str,
        body: dict[str, Any],
        stream: bool,
        headers: dict[str, str],
        inbox: queue.SimpleQueue[tuple[str, Any]],
    ) -> None:
        try:
            async with self._client.stream("POST", path, json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    inbox.put(("status", (resp.status_code, await resp.aread())))
                    return
                if not stream:
                    inbox.put(("json", await resp.aread()))
                    return
                buffer = b""
                async for piece in resp.aiter_raw():
                    buffer += piece
                    if b"\r" in buffer:
                        buffer = buffer.replace(b"\r\n", b"\n")
                    if b"\n\n" in buffer:
                        *events, buffer = buffer.split(b"\n\n")
                        inbox.put(("events", events))
                inbox.put(("end", None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            inbox.put(("failed", exc))

    def run(
        self,
        path: str,
        body: dict[str, Any],
        *,
        request_id: str,
        stream: bool,
        should_stop: Callable[[], bool],
        deadline: float,
        emit: Callable[[str], None] | None = None,
        window_s: float = 0.02,
        reasoning: bool = False,
    ) -> dict[str, Any]:
        """Forward one request; stream its events through `emit`; the outcome.

        The outcome is `{"response": <the server's JSON>, ...}` for a plain request
        and the usage for a streamed one. Raises the server's error as inferq's,
        `RequestCancelled` when the caller has gone, and `RequestTimedOut` when the
        deadline passes (for a stream: when no event came for as long as the
        caller was willing to wait at the start, the way the API times streams).
        """
        body = dict(body)
        strip_usage = False
        if stream:
            options = dict(body.get("stream_options") or {})
            if not options.get("include_usage"):
                # Asked for always, so the worker can count tokens; not passed on.
                options["include_usage"] = True
                strip_usage = True
            body["stream_options"] = options
        inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        # Raw bytes are relayed: nothing may be compressed on the way.
        headers = {"X-Request-Id": request_id, "Accept-Encoding": "identity"}
        future = asyncio.run_coroutine_threadsafe(
            self._exchange(path, body, stream, headers, inbox), self._loop
        )
        try:
            return self._follow(
                inbox, should_stop, deadline, emit, window_s, reasoning, strip_usage
            )
        finally:
            if not future.done():
                future.cancel()  # closes the connection: the server aborts the request

    def _follow(
        self,
        inbox: queue.SimpleQueue[tuple[str, Any]],
        should_stop: Callable[[], bool],
        deadline: float,
        emit: Callable[[str], None] | None,
        window_s: float,
        reasoning: bool,
        strip_usage: bool,
    ) -> dict[str, Any]:
        pending: list[bytes] = []
        last_flush = float("-inf")
        last_check = time.monotonic()
        usage: dict[str, Any] | None = None
        patience = max(1.0, deadline - time.time())

        # The first two events go out at once: a chat stream opens with an event that
        # only names the role, and the one after it carries the first token, which is
        # what a reader waits for. Later ones are joined within the window.
        immediate = 2

        def flush() -> None:
            nonlocal last_flush, immediate
            if pending and emit is not None:
                emit(b"".join(pending).decode("utf-8"))
                if immediate > 0:
                    immediate -= len(pending)
            pending.clear()
            last_flush = time.monotonic() if immediate <= 0 else float("-inf")

        while True:
            now = time.monotonic()
            wait = CHECK_EVERY_S
            if pending:
                wait = min(wait, max(0.0005, window_s - (now - last_flush)))
            try:
                kind, value = inbox.get(timeout=wait)
            except queue.Empty:
                kind, value = "", None
            if kind == "events":
                deadline = max(deadline, time.time() + patience)
                for event in value:
                    data = event[5:].strip() if event.startswith(b"data:") else b""
                    if not data:
                        continue  # a comment or keep-alive line
                    if data == b"[DONE]":
                        continue
                    if data.startswith(b'{"error"') or data.startswith(b'{"object":"error"'):
                        flush()
                        raise upstream_error(200, data)
                    if b'"usage":{' in data:
                        chunk = json.loads(data)
                        usage = chunk.get("usage") or usage
                        if strip_usage and not chunk.get("choices"):
                            continue
                    if reasoning and b'"reasoning"' in data:
                        data = _rename_in_event(data)
                    pending.append(b"data: " + data + b"\n\n")
            elif kind == "json":
                response = json.loads(value)
                for choice in response.get("choices") or ():
                    if reasoning and isinstance(choice.get("message"), dict):
                        add_reasoning_content(choice["message"])
                return {"response": response, **_counts(response.get("usage"))}
            elif kind == "status":
                flush()
                status, raw = value
                raise upstream_error(int(status), raw)
            elif kind == "failed":
                flush()
                raise ModelUnavailable(
                    f"the model server of this replica did not answer: {value!r}",
                    code="model_server_unreachable",
                )
            elif kind == "end":
                flush()
                return _counts(usage)
            if pending and time.monotonic() - last_flush >= window_s:
                flush()
            now = time.monotonic()
            if now - last_check >= CHECK_EVERY_S:
                last_check = now
                if should_stop():
                    flush()
                    raise RequestCancelled("the caller went away")
                if time.time() > deadline:
                    flush()
                    raise RequestTimedOut("the model server did not answer in time")


def _counts(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
    }
