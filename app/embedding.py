"""Embedding work as a worker does it: token-count once, truncate or refuse, batch by
length, run the engine, and pack vectors for the trip back.

Kept free of Celery so it is tested directly against a real engine.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.engines.base import EmbeddingEngine
from app.errors import InvalidRequest
from app.protocol.embeddings import EmbeddingInput, EmbeddingTask


@dataclass(frozen=True)
class PreparedInputs:
    token_ids: list[list[int]]
    truncated: list[int]

    @property
    def token_count(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


def prepare_inputs(
    engine: EmbeddingEngine, inputs: Sequence[EmbeddingInput], truncate: bool
) -> PreparedInputs:
    """Tokenise every input once and apply the model's length limit.

    With `truncate` false an over-long input is refused, naming its index and length,
    rather than silently cut.
    """
    texts = [(i, s) for i, s in enumerate(inputs) if isinstance(s, str)]
    token_ids: list[list[int]] = [[] for _ in inputs]
    if texts:
        for (i, _), ids in zip(texts, engine.tokenize([s for _, s in texts]), strict=True):
            token_ids[i] = ids
    for i, item in enumerate(inputs):
        if isinstance(item, list):
            bad = next((t for t in item if not 0 <= t < engine.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(
                    f"input[{i}] holds token id {bad}, outside this model's vocabulary "
                    f"(0..{engine.vocab_size - 1})",
                    param="input",
                    code="invalid_token_id",
                )
            token_ids[i] = engine.add_special_tokens(item)
    truncated: list[int] = []
    limit = engine.max_tokens
    for i, ids in enumerate(token_ids):
        if len(ids) > limit:
            if not truncate:
                raise InvalidRequest(
                    f"input[{i}] has {len(ids)} tokens, more than this model's limit of "
                    f"{limit}; send shorter input or set truncate to true",
                    param="input",
                    code="context_length_exceeded",
                )
            token_ids[i] = engine.truncate(ids, limit)
            truncated.append(i)
    return PreparedInputs(token_ids, truncated)


def check_dimensions(engine: EmbeddingEngine, dimensions: int | None) -> None:
    if dimensions is None or dimensions == engine.dimensions:
        return
    if dimensions in engine.matryoshka_dimensions:
        return
    allowed = sorted({engine.dimensions, *engine.matryoshka_dimensions})
    raise InvalidRequest(
        f"this model cannot return {dimensions} dimensions; it supports "
        f"{', '.join(map(str, allowed))}",
        param="dimensions",
        code="unsupported_dimensions",
    )


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Cut Matryoshka vectors to `dimensions` and re-normalise them."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


def embed_in_length_order(
    engine: EmbeddingEngine, token_ids: Sequence[Sequence[int]], batch_size: int
) -> np.ndarray:
    """Run one request's inputs in length-sorted batches so padding stays small."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out = np.empty((len(token_ids), engine.dimensions), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out[chunk] = engine.embed([token_ids[i] for i in chunk])
    return out


def vectors_to_b64(vectors: np.ndarray) -> list[str]:
    """Little-endian float32 per vector: the format OpenAI's `base64` encoding uses."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]


def b64_to_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def run_embedding_task(
    engine: EmbeddingEngine, task: EmbeddingTask, batch_size: int
) -> tuple[list[str], int, list[int]]:
    check_dimensions(engine, task.dimensions)
    prepared = prepare_inputs(engine, task.inputs, task.truncate)
    vectors = embed_in_length_order(engine, prepared.token_ids, batch_size)
    return (
        vectors_to_b64(shorten(vectors, task.dimensions)),
        prepared.token_count,
        prepared.truncated,
    )
