"""`/v1/rerank` and `/v2/rerank`: one request shape for Xinference, Jina and Cohere v1/v2.

They differ only in optional fields: Jina and Cohere v1 take `{"text": ...}` objects
as documents, Cohere v2 `max_tokens_per_doc`, xinference-client sends every
field with null for unset ones.
"""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from app.protocol.values import INT32_MAX

#: What `documents` accepts, as the schema says it (validated by `_documents` below).
DOCUMENTS_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "object",
                "properties": {"text": {"type": "string", "minLength": 1}},
                "required": ["text"],
            },
        ]
    },
    "title": "Documents",
    "description": "Strings, or Cohere-style objects with a `text` field.",
}


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    #: Strings, or Cohere-style objects with a `text` field.
    documents: Annotated[list[str], WithJsonSchema(DOCUMENTS_SCHEMA)]
    top_n: int | None = Field(default=None, gt=0, le=INT32_MAX)
    # Null as "not given": xinference-client sends every field, unset ones as null.
    return_documents: bool | None = False
    return_len: bool | None = False
    #: inferq: cut over-long (query, document) pairs to the model's limit, or refuse them.
    truncate: bool = True
    # Accepted for compatibility and not used: documents are cut to the model's limit.
    max_chunks_per_doc: int | None = None  # Xinference, Cohere v1
    max_tokens_per_doc: int | None = None  # Cohere v2

    @field_validator("documents", mode="before")
    @classmethod
    def _documents(cls, value: Any) -> list[str]:
        if not isinstance(value, list) or not value:
            raise ValueError("documents must be a non-empty list")
        out: list[str] = []
        for i, doc in enumerate(value):
            if isinstance(doc, dict) and isinstance(doc.get("text"), str):
                doc = doc["text"]
            if not isinstance(doc, str):
                raise ValueError(f"documents[{i}] must be a string or an object with a text field")
            if not doc:
                raise ValueError(f"documents[{i}] is an empty string")
            out.append(doc)
        return out


class RerankTask(BaseModel):
    query: str
    documents: list[str]
    truncate: bool = True


class RerankResult(TypedDict):
    """What a worker publishes back (a plain dict, like EmbeddingResult)."""

    scores: list[float]
    input_tokens: int
    truncated: list[int]
    replica: str
