"""Every Redis key and channel name inferq uses, in one place, under one prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeySpace:
    prefix: str

    @property
    def broker_prefix(self) -> str:
        """Celery/kombu's `global_keyprefix`: queues become `<prefix>:model.<name>`."""
        return f"{self.prefix}:"

    def result_channel(self, request_id: str) -> str:
        return f"{self.prefix}:result:{request_id}"

    def cancel(self, request_id: str) -> str:
        """Set when a caller gives up (disconnect, timeout): workers stop or skip the work."""
        return f"{self.prefix}:cancel:{request_id}"

    def answered(self, request_id: str) -> str:
        """Set with a request's final reply: a redelivered copy of it is skipped."""
        return f"{self.prefix}:answered:{request_id}"

    def request_claim(self, request_id: str) -> str:
        """The replica running a sync request; another delivery of it runs only if that
        replica has died."""
        return f"{self.prefix}:claim:{request_id}"

    def replicas(self, model: str) -> str:
        """Sorted set of a model's replica ids, scored by heartbeat expiry (epoch seconds)."""
        return f"{self.prefix}:replicas:{model}"

    def replica_info(self, replica_id: str) -> str:
        return f"{self.prefix}:replica:{replica_id}"

    def replica_stats(self, replica_id: str) -> str:
        return f"{self.prefix}:replica-stats:{replica_id}"

    def admission_work(self, model: str) -> str:
        """Hash of API process -> "<unanswered inputs>:<when written>" for one model."""
        return f"{self.prefix}:admission-work:{model}"

    def queue_list(self, queue: str) -> str:
        """The Redis list behind a Celery queue (kombu prepends `global_keyprefix`)."""
        return f"{self.broker_prefix}{queue}"

    @property
    def unacked_index(self) -> str:
        """kombu's sorted set of unacknowledged deliveries, scored by delivery time."""
        return f"{self.broker_prefix}unacked_index"

    @property
    def unacked(self) -> str:
        """kombu's hash of the unacknowledged messages themselves, by delivery tag."""
        return f"{self.broker_prefix}unacked"

    def model_facts(self, model: str) -> str:
        """What the model's last loaded replica reported it takes (app/model_facts.py)."""
        return f"{self.prefix}:model-facts:{model}"

    def model_error(self, model: str) -> str:
        """Why the model's engine last failed to load (JSON, expires): set by the worker."""
        return f"{self.prefix}:model-error:{model}"

    # Cluster operations: nodes and the models launched on them (app/cluster_state.py).
    @property
    def nodes(self) -> str:
        """Sorted set of node names, scored by heartbeat expiry (epoch seconds)."""
        return f"{self.prefix}:nodes"

    def node_info(self, node: str) -> str:
        """What a node last reported: devices, worker processes (JSON, expires)."""
        return f"{self.prefix}:node:{node}"

    def node_assignments(self, node: str) -> str:
        """Hash of the replicas a node must run, by assignment id: its desired state."""
        return f"{self.prefix}:node-assignments:{node}"

    def node_events(self, node: str) -> str:
        """Capped list of a node's recent worker events (crashes, restarts), newest first."""
        return f"{self.prefix}:node-events:{node}"

    @property
    def deployments(self) -> str:
        """Hash of launched models by uid: the model spec they serve."""
        return f"{self.prefix}:deployments"

    @property
    def launch_lock(self) -> str:
        return f"{self.prefix}:launch-lock"


def node_queue(node: str) -> str:
    """The Celery queue a node agent consumes its control messages from."""
    return f"node.{node}"
