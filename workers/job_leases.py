"""Lease renewal for the jobs this worker process runs, in the job store.

A job's row says which replica runs it and until when (`lease_until`). Renewing
it while the job runs, and only then, is what lets a job whose outcome could not
be recorded (a database blip as it finished), or whose attempt hangs past the
run timeout, be taken over by the next delivery instead of staying `running`
while its worker lives on. One UPDATE renews all of a process's jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy.exc import SQLAlchemyError

from app.jobs.store import JobStore

log = logging.getLogger(__name__)


class JobLeases:
    def __init__(
        self,
        store: Callable[[], JobStore],
        replica_id: str,
        lease_s: float,
        run_timeout_s: float,
    ) -> None:
        self._store = store
        self._replica_id = replica_id
        self._lease_s = lease_s
        self._run_timeout_s = run_timeout_s
        #: attempt token -> (job id, when it started): two attempts at one job in this
        #: process (a takeover of a hung one) are renewed and released apart.
        self._running: dict[object, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, job_id: str) -> Iterator[None]:
        """Renew the job's lease for the length of the block, up to the run timeout."""
        token = object()
        with self._lock:
            self._running[token] = (job_id, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="inferq-job-leases", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(token, None)

    def _due(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            running = list(self._running.values())
        return sorted({j for j, since in running if now - since < self._run_timeout_s})

    def _run(self) -> None:
        while True:
            time.sleep(self._lease_s / 3)
            due = self._due()
            if not due:
                continue
            try:
                self._store().renew(due, self._replica_id, self._lease_s)
            except SQLAlchemyError as exc:
                # The next renewal may get through; if none does, the jobs are taken over.
                log.warning("could not renew the leases of %d job(s): %s", len(due), exc)
            except Exception:  # the thread must outlive any one failure
                log.exception("renewing the leases of %d job(s) failed", len(due))
