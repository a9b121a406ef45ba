"""Deadlines travel with the task: a caller gets 504 at its deadline, and the worker
skips work whose caller has already given up, spending nothing on it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from app.keys import KeySpace
from tests.procs import Proc, start_api, start_worker

ABANDONED = 5


@pytest.fixture(scope="module")
def chat(inferq_env: dict[str, str], log_dir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    env = {
        **inferq_env,
        "INFERQ_KEY_PREFIX": f"{inferq_env['INFERQ_KEY_PREFIX']}-dl",
        "INFERQ_REQUEST_TIMEOUT_S": "120",
    }
    worker: Proc = start_worker(env, log_dir, "smollm2")  # one generation at a time
    api, base = start_api(env, log_dir)
    yield base, env
    api.stop()
    worker.stop()


def worker_counters(env: dict[str, str]) -> dict[str, float]:
    client = redis.Redis.from_url(env["INFERQ_REDIS_URL"])
    keys = KeySpace(env["INFERQ_KEY_PREFIX"])
    (member,) = client.zrange(keys.replicas("smollm2"), 0, -1)
    assert json.loads(client.get(keys.replica_info(member.decode())))["model"] == "smollm2"
    raw = client.hgetall(keys.replica_stats(member.decode()))
    return {k.decode(): float(v) for k, v in raw.items()}


def ask(base: str, content: str, max_tokens: int, timeout_s: float | None = None) -> httpx.Response:
    headers = {"X-Inferq-Timeout": str(timeout_s)} if timeout_s else {}
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_abandoned_requests_are_504_and_never_run(chat: tuple[str, dict[str, str]]) -> None:
    base, env = chat
    assert ask(base, "Hello", 2).status_code == 200
    time.sleep(1.5)  # a heartbeat carries the counters
    before = worker_counters(env)

    # One long generation keeps the only slot busy (this prompt runs to max_tokens, some
    # seconds even on a fast machine)...
    long: list[httpx.Response] = []
    story = "Write a very long story about a dragon, at least 2000 words."
    runner = threading.Thread(target=lambda: long.append(ask(base, story, 600)))
    runner.start()
    time.sleep(0.5)

    # ...while callers with a one-second deadline queue behind it and give up.
    def abandon(i: int) -> tuple[int, str, float]:
        started = time.monotonic()
        reply = ask(base, f"Quick question {i}", 16, timeout_s=1.0)
        return reply.status_code, reply.json()["error"]["code"], time.monotonic() - started

    with ThreadPoolExecutor(ABANDONED) as pool:
        outcomes = list(pool.map(abandon, range(ABANDONED)))
    assert all(status == 504 and code == "request_timeout" for status, code, _ in outcomes)
    assert max(took for *_, took in outcomes) < 3
    assert runner.is_alive(), "the long generation should outlast the abandoned callers"
    runner.join(120)
    assert long and long[0].status_code == 200

    assert ask(base, "Hello again", 2).status_code == 200
    time.sleep(1.5)
    after = worker_counters(env)
    # Only the long generation and the last request reached the engine.
    assert after["received"] - before["received"] == 2, (before, after)
