"""Async jobs end to end, on SQLite and on PostgreSQL: a real API, real workers, real Redis.

Every test here runs once per database backend. Each backend gets its own key
prefix (so its queues and workers are its own) and a database migrated from
empty by `inferq db upgrade`.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from app.db import create_db_engine
from tests.procs import Proc, alive_replica_count, start_api, start_worker
from tests.stack import KEY_A, KEY_B, Stack, finished, running_stack, wait_job


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest,
    inferq_env: dict[str, str],
    database_urls: Callable[[str, str], str],
    log_dir: Path,
) -> Iterator[Stack]:
    backend = request.param
    with running_stack(
        inferq_env,
        f"jobs-{backend}",
        database_urls(backend, "jobs"),
        log_dir,
        ("minilm", "minilm-cosine-rerank", "smollm2"),
    ) as built:
        built.backend = backend
        yield built


def submit(stack: Stack, endpoint: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    headers = extra.pop("headers", {})
    with stack.http() as http:
        response = http.post(
            "/v1/jobs", json={"endpoint": endpoint, "body": body, **extra}, headers=headers
        )
    assert response.status_code == 202, response.text
    return response.json()


def test_embedding_job_result_equals_the_sync_response(stack: Stack) -> None:
    body = {"model": "minilm", "input": ["a job about cats", "another about the sea"]}
    job = submit(stack, "/v1/embeddings", body, metadata={"run": "1"})
    assert job["status"] in ("queued", "running") and job["object"] == "job"
    done = wait_job(stack, job["id"], finished)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["metadata"] == {"run": "1"}
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    with stack.http() as http:
        sync = http.post("/v1/embeddings", json=body).json()
    result = done["result"]
    assert result["object"] == "list" and result["model"] == sync["model"]
    assert result["usage"] == sync["usage"]
    for got, want in zip(result["data"], sync["data"], strict=True):
        assert got["index"] == want["index"]
        np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)


def test_rerank_and_chat_jobs_equal_their_sync_responses(stack: Stack) -> None:
    rerank = {
        "model": "minilm-cosine-rerank",
        "query": "what do cats eat",
        "documents": ["cats eat fish", "the stock market fell", "kittens like milk"],
        "top_n": 2,
        "return_documents": True,
    }
    chat = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 12,
        "temperature": 0,
    }
    completion = {
        "model": "smollm2",
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "temperature": 0,
    }
    jobs = {
        "/v1/rerank": (rerank, submit(stack, "/v1/rerank", rerank)),
        "/v1/chat/completions": (chat, submit(stack, "/v1/chat/completions", chat)),
        "/v1/completions": (completion, submit(stack, "/v1/completions", completion)),
    }
    with stack.http() as http:
        for endpoint, (body, job) in jobs.items():
            done = wait_job(stack, job["id"], finished)
            assert done["status"] == "succeeded", done
            sync = http.post(endpoint, json=body).json()
            result = done["result"]
            if endpoint == "/v1/rerank":
                assert [r["index"] for r in result["results"]] == [
                    r["index"] for r in sync["results"]
                ]
                for got, want in zip(result["results"], sync["results"], strict=True):
                    assert got["relevance_score"] == pytest.approx(want["relevance_score"])
                    assert got["document"] == want["document"]
            else:
                assert result["object"] == sync["object"]
                assert result["choices"] == sync["choices"]
                assert result["usage"] == sync["usage"]


def test_bad_submissions_get_openai_errors_and_store_nothing(stack: Stack) -> None:
    ok_body = {"model": "minilm", "input": "hello"}
    with stack.http() as http:
        before = len(http.get("/v1/jobs", params={"limit": 100}).json()["data"])
        cases = [
            ({"endpoint": "/v1/images", "body": ok_body}, 400, "endpoint"),
            ({"endpoint": "/v1/embeddings", "body": {"model": "minilm"}}, 400, "body.input"),
            ({"endpoint": "/v1/embeddings", "body": {"model": "nope", "input": "x"}}, 404, "model"),
            ({"endpoint": "/v1/rerank", "body": ok_body}, 400, "body.query"),
            (
                {
                    "endpoint": "/v1/chat/completions",
                    "body": {
                        "model": "smollm2",
                        "messages": [{"role": "user", "content": "hi"}],
                        "stream": True,
                    },
                },
                400,
                "body.stream",
            ),
            ({"endpoint": "/v1/embeddings", "body": ok_body, "priority": 42}, 400, "priority"),
            ({"endpoint": "/v1/embeddings", "body": ok_body, "webhook": "ftp://x"}, 400, None),
        ]
        for payload, status, param in cases:
            response = http.post("/v1/jobs", json=payload)
            assert response.status_code == status, (payload, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            if param:
                assert error["param"] == param, error
        assert http.post("/v1/jobs", content=b"{not json").status_code == 400

        key = {"Idempotency-Key": "bad-reuse"}
        first = http.post(
            "/v1/jobs", json={"endpoint": "/v1/embeddings", "body": ok_body}, headers=key
        )
        assert first.status_code == 202
        reused = http.post(
            "/v1/jobs",
            json={"endpoint": "/v1/embeddings", "body": {**ok_body, "input": "other"}},
            headers=key,
        )
        assert reused.status_code == 409
        assert reused.json()["error"]["code"] == "idempotency_key_reused"
        after = len(http.get("/v1/jobs", params={"limit": 100}).json()["data"])
        assert after == before + 1  # only the one good submission


def test_idempotent_resubmission_returns_the_same_job(stack: Stack) -> None:
    body = {"model": "minilm", "input": "same every time"}
    headers = {"Idempotency-Key": f"same-{stack.backend}"}
    first = submit(stack, "/v1/embeddings", body, headers=headers)
    with stack.http() as http:
        again = http.post(
            "/v1/jobs", json={"endpoint": "/v1/embeddings", "body": body}, headers=headers
        )
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first["id"]


def test_jobs_are_visible_only_to_the_key_that_submitted_them(stack: Stack) -> None:
    job = submit(stack, "/v1/embeddings", {"model": "minilm", "input": "mine"})
    with stack.http(KEY_B) as other:
        assert other.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert other.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        listed = other.get("/v1/jobs", params={"limit": 100}).json()["data"]
        assert job["id"] not in {j["id"] for j in listed}
    with stack.http(None) as anonymous:
        response = anonymous.get(f"/v1/jobs/{job['id']}")
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    with stack.http("wrong-key") as wrong:
        assert (
            wrong.post("/v1/embeddings", json={"model": "minilm", "input": "x"}).status_code == 401
        )


def test_list_filters_and_paginates_newest_first(stack: Stack) -> None:
    ids = [
        submit(stack, "/v1/embeddings", {"model": "minilm", "input": f"page {i}"})["id"]
        for i in range(3)
    ]
    for job_id in ids:
        wait_job(stack, job_id, finished)
    with stack.http() as http:
        page = http.get("/v1/jobs", params={"limit": 2, "model": "minilm"}).json()
        assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
        rest = http.get(
            "/v1/jobs", params={"limit": 1, "model": "minilm", "after": page["last_id"]}
        ).json()
        assert rest["data"][0]["id"] == ids[0]
        done = http.get("/v1/jobs", params={"status": "succeeded", "limit": 100}).json()
        assert set(ids) <= {j["id"] for j in done["data"]}
        # A listing never carries results (vectors of up to 100 jobs); one job does.
        assert all(j["result"] is None for j in done["data"]), done["data"][0]
        one = http.get(f"/v1/jobs/{ids[0]}").json()
        assert len(one["result"]["data"][0]["embedding"]) == 384
        assert http.get("/v1/jobs", params={"status": "sleeping"}).status_code == 400


def test_a_cancelled_queued_job_never_reaches_an_engine(stack: Stack) -> None:
    # No worker serves idle-model yet, so the job waits in its queue.
    job = submit(stack, "/v1/embeddings", {"model": "idle-model", "input": "never embedded"})
    with stack.http() as http:
        cancelled = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200  # already so
    worker = start_worker(stack.env, stack.log_dir, "idle-model")
    try:
        deadline = time.monotonic() + 30
        while stack.worker_stats(worker, "idle-model").get("jobs_skipped", 0) < 1:
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.2)
        stats = stack.worker_stats(worker, "idle-model")
        assert stats.get("jobs_started", 0) == 0
        assert stats.get("batches", 0) == 0  # the engine never ran
    finally:
        worker.stop()
    assert wait_job(stack, job["id"], finished)["status"] == "cancelled"


def test_cancelling_a_running_chat_job_stops_the_generation(stack: Stack) -> None:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": 900,
        "temperature": 0.8,
        "seed": 3,
    }
    job = submit(stack, "/v1/chat/completions", body)
    wait_job(stack, job["id"], lambda j: j["status"] == "running" or finished(j))
    time.sleep(0.5)
    with stack.http() as http:
        response = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        # The only chat slot is free again well before 900 tokens could have been made.
        started = time.monotonic()
        quick = http.post(
            "/v1/chat/completions",
            json={**body, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert quick.status_code == 200
        assert time.monotonic() - started < 20
    worker = stack.workers["smollm2"]
    deadline = time.monotonic() + 10
    while stack.worker_stats(worker, "smollm2").get("jobs_discarded", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    final = wait_job(stack, job["id"], finished)
    assert final["status"] == "cancelled" and final["result"] is None


def test_jobs_wait_behind_interactive_requests_not_in_front_of_them(stack: Stack) -> None:
    texts = [f"bulk text number {i} about nothing much at all" for i in range(1500)]
    job = submit(stack, "/v1/embeddings", {"model": "minilm", "input": texts})
    wait_job(stack, job["id"], lambda j: j["status"] == "running" or finished(j))
    time.sleep(0.3)
    with stack.http() as http:
        started = time.monotonic()
        response = http.post("/v1/embeddings", json={"model": "minilm", "input": "urgent"})
        took = time.monotonic() - started
        assert response.status_code == 200
        status = http.get(f"/v1/jobs/{job['id']}").json()["status"]
    assert status == "running", "the job finished first: make it longer"
    assert took < 3.0, f"a sync request waited {took:.1f}s behind a job"
    assert wait_job(stack, job["id"], finished, timeout=180)["status"] == "succeeded"


def test_a_job_survives_sigkill_of_its_worker(stack: Stack, reference_model: Any) -> None:
    texts = [f"sentence {i} for a job that outlives its first worker" for i in range(1500)]
    first = start_worker(stack.env, stack.log_dir, "minilm-victim")
    second: Proc | None = None
    try:
        job = submit(stack, "/v1/embeddings", {"model": "minilm-victim", "input": texts})
        wait_job(stack, job["id"], lambda j: j["status"] == "running" or finished(j))
        time.sleep(0.5)
        assert stack.worker_stats(first, "minilm-victim").get("jobs_started", 0) == 1
        first.kill()
        while alive_replica_count(stack.env, "minilm-victim"):
            time.sleep(0.2)  # its heartbeat runs out
        second = start_worker(stack.env, stack.log_dir, "minilm-victim", replica=1)
        done = wait_job(stack, job["id"], finished, timeout=180)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        data = done["result"]["data"]
        assert [d["index"] for d in data] == list(range(len(texts)))
        expected = reference_model.encode(texts[:50], normalize_embeddings=True)
        np.testing.assert_allclose([d["embedding"] for d in data[:50]], expected, atol=1e-4)
        stats = stack.worker_stats(second, "minilm-victim")
        assert stats.get("jobs_succeeded") == 1
    finally:
        first.kill()
        if second:
            second.stop()


@contextmanager
def _outcomes_refused(database_url: str, backend: str) -> Iterator[None]:
    """A database that refuses to record a succeeded job, as a blip would, until the
    block ends: a trigger, so the worker meets a real error from its real database."""
    engine = create_db_engine(database_url)
    if backend == "postgresql":
        install = [
            "CREATE FUNCTION refuse_outcome() RETURNS trigger AS "
            "$$ BEGIN RAISE EXCEPTION 'the database is away'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_outcome BEFORE UPDATE ON jobs FOR EACH ROW "
            "WHEN (NEW.status = 'succeeded') EXECUTE FUNCTION refuse_outcome()",
        ]
        remove = ["DROP TRIGGER refuse_outcome ON jobs", "DROP FUNCTION refuse_outcome()"]
    else:
        install = [
            "CREATE TRIGGER refuse_outcome BEFORE UPDATE ON jobs FOR EACH ROW "
            "WHEN NEW.status = 'succeeded' BEGIN SELECT RAISE(ABORT, 'the database is away'); END"
        ]
        remove = ["DROP TRIGGER refuse_outcome"]
    try:
        with engine.begin() as conn:
            for statement in install:
                conn.execute(sa.text(statement))
        yield
    finally:
        with engine.begin() as conn:
            for statement in remove:
                conn.execute(sa.text(statement))
        engine.dispose()


def test_a_job_whose_outcome_could_not_be_recorded_is_taken_over(stack: Stack) -> None:
    """The worker ran the job and lives on, but the database failed as it recorded the
    outcome: the job must not stay `running` while that replica lives. Its lease runs
    out, the sweeper sends it again and the next delivery runs it to the end."""
    worker = stack.workers["minilm"]
    unrecorded = stack.settled_stats(worker, "minilm").get("jobs_unrecorded", 0)
    with _outcomes_refused(stack.env["INFERQ_DATABASE_URL"], stack.backend):
        job = submit(stack, "/v1/embeddings", {"model": "minilm", "input": "a blip"})
        deadline = time.monotonic() + 30
        while stack.worker_stats(worker, "minilm").get("jobs_unrecorded", 0) <= unrecorded:
            assert time.monotonic() < deadline, "the outcome was never refused"
            time.sleep(0.2)
        with stack.http() as http:
            assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    done = wait_job(stack, job["id"], finished, timeout=60)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2 and len(done["result"]["data"]) == 1


def test_the_job_outlives_an_api_restart(stack: Stack) -> None:
    api, base = start_api(stack.env, stack.log_dir)
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY_A}"}) as http:
            response = http.post(
                "/v1/jobs",
                json={"endpoint": "/v1/embeddings", "body": {"model": "minilm", "input": "x"}},
            )
            assert response.status_code == 202
            job_id = response.json()["id"]
    finally:
        api.stop()
    api, base = start_api(stack.env, stack.log_dir)
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY_A}"}) as http:
            while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] != "succeeded":
                assert time.monotonic() < deadline, job
                time.sleep(0.2)
        assert len(job["result"]["data"]) == 1
    finally:
        api.stop()


class _Hooks(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]]
    fail_first: int

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append(body)
        failing = len(type(self).received) <= type(self).fail_first
        self.send_response(500 if failing else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def hook_server() -> Iterator[tuple[str, type[_Hooks]]]:
    handler = type("Hooks", (_Hooks,), {"received": [], "fail_first": 1})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}/done", handler
    server.shutdown()


def test_webhooks_are_retried_and_their_outcome_recorded(
    stack: Stack, hook_server: tuple[str, type[_Hooks]]
) -> None:
    url, hooks = hook_server
    job = submit(stack, "/v1/embeddings", {"model": "minilm", "input": "hook"}, webhook=url)
    done = wait_job(stack, job["id"], lambda j: (j["webhook"] or {}).get("status") == "delivered")
    assert done["webhook"]["attempts"] == 2  # the first call got a 500
    assert len(hooks.received) == 2
    assert hooks.received[-1]["id"] == job["id"]
    assert hooks.received[-1]["status"] == "succeeded"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    unreachable = f"http://127.0.0.1:{dead_port}/nobody"
    job = submit(stack, "/v1/embeddings", {"model": "minilm", "input": "hook"}, webhook=unreachable)
    failed = wait_job(stack, job["id"], lambda j: (j["webhook"] or {}).get("status") == "failed")
    assert failed["status"] == "succeeded"
    assert failed["webhook"]["attempts"] == 3 and failed["webhook"]["last_error"]
