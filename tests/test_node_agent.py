"""The node agent's loop against real Redis and real processes, driven step by step."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from app.cluster_state import Assignment, NodeReport
from app.keys import KeySpace
from app.node_agent import NodeAgent
from app.settings import Settings

#: One argument longer than Linux takes (MAX_ARG_STRLEN is 128 KiB): exec fails, E2BIG.
TOO_LONG = "x" * 300_000


@pytest.fixture
def agent(redis_url: str, key_prefix: str) -> Iterator[NodeAgent]:
    settings = Settings(
        redis_url=redis_url,
        key_prefix=f"{key_prefix}-node-unit",
        node_restart_max_backoff_s=1.0,
    )
    client = redis.Redis.from_url(redis_url)
    keys = KeySpace(settings.key_prefix)
    built = NodeAgent(
        settings,
        client,
        keys,
        "unit-node",
        ["0"],
        "cpu",
        "127.0.0.1",
        lambda _: ([sys.executable, "-c", "pass", TOO_LONG], {}),
        {},
    )
    yield built
    for key in client.scan_iter(match=f"{settings.key_prefix}:*"):
        client.delete(key)


def test_a_worker_that_cannot_start_is_a_failed_replica_not_a_wedged_node(
    agent: NodeAgent,
) -> None:
    """An option so long the kernel refuses the worker's command line: the node records
    an event, shows the replica failed, keeps beating and tries again later."""
    assignment = Assignment("a-1", "huge-options", "unit-node", ["0"], 0, {"name": "huge-options"})
    client, keys = agent.client, agent.keys
    for _ in range(3):
        agent.reconcile({assignment.assignment_id: assignment})
        agent.tend()
        agent.heartbeat()
        report = NodeReport.from_json(client.get(keys.node_info("unit-node")))
        [worker] = report.workers
        assert worker.state == "failed" and worker.pid is None, worker
        time.sleep(1.1)  # past the retry delay: the next tend tries again
    events = [json.loads(e) for e in client.lrange(keys.node_events("unit-node"), 0, -1)]
    assert {e["event"] for e in events} == {"failed"}, events
    assert len(events) >= 2  # tried again, and said so each time
    assert "could not be started" in events[0]["detail"]
    assert "Argument list too long" in events[0]["detail"], events[0]
    assert client.zscore(keys.nodes, "unit-node") is not None  # still heartbeating
