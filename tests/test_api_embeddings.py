"""/v1/embeddings end to end: the official openai client -> uvicorn -> Redis -> Celery worker."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis

from app.keys import KeySpace

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "inferq queues requests per model",
    "a",
    "Embeddings map text to vectors; similar texts land close together in that space.",
    "token " * 300,  # longer than the model's 256-token limit
]


def decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def test_models_lists_registry_with_kind_and_live_replicas(api: str, client: Any) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert {"minilm", "minilm-pair", "idle-model", "tiny-rerank"} <= set(models)
    assert models["minilm"].model_extra["kind"] == "embedding"
    assert models["minilm"].model_extra["replicas_alive"] == 1
    assert models["idle-model"].model_extra["replicas_alive"] == 0
    assert client.models.retrieve("minilm").id == "minilm"


def test_float_vectors_equal_in_process_encode(client: Any, reference_model: Any) -> None:
    reply = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert [d.index for d in reply.data] == list(range(len(TEXTS)))
    assert got.shape == (len(TEXTS), 384)
    assert np.abs(got - reference_model.encode(TEXTS)).max() < 1e-5
    real_tokens = sum(min(len(ids), 256) for ids in reference_model.tokenizer(TEXTS)["input_ids"])
    assert reply.usage.prompt_tokens == real_tokens == reply.usage.total_tokens
    assert reply.model == "minilm"
    assert reply.model_extra["inferq"]["truncated_inputs"] == [4]


def test_base64_vectors_equal_in_process_encode(client: Any, reference_model: Any) -> None:
    reply = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="base64")
    got = np.stack([decode(d.embedding) for d in reply.data])
    assert np.abs(got - reference_model.encode(TEXTS)).max() < 1e-5
    # The client's default path asks for base64 and decodes it itself.
    default = client.embeddings.create(model="minilm", input=TEXTS[:2])
    assert np.abs(np.array([d.embedding for d in default.data]) - got[:2]).max() < 1e-6


def test_single_string_and_token_inputs(client: Any, reference_model: Any) -> None:
    one = client.embeddings.create(model="minilm", input="hello world", encoding_format="float")
    assert len(one.data) == 1
    want = reference_model.encode(["hello world"])[0]
    assert np.abs(np.array(one.data[0].embedding) - want).max() < 1e-5
    ids = reference_model.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    flat = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    nested = client.embeddings.create(model="minilm", input=[ids, ids], encoding_format="float")
    assert flat.usage.prompt_tokens == len(ids) + 2
    assert np.abs(np.array(flat.data[0].embedding) - want).max() < 1e-5
    assert len(nested.data) == 2


def test_truncate_false_refuses_with_index_and_length(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(
            model="minilm", input=["fine", "token " * 300], extra_body={"truncate": False}
        )
    error = info.value.body
    assert "input[1] has 302 tokens" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_dimensions_the_model_cannot_honour(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="minilm", input="x", dimensions=64)
    assert info.value.body["param"] == "dimensions"
    ok = client.embeddings.create(
        model="minilm", input="x", dimensions=384, encoding_format="float"
    )
    assert len(ok.data[0].embedding) == 384


def _received(redis_client: redis.Redis, prefix: str) -> int:
    keys = KeySpace(prefix)
    total = 0
    for key in redis_client.scan_iter(match=keys.replica_stats("*")):
        total += int(redis_client.hget(key, "received") or 0)
    return total


BAD_BODIES: list[tuple[Any, str]] = [
    ({"model": "minilm", "input": ""}, "empty string"),
    ({"model": "minilm", "input": []}, "empty list"),
    ({"model": "minilm", "input": ["ok", 3]}, "input[1]"),
    ({"model": "minilm", "input": [["a"]]}, "integer token ids"),
    ({"model": "minilm", "input": {"text": "x"}}, "input"),
    ({"model": "minilm", "input": True}, "input"),
    ({"model": "minilm"}, "input"),
    ({"input": "x"}, "model"),
    ({"model": 7, "input": "x"}, "model"),
    ({"model": "minilm", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "minilm", "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": "minilm", "input": "x", "truncate": "maybe"}, "truncate"),
    ([1, 2], "JSON object"),
]


def test_bad_input_is_refused_before_any_worker_sees_it(
    api: str, client: Any, redis_client: redis.Redis, key_prefix: str
) -> None:
    time.sleep(1.0)  # workers write their counters with each heartbeat (0.5 s here)
    before = _received(redis_client, key_prefix)
    with httpx.Client(base_url=api, timeout=10) as http:
        for body, needle in BAD_BODIES:
            resp = http.post("/v1/embeddings", json=body)
            assert resp.status_code == 400, body
            error = resp.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
            assert needle in error["message"], (body, error)
        resp = http.post(
            "/v1/embeddings",
            content=b'{"model": "minilm", "input": [',
            headers={"content-type": "application/json"},
        )
        assert resp.status_code == 400
        assert "not valid JSON" in resp.json()["error"]["message"]
    time.sleep(1.0)
    assert _received(redis_client, key_prefix) == before


def test_unknown_model_is_404_model_not_found(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="no-such-model", input="x")
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"


def test_model_without_live_replica_is_503_at_once(client: Any) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        client.embeddings.create(model="idle-model", input="x")
    assert time.monotonic() - started < 2.0
    assert info.value.status_code == 503
    assert info.value.body["code"] == "model_unavailable"


def test_timeout_is_504_and_the_late_reply_reaches_nobody(
    api: str, client: Any, reference_model: Any
) -> None:
    heavy = {"model": "minilm", "input": [f"text number {i} " * 40 for i in range(400)]}
    with httpx.Client(base_url=api, timeout=30) as http:
        started = time.monotonic()
        resp = http.post("/v1/embeddings", json=heavy, headers={"X-Inferq-Timeout": "0.3"})
        assert resp.status_code == 504
        assert time.monotonic() - started < 2.0
        assert resp.json()["error"]["code"] == "request_timeout"
    # The next caller gets its own answer, not the heavy request's late one.
    reply = client.embeddings.create(model="minilm", input=["my own text"], encoding_format="float")
    assert len(reply.data) == 1
    want = reference_model.encode(["my own text"])[0]
    assert np.abs(np.array(reply.data[0].embedding) - want).max() < 1e-5


def test_request_size_limits_are_named(api: str, minilm_worker: Any) -> None:
    with httpx.Client(base_url=api, timeout=30) as http:
        resp = http.post("/v1/embeddings", json={"model": "minilm", "input": ["x"] * 10_000})
        assert resp.status_code == 413
        assert "limit is 2048" in resp.json()["error"]["message"]
        resp = http.post("/v1/embeddings", json={"model": "minilm", "input": "y" * 100_000})
        assert resp.status_code == 413
        assert "input[0] has 100000 characters" in resp.json()["error"]["message"]


def test_health_and_ready(api: str, minilm_worker: Any) -> None:
    with urllib.request.urlopen(f"{api}/health") as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{api}/ready")  # idle-model has no replica
    assert info.value.code == 503
    body = json.loads(info.value.read())
    assert body["redis"] is True and body["models"]["minilm"] == 1
    assert body["models"]["idle-model"] == 0


def test_unknown_route_is_openai_error_json(api: str) -> None:
    with httpx.Client(base_url=api) as http:
        resp = http.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"
