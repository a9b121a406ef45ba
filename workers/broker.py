"""A Celery consumer that outlives a Redis broker going away and coming back.

When the broker connection breaks, Celery closes it and connects anew. Two
steps of that fail with kombu's Redis transport, and Celery treats both
failures as unrecoverable, so a worker (or node agent) would stop on every
Redis restart:
- the close itself: the channel's pending BRPOP read raises first, and the
  second close finds the transport released (AttributeError);
- acknowledging a message that was being worked on when the connection broke:
  its channel belongs to the released transport (AttributeError again).
Here the close is best effort, and such a message is acknowledged through a
plain Redis client instead, the way kombu's Redis transport does it (drop the
delivery tag from its unacked index and hash, named in app/keys.py). Both
inferq Celery apps use it (`worker_consumer`): model workers (workers/app.py)
and node agents (workers/node.py).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import redis
from celery.worker.consumer import Consumer

from app.keys import KeySpace
from app.settings import get_settings

log = logging.getLogger("inferq.worker")

#: Seconds between attempts to reach the broker again after losing it: first, added
#: per attempt, at most (kombu's own are 2, 2 and 30, so a worker could idle for
#: half a minute after Redis came back).
RECONNECT_INTERVALS = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 2.0}


class ResilientConsumer(Consumer):
    _client: redis.Redis | None = None
    _client_lock = threading.Lock()

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        if connection is not None:
            close = connection.close

            def best_effort_close() -> None:
                try:
                    close()
                except Exception as error:
                    log.warning("could not close the broken broker connection: %r", error)

            connection.close = best_effort_close
        super().on_connection_error_after_connected(exc)

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(conn.ensure_connection, **RECONNECT_INTERVALS)
        return super().ensure_connected(conn)

    def call_soon_ack(self, p: Any, *args: Any, **kwargs: Any) -> Any:
        return super().call_soon_ack(functools.partial(self._settle, p), *args, **kwargs)

    def settled(self, delivery_tag: str) -> None:
        """Called once a delivery is acknowledged or rejected, or could not be."""

    def _settle(self, settle: Any, *args: Any, **kwargs: Any) -> None:
        """Ack (or reject) a message; if its connection is gone, do it without that one.

        `settle` is kombu's `Message.ack_log_error` or `reject_log_error`. A message
        that could not be settled at all goes back to its queue one visibility timeout
        later, like the message of a worker that died.
        """
        message = getattr(settle, "__self__", None)
        tag = str(getattr(message, "delivery_tag", "") or "")
        try:
            settle(*args, **kwargs)
        except Exception as error:
            if not tag:
                raise
            log.warning("delivery %s outlived its broker connection (%r)", tag, error)
            rejecting = getattr(settle, "__name__", "") == "reject_log_error"
            requeue = kwargs.get("requeue", args[2] if len(args) > 2 else False)
            if not (rejecting and requeue):
                try:
                    self._forget(tag)
                except Exception as again:
                    log.warning("could not acknowledge delivery %s: %r", tag, again)
        finally:
            if tag:
                self.settled(tag)

    def _forget(self, delivery_tag: str) -> None:
        settings = get_settings()
        with self._client_lock:
            if self._client is None:
                self._client = redis.Redis.from_url(settings.require_redis_url(), socket_timeout=5)
        keys = KeySpace(settings.key_prefix)
        pipe = self._client.pipeline(transaction=False)
        pipe.zrem(keys.unacked_index, delivery_tag)
        pipe.hdel(keys.unacked, delivery_tag)
        pipe.execute()
