"""app/embedding.py against the real sentence-transformers engine, in-process."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.embedding import (
    EmbeddingRunner,
    b64_to_vector,
    build_embedding_runner,
    check_dimensions,
    prepare_inputs,
    shorten,
)
from app.errors import InvalidRequest
from app.protocol.embeddings import EmbeddingTask

TEXTS = [
    "a short one",
    "a considerably longer sentence about the weather in the mountains in early spring",
    "mid-length text with some words",
    "word " * 400,
]


@pytest.fixture(scope="module")
def runner(st_engine: Any) -> EmbeddingRunner:
    built = build_embedding_runner(st_engine, {"batch_size": 2, "buckets": [8, 16]}, 2.0)
    yield built
    built.batcher.stop()


def test_vectors_equal_in_process_encode_in_input_order(
    runner: EmbeddingRunner, st_engine: Any, reference_model: Any
) -> None:
    out = runner.run(EmbeddingTask(inputs=TEXTS))
    vectors, tokens, truncated = out.vectors_b64, out.prompt_tokens, out.truncated
    got = np.stack([b64_to_vector(v) for v in vectors])
    want = reference_model.encode(TEXTS)
    assert got.shape == (4, 384)
    assert np.abs(got - want).max() < 1e-5
    assert truncated == [3]
    assert tokens == sum(min(len(ids), 256) for ids in st_engine.tokenize(TEXTS))


def test_truncation_matches_the_tokenizer_and_is_reported(st_engine: Any) -> None:
    prepared = prepare_inputs(st_engine, TEXTS, truncate=True)
    assert prepared.truncated == [3]
    assert len(prepared.token_ids[3]) == st_engine.max_tokens
    expected = st_engine._tokenizer(TEXTS[3], truncation=True, max_length=256)["input_ids"]
    assert prepared.token_ids[3] == expected


def test_refusing_truncation_names_the_input_and_its_length(st_engine: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        prepare_inputs(st_engine, TEXTS, truncate=False)
    assert "input[3] has 402 tokens" in info.value.message
    assert info.value.code == "context_length_exceeded"


def test_token_id_inputs_embed_like_their_text(
    runner: EmbeddingRunner, st_engine: Any, reference_model: Any
) -> None:
    ids = st_engine.tokenize(["hello world"])[0][1:-1]  # without [CLS]/[SEP]
    out = runner.run(EmbeddingTask(inputs=[ids]))
    assert out.prompt_tokens == len(ids) + 2
    want = reference_model.encode(["hello world"])[0]
    assert np.abs(b64_to_vector(out.vectors_b64[0]) - want).max() < 1e-5


def test_out_of_vocabulary_token_ids_are_refused(st_engine: Any) -> None:
    with pytest.raises(InvalidRequest, match=r"input\[1\] holds token id 999999"):
        prepare_inputs(st_engine, [[5, 6], [7, 999999]], truncate=True)
    with pytest.raises(InvalidRequest, match="token id -1"):
        prepare_inputs(st_engine, [[-1]], truncate=True)


def test_dimensions(st_engine: Any) -> None:
    check_dimensions(st_engine, None)
    check_dimensions(st_engine, 384)
    with pytest.raises(InvalidRequest, match="cannot return 128 dimensions; it supports 384"):
        check_dimensions(st_engine, 128)
    cut = shorten(np.ones((2, 8), dtype=np.float32), 4)
    assert cut.shape == (2, 4)
    assert np.allclose(np.linalg.norm(cut, axis=1), 1.0)


def test_padding_does_not_change_results(st_engine: Any) -> None:
    ids = prepare_inputs(st_engine, TEXTS, truncate=True).token_ids
    one_by_one = np.stack([st_engine.embed([t])[0] for t in ids])
    padded = st_engine.embed(ids, pad_to=256)
    assert np.abs(one_by_one - padded).max() < 1e-5
