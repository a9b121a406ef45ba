"""The console's charts: rates from the growth of each replica's counters."""

from __future__ import annotations

from typing import Any

from api.cluster_reads import ClusterState
from api.history import ClusterHistory


def _state(*replicas: tuple[str, dict[str, float]]) -> ClusterState:
    rows: list[dict[str, Any]] = [{"replica_id": rid, "stats": stats} for rid, stats in replicas]
    return ClusterState(nodes={}, deployments={}, replicas={"m": rows})


def test_rates_come_from_counter_growth_and_a_restart_is_not_negative() -> None:
    history = ClusterHistory(keep=3)
    depths = {"m": (4, 1)}
    stats = {"answered": 10, "failed": 0, "real_tokens": 800, "computed_tokens": 1000}
    history.record(
        100.0, _state(("a", {**stats, "batches": 2, "batched_items": 8})), depths, {"m": 2}
    )
    grown = {"answered": 30, "failed": 2, "real_tokens": 1700, "computed_tokens": 2000}
    history.record(
        110.0, _state(("a", {**grown, "batches": 4, "batched_items": 20})), depths, {"m": 2}
    )
    first, second = history.series()["m"]
    assert first["requests_per_s"] is None  # no earlier sample to grow from
    assert second["requests_per_s"] == 2.2  # (20 answered + 2 failed) / 10 s
    assert second["tokens_per_s"] == 90.0
    assert second["batch_size"] == 6.0  # 12 items in 2 batches
    assert second["padding_efficiency"] == 0.9
    assert (second["queue_depth"], second["bulk_queue_depth"]) == (4, 1)
    assert (second["replicas_alive"], second["replicas_wanted"]) == (1, 2)

    # The replica restarted (counters from zero) and a new one joined: no negative rate.
    restarted = {"answered": 3, "real_tokens": 10, "computed_tokens": 10}
    history.record(120.0, _state(("a", restarted), ("b", stats)), depths, {"m": 2})
    third = history.series()["m"][-1]
    assert third["requests_per_s"] == 0.0 and third["replicas_alive"] == 2
    assert len(history.series()["m"]) == 3

    history.record(130.0, _state(), {}, {})  # the model is gone
    assert history.series() == {}
