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

    def replicas(self, model: str) -> str:
        """Sorted set of a model's replica ids, scored by heartbeat expiry (epoch seconds)."""
        return f"{self.prefix}:replicas:{model}"

    def replica_info(self, replica_id: str) -> str:
        return f"{self.prefix}:replica:{replica_id}"

    def replica_stats(self, replica_id: str) -> str:
        return f"{self.prefix}:replica-stats:{replica_id}"

    def queue_list(self, queue: str) -> str:
        """The Redis list behind a Celery queue (kombu prepends `global_keyprefix`)."""
        return f"{self.broker_prefix}{queue}"

    @property
    def unacked_index(self) -> str:
        """kombu's sorted set of unacknowledged deliveries, scored by delivery time."""
        return f"{self.broker_prefix}unacked_index"
