"""Rerank as a worker does it, through the same bucket batcher as embeddings.

Two kinds of model rerank: a cross-encoder scores each (query, document) pair,
and the pairs are batched by their length; a bi-encoder (an embedding model)
embeds the query and the documents through the embedding batcher and scores by
cosine similarity, a fallback that serves rerank without a cross-encoder.
"""

from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from app.batcher import INTERACTIVE, BucketBatcher
from app.embedding import EmbeddingRunner, build_embedding_runner
from app.engines.base import EmbeddingEngine, Pair, RerankEngine
from app.errors import InvalidRequest, RequestTimedOut
from app.protocol.rerank import RerankTask


@dataclass
class RerankOutput:
    scores: list[float]
    input_tokens: int
    truncated: list[int]


class RerankRunner(Protocol):
    batcher: BucketBatcher  # type: ignore[type-arg]

    def run(
        self, task: RerankTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> RerankOutput: ...


class CrossEncoderRerank:
    def __init__(self, engine: RerankEngine, batcher: BucketBatcher[Pair]) -> None:
        import threading

        self.engine = engine
        self.batcher = batcher
        self._tokenizer_lock = threading.Lock()

    def run(
        self, task: RerankTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> RerankOutput:
        with self._tokenizer_lock:
            pairs, truncated = self.engine.encode_pairs(task.query, task.documents, task.truncate)
        future = self.batcher.submit(pairs, [len(p.ids) for p in pairs], deadline, lane)
        wait = None if deadline == float("inf") else max(0.0, deadline - time.time()) + 1.0
        try:
            scores = future.result(timeout=wait)
        except FutureTimeout:
            raise RequestTimedOut("the request's deadline passed while it waited") from None
        return RerankOutput([float(s) for s in scores], sum(len(p.ids) for p in pairs), truncated)


class CosineRerank:
    """Bi-encoder fallback: cosine similarity of query and document embeddings."""

    def __init__(self, embeddings: EmbeddingRunner) -> None:
        self.embeddings = embeddings
        self.batcher = embeddings.batcher

    def run(
        self, task: RerankTask, deadline: float = float("inf"), lane: int = INTERACTIVE
    ) -> RerankOutput:
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
        vectors = self.embeddings.vectors(prepared, deadline, lane)
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        scores = unit[1:] @ unit[0]
        truncated = [i - 1 for i in prepared.truncated if i > 0]
        return RerankOutput([float(s) for s in scores], prepared.token_count, truncated)


def build_rerank_runner(
    engine: EmbeddingEngine | RerankEngine, options: dict[str, object], max_wait_ms: float
) -> RerankRunner:
    if isinstance(engine, EmbeddingEngine):
        return CosineRerank(build_embedding_runner(engine, options, max_wait_ms))
    wait = float(options.get("max_wait_ms", max_wait_ms))  # type: ignore[arg-type]
    batcher: BucketBatcher[Pair] = BucketBatcher(
        engine.buckets(options),
        run_batch=lambda batch, padded: engine.score(batch, pad_to=padded),
        max_wait_ms=wait,
        pad_to_bucket=engine.pad_to_bucket or bool(options.get("pad_to_bucket", False)),
        name="inferq-rerank-batcher",
        min_padding_efficiency=float(options.get("min_padding_efficiency", 0.92)),  # type: ignore[arg-type]
    )
    return CrossEncoderRerank(engine, batcher)
