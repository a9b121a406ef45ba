"""Embedding work as a worker does it: token-count once, truncate or refuse, batch by
length, run the engine, and pack vectors for the trip back.

Kept free of Celery so it is tested directly against a real engine.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.batcher import INTERACTIVE, BucketBatcher, wait_for_result
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


def vectors_to_b64(vectors: np.ndarray) -> list[str]:
    """Little-endian float32 per vector: the format OpenAI's `base64` encoding uses."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]


def b64_to_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


@dataclass
class EmbeddingOutput:
    vectors_b64: list[str]
    prompt_tokens: int
    truncated: list[int]


@dataclass
class PendingEmbedding:
    """A request whose inputs are in the batcher: a worker serving many requests of
    one message submits them all first, then collects each as its future resolves."""

    future: Future[list[Any]]
    prepared: PreparedInputs
    dimensions: int | None
    deadline: float

    def finish(self) -> EmbeddingOutput:
        rows = wait_for_result(self.future, self.deadline)
        vectors = shorten(np.stack(rows).astype(np.float32, copy=False), self.dimensions)
        return EmbeddingOutput(
            vectors_to_b64(vectors), self.prepared.token_count, self.prepared.truncated
        )


class EmbeddingRunner:
    """One worker's embedding service: shared engine, one tokenizer lock, one batcher.

    Tokenising happens in the caller's thread (HF fast tokenizers refuse concurrent
    use, hence the lock); the engine runs only in the batcher's thread.
    """

    def __init__(self, engine: EmbeddingEngine, batcher: BucketBatcher[list[int]]) -> None:
        self.engine = engine
        self.batcher = batcher
        self._tokenizer_lock = threading.Lock()

    def prepare(self, inputs: Sequence[EmbeddingInput], truncate: bool) -> PreparedInputs:
        with self._tokenizer_lock:
            return prepare_inputs(self.engine, inputs, truncate)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Untruncated lengths, special tokens included."""
        with self._tokenizer_lock:
            return [len(ids) for ids in self.engine.tokenize(texts)]

    def submit(
        self, prepared: PreparedInputs, deadline: float, lane: int = INTERACTIVE
    ) -> Future[list[Any]]:
        lengths = [len(ids) for ids in prepared.token_ids]
        return self.batcher.submit(prepared.token_ids, lengths, deadline, lane)

    def vectors(
        self, prepared: PreparedInputs, deadline: float, lane: int = INTERACTIVE
    ) -> np.ndarray:
        rows = wait_for_result(self.submit(prepared, deadline, lane), deadline)
        return np.stack(rows).astype(np.float32, copy=False)

    def begin(
        self, task: EmbeddingTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> PendingEmbedding:
        check_dimensions(self.engine, task.dimensions)
        prepared = self.prepare(task.inputs, task.truncate)
        future = self.submit(prepared, deadline, lane)
        return PendingEmbedding(future, prepared, task.dimensions, deadline)

    def run(
        self, task: EmbeddingTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> EmbeddingOutput:
        return self.begin(task, deadline, lane).finish()


def build_embedding_runner(
    engine: EmbeddingEngine, options: dict[str, object], max_wait_ms: float
) -> EmbeddingRunner:
    wait = float(options.get("max_wait_ms", max_wait_ms))  # type: ignore[arg-type]
    # `pad_to_bucket: true` in the options makes a shape-free engine behave like a
    # compiled-shape one (used by bench/ to measure what padding costs).
    padded = engine.pad_to_bucket or bool(options.get("pad_to_bucket", False))
    batcher: BucketBatcher[list[int]] = BucketBatcher(
        engine.buckets(options),
        run_batch=lambda batch, padded: engine.embed(batch, pad_to=padded),
        max_wait_ms=wait,
        pad_to_bucket=padded,
        name="inferq-embedding-batcher",
        min_padding_efficiency=float(options.get("min_padding_efficiency", 0.92)),  # type: ignore[arg-type]
        # Shape-free engines run a lone input at once; compiled shapes cost a full batch.
        run_when_idle=bool(options.get("run_when_idle", not padded)),
    )
    return EmbeddingRunner(engine, batcher)
