"""Two replicas of one model on different devices: both serve, and SIGKILL loses nothing."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from api.routes.embeddings import REPLICA_HEADER
from tests.procs import alive_replica_count, start_worker

REQUESTS = 160
CLIENTS = 8


def test_two_replicas_share_work_and_a_killed_one_loses_no_request(
    api: str, inferq_env: dict[str, str], log_dir: Path, reference_model: Any
) -> None:
    first = start_worker(inferq_env, log_dir, "minilm-pair", devices="0", replica=0)
    second = start_worker(inferq_env, log_dir, "minilm-pair", devices="1", replica=1)
    workers = {first.pid: first, second.pid: second}
    try:
        assert alive_replica_count(inferq_env, "minilm-pair") == 2
        texts = [f"request {i}: " + "lorem ipsum dolor " * (1 + i % 7) for i in range(REQUESTS)]
        answered: dict[int, tuple[int, int, np.ndarray, float]] = {}
        lock = threading.Lock()
        killed: list[int] = []

        def send(i: int) -> None:
            started = time.monotonic()
            with httpx.Client(base_url=api, timeout=60) as http:
                resp = http.post(
                    "/v1/embeddings",
                    json={"model": "minilm-pair", "input": [texts[i]], "encoding_format": "float"},
                )
            pid = int(resp.headers.get(REPLICA_HEADER, ":0").rsplit(":", 1)[1])
            vector = np.array(resp.json()["data"][0]["embedding"]) if resp.is_success else None
            with lock:
                answered[i] = (resp.status_code, pid, vector, time.monotonic() - started)
                # Once both replicas have answered, kill the first one mid-stream.
                pids = {a[1] for a in answered.values()}
                if not killed and len(answered) >= 40 and pids >= set(workers):
                    killed.append(first.pid)
                    first.kill()

        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(send, range(REQUESTS)))

        assert killed == [first.pid], "both replicas should have answered before the kill"
        statuses = [answered[i][0] for i in range(REQUESTS)]
        assert statuses == [200] * REQUESTS  # every request answered: none lost
        want = reference_model.encode(texts)
        got = np.stack([answered[i][2] for i in range(REQUESTS)])
        assert np.abs(got - want).max() < 1e-5  # and each got its own answer
        by_pid = {pid: sum(1 for a in answered.values() if a[1] == pid) for pid in workers}
        assert by_pid[first.pid] > 0 and by_pid[second.pid] > 0
        print(f"answers by pid: {by_pid}; slowest {max(a[3] for a in answered.values()):.1f}s")
        time.sleep(3)  # the killed replica's heartbeat expires
        assert alive_replica_count(inferq_env, "minilm-pair") == 1
    finally:
        for proc in workers.values():
            proc.stop()
