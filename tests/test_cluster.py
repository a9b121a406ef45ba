"""Cluster operations end to end: a node agent, launching and terminating replicas from
the CLI, the cluster view, traffic over several replicas, and crash restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.placement import NodeView, PlacementError, PlacementRequest, place
from tests.cluster import ADMIN_KEY, Cluster, ready_workers, running_cluster, workers_of
from tests.procs import ROOT

MODEL = "minilm-launched"


# -- placement rules, without processes --------------------------------------------------
def test_placement_spreads_replicas_over_free_devices() -> None:
    nodes = [
        NodeView("a", "vacc", [str(i) for i in range(4)], used={"0": "x"}),
        NodeView("b", "vacc", [str(i) for i in range(4)]),
    ]
    slots = place(PlacementRequest(("vacc",), replicas=2, devices_per_replica=2), nodes)
    # The node with the most free devices takes each replica: replicas land apart.
    assert [(s.node, s.devices) for s in slots] == [("b", ("0", "1")), ("a", ("1", "2"))]
    nodes[1].used = {"0": "y", "1": "y"}
    slots = place(PlacementRequest(("vacc",), replicas=1, devices_per_replica=3), nodes)
    assert [(s.node, s.devices) for s in slots] == [("a", ("1", "2", "3"))]


def test_placement_refuses_with_the_reason() -> None:
    nodes = [NodeView("a", "vacc", ["0", "1"], used={"0": "bge"}), NodeView("c", "cpu", [])]
    with pytest.raises(PlacementError, match=r"not enough free vacc devices.*a \(vacc\) has 1"):
        place(PlacementRequest(("vacc",), replicas=1, devices_per_replica=2), nodes)
    with pytest.raises(PlacementError, match=r"in use on a: 0 \(bge\)") as busy:
        place(PlacementRequest(("vacc",), devices=("0",)), nodes)
    assert busy.value.status == 409
    with pytest.raises(PlacementError, match="no live node has cuda devices"):
        place(PlacementRequest(("cuda",)), nodes)
    with pytest.raises(PlacementError, match="no live node is named"):
        place(PlacementRequest(("cpu",), node="zz"), nodes)
    with pytest.raises(PlacementError, match="cannot be split"):
        place(PlacementRequest(("vacc",), devices=("0", "1", "2"), devices_per_replica=2), nodes)
    with pytest.raises(PlacementError, match="no node is alive") as none:
        place(PlacementRequest(("cpu",)), [])
    assert none.value.status == 503


def test_placement_runs_unpinned_cpu_replicas_on_the_least_busy_node() -> None:
    nodes = [NodeView("a", "cpu", [], workers=2), NodeView("b", "cpu", [], workers=0)]
    slots = place(PlacementRequest(("cpu",), replicas=3), nodes)
    assert [s.node for s in slots] == ["b", "b", "a"]
    assert all(s.devices == () for s in slots)


# -- a real cluster -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(
    inferq_env: dict[str, str], log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with running_cluster(
        inferq_env, "cluster", log_dir, tmp_path_factory.mktemp("cluster")
    ) as running:
        running.add_node("node-a", devices="0,1")
        yield running


def inferq(cluster: Cluster, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app", *args, "--api", cluster.base, "--api-key", ADMIN_KEY],
        env=cluster.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_node_registers_its_devices(cluster: Cluster) -> None:
    view = cluster.view()
    (node,) = [n for n in view["nodes"] if n["name"] == "node-a"]
    assert node["alive"] and node["device_kind"] == "cpu"
    assert [d["id"] for d in node["devices"]] == ["0", "1"]
    assert view["jobs"] is not None and view["jobs_problem"] is None


def test_launch_scale_spread_and_terminate_from_the_cli(cluster: Cluster) -> None:
    out = inferq(cluster, "launch", "minilm", "--uid", MODEL, "--devices", "0")
    assert f"{MODEL}: 1 replica(s) ready" in out
    # A second replica, on whichever device is free: the other one.
    out = inferq(cluster, "launch", "minilm", "--uid", MODEL, "--n-gpu", "1")
    second = out.split()[1]
    view = cluster.wait("two ready replicas", lambda v: len(ready_workers(v, MODEL)) == 2)
    (node,) = view["nodes"]
    assert {d["id"]: d["model"] for d in node["devices"]} == {"0": MODEL, "1": MODEL}
    assert sorted(tuple(w["devices"]) for w in ready_workers(view, MODEL)) == [("0",), ("1",)]
    (row,) = [m for m in view["models"] if m["id"] == MODEL]
    assert (row["replicas_alive"], row["replicas_wanted"], row["source"]) == (2, 2, "launched")
    assert MODEL in inferq(cluster, "list")

    # Traffic reaches both replicas.
    with cluster.http() as http:

        def embed(i: int) -> int:
            body = {"model": MODEL, "input": [f"text number {i} " * (1 + i % 7)]}
            return http.post("/v1/embeddings", json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(embed, range(80))) == {200}
    view = cluster.wait(
        "both replicas serving",
        lambda v: sum(w["tasks_done"] for w in ready_workers(v, MODEL)) >= 80,
        timeout=15,
    )
    done = [w["tasks_done"] for w in ready_workers(view, MODEL)]
    assert sum(done) >= 80 and min(done) > 0, done

    # Launching the same replica again changes nothing (deployment scripts re-run)...
    with cluster.http() as http:
        again = http.post(
            "/v1/models", json={"model_name": "minilm", "model_uid": MODEL, "devices": ["1"]}
        )
        assert again.status_code == 200
        assert [r["replica_id"] for r in again.json()["launched_replicas"]] == [second]
        assert again.json()["replicas_wanted"] == 2
        # ...while another model is refused the busy device, with the reason.
        refused = http.post(
            "/v1/models", json={"model_name": "minilm", "model_uid": "other", "devices": ["1"]}
        )
        assert refused.status_code == 409
        assert "in use on node-a: 1 (minilm-launched)" in refused.json()["error"]["message"]

    # Terminate the second replica: it leaves the view and frees its device.
    inferq(cluster, "terminate", MODEL, "--replica", second)
    view = cluster.wait(
        "one replica left",
        lambda v: (
            len(workers_of(v, MODEL)) == 1
            and len(ready_workers(v, MODEL)) == 1
            and any(e["event"] == "stopped" for e in v["nodes"][0]["events"])
        ),
        timeout=60,
    )
    (node,) = view["nodes"]
    assert {d["id"]: d["model"] for d in node["devices"]} == {"0": MODEL, "1": None}
    assert [e for e in node["events"] if e["replica_id"] == second and e["event"] == "stopped"]


def test_a_crashed_worker_is_restarted_and_the_crash_shows(cluster: Cluster) -> None:
    view = cluster.wait("a ready replica", lambda v: len(ready_workers(v, MODEL)) >= 1)
    victim = ready_workers(view, MODEL)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    view = cluster.wait(
        "the restarted replica",
        lambda v: any(
            w["assignment_id"] == victim["assignment_id"]
            and w["pid"] != victim["pid"]
            and w["state"] == "ready"
            for w in ready_workers(v, MODEL)
        ),
    )
    (row,) = [
        w for w in ready_workers(view, MODEL) if w["assignment_id"] == victim["assignment_id"]
    ]
    assert row["restarts"] >= 1
    events = [e for e in view["nodes"][0]["events"] if e["replica_id"] == victim["assignment_id"]]
    kinds = [e["event"] for e in events]
    assert "crashed" in kinds and "restarted" in kinds
    crash = next(e for e in events if e["event"] == "crashed")
    assert "SIGKILL" in crash["detail"]
    with cluster.http() as http:
        model = http.get(f"/v1/models/{MODEL}").json()
        (replica,) = model["replicas"]
        assert replica["restarts"] >= 1 and replica["state"] == "ready"
        assert model["registry_entry"]["placements"] == [
            {"host": "node-a", "devices": ["0"], "tp": 1}
        ]


def test_terminate_all_and_errors(cluster: Cluster) -> None:
    with cluster.http() as http:
        assert http.delete(f"/v1/models/{MODEL}").json()["deleted"] is True
        cluster.wait("no workers", lambda v: not workers_of(v, MODEL), timeout=60)
        assert MODEL not in [m["id"] for m in http.get("/v1/models").json()["data"]]
        gone = http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
        assert gone.status_code == 404
        missing = http.delete("/v1/models/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "invalid_request_error"
        unknown = http.post("/v1/models", json={"model_name": "not-in-registry"})
        assert unknown.status_code == 400
        assert "model_type" in unknown.json()["error"]["message"]
        cuda = http.post(
            "/v1/models",
            json={
                "model_name": "qwen3",
                "model_type": "LLM",
                "model_engine": "vllm",
                "model_path": "/models/Qwen3-30B-A3B-FP8",
                "n_gpu": 2,
            },
        )
        assert cuda.status_code == 409, cuda.text
        assert "no live node has cuda or vacc devices" in cuda.json()["error"]["message"]


def test_launches_keep_to_the_operators_model_roots_and_options(cluster: Cluster) -> None:
    """An admin key is not a shell on every node: paths outside INFERQ_MODEL_ROOTS,
    trust_remote_code and options that pick a program are refused before placement."""
    qwen = {"model_name": "q", "model_type": "LLM", "model_engine": "vllm", "n_gpu": 2}
    refused = [
        ({**qwen, "model_path": "/etc/passwd"}, "model_path_not_allowed"),
        ({**qwen, "model_path": "/models/../etc"}, "model_path_not_allowed"),
        ({**qwen, "model_path": "models/relative"}, "model_path_not_allowed"),
        ({**qwen, "model_path": "/models-evil/x"}, "model_path_not_allowed"),
        (
            {**qwen, "model_path": "/models/q", "model_options": {"trust_remote_code": True}},
            "option_not_allowed",
        ),
        (
            {
                **qwen,
                "model_path": "/models/q",
                "model_options": {"extra_args": ["--trust-remote-code"]},
            },
            "option_not_allowed",
        ),
        (
            {**qwen, "model_path": "/models/q", "model_options": {"command": ["sh", "-c", "id"]}},
            "option_not_allowed",
        ),
        (
            {"model_name": MODEL, "model_options": {"python": "/tmp/evil/python"}},
            "option_not_allowed",
        ),
        (
            {"model_name": MODEL, "model_path": "package:app/../../../srv/x"},
            "model_path_not_allowed",
        ),
        (
            {"model_name": MODEL, "model_options": {"speculative_config": {"model": "/x"}}},
            "option_not_allowed",
        ),
    ]
    with cluster.http() as http:
        for body, code in refused:
            response = http.post("/v1/models", json=body)
            assert response.status_code == 403, (body, response.text)
            assert response.json()["error"]["code"] == code, response.text
        huge = http.post(
            "/v1/models", json={"model_name": MODEL, "model_options": {"note": "x" * 200_000}}
        )
        assert huge.status_code == 400 and "model_options" in huge.text, huge.text
        inside = {**qwen, "model_name": "qwen3", "model_path": "/models/Qwen3-30B-A3B-FP8"}
        placed = http.post("/v1/models", json=inside)
        assert placed.status_code == 409, placed.text  # allowed: only devices are wanting
    time.sleep(0)
