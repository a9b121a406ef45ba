"""`inferq launch`, `terminate` and `list`: the model lifecycle API from a shell.

They talk to the API over HTTP like any client, so they work from any machine
that reaches it, and a registry file's entry launches exactly as written there.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx

from app.registry import ModelSpec, load_registry


class CommandFailed(SystemExit):
    """Printed as the API's error message; exits with status 1."""

    def __init__(self, message: str) -> None:
        print(message, file=sys.stderr)
        super().__init__(1)


def _check(response: httpx.Response) -> dict[str, Any]:
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        error = body.get("error") or {}
        message = error.get("message") or response.text
        raise CommandFailed(f"error {response.status_code}: {message}")
    return body


def api_client(base: str, key: str | None, timeout: float = 30.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base.rstrip("/"), headers=headers, timeout=timeout)


def requests_for_entry(spec: ModelSpec) -> list[dict[str, Any]]:
    """One launch request per placement of a registry entry: same replicas, same devices."""
    common = {
        "model_uid": spec.name,
        "model_name": spec.name,
        "model_type": spec.kind.value,
        "model_engine": spec.engine,
        "model_path": spec.path,
        "model_options": spec.options,
    }
    requests = []
    for placement in spec.placements:
        body: dict[str, Any] = dict(common)
        body["replica"] = len(placement.device_groups())
        if placement.devices:
            body["devices"] = placement.devices
            body["n_gpu"] = placement.tp
        if placement.host:
            body["worker_ip"] = placement.host
        requests.append(body)
    return requests


def wait_ready(client: httpx.Client, uid: str, replica_ids: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while True:
        model = _check(client.get(f"/v1/models/{uid}"))
        states = {
            r["replica_id"]: r["state"] for r in model["replicas"] if r["replica_id"] in replica_ids
        }
        if states and all(s == "ready" for s in states.values()):
            return
        if time.monotonic() > deadline:
            listed = ", ".join(f"{k}: {v}" for k, v in states.items())
            raise CommandFailed(f"{uid}: not ready after {timeout:g}s ({listed})")
        time.sleep(0.5)


def launch(
    client: httpx.Client, body: dict[str, Any], wait: bool, timeout: float
) -> dict[str, Any]:
    # The CLI waits itself (and prints the placement first), so the API answers at once.
    result = _check(client.post("/v1/models", json=body, params={"wait_ready": "false"}))
    new = {r["replica_id"] for r in result.get("launched_replicas", [])}
    for replica in result.get("launched_replicas", []):
        devices = ",".join(replica["devices"]) or "-"
        print(f"{result['id']}\t{replica['replica_id']}\tnode={replica['node']}\tdevices={devices}")
    if wait and new:
        wait_ready(client, result["id"], new, timeout)
        print(f"{result['id']}: {len(new)} replica(s) ready")
    return result


def launch_from_registry(
    client: httpx.Client, path: str, names: list[str], wait: bool, timeout: float
) -> None:
    from pathlib import Path

    registry = load_registry(Path(path))
    specs = registry.models if not names else [registry.require(n) for n in names]
    for spec in specs:
        for body in requests_for_entry(spec):
            launch(client, body, wait, timeout)


def list_models(client: httpx.Client, as_json: bool = False) -> None:
    models = _check(client.get("/v1/models"))["data"]
    if as_json:
        print(json.dumps(models, indent=2))
        return
    print("MODEL\tKIND\tENGINE\tSOURCE\tALIVE/WANTED")
    for m in models:
        print(
            f"{m['id']}\t{m['kind']}\t{m['engine']}\t{m['source']}\t"
            f"{m['replicas_alive']}/{m['replicas_wanted']}"
        )


def terminate(client: httpx.Client, uid: str, replica: str | None) -> None:
    path = f"/v1/models/{uid}" + (f"/replicas/{replica}" if replica else "")
    result = _check(client.delete(path))
    stopped = result.get("replicas_terminated", [])
    print(f"{uid}: terminated {len(stopped)} replica(s) {' '.join(stopped)}".rstrip())
