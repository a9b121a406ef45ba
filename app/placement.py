"""Where launched replicas go: nodes with free devices of the kind the engine needs.

Pure functions over a snapshot of the cluster, so the rules are tested without
processes; the API takes the snapshot and writes the result under a lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class PlacementError(ValueError):
    """No placement satisfies the request; the message says why, naming nodes and devices."""

    def __init__(self, message: str, code: str = "placement_failed", status: int = 409) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class NodeView:
    name: str
    device_kind: str
    devices: list[str]
    address: str = ""
    #: device id -> the model uid holding it (launched replicas and hand-started workers).
    used: dict[str, str] = field(default_factory=dict)
    workers: int = 0

    def free(self) -> list[str]:
        return [d for d in self.devices if d not in self.used]

    def matches(self, wanted: str) -> bool:
        return wanted in (self.name, self.address)


@dataclass(frozen=True)
class PlacementRequest:
    device_kinds: tuple[str, ...]  # what the engine runs on: "cpu", "cuda", "vacc"
    replicas: int = 1
    devices_per_replica: int | None = None  # n_gpu; None: the engine's default
    devices: tuple[str, ...] = ()  # explicit devices, split into groups
    node: str | None = None  # name or address (xinference's worker_ip)


@dataclass(frozen=True)
class Slot:
    node: str
    devices: tuple[str, ...]


def _describe_free(nodes: list[NodeView]) -> str:
    parts = []
    for node in nodes:
        free = node.free()
        listed = ",".join(free) if free else "none"
        parts.append(f"{node.name} ({node.device_kind}) has {len(free)} free: {listed}")
    return "; ".join(parts) or "no nodes"


def place(request: PlacementRequest, nodes: list[NodeView]) -> list[Slot]:
    """One slot per replica, or PlacementError with the reason."""
    if not nodes:
        raise PlacementError(
            "no node is alive: start `inferq node` on a machine that joins this cluster",
            code="no_nodes",
            status=503,
        )
    candidates = nodes
    if request.node:
        candidates = [n for n in nodes if n.matches(request.node)]
        if not candidates:
            known = ", ".join(f"{n.name} ({n.address or 'no address'})" for n in nodes)
            raise PlacementError(
                f"no live node is named or addressed {request.node!r}; live nodes: {known}",
                code="node_not_found",
                status=400,
            )
    if request.devices:
        return _place_explicit(request, candidates)
    pinned = "cpu" not in request.device_kinds or request.devices_per_replica is not None
    if not pinned:
        # CPU engines without a device request run unpinned: spread by worker count.
        load = {n.name: n.workers for n in candidates}
        slots = []
        for _ in range(request.replicas):
            chosen = min(candidates, key=lambda n: (load[n.name], n.name))
            load[chosen.name] += 1
            slots.append(Slot(chosen.name, ()))
        return slots
    return _place_counted(request, candidates)


def _kind_nodes(request: PlacementRequest, candidates: list[NodeView]) -> list[NodeView]:
    fitting = [n for n in candidates if n.device_kind in request.device_kinds]
    if not fitting:
        kinds = ", ".join(f"{n.name} ({n.device_kind})" for n in candidates)
        raise PlacementError(
            f"no live node has {' or '.join(request.device_kinds)} devices; nodes: {kinds}",
            code="no_matching_devices",
        )
    return fitting


def _place_counted(request: PlacementRequest, candidates: list[NodeView]) -> list[Slot]:
    per = request.devices_per_replica or 1
    fitting = _kind_nodes(request, candidates)
    free = {n.name: n.free() for n in fitting}
    slots: list[Slot] = []
    for _ in range(request.replicas):
        # The node with the most free devices first: keeps replicas apart, fills evenly.
        best = max(fitting, key=lambda n: (len(free[n.name]), -fitting.index(n)))
        if len(free[best.name]) < per:
            raise PlacementError(
                f"not enough free {'/'.join(request.device_kinds)} devices for {request.replicas} "
                f"replica(s) of {per} device(s): {_describe_free(fitting)}",
                code="devices_busy",
            )
        taken, free[best.name] = free[best.name][:per], free[best.name][per:]
        slots.append(Slot(best.name, tuple(taken)))
    return slots


def _place_explicit(request: PlacementRequest, candidates: list[NodeView]) -> list[Slot]:
    per = request.devices_per_replica or 1
    devices = list(request.devices)
    if len(set(devices)) != len(devices):
        raise PlacementError("a device is listed twice", code="invalid_devices", status=400)
    if len(devices) % per:
        raise PlacementError(
            f"{len(devices)} devices cannot be split into replicas of {per}",
            code="invalid_devices",
            status=400,
        )
    groups = [tuple(devices[i : i + per]) for i in range(0, len(devices), per)]
    if request.replicas not in (1, len(groups)):
        raise PlacementError(
            f"replica={request.replicas} disagrees with {len(devices)} devices at "
            f"n_gpu={per} ({len(groups)} groups)",
            code="invalid_devices",
            status=400,
        )
    fitting = _kind_nodes(request, candidates)
    holders = [n for n in fitting if set(devices) <= set(n.devices)]
    if not holders:
        raise PlacementError(
            f"no live {'/'.join(request.device_kinds)} node has devices {','.join(devices)}: "
            f"{_describe_free(fitting)}",
            code="invalid_devices",
            status=400,
        )
    if len(holders) > 1:
        names = ", ".join(n.name for n in holders)
        raise PlacementError(
            f"devices {','.join(devices)} exist on several nodes ({names}); "
            "say which with worker_ip (a node name or address)",
            code="ambiguous_node",
            status=400,
        )
    node = holders[0]
    busy = [f"{d} ({node.used[d]})" for d in devices if d in node.used]
    if busy:
        raise PlacementError(
            f"devices already in use on {node.name}: {', '.join(busy)}", code="devices_busy"
        )
    return [Slot(node.name, group) for group in groups]
