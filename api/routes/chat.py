"""`/v1/chat/completions` and `/v1/completions`, streamed as Server-Sent Events or not."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import REPLICA_HEADER, ServicesDep, TimeoutDep
from api.dispatch import Exchange
from api.services import Services
from app.celery_app import GENERATE_TASK
from app.errors import InferqError
from app.generation import check_context
from app.protocol.chat import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationTask,
    SamplingFields,
)
from app.registry import ModelSpec

router = APIRouter()


def _sampling(body: SamplingFields, max_tokens: int | None) -> dict[str, Any]:
    return {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": body.stop,
        "seed": body.seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "stream": body.stream,
    }


async def _check_fits(services: Services, spec: ModelSpec, task: GenerationTask) -> None:
    """Refuse, before queueing, a prompt or budget the model's context cannot hold."""
    sizer = services.prompt_sizer(spec)
    if sizer is None:
        return
    tokens = await asyncio.to_thread(sizer.count, task)
    check_context(tokens, task.max_tokens, sizer.context_length)


def _usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(result["prompt_tokens"]), int(result["completion_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
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


def _stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, services: ServicesDep, timeout: TimeoutDep
) -> Any:
    spec = services.model(body.model, kind="chat")
    task = GenerationTask(
        messages=[{"role": m.role, "content": m.text()} for m in body.messages],
        json_mode=bool(body.response_format and body.response_format.type == "json_object"),
        chat_template_kwargs=body.chat_template_kwargs,
        **_sampling(body, body.token_limit()),
    )
    await _check_fits(services, spec, task)
    exchange = await services.dispatcher.start(
        spec, GENERATE_TASK, task.model_dump(), timeout, streaming=body.stream
    )
    completion_id, created = f"chatcmpl-{exchange.request_id}", int(time.time())
    if not body.stream:
        try:
            result = (await exchange.result()).result
        finally:
            await exchange.close()
        message: dict[str, Any] = {"role": "assistant", "content": result["text"]}
        if result.get("reasoning") is not None:
            message["reasoning_content"] = result["reasoning"]
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": spec.name,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": result["finish_reason"],
                    "logprobs": None,
                }
            ],
            "usage": _usage(result),
            "system_fingerprint": None,
        }
        return JSONResponse(payload, headers={REPLICA_HEADER: result["replica"]})

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
            events.append({**chunk({}), "choices": [], "usage": _usage(result)})
        return events

    head = chunk({"role": "assistant", "content": ""})
    return _stream(_relay(services, exchange, head, piece, tail))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, services: ServicesDep, timeout: TimeoutDep) -> Any:
    spec = services.model(body.model, kind="chat")
    task = GenerationTask(prompt=body.prompt_text(), **_sampling(body, body.max_tokens))
    await _check_fits(services, spec, task)
    exchange = await services.dispatcher.start(
        spec, GENERATE_TASK, task.model_dump(), timeout, streaming=body.stream
    )
    completion_id, created = f"cmpl-{exchange.request_id}", int(time.time())

    def event(text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": spec.name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    if not body.stream:
        try:
            result = (await exchange.result()).result
        finally:
            await exchange.close()
        payload = {**event(result["text"], result["finish_reason"]), "usage": _usage(result)}
        return JSONResponse(payload, headers={REPLICA_HEADER: result["replica"]})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def piece(delta: dict[str, str]) -> dict[str, Any] | None:
        return event(delta["content"], None) if delta.get("content") else None

    def tail(result: dict[str, Any]) -> list[dict[str, Any]]:
        events = [event("", result["finish_reason"])]
        if include_usage:
            events.append({**event("", None), "choices": [], "usage": _usage(result)})
        return events

    return _stream(_relay(services, exchange, None, piece, tail))
