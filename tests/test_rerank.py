"""Rerank: the engines in-process, then /v1/rerank end to end through real workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.engines.base import RerankEngine
from app.errors import InvalidRequest
from app.protocol.rerank import RerankTask
from app.registry import ModelSpec
from app.rerank import CosineRerank, CrossEncoderRerank, build_rerank_runner
from tests.procs import Proc, start_worker

QUERY = "how does a task queue spread work across machines"
DOCS = [
    "Celery workers consume tasks from a broker such as Redis.",
    "The recipe needs two eggs and a cup of flour.",
    "A queue lets many machines take jobs as they become free.",
    "Mountains in spring are covered with flowers.",
    "Redis lists can act as simple message queues between processes.",
    "Tax forms are due at the end of the month.",
]


@pytest.fixture(scope="module")
def cross_encoder(tiny_cross_encoder: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(tiny_cross_encoder), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def ce_runner(tiny_cross_encoder: Path) -> Iterator[CrossEncoderRerank]:
    from app.engines.cross_encoder import CrossEncoderEngine

    spec = ModelSpec(name="t", kind="rerank", engine="cross_encoder", path=str(tiny_cross_encoder))
    runner = build_rerank_runner(CrossEncoderEngine.load(spec, []), {"batch_size": 4}, 2.0)
    assert isinstance(runner, CrossEncoderRerank)
    yield runner
    runner.batcher.stop()


def test_cross_encoder_scores_equal_in_process_predict(
    ce_runner: CrossEncoderRerank, cross_encoder: Any
) -> None:
    out = ce_runner.run(RerankTask(query=QUERY, documents=DOCS))
    want = cross_encoder.predict([(QUERY, d) for d in DOCS])
    assert np.abs(np.array(out.scores) - want).max() < 1e-5
    assert list(np.argsort(out.scores)) == list(np.argsort(want))
    assert out.truncated == []
    assert out.input_tokens == sum(
        len(ids) for ids in cross_encoder.tokenizer([QUERY] * len(DOCS), DOCS)["input_ids"]
    )


def test_cross_encoder_truncates_the_document_or_refuses(
    ce_runner: CrossEncoderRerank, cross_encoder: Any
) -> None:
    long_doc = "queue " * 300
    out = ce_runner.run(RerankTask(query=QUERY, documents=[DOCS[0], long_doc]))
    assert out.truncated == [1]
    want = cross_encoder.predict([(QUERY, DOCS[0]), (QUERY, long_doc)])  # it truncates too
    assert np.abs(np.array(out.scores) - want).max() < 1e-5
    with pytest.raises(InvalidRequest, match=r"documents\[1\] with the query has \d+ tokens"):
        ce_runner.run(RerankTask(query=QUERY, documents=[DOCS[0], long_doc], truncate=False))
    assert isinstance(ce_runner.engine, RerankEngine)


def test_cosine_fallback_scores_are_cosine_similarities(
    st_engine: Any, reference_model: Any
) -> None:
    runner = build_rerank_runner(st_engine, {"batch_size": 8}, 2.0)
    try:
        assert isinstance(runner, CosineRerank)
        out = runner.run(RerankTask(query=QUERY, documents=DOCS))
        vectors = reference_model.encode([QUERY, *DOCS])
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        assert np.abs(np.array(out.scores) - unit[1:] @ unit[0]).max() < 1e-5
        with pytest.raises(InvalidRequest, match=r"documents\[0\] has 302 tokens"):
            runner.run(RerankTask(query="q", documents=["token " * 300], truncate=False))
    finally:
        runner.batcher.stop()


@pytest.fixture(scope="module")
def rerank_workers(inferq_env: dict[str, str], log_dir: Path) -> Iterator[list[Proc]]:
    procs = [
        start_worker(inferq_env, log_dir, "tiny-rerank"),
        start_worker(inferq_env, log_dir, "minilm-cosine-rerank"),
    ]
    yield procs
    for proc in procs:
        proc.stop()


def test_rerank_endpoint_orders_like_the_in_process_cross_encoder(
    api: str, rerank_workers: list[Proc], cross_encoder: Any
) -> None:
    body = {"model": "tiny-rerank", "query": QUERY, "documents": DOCS, "return_documents": True}
    resp = httpx.post(f"{api}/v1/rerank", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    reply = resp.json()
    want = cross_encoder.predict([(QUERY, d) for d in DOCS])
    assert [r["index"] for r in reply["results"]] == list(np.argsort(-want))
    for r in reply["results"]:
        assert abs(r["relevance_score"] - want[r["index"]]) < 1e-5
        assert r["document"] == {"text": DOCS[r["index"]]}
    assert reply["meta"]["tokens"]["input_tokens"] > 0
    assert reply["id"]


def test_rerank_top_n_cohere_documents_and_cosine_default(
    api: str, rerank_workers: list[Proc], reference_model: Any
) -> None:
    docs = [{"text": d} for d in DOCS]
    body = {"model": "minilm-cosine-rerank", "query": QUERY, "documents": docs, "top_n": 2}
    reply = httpx.post(f"{api}/v1/rerank", json=body, timeout=30).json()
    vectors = reference_model.encode([QUERY, *DOCS])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = list(np.argsort(-(unit[1:] @ unit[0]))[:2])
    assert [r["index"] for r in reply["results"]] == expected
    assert all(r["document"] is None for r in reply["results"])


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "tiny-rerank", "query": "q", "documents": []}, 400, "non-empty"),
        ({"model": "tiny-rerank", "query": "", "documents": ["a"]}, 400, "query"),
        ({"model": "tiny-rerank", "documents": ["a"]}, 400, "query"),
        ({"model": "tiny-rerank", "query": "q", "documents": ["a", 5]}, 400, "documents[1]"),
        ({"model": "tiny-rerank", "query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
        ({"model": "minilm", "query": "q", "documents": ["a"]}, 400, "not a rerank model"),
        ({"model": "nope", "query": "q", "documents": ["a"]}, 404, "does not exist"),
        (
            {"model": "tiny-rerank", "query": "q", "documents": ["x " * 300], "truncate": False},
            400,
            "documents[0]",
        ),
    ],
)
def test_rerank_bad_input(
    api: str, rerank_workers: list[Proc], body: dict[str, Any], status: int, needle: str
) -> None:
    resp = httpx.post(f"{api}/v1/rerank", json=body, timeout=30)
    assert resp.status_code == status
    assert needle in resp.json()["error"]["message"]
