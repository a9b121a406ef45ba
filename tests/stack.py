"""A running inferq (API and workers) for end-to-end tests, and helpers to drive it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from app.keys import KeySpace
from tests.procs import Proc, db_upgrade, run_inferq, start_api, start_worker

KEY_A, KEY_B = "job-key-a", "job-key-b"


@dataclass
class Stack:
    backend: str
    env: dict[str, str]
    base: str
    log_dir: Path
    api: Proc
    workers: dict[str, Proc] = field(default_factory=dict)

    def http(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=60)

    def inferq(self, *args: str) -> str:
        return run_inferq(self.env, *args)

    def worker_stats(self, proc: Proc, model: str) -> dict[str, float]:
        """The counters a worker process itself reports through its heartbeat."""
        client = redis.Redis.from_url(self.env["INFERQ_REDIS_URL"])
        keys = KeySpace(self.env["INFERQ_KEY_PREFIX"])
        for member in client.zrange(keys.replicas(model), 0, -1):
            replica_id = member.decode()
            info = client.get(keys.replica_info(replica_id))
            if info and json.loads(info)["pid"] == proc.pid:
                raw = client.hgetall(keys.replica_stats(replica_id))
                return {k.decode(): float(v) for k, v in raw.items()}
        return {}

    def settled_stats(self, proc: Proc, model: str, quiet_s: float = 2.0) -> dict[str, float]:
        """A worker's counters once they stood still for several heartbeats: work of an
        earlier test that is still finishing (or not yet reported) must not count."""
        deadline = time.monotonic() + 60
        last, since = self.worker_stats(proc, model), time.monotonic()
        while time.monotonic() - since < quiet_s:
            if time.monotonic() > deadline:
                raise AssertionError(f"{model}'s counters did not settle: {last}")
            time.sleep(0.25)
            now = self.worker_stats(proc, model)
            if now != last:
                last, since = now, time.monotonic()
        return last


def wait_job(
    stack: Stack, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 90
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with stack.http() as http:
        while True:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if until(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job did not get there in {timeout}s: {job}")
            time.sleep(0.1)


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled", "expired")


@contextmanager
def running_stack(
    base_env: dict[str, str],
    name: str,
    database_url: str,
    log_dir: Path,
    models: tuple[str, ...],
    extra: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """An API and one worker per model on their own key prefix and a fresh database,
    migrated by `inferq db upgrade`; downgraded to empty again afterwards."""
    env = {
        **base_env,
        "INFERQ_KEY_PREFIX": f"{base_env['INFERQ_KEY_PREFIX']}-{name}",
        "INFERQ_DATABASE_URL": database_url,
        "INFERQ_API_KEYS": f"{KEY_A},{KEY_B}",
        "INFERQ_WEBHOOK_ALLOW_LOOPBACK": "true",
        "INFERQ_WEBHOOK_BACKOFF_S": "0.2",
        "INFERQ_WEBHOOK_MAX_ATTEMPTS": "3",
        "INFERQ_JOB_SWEEP_INTERVAL_S": "0.5",
        "INFERQ_JOB_RESEND_AFTER_S": "5",
        "INFERQ_JOB_LEASE_S": "3",
        "INFERQ_BULK_POLL_INTERVAL_S": "0.3",
        **(extra or {}),
    }
    assert "up to date" in db_upgrade(env)
    api, base = start_api(env, log_dir)
    built = Stack(name, env, base, log_dir, api)
    try:
        for model in models:
            built.workers[model] = start_worker(env, log_dir, model)
        yield built
    finally:
        for proc in built.workers.values():
            proc.stop()
        built.api.stop()
    # From the head back to an empty schema, with the tables gone.
    assert "(empty)" in built.inferq("db", "downgrade", "base")
