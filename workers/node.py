"""The node agent's Celery app: `inferq node` runs it as a worker on `node.<name>`.

Its one task only wakes the agent (app/node_agent.py); what to run is read from
Redis, so a lost or repeated control message does no harm. The agent's thread
starts before the consumer and stops, with every worker it runs, when the
Celery worker shuts down.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import redis
from celery import signals

from app.celery_app import create_celery
from app.cluster_state import NODE_RECONCILE_TASK, Assignment
from app.keys import KeySpace
from app.node_agent import NodeAgent
from app.settings import get_settings

log = logging.getLogger("inferq.node")

settings = get_settings()
node_app = create_celery(settings)
# A Redis restart must not stop the node, and with it every worker it runs.
node_app.conf.worker_consumer = "workers.broker:ResilientConsumer"
_agent: NodeAgent | None = None


def worker_command(assignment: Assignment) -> tuple[list[str], dict[str, str]]:
    """An ordinary `inferq worker`, told its spec, node and assignment through settings."""
    import json

    argv = [sys.executable, "-m", "app", "worker", "--model", assignment.uid]
    argv += ["--replica", str(assignment.replica)]
    if assignment.devices:
        argv += ["--devices", ",".join(assignment.devices)]
    env = {
        "INFERQ_WORKER_SPEC": json.dumps(assignment.spec),
        "INFERQ_WORKER_NODE": assignment.node,
        "INFERQ_WORKER_ASSIGNMENT": assignment.assignment_id,
        "INFERQ_WORKER_DEVICE_KIND": assignment.device_kind,
    }
    return argv, env


@node_app.task(name=NODE_RECONCILE_TASK, ignore_result=True)
def reconcile() -> None:
    if _agent is not None:
        _agent.wake()


@signals.worker_init.connect
def _start_agent(**_: Any) -> None:
    global _agent
    from app.supervisor import child_env

    client = redis.Redis.from_url(settings.require_redis_url(), socket_timeout=10)
    env = child_env({})
    # The node's own identity must not leak into the workers' settings.
    for name in (
        "INFERQ_WORKER_SPEC",
        "INFERQ_WORKER_NODE",
        "INFERQ_WORKER_ASSIGNMENT",
        "INFERQ_WORKER_DEVICE_KIND",
    ):
        env.pop(name, None)
    _agent = NodeAgent(
        settings,
        client,
        KeySpace(settings.key_prefix),
        settings.node_name,
        settings.node_devices,
        settings.node_device_kind,
        settings.node_address,
        worker_command,
        env,
    )
    _agent.start()
    log.info(
        "node %s (%s) offers %s devices %s",
        settings.node_name,
        settings.node_address,
        settings.node_device_kind,
        ",".join(settings.node_devices) or "(none)",
    )


@signals.worker_shutdown.connect
def _stop_agent(**_: Any) -> None:
    if _agent is not None:
        _agent.stop()
