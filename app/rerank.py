"""Rerank as a worker does it, through the same bucket batcher as embeddings.

Two kinds of model rerank: a cross-encoder scores each (query, document) pair,
and the pairs are batched by their length; a bi-encoder (an embedding model)
embeds the query and the documents through the embedding batcher and scores by
cosine similarity, a fallback that serves rerank without a cross-encoder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from app.batcher import INTERACTIVE, BucketBatcher, wait_for_result
from app.embedding import EmbeddingRunner, build_embedding_runner
from app.engines.base import EmbeddingEngine, Pair, RerankEngine
from app.errors import InvalidRequest
from app.protocol.rerank import RerankTask


@dataclass
class RerankOutput:
    scores: list[float]
    input_tokens: int
    truncated: list[int]


@dataclass
class PendingRerank:
    """A request whose pairs (or texts) are in the batcher; `score` turns the batcher's
    results into one score per document."""

    future: Future[list[Any]]
    deadline: float
    score: Callable[[list[Any]], list[float]]
    input_tokens: int
    truncated: list[int]

    def finish(self) -> RerankOutput:
        scores = self.score(wait_for_result(self.future, self.deadline))
        return RerankOutput(scores, self.input_tokens, self.truncated)


class RerankRunner(Protocol):
    batcher: BucketBatcher  # type: ignore[type-arg]

    def begin(
        self, task: RerankTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> PendingRerank: ...

    def run(
        self, task: RerankTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> RerankOutput: ...


class CrossEncoderRerank:
    def __init__(self, engine: RerankEngine, batcher: BucketBatcher[Pair]) -> None:
        self.engine = engine
        self.batcher = batcher
        self._tokenizer_lock = threading.Lock()

    def begin(
        self, task: RerankTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> PendingRerank:
        with self._tokenizer_lock:
            pairs, truncated = self.engine.encode_pairs(task.query, task.documents, task.truncate)
        future = self.batcher.submit(pairs, [len(p.ids) for p in pairs], deadline, lane)
        tokens = sum(len(p.ids) for p in pairs)
        return PendingRerank(
            future, deadline, lambda rows: [float(s) for s in rows], tokens, truncated
        )

    def run(
        self, task: RerankTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> RerankOutput:
        return self.begin(task, deadline, lane).finish()


class CosineRerank:
    """Bi-encoder fallback: cosine similarity of query and document embeddings."""

    def __init__(self, embeddings: EmbeddingRunner) -> None:
        self.embeddings = embeddings
        self.batcher = embeddings.batcher

    def begin(
        self, task: RerankTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> PendingRerank:
        texts = [task.query, *task.documents]
        prepared = self.embeddings.prepare(texts, truncate=True)
        if prepared.truncated and not task.truncate:
            first = prepared.truncated[0]
            what = "the query" if first == 0 else f"documents[{first - 1}]"
            [length] = self.embeddings.token_lengths([texts[first]])
            raise InvalidRequest(
                f"{what} has {length} tokens, more than this model's limit of "
                f"{self.embeddings.engine.max_tokens}; send shorter text or set truncate to true",
                param="query" if first == 0 else "documents",
                code="context_length_exceeded",
            )
        future = self.embeddings.submit(prepared, deadline, lane)
        truncated = [i - 1 for i in prepared.truncated if i > 0]
        return PendingRerank(future, deadline, cosine_scores, prepared.token_count, truncated)

    def run(
        self, task: RerankTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> RerankOutput:
        return self.begin(task, deadline, lane).finish()


def cosine_scores(rows: list[Any]) -> list[float]:
    """Each document's cosine similarity to the query (the first row)."""
    vectors = np.stack(rows).astype(np.float32, copy=False)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return [float(s) for s in unit[1:] @ unit[0]]


def build_rerank_runner(
    engine: EmbeddingEngine | RerankEngine, options: dict[str, object], max_wait_ms: float
) -> RerankRunner:
    if isinstance(engine, EmbeddingEngine):
        return CosineRerank(build_embedding_runner(engine, options, max_wait_ms))
    wait = float(options.get("max_wait_ms", max_wait_ms))  # type: ignore[arg-type]
    # `pad_to_bucket: true` in the options makes a shape-free engine behave like a
    # compiled-shape one (used by bench/ to measure what padding costs).
    padded = engine.pad_to_bucket or bool(options.get("pad_to_bucket", False))
    batcher: BucketBatcher[Pair] = BucketBatcher(
        engine.buckets(options),
        run_batch=lambda batch, padded: engine.score(batch, pad_to=padded),
        max_wait_ms=wait,
        pad_to_bucket=padded,
        name="inferq-rerank-batcher",
        min_padding_efficiency=float(options.get("min_padding_efficiency", 0.92)),  # type: ignore[arg-type]
        # Shape-free engines run a lone input at once; compiled shapes cost a full batch.
        run_when_idle=bool(options.get("run_when_idle", not padded)),
    )
    return CrossEncoderRerank(engine, batcher)
