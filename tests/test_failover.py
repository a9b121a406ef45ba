"""Two replicas of one model on different devices: both serve, and SIGKILL loses nothing."""

from __future__ import annotations

import json
import threading
import time
import uuid
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


def _queued_request_ids(redis_client: Any, key_prefix: str, queue: str) -> list[str]:
    """Read Celery messages straight off the queue's Redis list, as a worker would."""
    import base64
    import json

    from app.keys import KeySpace

    ids = []
    for raw in redis_client.lrange(KeySpace(key_prefix).queue_list(queue), 0, -1):
        message = json.loads(raw)
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        # A message of the batched task holds several requests, others hold one.
        ids += [r["request_id"] for r in kwargs.get("requests", [kwargs])]
    return ids


def test_a_message_lost_before_any_worker_accepted_it_is_queued_again(
    api: str, redis_client: Any, key_prefix: str
) -> None:
    """The broker can lose a message popped by a worker that dies before recording it.

    Here the loss is made by hand: a replica of `idle-model` is announced but
    nothing consumes, the queued message is deleted, and this test then plays
    the worker that finally takes the re-queued message and answers it.
    """
    import json

    from app.embedding import vectors_to_b64
    from app.keys import KeySpace
    from app.replicas import ReplicaAnnouncer, ReplicaInfo

    keys = KeySpace(key_prefix)
    info = ReplicaInfo("stand-in", "idle-model", "test", 1, [], 0)
    announcer = ReplicaAnnouncer(redis_client, keys, info, interval=0.2, ttl=2)
    announcer.start()
    queue = "model.idle-model"
    try:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(
                httpx.post,
                f"{api}/v1/embeddings",
                json={"model": "idle-model", "input": "lost once", "encoding_format": "float"},
                timeout=30,
            )
            deadline = time.monotonic() + 5
            while not _queued_request_ids(redis_client, key_prefix, queue):
                assert time.monotonic() < deadline, "the request was never queued"
                time.sleep(0.05)
            [request_id] = _queued_request_ids(redis_client, key_prefix, queue)
            redis_client.delete(keys.queue_list(queue))  # lost in the pop/record gap
            deadline = time.monotonic() + 10
            while not (again := _queued_request_ids(redis_client, key_prefix, queue)):
                assert time.monotonic() < deadline, "the lost request was not queued again"
                time.sleep(0.1)
            assert again == [request_id]
            redis_client.delete(keys.queue_list(queue))
            vector = np.arange(384, dtype=np.float32)
            reply = {
                "ok": True,
                "result": {
                    "vectors_b64": vectors_to_b64(vector[None, :]),
                    "prompt_tokens": 4,
                    "truncated": [],
                    "replica": "test:1",
                },
            }
            redis_client.publish(keys.result_channel(request_id), json.dumps(reply))
            resp = call.result(timeout=10)
        assert resp.status_code == 200
        assert resp.json()["data"][0]["embedding"] == vector.tolist()
    finally:
        announcer.stop()
        redis_client.delete(keys.queue_list(queue))


def test_a_resent_copy_on_the_replica_that_runs_it_is_not_run_again(
    inferq_env: dict[str, str], minilm_worker: Any, redis_client: Any
) -> None:
    """The API resends a request nobody accepted within a few seconds; when the first
    copy sat prefetched on the replica that then runs it, the copy must be skipped, not
    run a second time beside it (a vLLM replica would generate every token twice)."""
    from app.celery_app import EMBEDDINGS_TASK, create_celery
    from app.keys import KeySpace
    from app.settings import Settings

    settings = Settings(
        redis_url=inferq_env["INFERQ_REDIS_URL"], key_prefix=inferq_env["INFERQ_KEY_PREFIX"]
    )
    celery = create_celery(settings)
    request_id = uuid.uuid4().hex
    channel = redis_client.pubsub()
    channel.subscribe(KeySpace(settings.key_prefix).result_channel(request_id))
    # Long enough that the first copy still runs when the second is taken.
    texts = [f"copy {i} " + "lorem ipsum dolor sit amet " * 40 for i in range(256)]
    kwargs = {
        "request_id": request_id,
        "model": "minilm",
        "payload": {"inputs": texts, "truncate": True},
        "deadline": time.time() + 120,
    }
    for _ in range(2):
        celery.send_task(EMBEDDINGS_TASK, kwargs=kwargs, exchange="", routing_key="model.minilm")
    finals, accepted = 0, 0
    quiet_until = 0.0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = channel.get_message(timeout=1.0)
        if message is None or message["type"] != "message":
            if finals and time.monotonic() > quiet_until:
                break
            continue
        reply = json.loads(message["data"])
        accepted += "accepted" in reply
        if "ok" in reply:
            assert reply["ok"], reply
            finals += 1
            quiet_until = time.monotonic() + 5  # room for a second copy's answer
    channel.close()
    assert (accepted, finals) == (1, 1), (accepted, finals)
