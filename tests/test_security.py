"""Keys and scopes, the refusal to serve open on a network address, and JSON-only Celery."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.procs import Proc, db_upgrade, inferq_command, start_api

INFERENCE_KEY = "sk-inference-" + "a" * 24
JOBS_KEY = "sk-jobs-" + "b" * 24
ADMIN_KEY = "sk-admin-" + "c" * 24
PLAIN_KEY = "sk-plain-" + "d" * 24

KEYS_FILE = f"""
keys:
  - name: search-app
    key: {INFERENCE_KEY}
    scopes: [inference]
  - name: batch-app
    key: {JOBS_KEY}
    scopes: [jobs]
  - name: ops
    sha256: {hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}
    scopes: [admin]
"""


@pytest.fixture(scope="module")
def secured(
    inferq_env: dict[str, str],
    log_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    minilm_worker: Proc,
) -> Iterator[tuple[str, Proc]]:
    root = tmp_path_factory.mktemp("secured")
    keys_file = root / "keys.yaml"
    keys_file.write_text(KEYS_FILE)
    env = {
        **inferq_env,
        "INFERQ_API_KEYS": PLAIN_KEY,
        "INFERQ_API_KEYS_FILE": str(keys_file),
        "INFERQ_DATABASE_URL": f"sqlite:///{root / 'jobs.db'}",
    }
    db_upgrade(env)
    # Info-level logs, so the access log is there to be searched for keys.
    proc, base = start_api(env, log_dir, loglevel="info")
    yield base, proc
    proc.stop()


def call(base: str, method: str, path: str, key: str | None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{base}{path}", headers=headers, timeout=60, **kw)


EMBED = {"model": "minilm", "input": "scoped"}
JOB = {"endpoint": "/v1/embeddings", "body": EMBED}
LAUNCH = {"model_name": "minilm", "model_uid": "never-launched"}


def test_keys_need_their_scope(secured: tuple[str, Proc]) -> None:
    base, _ = secured
    missing = call(base, "POST", "/v1/embeddings", None, json=EMBED)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert call(base, "POST", "/v1/embeddings", "sk-wrong", json=EMBED).status_code == 401

    expected = {
        # key: embeddings, list models, submit a job, cluster view, launch
        INFERENCE_KEY: (200, 200, 403, 403, 403),
        JOBS_KEY: (403, 403, 202, 403, 403),
        ADMIN_KEY: (200, 200, 202, 200, 503),  # admin may launch; no node is alive here
        PLAIN_KEY: (200, 200, 202, 200, 503),  # INFERQ_API_KEYS: every scope
    }
    for key, statuses in expected.items():
        got = (
            call(base, "POST", "/v1/embeddings", key, json=EMBED).status_code,
            call(base, "GET", "/v1/models", key).status_code,
            call(base, "POST", "/v1/jobs", key, json=JOB).status_code,
            call(base, "GET", "/v1/cluster", key).status_code,
            call(base, "POST", "/v1/models", key, json=LAUNCH).status_code,
        )
        assert got == statuses, key[:8]
    # A model's paths, options and hosts are for admins; an inference key sees its card.
    card = call(base, "GET", "/v1/models/minilm", INFERENCE_KEY).json()
    assert card["id"] == "minilm" and "registry_entry" not in card and "replicas" not in card
    full = call(base, "GET", "/v1/models/minilm", ADMIN_KEY).json()
    assert "path" in full["registry_entry"] and "replicas" in full
    denied = call(base, "DELETE", "/v1/models/minilm", INFERENCE_KEY).json()["error"]
    assert denied["type"] == "permission_error" and denied["code"] == "insufficient_scope"
    assert "'search-app'" in denied["message"] and "'admin'" in denied["message"]


def test_the_openai_client_sends_its_key_as_a_bearer_token(secured: tuple[str, Proc]) -> None:
    base, _ = secured
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=INFERENCE_KEY, max_retries=0)
    assert len(client.embeddings.create(model="minilm", input="x").data[0].embedding) == 384
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-nope", max_retries=0).models.list()


def test_keys_never_reach_the_logs(secured: tuple[str, Proc]) -> None:
    base, proc = secured
    for key in (INFERENCE_KEY, JOBS_KEY, ADMIN_KEY, PLAIN_KEY, "sk-wrong-guess"):
        call(base, "GET", "/v1/models", key)
    time.sleep(0.5)
    logged = proc.log_path.read_text(errors="replace")
    for key in (INFERENCE_KEY, JOBS_KEY, ADMIN_KEY, PLAIN_KEY, "sk-wrong-guess"):
        assert key not in logged


def test_an_open_api_on_a_network_address_is_refused(
    inferq_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**inferq_env, "INFERQ_API_KEYS": ""}
    for command in (["api", "--host", "0.0.0.0"], ["up", "--host", "0.0.0.0"]):
        done = inferq_command(env, *command)
        assert done.returncode == 2, done.stderr
        assert "without API keys" in done.stderr and "INFERQ_ALLOW_UNAUTHENTICATED" in done.stderr
    bad = tmp_path / "keys.yaml"
    secret = "sk-this-must-not-be-echoed-0000"
    bad.write_text(f"keys:\n  - name: x\n    key: {secret}\n    scopes: [everything]\n")
    done = inferq_command({**env, "INFERQ_API_KEYS_FILE": str(bad)}, "api", "--host", "127.0.0.1")
    assert done.returncode == 2 and "keys.0.scopes.0" in done.stderr
    assert secret not in done.stderr
    # Not YAML at all, on the key's own line: PyYAML would quote that line.
    bad.write_text(f"keys:\n  - name: x\n    key: {secret}: [\n")
    done = inferq_command({**env, "INFERQ_API_KEYS_FILE": str(bad)}, "api", "--host", "127.0.0.1")
    assert done.returncode == 2 and "not valid YAML at line 3" in done.stderr, done.stderr
    assert secret not in done.stderr


def test_allowing_an_open_api_explicitly(inferq_env: dict[str, str], log_dir: Path) -> None:
    env = {**inferq_env, "INFERQ_API_KEYS": "", "INFERQ_ALLOW_UNAUTHENTICATED": "true"}
    proc, base = start_api(env, log_dir, host="0.0.0.0")
    try:
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    finally:
        proc.stop()


class _Evil:
    """Unpickling this runs a shell command: what a worker must never do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_message_is_rejected_not_executed(
    inferq_env: dict[str, str], minilm_worker: Proc, api: str, tmp_path: Path
) -> None:
    from app.celery_app import create_celery
    from app.settings import Settings

    marker = tmp_path / "pwned"
    settings = Settings(
        redis_url=inferq_env["INFERQ_REDIS_URL"], key_prefix=inferq_env["INFERQ_KEY_PREFIX"]
    )
    attacker = create_celery(settings)
    attacker.send_task(
        "inferq.embeddings",
        kwargs={
            "request_id": uuid.uuid4().hex,
            "model": "minilm",
            "payload": _Evil(marker),
            "deadline": time.time() + 60,
        },
        exchange="",
        routing_key="model.minilm",
        serializer="pickle",
    )
    deadline = time.monotonic() + 20
    while "ContentDisallowed" not in minilm_worker.tail(200):
        assert time.monotonic() < deadline, minilm_worker.tail()
        time.sleep(0.2)
    assert not marker.exists()
    assert minilm_worker.popen.poll() is None
    reply = httpx.post(f"{api}/v1/embeddings", json=EMBED, timeout=60)
    assert reply.status_code == 200
