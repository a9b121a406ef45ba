"""Reading the cluster's state from Redis: nodes, launched models, replicas, queues.

Every read is a handful of pipelined round trips, whatever the cluster's size in
models; the cluster view and the launcher share them so they agree on what is
running.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from api.jobs import KOMBU_PRIORITY_SEP, KOMBU_PRIORITY_STEPS
from app.cluster_state import Assignment, Deployment, NodeReport
from app.keys import KeySpace
from app.model_facts import read_facts
from app.registry import bulk_queue, model_queue
from app.replicas import read_load_errors


@dataclass
class NodeState:
    name: str
    alive: bool
    expires: float
    report: NodeReport | None
    assignments: list[Assignment] = field(default_factory=list)


@dataclass
class ClusterState:
    nodes: dict[str, NodeState]
    deployments: dict[str, Deployment]
    #: model -> live replica infos (ReplicaInfo as dicts) with `expires` and `stats` added.
    replicas: dict[str, list[dict[str, Any]]]
    #: model -> its engine's recent load failure ({reason, time, host, node, pid}).
    load_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: model -> what its last loaded replica reported it takes (app/model_facts.py).
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def assignments(self) -> list[Assignment]:
        return [a for node in self.nodes.values() for a in node.assignments]

    def assignments_of(self, uid: str) -> list[Assignment]:
        return [a for a in self.assignments() if a.uid == uid]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def read_deployments(client: aioredis.Redis, keys: KeySpace) -> dict[str, Deployment]:
    raw = await client.hgetall(keys.deployments)
    return {_text(k): Deployment.from_json(v) for k, v in raw.items()}


async def read_nodes(client: aioredis.Redis, keys: KeySpace) -> dict[str, NodeState]:
    now = time.time()
    members = await client.zrange(keys.nodes, 0, -1, withscores=True)
    names = [_text(m) for m, _ in members]
    scores = {_text(m): float(s) for m, s in members}
    if not names:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.get(keys.node_info(name))
            pipe.hgetall(keys.node_assignments(name))
        raw = await pipe.execute()
    nodes: dict[str, NodeState] = {}
    for i, name in enumerate(names):
        info, assigned = raw[2 * i], raw[2 * i + 1]
        report = NodeReport.from_json(info) if info else None
        assignments = sorted(
            (Assignment.from_json(v) for v in assigned.values()), key=lambda a: a.created
        )
        nodes[name] = NodeState(name, scores[name] > now, scores[name], report, assignments)
    return nodes


async def read_replicas(
    client: aioredis.Redis, keys: KeySpace, models: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Live replicas of each model, with their heartbeat expiry and reported counters."""
    now = time.time()
    async with client.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.zrangebyscore(keys.replicas(model), now, "+inf", withscores=True)
        listed = await pipe.execute()
    ids: list[tuple[str, str, float]] = [
        (model, _text(member), float(score))
        for model, members in zip(models, listed, strict=True)
        for member, score in members
    ]
    found: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    if not ids:
        return found
    async with client.pipeline(transaction=False) as pipe:
        for _, replica_id, _ in ids:
            pipe.get(keys.replica_info(replica_id))
            pipe.hgetall(keys.replica_stats(replica_id))
        raw = await pipe.execute()
    for i, (model, _, expires) in enumerate(ids):
        info, stats = raw[2 * i], raw[2 * i + 1]
        if not info:
            continue
        entry = json.loads(info)
        entry["expires"] = expires
        entry["stats"] = {_text(k): float(v) for k, v in stats.items()}
        found[model].append(entry)
    return found


async def read_cluster(
    client: aioredis.Redis, keys: KeySpace, registry_models: list[str]
) -> ClusterState:
    nodes = await read_nodes(client, keys)
    deployments = await read_deployments(client, keys)
    models = list(dict.fromkeys([*registry_models, *deployments]))
    for node in nodes.values():
        for assignment in node.assignments:
            if assignment.uid not in models:
                models.append(assignment.uid)
    replicas = await read_replicas(client, keys, models)
    load_errors = await read_load_errors(client, keys, models)
    facts = await read_facts(client, keys, models)
    return ClusterState(nodes, deployments, replicas, load_errors, facts)


async def queue_depths(
    client: aioredis.Redis, keys: KeySpace, models: list[str]
) -> dict[str, tuple[int, int]]:
    """(interactive, bulk) messages waiting per model, over all of kombu's priority lists."""
    names: list[str] = []
    for model in models:
        for queue in (model_queue(model), bulk_queue(model)):
            base = keys.queue_list(queue)
            names += [base] + [f"{base}{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS[1:]]
    if not names:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        lengths = [int(n) for n in await pipe.execute()]
    per = len(KOMBU_PRIORITY_STEPS)
    depths: dict[str, tuple[int, int]] = {}
    for i, model in enumerate(models):
        chunk = lengths[2 * per * i : 2 * per * (i + 1)]
        depths[model] = (sum(chunk[:per]), sum(chunk[per:]))
    return depths
