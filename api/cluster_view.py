"""What `/v1/models` and `/v1/cluster` show, built from one read of the cluster state."""

from __future__ import annotations

import time
from typing import Any

from api.cluster_reads import ClusterState, NodeState
from app.cluster_state import Assignment, WorkerProcess
from app.registry import ModelSpec, bulk_queue, model_queue

#: Worker counters that count a finished request or job.
DONE_COUNTERS = ("answered", "failed", "jobs_succeeded", "jobs_failed")


def worker_processes(state: ClusterState) -> dict[str, WorkerProcess]:
    """What nodes report of each assignment's worker process."""
    found: dict[str, WorkerProcess] = {}
    for node in state.nodes.values():
        if node.alive and node.report:
            for process in node.report.workers:
                found[process.assignment_id] = process
    return found


def _ready_assignments(state: ClusterState) -> set[str]:
    return {
        str(r["assignment"]) for rs in state.replicas.values() for r in rs if r.get("assignment")
    }


def replica_view(
    assignment: Assignment, state: ClusterState, processes: dict[str, WorkerProcess]
) -> dict[str, Any]:
    node = state.nodes.get(assignment.node)
    process = processes.get(assignment.assignment_id)
    if assignment.assignment_id in _ready_assignments(state):
        status = "ready"
    elif node is None or not node.alive:
        status = "node_down"
    elif process is None:
        status = "pending"
    else:
        status = process.state
    return {
        "replica_id": assignment.assignment_id,
        "node": assignment.node,
        "devices": assignment.devices,
        "replica": assignment.replica,
        "state": status,
        "pid": process.pid if process else None,
        "restarts": process.restarts if process else 0,
        "last_exit_code": process.last_exit_code if process else None,
        "created": assignment.created,
    }


def registry_entry(spec: ModelSpec, assignments: list[Assignment]) -> dict[str, Any]:
    """The registry YAML entry that describes this model as it runs now."""
    entry = spec.model_dump(mode="json", exclude={"placements"})
    placements = [
        {"host": a.node, "devices": a.devices, "tp": max(1, len(a.devices))}
        if a.devices
        else {"host": a.node}
        for a in assignments
    ]
    entry["placements"] = placements or spec.model_dump(mode="json")["placements"]
    return entry


def _load_error(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A worker's last failure to load the model's engine, if recent (it expires)."""
    if record is None:
        return None
    return {k: record.get(k) for k in ("reason", "time", "host", "node")}


def wanted_replicas(spec: ModelSpec, state: ClusterState) -> int:
    """Launched replicas for a launched model, the registry's placements otherwise."""
    if spec.name in state.deployments:
        return len(state.assignments_of(spec.name))
    return len(spec.replica_device_groups())


def model_entry(
    spec: ModelSpec,
    source: str,
    state: ClusterState,
    created: int,
    detail: bool = False,
) -> dict[str, Any]:
    assignments = state.assignments_of(spec.name)
    alive = len(state.replicas.get(spec.name, []))
    wanted = wanted_replicas(spec, state)
    entry: dict[str, Any] = {
        "id": spec.name,
        "object": "model",
        "created": int(state.deployments[spec.name].created)
        if spec.name in state.deployments
        else created,
        "owned_by": "inferq",
        "kind": spec.kind.value,
        "engine": spec.engine,
        "source": source,
        "launched": spec.name in state.deployments,
        "replicas_alive": alive,
        "replicas_wanted": wanted,
        "load_error": _load_error(state.load_errors.get(spec.name)),
    }
    if detail:
        processes = worker_processes(state)
        entry["replicas"] = [replica_view(a, state, processes) for a in assignments]
        entry["registry_entry"] = registry_entry(spec, assignments)
    return entry


def _node_view(node: NodeState, state: ClusterState, events: list[dict[str, Any]]) -> dict:
    holders: dict[str, tuple[str, str | None]] = {}
    for assignment in node.assignments:
        for device in assignment.devices:
            holders[device] = (assignment.uid, assignment.assignment_id)
    report = node.report
    if report is not None:
        for model, replicas in state.replicas.items():
            for replica in replicas:
                if not replica.get("node") and replica.get("host") == report.host:
                    for device in replica.get("devices", []):
                        holders.setdefault(str(device), (model, None))
    devices = list(report.devices) if report else sorted({d for d in holders})
    return {
        "name": node.name,
        "host": report.host if report else None,
        "address": report.address if report else None,
        "device_kind": report.device_kind if report else None,
        "alive": node.alive,
        "last_heartbeat": report.heartbeat if report else None,
        "started_at": report.started_at if report else None,
        "devices": [
            {
                "id": device,
                "model": holders.get(device, (None, None))[0],
                "replica_id": holders.get(device, (None, None))[1],
            }
            for device in devices
        ],
        "events": events,
    }


def _worker_rows(
    state: ClusterState, processes: dict[str, WorkerProcess], heartbeat_ttl: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    announced: set[str] = set()
    for model, replicas in state.replicas.items():
        for replica in replicas:
            stats = replica.get("stats", {})
            assignment = str(replica.get("assignment") or "")
            announced.add(assignment)
            process = processes.get(assignment)
            rows.append(
                {
                    "replica_id": replica["replica_id"],
                    "assignment_id": assignment or None,
                    "model": model,
                    "node": replica.get("node") or None,
                    "host": replica.get("host"),
                    "pid": replica.get("pid"),
                    "devices": replica.get("devices", []),
                    "state": replica.get("state", "ready"),
                    "started_at": replica.get("started_at"),
                    "last_heartbeat": replica["expires"] - heartbeat_ttl,
                    "tasks_done": int(sum(stats.get(k, 0) for k in DONE_COUNTERS)),
                    "in_flight": int(stats.get("in_flight", 0)),
                    "restarts": process.restarts if process else 0,
                }
            )
    for node in state.nodes.values():
        wanted = {a.assignment_id for a in node.assignments}
        for process in node.report.workers if node.alive and node.report else []:
            if process.assignment_id in wanted or process.assignment_id in announced:
                continue
            # Terminated, finishing its in-flight work before it exits.
            rows.append(
                {
                    "replica_id": None,
                    "assignment_id": process.assignment_id,
                    "model": process.uid,
                    "node": node.name,
                    "host": node.report.host if node.report else None,
                    "pid": process.pid,
                    "devices": process.devices,
                    "state": process.state,
                    "started_at": process.since,
                    "last_heartbeat": None,
                    "tasks_done": 0,
                    "in_flight": 0,
                    "restarts": process.restarts,
                }
            )
        for assignment in node.assignments:
            if assignment.assignment_id in announced:
                continue
            process = processes.get(assignment.assignment_id)
            rows.append(
                {
                    "replica_id": None,
                    "assignment_id": assignment.assignment_id,
                    "model": assignment.uid,
                    "node": node.name,
                    "host": node.report.host if node.report else None,
                    "pid": process.pid if process else None,
                    "devices": assignment.devices,
                    "state": (process.state if process else "pending")
                    if node.alive
                    else "node_down",
                    "started_at": process.since if process else None,
                    "last_heartbeat": None,
                    "tasks_done": 0,
                    "in_flight": 0,
                    "restarts": process.restarts if process else 0,
                }
            )
    return rows


def cluster_view(
    state: ClusterState,
    models: list[tuple[ModelSpec, str]],
    depths: dict[str, tuple[int, int]],
    events: dict[str, list[dict[str, Any]]],
    jobs: dict[str, int] | None,
    jobs_problem: str | None,
    started_at: int,
    heartbeat_ttl: float,
) -> dict[str, Any]:
    processes = worker_processes(state)
    model_rows = []
    queues = []
    for spec, source in models:
        interactive, bulk = depths.get(spec.name, (0, 0))
        row = model_entry(spec, source, state, started_at)
        row.update(
            {
                "queue": model_queue(spec.name),
                "queue_depth": interactive,
                "bulk_queue": bulk_queue(spec.name),
                "bulk_queue_depth": bulk,
            }
        )
        model_rows.append(row)
        queues.append({"name": model_queue(spec.name), "model": spec.name, "depth": interactive})
        queues.append({"name": bulk_queue(spec.name), "model": spec.name, "depth": bulk})
    return {
        "object": "cluster",
        "time": time.time(),
        "nodes": [
            _node_view(node, state, events.get(name, [])) for name, node in state.nodes.items()
        ],
        "workers": _worker_rows(state, processes, heartbeat_ttl),
        "models": model_rows,
        "queues": queues,
        "jobs": jobs,
        "jobs_problem": jobs_problem,
    }
