"""Two hosts for real on one machine: Redis and the API in one network namespace, a node
with its worker in another, joined by a veth link that the test cuts and restores."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.embedded_redis import redis_server_binary
from tests.cluster import AT_ONCE
from tests.netns import Hosts, can_make_namespaces, new_hosts
from tests.procs import Proc, subprocess_env, wait_http

pytestmark = pytest.mark.skipif(
    can_make_namespaces() is not None, reason=str(can_make_namespaces())
)

MODEL = "minilm-far"
API_KEY = "two-hosts-api-key"


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    made = new_hosts()
    made.create()
    try:
        yield made
    finally:
        made.destroy()


def embed(http: httpx.Client) -> httpx.Response:
    return http.post("/v1/embeddings", json={"model": MODEL, "input": "across the link"})


def test_a_request_crosses_the_network_and_503_while_the_link_is_cut(
    hosts: Hosts, inferq_env: dict[str, str], log_dir: Path, tmp_path: Path
) -> None:
    # Redis on a network address wants a password (protected mode), as in production.
    redis_url = f"redis://:two-hosts-secret@{hosts.a_address}:6379/0"
    env = subprocess_env(
        {
            "INFERQ_REDIS_URL": redis_url,
            "INFERQ_KEY_PREFIX": "two-hosts",
            "INFERQ_REGISTRY": inferq_env["INFERQ_REGISTRY"],
            "INFERQ_DATA_DIR": str(tmp_path / "data"),
            "INFERQ_HEARTBEAT_INTERVAL_S": "0.5",
            "INFERQ_HEARTBEAT_TTL_S": "2.5",
            "INFERQ_VISIBILITY_TIMEOUT_S": "4",
            "INFERQ_NODE_HEARTBEAT_S": "0.5",
            "INFERQ_NODE_HEARTBEAT_TTL_S": "3",
            "INFERQ_NODE_RECONCILE_S": "1",
            "INFERQ_REQUEST_TIMEOUT_S": "20",
            # The API listens on a network address, so it must have keys.
            "INFERQ_API_KEYS": API_KEY,
            "HF_HUB_OFFLINE": "1",
        }
    )
    procs: list[Proc] = []
    try:
        redis_server = Proc(
            "redis-a",
            [
                *hosts.run_in(hosts.a),
                redis_server_binary(),
                "--bind",
                hosts.a_address,
                "127.0.0.1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                "two-hosts-secret",
            ],
            env,
            log_dir,
        )
        procs.append(redis_server)
        api = Proc(
            "api-a",
            [
                *hosts.run_in(hosts.a),
                sys.executable,
                "-m",
                "app",
                "api",
                "--host",
                "0.0.0.0",
                "--port",
                "9997",
                "--loglevel",
                "warning",
            ],
            env,
            log_dir,
        )
        procs.append(api)
        base = f"http://{hosts.api_address}:9997"
        wait_http(f"{base}/health", api)
        # The node runs in namespace B; only the API (in A) can tell the test it joined.
        node = Proc(
            "node-far",
            [*hosts.run_in(hosts.b), sys.executable, "-m", "app", "node", "--name", "far"],
            env,
            log_dir,
        )
        procs.append(node)

        auth = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=base, timeout=30, headers=auth) as http:
            wait_until(
                lambda: [n["name"] for n in cluster_view(http)["nodes"]] == ["far"],
                60,
                "the node in namespace B to join",
            )
            launched = http.post(
                "/v1/models", json={"model_name": "minilm", "model_uid": MODEL}, params=AT_ONCE
            )
            assert launched.status_code == 200, launched.text
            wait_until(lambda: embed(http).status_code == 200, 120, "the launched replica")
            view = cluster_view(http)
            (far,) = view["nodes"]
            assert far["address"] == hosts.b_address  # it reached Redis across the link
            (worker,) = [w for w in view["workers"] if w["model"] == MODEL]
            assert worker["node"] == "far" and worker["state"] == "ready"
            assert len(embed(http).json()["data"][0]["embedding"]) == 384

            hosts.cut()
            cut_at = time.monotonic()
            wait_until(lambda: embed(http).status_code == 503, 15, "503 after the cut")
            took = time.monotonic() - cut_at
            refused = embed(http)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "model_unavailable"
            assert took < 10, f"503 came {took:.1f}s after the cut"

            hosts.restore()
            back_at = time.monotonic()
            wait_until(lambda: embed(http).status_code == 200, 60, "recovery after the link")
            recovered = time.monotonic() - back_at
            assert recovered < 45, f"recovered {recovered:.1f}s after the link returned"
            print(f"two hosts: 503 {took:.1f}s after the cut, served {recovered:.1f}s after repair")
    finally:
        for proc in reversed(procs):
            proc.stop(timeout=20)


def wait_until(check: object, timeout: float, what: str) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def cluster_view(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/v1/cluster")
    assert response.status_code == 200, response.text
    return dict(response.json())
