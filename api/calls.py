"""What each inference endpoint does before and after a worker runs it.

`prepare` validates a body and turns it into a task for a model's queue;
`render` turns the worker's result into the endpoint's response. The sync
routes and async jobs use the same two functions, so a job is refused for
exactly the reasons the sync call would be, and its result has exactly the
sync response's shape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from api.metrics import note_model
from app.celery_app import EMBEDDINGS_TASK, GENERATE_TASK, RERANK_TASK
from app.embedding import b64_to_vector
from app.engines import ENGINES
from app.errors import InvalidRequest
from app.generation import check_context
from app.limits import check_input_limits
from app.protocol.chat import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationTask,
    RelayTask,
    SamplingFields,
    unhonoured_fields,
)
from app.protocol.embeddings import EmbeddingRequest, EmbeddingResult, EmbeddingTask
from app.protocol.rerank import RerankRequest, RerankResult, RerankTask
from app.registry import ModelSpec

if TYPE_CHECKING:
    from api.services import Services


@dataclass(frozen=True)
class Prepared:
    body: Any
    spec: ModelSpec
    task: str
    payload: dict[str, Any]
    #: Inputs the engine will run (texts, documents): what admission plans with.
    work: int = 0


@dataclass(frozen=True)
class EndpointCall:
    path: str
    request_model: type[BaseModel]
    prepare: Callable[[Any, Services], Awaitable[Prepared]]
    # (body, model name, worker result, request or job id, created) -> response body
    render: Callable[[Any, str, dict[str, Any], str, int], dict[str, Any]]

    def parse(self, raw: Any, param_prefix: str = "body") -> Any:
        """Validate a raw JSON body the way FastAPI would for the sync route."""
        try:
            return self.request_model.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            param = f"{param_prefix}.{loc}" if loc else param_prefix
            message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            raise InvalidRequest(f"{param}: {message}", param=param) from None


# ---- embeddings ---------------------------------------------------------------------


async def prepare_embeddings(body: EmbeddingRequest, services: Services) -> Prepared:
    spec = services.model(body.model, kind="embedding")
    note_model(spec.name)
    check_input_limits(body.input, services.settings)
    if not spec.options.get("token_id_input") and any(isinstance(i, list) for i in body.input):
        raise InvalidRequest(
            f"the model {spec.name!r} does not take token ids as input: ids from another "
            "tokenizer (tiktoken's, which LangChain's OpenAIEmbeddings sends unless "
            "check_embedding_ctx_length=False) would give wrong vectors. Send text; a "
            "registry entry's token_id_input: true takes ids of the model's own tokenizer",
            param="input",
            code="token_ids_not_accepted",
        )
    task = EmbeddingTask(inputs=body.input, truncate=body.truncate, dimensions=body.dimensions)
    return Prepared(body, spec, EMBEDDINGS_TASK, task.model_dump(), len(body.input))


def render_embeddings(
    body: EmbeddingRequest, model: str, raw: EmbeddingResult, _: str, __: int
) -> dict[str, Any]:
    # The worker's own result, read as it is: it was built by inferq's code, and
    # validating it again cost a tenth of the route's time with a fast model.
    as_base64 = body.encoding_format == "base64"
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": b64 if as_base64 else b64_to_vector(b64).tolist(),
        }
        for index, b64 in enumerate(raw["vectors_b64"])
    ]
    tokens = int(raw["prompt_tokens"])
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "inferq": {"truncated_inputs": raw["truncated"], "replica": raw["replica"]},
    }


# ---- rerank -------------------------------------------------------------------------


async def prepare_rerank(body: RerankRequest, services: Services) -> Prepared:
    spec = services.model(body.model, kind="rerank")
    note_model(spec.name)
    check_input_limits(body.documents, services.settings, param="documents")
    check_input_limits([body.query], services.settings, param="query")
    task = RerankTask(query=body.query, documents=body.documents, truncate=body.truncate)
    return Prepared(body, spec, RERANK_TASK, task.model_dump(), len(body.documents))


def render_rerank(
    body: RerankRequest, model: str, raw: RerankResult, request_id: str, _: int
) -> dict[str, Any]:
    scores: list[float] = raw["scores"]
    tokens = int(raw["input_tokens"])
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if body.top_n is not None:
        order = order[: body.top_n]
    return {
        "id": request_id,
        "model": model,
        "results": [
            {
                "index": i,
                "relevance_score": scores[i],
                "document": {"text": body.documents[i]} if body.return_documents else None,
            }
            for i in order
        ],
        # Jina's count; Cohere's and Xinference's are in meta.
        "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
        "meta": {
            "api_version": None,
            "billed_units": None,
            "tokens": {"input_tokens": tokens, "output_tokens": 0},
            "warnings": None,
            "truncated_documents": raw["truncated"],
            "replica": raw["replica"],
        },
    }


# ---- chat and completions -----------------------------------------------------------


def _sampling(body: SamplingFields, max_tokens: int | None) -> dict[str, Any]:
    extra = body.model_extra or {}
    top_k, penalty = extra.get("top_k"), extra.get("repetition_penalty")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < -1):
        raise InvalidRequest("top_k must be an integer, -1 or more", param="top_k")
    if penalty is not None and (
        not isinstance(penalty, int | float) or isinstance(penalty, bool) or not 0 < penalty <= 10
    ):
        raise InvalidRequest(
            "repetition_penalty must be a number in (0, 10]", param="repetition_penalty"
        )
    return {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": None if top_k is None else max(0, top_k),  # 0 (or -1): no top-k cut
        "repetition_penalty": penalty,
        "stop": body.stop,
        "seed": body.seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "stream": body.stream,
    }


def refuse_unhonoured(body: SamplingFields, spec: ModelSpec) -> None:
    """A field the model's engine cannot honour is a 400 naming it, never ignored."""
    asked = unhonoured_fields(body, ENGINES[spec.engine].honours)
    if asked:
        raise InvalidRequest(
            f"{asked[0]} is not supported by model {spec.name!r} (engine {spec.engine}); "
            "leave it out, or use a model served by vllm",
            param=asked[0],
            code="unsupported_parameter",
        )


def relayed(spec: ModelSpec, body: SamplingFields, path: str) -> Prepared:
    """A request for a relay engine: the caller's body goes to the model's own server,
    which validates every field against the model it serves."""
    declared = spec.options.get("max_model_len")
    limit = body.token_limit() if isinstance(body, ChatCompletionRequest) else body.max_tokens
    if declared and limit and limit >= int(declared):
        check_context(1, limit, int(declared))
    task = RelayTask(path=path, body=body.forwarded(spec.name), stream=body.stream)
    return Prepared(body, spec, GENERATE_TASK, task.model_dump())


async def check_fits(services: Services, spec: ModelSpec, task: GenerationTask) -> None:
    """Refuse, before queueing, a prompt or budget the model's context cannot hold."""
    sizer = services.prompt_sizer(spec)
    if sizer is None:
        # No tokenizer here: at least hold the budget to the declared context.
        declared = spec.options.get("max_model_len") or spec.options.get("n_ctx")
        if declared and task.max_tokens and task.max_tokens >= int(declared):
            check_context(1, task.max_tokens, int(declared))
        return
    tokens = await asyncio.to_thread(sizer.count, task)
    check_context(tokens, task.max_tokens, sizer.context_length)


def usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(result["prompt_tokens"]), int(result["completion_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def prepare_chat(body: ChatCompletionRequest, services: Services) -> Prepared:
    spec = services.model(body.model, kind="chat")
    note_model(spec.name)
    if ENGINES[spec.engine].relay:
        return relayed(spec, body, "/v1/chat/completions")
    refuse_unhonoured(body, spec)
    for index, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for part in message.content:
                if part.type != "text":
                    raise InvalidRequest(
                        f"messages[{index}] has a {part.type!r} part; model {spec.name!r} "
                        "reads text only",
                        param=f"messages.{index}.content",
                        code="unsupported_parameter",
                    )
    response_format = body.response_format
    schema = None
    if response_format is not None and response_format.type == "json_schema":
        assert response_format.json_schema is not None
        schema = response_format.json_schema.json_schema
    task = GenerationTask(
        messages=[{"role": m.role, "content": m.text()} for m in body.messages],
        json_mode=response_format is not None and response_format.type != "text",
        json_schema=schema,
        chat_template_kwargs=body.chat_template_kwargs,
        **_sampling(body, body.token_limit()),
    )
    await check_fits(services, spec, task)
    return Prepared(body, spec, GENERATE_TASK, task.model_dump())


def render_relayed(result: dict[str, Any], model: str, request_id: str) -> dict[str, Any]:
    """The server's own response, under inferq's id and the model's registry name."""
    response = dict(result["response"])
    prefix = "chatcmpl" if response.get("object") == "chat.completion" else "cmpl"
    response["id"] = f"{prefix}-{request_id}"
    response["model"] = model
    return response


def render_chat(
    _: ChatCompletionRequest, model: str, result: dict[str, Any], request_id: str, created: int
) -> dict[str, Any]:
    if "response" in result:
        return render_relayed(result, model, request_id)
    message: dict[str, Any] = {"role": "assistant", "content": result["text"]}
    if result.get("reasoning") is not None:
        message["reasoning_content"] = result["reasoning"]
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": result["finish_reason"],
                "logprobs": None,
            }
        ],
        "usage": usage(result),
        "system_fingerprint": None,
    }


async def prepare_completion(body: CompletionRequest, services: Services) -> Prepared:
    spec = services.model(body.model, kind="chat")
    note_model(spec.name)
    if ENGINES[spec.engine].relay:
        return relayed(spec, body, "/v1/completions")
    refuse_unhonoured(body, spec)
    task = GenerationTask(prompt=body.prompt_text(), **_sampling(body, body.max_tokens))
    await check_fits(services, spec, task)
    return Prepared(body, spec, GENERATE_TASK, task.model_dump())


def completion_event(
    request_id: str, created: int, model: str, text: str, finish: str | None
) -> dict[str, Any]:
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }


def render_completion(
    _: CompletionRequest, model: str, result: dict[str, Any], request_id: str, created: int
) -> dict[str, Any]:
    if "response" in result:
        return render_relayed(result, model, request_id)
    event = completion_event(request_id, created, model, result["text"], result["finish_reason"])
    return {**event, "usage": usage(result)}


CALLS: dict[str, EndpointCall] = {
    call.path: call
    for call in (
        EndpointCall("/v1/embeddings", EmbeddingRequest, prepare_embeddings, render_embeddings),
        EndpointCall("/v1/rerank", RerankRequest, prepare_rerank, render_rerank),
        EndpointCall("/v1/chat/completions", ChatCompletionRequest, prepare_chat, render_chat),
        EndpointCall("/v1/completions", CompletionRequest, prepare_completion, render_completion),
    )
}


def now_s() -> int:
    return int(time.time())
