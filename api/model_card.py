"""What `/v1/models` says a client needs to size its requests, in the shapes clients read.

OpenAI's model object says nothing about limits; vLLM adds `max_model_len`;
Xinference's clients (xinference-client's `get_model`, Dify's helper) pick a
handle from `model_type` and `model_ability` and read `model_name`,
`context_length`, `max_tokens` and `dimensions`. One entry carries all of them,
from the facts the model's worker reported (app/model_facts.py) and the API's
own request limits.
"""

from __future__ import annotations

from typing import Any

from app.model_facts import facts_for
from app.registry import ModelKind, ModelSpec
from app.settings import Settings

#: Xinference's `model_type` of each kind.
XINFERENCE_TYPES = {
    ModelKind.chat: "LLM",
    ModelKind.embedding: "embedding",
    ModelKind.rerank: "rerank",
}


def abilities(spec: ModelSpec) -> list[str]:
    """Xinference's `model_ability`: `chat` first, since its client and Dify pick the
    handle from it; `reasoning` and `tools` where the engine is set up for them."""
    if spec.kind == ModelKind.embedding:
        return ["embed"]
    if spec.kind == ModelKind.rerank:
        return ["rerank"]
    found = ["chat"]
    if spec.options.get("reasoning_parser"):
        found.append("reasoning")
    if spec.options.get("tool_call_parser") and spec.options.get("enable_auto_tool_choice", True):
        found.append("tools")
    return found


def _format(spec: ModelSpec) -> str:
    return "ggufv2" if spec.engine == "llama_cpp" else "pytorch"


def card(spec: ModelSpec, facts: dict[str, Any] | None, settings: Settings) -> dict[str, Any]:
    """The sizing and Xinference fields of one model's `/v1/models` entry.

    `context_length` is null until a replica of this engine and path has loaded
    once (the API does not open model files); the request limits are the API's.
    """
    known = facts_for(spec, facts)
    context = known.get("context_length")
    entry: dict[str, Any] = {
        "context_length": context,
        "abilities": abilities(spec),
        "max_inputs_per_request": settings.max_inputs_per_request,
        "max_input_chars": settings.max_input_chars,
        # Xinference's names.
        "model_type": XINFERENCE_TYPES[spec.kind],
        "model_name": spec.name,
        "model_ability": abilities(spec),
        "model_format": _format(spec),
        "max_tokens": context,
    }
    if spec.kind == ModelKind.embedding:
        entry["dimensions"] = known.get("dimensions")
        entry["dimensions_accepted"] = known.get("dimensions_accepted")
        # Token-id input only where the registry says the ids are the model's own.
        entry["token_id_input"] = bool(spec.options.get("token_id_input"))
    if spec.kind == ModelKind.chat:
        entry["max_model_len"] = context  # vLLM's name
        entry["parallel"] = known.get("parallel")
    if spec.kind != ModelKind.chat:
        # Inputs (or query + document pairs) longer than this are cut or refused.
        entry["max_input_tokens"] = context
    return entry
