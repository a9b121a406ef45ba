"""A cluster for end-to-end tests: an API and node agents on a key prefix of their own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.procs import Proc, db_upgrade, start_api, start_node

ADMIN_KEY = "cluster-admin-key"
#: Launch without waiting for the replicas to load (the API waits by default, as
#: Xinference's does): the tests watch the replicas come up themselves.
AT_ONCE = {"wait_ready": "false"}


@dataclass
class Cluster:
    env: dict[str, str]
    base: str
    api: Proc
    log_dir: Path
    nodes: dict[str, Proc] = field(default_factory=dict)

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60
        )

    def view(self) -> dict[str, Any]:
        with self.http() as http:
            response = http.get("/v1/cluster")
            assert response.status_code == 200, response.text
            return response.json()

    def add_node(self, name: str, devices: str = "", kind: str = "cpu") -> Proc:
        self.nodes[name] = start_node(self.env, self.log_dir, name, devices, kind)
        return self.nodes[name]

    def wait(
        self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 120
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            view = self.view()
            if check(view):
                return view
            if time.monotonic() > deadline:
                logs = "\n".join(p.tail(30) for p in self.nodes.values())
                raise AssertionError(f"cluster never showed {what}: {view}\n{logs}")
            time.sleep(0.3)


def workers_of(view: dict[str, Any], model: str) -> list[dict[str, Any]]:
    return [w for w in view["workers"] if w["model"] == model]


def ready_workers(view: dict[str, Any], model: str) -> list[dict[str, Any]]:
    return [w for w in workers_of(view, model) if w["replica_id"] and w["state"] == "ready"]


@contextmanager
def running_cluster(
    base_env: dict[str, str], name: str, log_dir: Path, tmp: Path
) -> Iterator[Cluster]:
    env = {
        **base_env,
        "INFERQ_KEY_PREFIX": f"{base_env['INFERQ_KEY_PREFIX']}-{name}",
        "INFERQ_DATABASE_URL": f"sqlite:///{tmp / 'cluster.db'}",
        "INFERQ_API_KEYS": ADMIN_KEY,
        "INFERQ_NODE_RECONCILE_S": "1",
        "INFERQ_NODE_HEARTBEAT_S": "0.5",
        "INFERQ_NODE_HEARTBEAT_TTL_S": "3",
        "INFERQ_NODE_STOP_GRACE_S": "10",
        "INFERQ_MODEL_ROOTS": "/models",
        "INFERQ_HISTORY_SAMPLE_S": "0.5",
    }
    db_upgrade(env)
    api, base = start_api(env, log_dir)
    cluster = Cluster(env, base, api, log_dir)
    try:
        yield cluster
    finally:
        for proc in cluster.nodes.values():
            proc.stop(timeout=30)
        api.stop()
