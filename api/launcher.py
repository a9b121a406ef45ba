"""Launching and terminating model replicas on nodes (`POST`/`DELETE /v1/models`).

The API decides placement and writes it as each node's desired state, under a
Redis lock so two launches never take the same device; nodes do the rest
(app/node_agent.py). A launched model serves from the same queue as any worker
of that name, so a replica launched beside hand-started workers simply shares
their traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from pydantic import ValidationError
from redis.exceptions import LockError, RedisError

from api.cluster_reads import ClusterState, read_cluster
from app.cluster_state import NODE_RECONCILE_TASK, Assignment, Deployment
from app.engines import ENGINES
from app.errors import (
    BackendUnavailable,
    Conflict,
    InferqError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    backend_reason,
)
from app.keys import KeySpace, node_queue
from app.placement import NodeView, PlacementError, PlacementRequest, place
from app.protocol.launch import LaunchRequest
from app.registry import ModelSpec, Placement, Registry
from app.settings import Settings

log = logging.getLogger(__name__)

#: The parts of a spec that make two launches "the same model".
SPEC_IDENTITY = ("kind", "engine", "path", "options")


def refused(error: PlacementError) -> InferqError:
    """The API error for a placement that cannot be made, by the status it calls for."""
    kinds: dict[int, type[InferqError]] = {400: InvalidRequest, 409: Conflict}
    return kinds.get(error.status, BackendUnavailable)(str(error), code=error.code)


def _spec_error(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'model'}: {e['msg']}" for e in exc.errors()
    )


def node_views(state: ClusterState) -> list[NodeView]:
    """Live nodes with the devices their assignments and hand-started workers hold."""
    views: list[NodeView] = []
    for node in state.nodes.values():
        if not node.alive or node.report is None:
            continue
        used: dict[str, str] = {}
        for assignment in node.assignments:
            for device in assignment.devices:
                used[device] = assignment.uid
        for model, replicas in state.replicas.items():
            for replica in replicas:
                if not replica.get("node") and replica.get("host") == node.report.host:
                    for device in replica.get("devices", []):
                        used.setdefault(str(device), model)
        views.append(
            NodeView(
                name=node.name,
                device_kind=node.report.device_kind,
                devices=list(node.report.devices),
                address=node.report.address,
                used=used,
                workers=len(node.assignments),
            )
        )
    return views


def _address(state: ClusterState, assignment: Assignment) -> str | None:
    node = state.nodes.get(assignment.node)
    return node.report.address if node and node.report else None


#: Options that choose what runs on the node (a program, an interpreter, its
#: environment): the registry may set them, a launch request may not.
#: `extra_args` and `speculative_config` too: they may name other files (`--model`,
#: `--tokenizer`, a draft model) past the model-root check.
REGISTRY_ONLY_OPTIONS = ("command", "python", "env", "extra_args", "speculative_config")


def check_launch_policy(request: LaunchRequest, base: ModelSpec | None, settings: Settings) -> None:
    """What a launch request may ask nodes to run, whatever its key.

    An admin key is a network credential, not a shell on every node: a path outside
    the operator's model roots, a model's own Python code or a program of the
    request's choosing need the operator's say-so in settings or the registry."""
    path = request.model_path
    if path and path.startswith("package:") and ".." in path.split("/"):
        raise PermissionDenied(
            f"model_path {path!r} leaves its package",
            param="model_path",
            code="model_path_not_allowed",
        )
    if path and path != (base.path if base else None) and not path.startswith("package:"):
        roots = [os.path.normpath(r) for r in settings.model_roots]
        where = os.path.normpath(path)
        inside = os.path.isabs(where) and any(
            where == root or where.startswith(root.rstrip(os.sep) + os.sep) for root in roots
        )
        if not inside:
            allowed = ", ".join(roots) if roots else "none are configured"
            raise PermissionDenied(
                f"model_path {path!r} is not under a model root (INFERQ_MODEL_ROOTS: {allowed})",
                param="model_path",
                code="model_path_not_allowed",
            )
    options = request.model_options
    for name in REGISTRY_ONLY_OPTIONS:
        if name in options:
            raise PermissionDenied(
                f"model_options.{name} chooses what runs on the node: set it in the registry",
                param=f"model_options.{name}",
                code="option_not_allowed",
            )
    if options.get("trust_remote_code") and not settings.launch_allow_trust_remote_code:
        raise PermissionDenied(
            "trust_remote_code runs the model's own Python on the node; the operator has "
            "not allowed it for launches (INFERQ_LAUNCH_ALLOW_TRUST_REMOTE_CODE)",
            param="model_options.trust_remote_code",
            code="option_not_allowed",
        )


def xinference_extras(request: LaunchRequest) -> list[str]:
    """What becomes of the fields xinference-client's launch_model sends besides ours:
    a refusal where ignoring one would run something else than was asked (LoRA
    adapters, a replica across nodes, the worker's environment), else a warning
    (returned to the caller and logged) that it is not used."""
    if request.n_worker is not None and request.n_worker > 1:
        raise InvalidRequest(
            "n_worker > 1 (one replica over several nodes) is not supported: a replica runs "
            "on one node; give it more devices with n_gpu",
            param="n_worker",
        )
    if request.replica_config:
        raise InvalidRequest(
            "replica_config is not supported: place replicas with replica, worker_ip and "
            "gpu_idx (or devices)",
            param="replica_config",
        )
    if request.peft_model_config and any(request.peft_model_config.values()):
        raise InvalidRequest(
            "LoRA adapters (peft_model_config) are not supported", param="peft_model_config"
        )
    if request.envs:
        raise PermissionDenied(
            "envs chooses the worker's environment on the node: set env in the registry",
            param="envs",
            code="option_not_allowed",
        )
    warnings: list[str] = []
    if request.request_limits is not None:
        warnings.append(
            "request_limits is ignored: the API bounds each model's queue "
            "(INFERQ_MAX_QUEUE_DEPTH) and its queued work"
        )
    if request.enable_thinking is not None:
        warnings.append(
            "enable_thinking is ignored at launch: send chat_template_kwargs "
            '{"enable_thinking": ...} with each chat request'
        )
    if request.enable_virtual_env or request.virtual_env_packages or request.virtual_env_find_links:
        warnings.append(
            "virtual environments are not built at launch: a registry entry's python: names "
            "the interpreter an engine's server runs in"
        )
    described = [
        name
        for name in ("model_size_in_billions", "model_format", "quantization")
        if getattr(request, name) not in (None, "", "none")
    ]
    if described:
        warnings.append(
            f"{', '.join(described)} {'is' if len(described) == 1 else 'are'} not used: the "
            "model path says what the model is (set quantization in model_options for vLLM)"
        )
    return warnings


class ModelLauncher:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: KeySpace,
        registry: Registry,
        celery: Celery,
        settings: Settings,
    ) -> None:
        self._settings = settings
        self._client = client
        self._keys = keys
        self._registry = registry
        self._celery = celery

    def build_spec(self, request: LaunchRequest, per_replica: int | None = None) -> ModelSpec:
        """The spec the replicas serve: the registry entry named by model_name, if any,
        with what the request overrides; otherwise everything from the request."""
        base = self._registry.get(request.model_name)
        check_launch_policy(request, base, self._settings)
        kind = request.kind or (base.kind if base else None)
        engine = request.model_engine or (base.engine if base else None)
        path = request.model_path or (base.path if base else None)
        missing = [
            name
            for name, value in (
                ("model_type", kind),
                ("model_engine", engine),
                ("model_path", path),
            )
            if value is None
        ]
        if missing:
            raise InvalidRequest(
                f"{request.model_name!r} is not in the registry, so the request must say "
                f"{', '.join(missing)}",
                param=missing[0],
                code="incomplete_model",
            )
        if engine not in ENGINES:
            raise InvalidRequest(
                f"unknown engine {engine!r}; known: {', '.join(sorted(ENGINES))}",
                param="model_engine",
            )
        options = {**(base.options if base else {}), **request.model_options}
        # Checked as one replica of the requested size, so engines with device-count rules
        # (vLLM's tensor-parallel sizes) judge the real shape; placement comes later.
        shape = [str(i) for i in range(per_replica or 0)]
        placements = [Placement(devices=shape, tp=len(shape))] if shape else [Placement()]
        try:
            return ModelSpec(
                name=request.uid,
                kind=kind,
                engine=engine,
                path=path,
                options=options,
                placements=placements,
            )
        except ValidationError as exc:
            raise InvalidRequest(
                f"invalid model: {_spec_error(exc)}", code="invalid_model"
            ) from None

    def _check_identity(self, spec: ModelSpec, state: ClusterState) -> None:
        registered = self._registry.get(spec.name)
        deployed = state.deployments.get(spec.name)
        mine = spec.model_dump(include=set(SPEC_IDENTITY))
        if registered is not None and registered.model_dump(include=set(SPEC_IDENTITY)) != mine:
            raise Conflict(
                f"the uid {spec.name!r} is a registry model with another engine, path or "
                "options; launch under another model_uid",
                param="model_uid",
                code="model_uid_taken",
            )
        if deployed is not None:
            current = ModelSpec.model_validate(deployed.spec).model_dump(include=set(SPEC_IDENTITY))
            if current != mine:
                raise Conflict(
                    f"{spec.name!r} already runs with another engine, path or options; "
                    "terminate it first or launch under another model_uid",
                    param="model_uid",
                    code="model_uid_taken",
                )

    async def launch(self, request: LaunchRequest) -> list[Assignment]:
        engine = request.model_engine or getattr(
            self._registry.get(request.model_name), "engine", ""
        )
        per = request.devices_per_replica
        if per is None and request.wanted_devices:
            # As xinference's gpu_idx: the listed devices are shared out over the replicas.
            per = max(1, len(request.wanted_devices) // request.replica)
        spec = self.build_spec(request, per)
        device_kinds = ENGINES[engine].kinds_for(spec.path) if engine in ENGINES else ("cpu",)
        wanted = PlacementRequest(
            device_kinds=device_kinds,
            replicas=request.replica,
            devices_per_replica=per,
            devices=tuple(request.wanted_devices),
            node=request.worker_ip,
        )
        async with self._locked():
            state = await read_cluster(self._client, self._keys, self._registry_names())
            self._check_identity(spec, state)
            already = self._already_placed(spec.name, wanted, state)
            if already:
                return already
            try:
                slots = place(wanted, node_views(state))
            except PlacementError as exc:
                raise refused(exc) from None
            assignments = self._assignments(spec, slots, state)
            # The first replica's spec stands for the model (its placement satisfies
            # engines that check device counts, such as vLLM's tensor-parallel rules).
            deployment = state.deployments.get(spec.name) or Deployment(
                spec.name, assignments[0].spec
            )
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(self._keys.deployments, spec.name, deployment.to_json())
                for assignment in assignments:
                    pipe.hset(
                        self._keys.node_assignments(assignment.node),
                        assignment.assignment_id,
                        assignment.to_json(),
                    )
                await pipe.execute()
        await self._nudge({a.node for a in assignments})
        log.info(
            "launched %s: %s",
            spec.name,
            ", ".join(f"{a.node}[{','.join(a.devices) or '-'}]" for a in assignments),
        )
        return assignments

    @staticmethod
    def _already_placed(
        uid: str, wanted: PlacementRequest, state: ClusterState
    ) -> list[Assignment]:
        """Replicas of `uid` on exactly the devices asked for: launching them again is
        a no-op, so a deployment script can be re-run."""
        if not wanted.devices:
            return []
        per = wanted.devices_per_replica or 1
        groups = {tuple(wanted.devices[i : i + per]) for i in range(0, len(wanted.devices), per)}
        found = [a for a in state.assignments_of(uid) if tuple(a.devices) in groups]
        if wanted.node:
            found = [a for a in found if wanted.node in (a.node, _address(state, a))]
        return found if {tuple(a.devices) for a in found} == groups else []

    def _assignments(
        self, spec: ModelSpec, slots: list[Any], state: ClusterState
    ) -> list[Assignment]:
        taken = {a.replica for a in state.assignments_of(spec.name)}
        assignments: list[Assignment] = []
        index = 0
        for slot in slots:
            node = state.nodes.get(slot.node)
            while index in taken:
                index += 1
            taken.add(index)
            devices = list(slot.devices)
            placement = (
                Placement(host=slot.node, devices=devices, tp=len(devices))
                if devices
                else Placement(host=slot.node)
            )
            try:
                placed = ModelSpec.model_validate(
                    {**spec.model_dump(exclude={"placements"}), "placements": [placement]}
                )
            except ValidationError as exc:
                raise InvalidRequest(
                    f"invalid placement for {spec.name!r}: {_spec_error(exc)}",
                    code="invalid_placement",
                ) from None
            assignments.append(
                Assignment(
                    assignment_id=f"{spec.name}-{uuid.uuid4().hex[:8]}",
                    uid=spec.name,
                    node=slot.node,
                    devices=devices,
                    replica=index,
                    spec=placed.model_dump(mode="json"),
                    device_kind=node.report.device_kind if node and node.report else "",
                )
            )
        return assignments

    async def terminate(self, uid: str, assignment_id: str | None = None) -> list[Assignment]:
        async with self._locked():
            state = await read_cluster(self._client, self._keys, self._registry_names())
            mine = state.assignments_of(uid)
            if assignment_id is not None:
                mine = [a for a in mine if a.assignment_id == assignment_id]
                if not mine:
                    raise ModelNotFound(
                        f"model {uid!r} has no launched replica {assignment_id!r}",
                        param="replica_id",
                    )
            elif not mine and uid not in state.deployments:
                if self._registry.get(uid) is not None:
                    raise Conflict(
                        f"{uid!r} runs only on workers started from the registry file "
                        "(inferq up or inferq worker); stop those processes instead",
                        code="not_launched",
                    )
                raise ModelNotFound(f"the model {uid!r} does not exist", param="model_uid")
            left = len(state.assignments_of(uid)) - len(mine)
            async with self._client.pipeline(transaction=True) as pipe:
                for assignment in mine:
                    pipe.hdel(
                        self._keys.node_assignments(assignment.node), assignment.assignment_id
                    )
                if left == 0:
                    pipe.hdel(self._keys.deployments, uid)
                await pipe.execute()
        await self._nudge({a.node for a in mine})
        return mine

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The cluster lock, so two launches never place on the same devices; Redis
        trouble and a lock held too long answer 503."""
        try:
            async with self._client.lock(self._keys.launch_lock, timeout=15, blocking_timeout=10):
                yield
        except LockError:
            raise BackendUnavailable(
                "another launch holds the cluster lock; try again", code="launch_busy"
            ) from None
        except (RedisError, OSError) as exc:
            log.warning("the cluster state is unreachable: %s", exc)
            raise BackendUnavailable(
                f"the cluster state is unreachable: {backend_reason(exc)}"
            ) from None

    def _registry_names(self) -> list[str]:
        return [m.name for m in self._registry.models]

    async def _nudge(self, nodes: set[str]) -> None:
        """Wake the nodes now; they would notice within their reconcile interval anyway."""
        for node in nodes:
            try:
                await asyncio.to_thread(
                    self._celery.send_task,
                    NODE_RECONCILE_TASK,
                    exchange="",
                    routing_key=node_queue(node),
                    expires=60,
                )
            except Exception as exc:  # the node's own polling covers a lost nudge
                log.warning("could not wake node %s: %s (it will notice on its own)", node, exc)
