"""The records nodes and the API share in Redis to run launched models.

Desired state is written by the API (which replicas each node must run) and
kept until a model is terminated, so a node that restarts picks its workers up
again; observed state is what nodes report with every heartbeat and expires
with them. A control message on the node's Celery queue only says "look now":
losing one costs a reconcile interval, never a replica.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

#: The Celery task a node consumes from `node.<name>`: compare and act now.
NODE_RECONCILE_TASK = "inferq.node.reconcile"

MAX_NODE_EVENTS = 100


@dataclass
class Assignment:
    """One replica a node must run: a model spec on a group of its devices."""

    assignment_id: str
    uid: str
    node: str
    devices: list[str]
    replica: int
    spec: dict[str, Any]
    created: float = field(default_factory=time.time)
    #: The node's kind of device, for engines that run on more than one kind.
    device_kind: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Assignment:
        return cls(**json.loads(raw))


@dataclass
class Deployment:
    """A launched model: the spec its replicas serve, under the uid clients call it by."""

    uid: str
    spec: dict[str, Any]
    created: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Deployment:
        return cls(**json.loads(raw))


@dataclass
class WorkerProcess:
    """A node's view of one worker process it runs (or is about to restart)."""

    assignment_id: str
    uid: str
    devices: list[str]
    pid: int | None
    state: str  # starting | running | restarting | failed (could not start) | stopping
    restarts: int = 0
    last_exit_code: int | None = None
    since: float = field(default_factory=time.time)


@dataclass
class NodeReport:
    name: str
    host: str
    address: str
    device_kind: str
    devices: list[str]
    pid: int
    started_at: float
    workers: list[WorkerProcess] = field(default_factory=list)
    heartbeat: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> NodeReport:
        data = json.loads(raw)
        data["workers"] = [WorkerProcess(**w) for w in data.get("workers", [])]
        return cls(**data)


def node_event(uid: str, assignment_id: str, event: str, detail: str = "") -> str:
    return json.dumps(
        {
            "time": time.time(),
            "model": uid,
            "replica_id": assignment_id,
            "event": event,
            "detail": detail,
        }
    )
