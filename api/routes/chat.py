"""`/v1/chat/completions` and `/v1/completions`, streamed as Server-Sent Events or not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.calls import (
    completion_event,
    prepare_chat,
    prepare_completion,
    render_chat,
    render_completion,
    usage,
)
from api.deps import REPLICA_HEADER, ServicesDep, TimeoutDep
from api.dispatch import Exchange
from api.services import Services
from app.engines import ENGINES
from app.errors import InferqError
from app.protocol.chat import ChatCompletionRequest, CompletionRequest

router = APIRouter()

#: How often a streamed request that waits for its first event checks its caller.
DISCONNECT_CHECK_S = 0.25

#: With `stream: true` the answer is Server-Sent Events rather than one JSON object;
#: the schema describes one event (before OpenAPI 3.2, `schema` is per event).
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion; Server-Sent Events with `stream: true`",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "data": {
                            "type": "string",
                            "description": "A chunk or an error object as JSON; `[DONE]` last",
                        },
                        "event": {"type": "string"},
                    },
                    "required": ["data"],
                }
            }
        },
    }
}


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def _relay(
    services: Services,
    exchange: Exchange,
    head: dict[str, Any] | None,
    piece: Callable[[dict[str, str]], dict[str, Any] | None],
    tail: Callable[[dict[str, Any]], list[dict[str, Any]]],
) -> AsyncIterator[bytes]:
    """Relay a worker's pieces as SSE; on error an error event, always `[DONE]` last.

    If the client goes away the response task is cancelled; the exchange is then
    closed from a fresh task (awaits in a cancelled scope would be cancelled too),
    which sets the cancel key that stops the generation.
    """
    try:
        if head:
            yield _sse(head)
        async for reply in exchange.replies():
            if "chunk" in reply:
                event = piece(reply["chunk"])
                if event:
                    yield _sse(event)
            else:
                for event in tail(reply["result"]):
                    yield _sse(event)
        yield b"data: [DONE]\n\n"
    except InferqError as exc:
        yield _sse(exc.to_openai())
        yield b"data: [DONE]\n\n"
    finally:
        services.spawn(exchange.close())


async def _passthrough(
    services: Services,
    exchange: Exchange,
    first_reply: asyncio.Future[dict[str, Any]],
    rest: AsyncIterator[dict[str, Any]],
) -> AsyncIterator[bytes]:
    """Relay a server's own SSE events (a relay engine) as they were written."""
    try:
        first = await first_reply
        if "sse" in first:
            yield first["sse"].encode()
        async for reply in rest:
            if "sse" in reply:
                yield reply["sse"].encode()
        yield b"data: [DONE]\n\n"
    except InferqError as exc:
        yield _sse(exc.to_openai())
        yield b"data: [DONE]\n\n"
    finally:
        first_reply.cancel()
        services.spawn(exchange.close())


async def _relayed_stream(
    services: Services, exchange: Exchange, request: Request
) -> StreamingResponse | Response:
    """A relay engine's stream starts with the server's first event. Waiting for it
    lets a request the server refuses (a context too long, a schema it cannot
    compile) be answered with the server's status as an error body, the way
    OpenAI answers, rather than inside a 200 stream. A caller who leaves while
    this waits (queueing, a long prefill) cancels the request at once."""
    replies = exchange.replies()
    first_reply = asyncio.ensure_future(anext(replies))
    started = time.monotonic()
    try:
        while not first_reply.done():
            if time.monotonic() - started > services.settings.sse_keepalive_s:
                # Long enough without a word: answer 200 now and keep the stream alive;
                # a refusal from here on comes as an error event, as any later one does.
                return _stream(services, _passthrough(services, exchange, first_reply, replies))
            await asyncio.wait({first_reply}, timeout=DISCONNECT_CHECK_S)
            if not first_reply.done() and await request.is_disconnected():
                first_reply.cancel()
                await exchange.close()
                return Response(status_code=499)
        first_reply.result()  # a refusal before the stream began: its own status
    except BaseException:
        first_reply.cancel()
        await exchange.close()
        raise
    return _stream(services, _passthrough(services, exchange, first_reply, replies))


#: An SSE comment: clients skip it, proxies see bytes on an idle stream.
KEEPALIVE = b": keep-alive\n\n"


async def _with_keepalives(events: AsyncIterator[bytes], every: float) -> AsyncIterator[bytes]:
    """`events`, with a comment whenever none came for `every` seconds: a streamed
    reasoning answer can wait minutes for its first token (queue, prefill, thinking),
    and proxies cut streams idle for less (nginx: 60 s)."""
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield KEEPALIVE
                continue
            finished, pending = pending, None
            try:
                event = finished.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def _stream(services: Services, events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        _with_keepalives(events, services.settings.sse_keepalive_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(
    body: ChatCompletionRequest, services: ServicesDep, asked: TimeoutDep, request: Request
) -> Any:
    call = await prepare_chat(body, services)
    spec = call.spec
    await services.admit(spec)
    timeout = services.timeout_for(spec, asked)
    exchange = await services.dispatcher.start(
        spec, call.task, call.payload, timeout, streaming=body.stream
    )
    completion_id, created = f"chatcmpl-{exchange.request_id}", int(time.time())
    if not body.stream:
        try:
            result = (await exchange.result()).result
        finally:
            await exchange.close()
        payload = render_chat(body, spec.name, result, exchange.request_id, created)
        return JSONResponse(payload, headers={REPLICA_HEADER: result["replica"]})

    if ENGINES[spec.engine].relay:
        return await _relayed_stream(services, exchange, request)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": spec.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def piece(delta: dict[str, str]) -> dict[str, Any] | None:
        out = {}
        if delta.get("reasoning"):
            out["reasoning_content"] = delta["reasoning"]
        if delta.get("content"):
            out["content"] = delta["content"]
        return chunk(out) if out else None

    def tail(result: dict[str, Any]) -> list[dict[str, Any]]:
        events = [chunk({}, result["finish_reason"])]
        if include_usage:
            events.append({**chunk({}), "choices": [], "usage": usage(result)})
        return events

    head = chunk({"role": "assistant", "content": ""})
    return _stream(services, _relay(services, exchange, head, piece, tail))


@router.post("/v1/completions", responses=STREAMED)
async def completions(
    body: CompletionRequest, services: ServicesDep, asked: TimeoutDep, request: Request
) -> Any:
    call = await prepare_completion(body, services)
    spec = call.spec
    await services.admit(spec)
    timeout = services.timeout_for(spec, asked)
    exchange = await services.dispatcher.start(
        spec, call.task, call.payload, timeout, streaming=body.stream
    )
    created = int(time.time())

    def event(text: str, finish: str | None) -> dict[str, Any]:
        return completion_event(exchange.request_id, created, spec.name, text, finish)

    if not body.stream:
        try:
            result = (await exchange.result()).result
        finally:
            await exchange.close()
        payload = render_completion(body, spec.name, result, exchange.request_id, created)
        return JSONResponse(payload, headers={REPLICA_HEADER: result["replica"]})

    if ENGINES[spec.engine].relay:
        return await _relayed_stream(services, exchange, request)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def piece(delta: dict[str, str]) -> dict[str, Any] | None:
        return event(delta["content"], None) if delta.get("content") else None

    def tail(result: dict[str, Any]) -> list[dict[str, Any]]:
        events = [event("", result["finish_reason"])]
        if include_usage:
            events.append({**event("", None), "choices": [], "usage": usage(result)})
        return events

    return _stream(services, _relay(services, exchange, None, piece, tail))
