"""Lease renewal for the messages this worker holds.

kombu's Redis transport keeps every delivered-but-unacknowledged message in a
sorted set scored by delivery time, and hands it to another consumer once it
is older than the visibility timeout. A fixed timeout forces a bad choice:
short, and long tasks run twice; long, and a killed worker's messages wait an
hour. So each worker refreshes the score of the messages it still holds: a live
worker's work is never redelivered however long it runs, and a dead worker's
work comes back one visibility timeout after its last renewal.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, client: redis.Redis, unacked_index_key: str, interval: float) -> None:
        self._client = client
        self._key = unacked_index_key
        self._interval = interval
        self._tags: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inferq-lease", daemon=True)

    def hold(self, delivery_tag: str) -> None:
        with self._lock:
            self._tags.add(delivery_tag)

    def release(self, delivery_tag: str) -> None:
        """Stop renewing a delivery: settled, or left for the broker to hand out again."""
        with self._lock:
            self._tags.discard(delivery_tag)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._tags)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def renew(self) -> None:
        """Push every held delivery's timestamp to now; forget the ones already acked.

        `ZADD XX` only updates members that still exist, so an acknowledged
        message is never put back, and its 0 reply tells us to drop it.
        """
        with self._lock:
            tags = list(self._tags)
        if not tags:
            return
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        for tag in tags:
            pipe.zadd(self._key, {tag: now}, xx=True, ch=True)
        results = pipe.execute()
        gone = {tag for tag, changed in zip(tags, results, strict=True) if not changed}
        if gone:
            with self._lock:
                self._tags -= gone

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.renew()
            except redis.RedisError as exc:
                log.warning("lease renewal failed: %s", exc)
