"""Backpressure: beyond the in-flight and queue bounds, 429 with Retry-After at once;
never a hang, and the work that was admitted is answered."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


@contextmanager
def _defaults(inferq_env: dict[str, str], log_dir: Path, name: str) -> Iterator[str]:
    """An API on its defaults (the suite's timeout aside) and one minilm replica of its own."""
    env = {**inferq_env, "INFERQ_KEY_PREFIX": f"{inferq_env['INFERQ_KEY_PREFIX']}-{name}"}
    worker = start_worker(env, log_dir, "minilm")
    api, base = start_api(env, log_dir)
    try:
        yield base
    finally:
        api.stop()
        worker.stop()


async def _post_all(
    base: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> list[tuple[int, dict[str, str], dict[str, Any], float]]:
    """Every body POSTed to /v1/embeddings at once, each on a connection of its own."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as http:

        async def one(body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any], float]:
            started = time.monotonic()
            reply = await http.post("/v1/embeddings", json=body, headers=headers)
            return reply.status_code, dict(reply.headers), reply.json(), time.monotonic() - started

        return await asyncio.gather(*(one(b) for b in bodies))


def test_a_burst_far_inside_the_bounds_is_served_not_refused(
    inferq_env: dict[str, str], log_dir: Path
) -> None:
    """300 requests at once, well under the 1,024 in flight: each waits for a Redis
    connection if all are busy, none is a 503 'Too many connections'."""
    bodies = [{"model": "minilm", "input": [f"burst text {i}"]} for i in range(300)]
    with _defaults(inferq_env, log_dir, "burst") as base:
        results = asyncio.run(_post_all(base, bodies))
    statuses = Counter(status for status, *_ in results)
    errors = {body["error"]["message"] for status, _, body, _ in results if status != 200}
    assert statuses == {200: 300}, (statuses, errors)


def test_work_that_cannot_finish_before_its_deadline_is_refused_at_once(
    inferq_env: dict[str, str], log_dir: Path
) -> None:
    """Far past capacity, admission knows the inputs queued and the replica's measured
    rate: what would end in a 504 is a 429 with Retry-After at once, and every request
    it admits is answered within its deadline. (A replica of its own: its rate is that
    of these texts, not of another test's.)"""
    with _defaults(inferq_env, log_dir, "deadline") as base:
        _burst_past_capacity(base)


def _burst_past_capacity(base: str) -> None:
    words = " ".join(f"word{i}" for i in range(50))
    deadline_s = 8.0
    headers = {"X-Inferq-Timeout": str(deadline_s)}
    warm = [{"model": "minilm", "input": [f"{i} {words}" for i in range(16)]}] * 4
    assert {s for s, *_ in asyncio.run(_post_all(base, warm, headers))} == {200}
    time.sleep(2)  # the replica's rate reaches its heartbeat
    bodies = [
        {"model": "minilm", "input": [f"{i}.{j} {words}" for j in range(16)]} for i in range(80)
    ]
    results = asyncio.run(_post_all(base, bodies, headers))
    statuses = Counter(status for status, *_ in results)
    assert set(statuses) <= {200, 429}, statuses
    refusals = [b["error"]["message"] for s, _, b, _ in results if s == 429]
    assert statuses[200] >= 4 and statuses[429] >= 20, (statuses, refusals[:1])
    for status, reply_headers, body, took in results:
        if status == 200:
            assert took < deadline_s, f"an admitted request took {took:.1f}s"
        else:
            assert body["error"]["code"] == "backlog_exceeds_deadline", body
            assert int(reply_headers["retry-after"]) >= 1
            assert took < 2.0, f"a refusal took {took:.1f}s"
