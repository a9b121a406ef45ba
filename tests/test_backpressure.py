"""Backpressure: beyond the in-flight and queue bounds, 429 with Retry-After at once;
never a hang, and the work that was admitted is answered."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.procs import Proc, db_upgrade, start_api, start_worker

CLIENTS = 16


@pytest.fixture(scope="module")
def tight(inferq_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    env = {
        **inferq_env,
        "INFERQ_KEY_PREFIX": f"{inferq_env['INFERQ_KEY_PREFIX']}-bp",
        "INFERQ_MAX_INFLIGHT_REQUESTS": "10",
        "INFERQ_MAX_QUEUE_DEPTH": "2",
        "INFERQ_OVERLOAD_RETRY_AFTER_S": "3",
    }
    worker: Proc = start_worker(env, log_dir, "smollm2")  # one generation at a time
    api, base = start_api(env, log_dir)
    yield base
    api.stop()
    worker.stop()


def test_over_the_bounds_is_429_with_retry_after_and_nothing_hangs(tight: str) -> None:
    def ask(i: int) -> tuple[int, dict, dict, float]:
        started = time.monotonic()
        reply = httpx.post(
            f"{tight}/v1/chat/completions",
            json={
                "model": "smollm2",
                "messages": [{"role": "user", "content": f"Count to ten, take {i}."}],
                "max_tokens": 24,
            },
            timeout=120,
        )
        return reply.status_code, dict(reply.headers), reply.json(), time.monotonic() - started

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(ask, range(CLIENTS)))

    statuses = [status for status, *_ in results]
    assert set(statuses) <= {200, 429}, statuses
    refused = [(headers, body, took) for status, headers, body, took in results if status == 429]
    codes = {body["error"]["code"] for _, body, _ in refused}
    # Six were refused at the door (10 in flight), some of the rest at the queue (2 waiting).
    assert codes == {"too_many_requests_in_flight", "queue_full"}, codes
    for headers, body, took in refused:
        assert headers["retry-after"] == "3"
        assert body["error"]["type"] == "rate_limit_error"
        assert took < 5  # refused at once, not after waiting
    served = [body for status, _, body, _ in results if status == 200]
    assert len(served) >= 2  # at least the two the queue bound lets wait
    assert all(b["choices"][0]["message"]["content"] for b in served)

    # Once the queue drains, requests are admitted again.
    reply = httpx.post(
        f"{tight}/v1/chat/completions",
        json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200


def test_async_jobs_queue_up_to_their_own_bound(
    inferq_env: dict[str, str], log_dir: Path, tmp_path: Path
) -> None:
    env = {
        **inferq_env,
        "INFERQ_KEY_PREFIX": f"{inferq_env['INFERQ_KEY_PREFIX']}-bpjobs",
        "INFERQ_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}",
        "INFERQ_MAX_QUEUED_JOBS": "3",
        "INFERQ_MAX_QUEUE_DEPTH": "1",  # the sync bound does not apply to jobs
    }
    db_upgrade(env)
    api, base = start_api(env, log_dir)
    try:
        # No worker serves idle-model: its jobs wait, durable, in its bulk queue.
        job = {"endpoint": "/v1/embeddings", "body": {"model": "idle-model", "input": "x"}}
        statuses = [httpx.post(f"{base}/v1/jobs", json=job, timeout=30) for _ in range(5)]
        assert [r.status_code for r in statuses] == [202, 202, 202, 429, 429]
        refused = statuses[-1]
        assert refused.json()["error"]["code"] == "job_queue_full"
        assert refused.headers["retry-after"] == "2"
    finally:
        api.stop()


def test_clients_without_a_key_never_take_the_in_flight_slots(
    inferq_env: dict[str, str], log_dir: Path, minilm_worker: Proc
) -> None:
    """Eight connections without a valid key, each trickling a body that never ends,
    against a limit of four in flight: a keyed client is still answered."""
    env = {
        **inferq_env,
        "INFERQ_API_KEYS": "sk-bp-valid",
        "INFERQ_MAX_INFLIGHT_REQUESTS": "4",
    }
    api, base = start_api(env, log_dir)
    host, port = base.removeprefix("http://").split(":")
    sockets: list[socket.socket] = []
    try:
        for i in range(8):
            sock = socket.create_connection((host, int(port)), timeout=10)
            key = "" if i % 2 else "Authorization: Bearer sk-made-up\r\n"
            head = (
                f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\n{key}"
                "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"model": "minilm", "input": "')
            sockets.append(sock)
        time.sleep(1)  # all eight are in the server, their bodies unfinished
        reply = httpx.post(
            f"{base}/v1/embeddings",
            json={"model": "minilm", "input": "keyed"},
            headers={"Authorization": "Bearer sk-bp-valid"},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
    finally:
        for sock in sockets:
            sock.close()
        api.stop()
