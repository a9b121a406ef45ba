"""`/v1/embeddings` request and response, in the OpenAI shape plus inferq's extras."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from app.protocol.values import INT32_MAX

EmbeddingInput = str | list[int]

_TOKEN_ID = {"type": "integer", "minimum": 0, "maximum": INT32_MAX}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": _TOKEN_ID}

#: What `input` accepts, as the schema says it: the four OpenAI forms, never empty.
#: (Validated by `_normalise_input` below, which turns each into a list.)
INPUT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        _TOKEN_IDS,
        {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
    ],
    "title": "Input",
    "description": "A string, a list of strings, a list of token ids, or a list of such lists.",
}


def _is_integer(value: Any) -> bool:
    """An integer as JSON has it: `3`, or `3.0` (a number with no fraction), not `true`."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "int" if _is_integer(value) else type(value).__name__


def _token_ids(index: int, ids: list[Any]) -> list[int]:
    if not all(_is_integer(t) for t in ids):
        raise ValueError(f"input[{index}] must hold only integer token ids")
    if not all(0 <= t <= INT32_MAX for t in ids):
        raise ValueError(f"input[{index}] holds a token id outside 0..{INT32_MAX}")
    return [int(t) for t in ids]


def _normalise_input(value: Any) -> list[EmbeddingInput]:
    """Accept exactly the four OpenAI input forms and refuse anything mixed or empty."""
    if isinstance(value, str):
        if not value:
            raise ValueError("input must not be an empty string")
        return [value]
    if not isinstance(value, list):
        raise ValueError("input must be a string, a list of strings, or token id lists")
    if not value:
        raise ValueError("input must not be an empty list")
    if all(isinstance(v, str) for v in value):
        for i, v in enumerate(value):
            if not v:
                raise ValueError(f"input[{i}] is an empty string")
        return list(value)
    if all(_is_integer(v) for v in value):
        return [_token_ids(0, value)]
    if all(isinstance(v, list) for v in value):
        out: list[EmbeddingInput] = []
        for i, ids in enumerate(value):
            if not ids:
                raise ValueError(f"input[{i}] is an empty token list")
            out.append(_token_ids(i, ids))
        return out
    first = _kind(value[0])
    bad = next((i for i, v in enumerate(value) if _kind(v) != first), 0)
    raise ValueError(
        "input items must all be strings, or all token id lists; "
        f"input[{bad}] is {type(value[bad]).__name__}"
    )


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: Annotated[list[EmbeddingInput], WithJsonSchema(INPUT_SCHEMA)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0, le=INT32_MAX)
    user: str | None = None
    #: inferq: cut over-long inputs to the model's limit (default) or refuse them.
    truncate: bool = True

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> list[EmbeddingInput]:
        return _normalise_input(value)


class EmbeddingTask(BaseModel):
    """What the API puts on the queue: validated, normalised, nothing the worker must re-check."""

    inputs: list[EmbeddingInput]
    truncate: bool = True
    dimensions: int | None = None


class EmbeddingResult(TypedDict):
    """What a worker publishes back: vectors as base64 little-endian float32. A plain
    dict on both sides: inferq's own code writes it, so it is not validated again."""

    vectors_b64: list[str]
    prompt_tokens: int
    truncated: list[int]
    replica: str


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class InferqEmbeddingInfo(BaseModel):
    truncated_inputs: list[int]
    replica: str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
    inferq: InferqEmbeddingInfo
