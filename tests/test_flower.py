"""Flower against inferq's broker: authenticated, and it sees the workers per model queue."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.embedded_redis import free_port
from tests.procs import Proc

LOGIN = ("operator", "flower-secret")


@pytest.fixture(scope="module")
def flower(inferq_env: dict[str, str], log_dir: Path, minilm_worker: Proc) -> Iterator[str]:
    port = free_port()
    env = {**inferq_env, "INFERQ_FLOWER_BASIC_AUTH": ":".join(LOGIN)}
    proc = Proc(
        "flower", [sys.executable, "-m", "app", "flower", "--port", str(port)], env, log_dir
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{base}/healthcheck", timeout=2)
            break
        except httpx.HTTPError:
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(f"flower did not start:\n{proc.tail()}") from None
            time.sleep(0.3)
    yield base
    proc.stop()


def test_flower_refuses_its_api_without_the_login(flower: str) -> None:
    assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
    wrong = httpx.get(f"{flower}/api/workers", auth=("operator", "nope"), timeout=10)
    assert wrong.status_code == 401


def test_flower_lists_the_workers_with_their_model_queue(flower: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        response = httpx.get(
            f"{flower}/api/workers", params={"refresh": "1"}, auth=LOGIN, timeout=20
        )
        assert response.status_code == 200, response.text
        queues = {
            name: [q["name"] for q in info.get("active_queues") or []]
            for name, info in response.json().items()
        }
        serving = [name for name, names in queues.items() if "model.minilm" in names]
        if serving:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"flower never listed the minilm worker: {queues}")
        time.sleep(1)
    (name,) = serving
    assert name.startswith("minilm-r0-")
    assert "model.minilm.bulk" in queues[name]


def test_flower_will_not_serve_a_network_address_without_a_login(
    inferq_env: dict[str, str],
) -> None:
    import subprocess

    from tests.procs import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "app", "flower", "--address", "0.0.0.0"],
        env={**inferq_env, "INFERQ_FLOWER_BASIC_AUTH": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "INFERQ_FLOWER_BASIC_AUTH" in done.stderr
