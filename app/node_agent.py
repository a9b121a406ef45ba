"""The node agent: runs on every machine and keeps its worker processes as asked.

The API writes which replicas a node must run (app/cluster_state.py); the agent
starts an ordinary `inferq worker` for each, restarts one that exits with a
growing delay, stops the ones no longer wanted, and reports what it runs with
every heartbeat. One thread does all of it, so the worker processes always have
the same parent thread: Linux's parent-death signal, which ends them if the
agent dies, is tied to the thread that started them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from app.child_guard import guarded
from app.cluster_state import (
    MAX_NODE_EVENTS,
    Assignment,
    Deployment,
    NodeReport,
    WorkerProcess,
    node_event,
)
from app.keys import KeySpace
from app.replicas import parse_load_error
from app.settings import Settings

log = logging.getLogger("inferq.node")

#: (assignment) -> (argv, extra environment) of the worker process that serves it.
WorkerCommand = Callable[[Assignment], tuple[list[str], dict[str, str]]]

#: A worker that ran this long before exiting starts its next restart delay from 1 s again.
STABLE_RUN_S = 60.0


@dataclass
class ManagedWorker:
    assignment: Assignment
    process: subprocess.Popen[bytes] | None = None
    state: str = "starting"
    restarts: int = 0
    consecutive_failures: int = 0
    last_exit_code: int | None = None
    started: float = 0.0
    next_start: float = 0.0
    stop_deadline: float = 0.0
    since: float = field(default_factory=time.time)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def report(self) -> WorkerProcess:
        return WorkerProcess(
            assignment_id=self.assignment.assignment_id,
            uid=self.assignment.uid,
            devices=self.assignment.devices,
            pid=self.process.pid if self.alive() and self.process else None,
            state=self.state,
            restarts=self.restarts,
            last_exit_code=self.last_exit_code,
            since=self.since,
        )


class NodeAgent:
    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        keys: KeySpace,
        name: str,
        devices: list[str],
        device_kind: str,
        address: str,
        command: WorkerCommand,
        env: dict[str, str],
    ) -> None:
        self.settings = settings
        self.client = client
        self.keys = keys
        self.name = name
        self.devices = devices
        self.device_kind = device_kind
        self.address = address
        self._command = command
        self._env = env
        self.workers: dict[str, ManagedWorker] = {}
        self.started_at = time.time()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inferq-node", daemon=True)
        self._last_reconcile = 0.0
        self._redis_run_id: str | None = None

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A control message arrived: compare desired and actual state now."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop every worker (they finish in-flight work first) and leave the cluster.

        What the node was asked to run stays in Redis, so a restarted node resumes it.
        """
        self._stop.set()
        self._wake.set()
        self._stopped.wait(timeout if timeout is not None else self.settings.node_stop_grace_s + 5)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    now = time.monotonic()
                    woken = self._wake.is_set()
                    self._wake.clear()
                    if woken or now - self._last_reconcile >= self.settings.node_reconcile_s:
                        self._last_reconcile = now
                        restarted = self._redis_restarted()
                        wanted = self.desired()
                        if restarted and not wanted:
                            wanted = self._restore_desired()
                        self.reconcile(wanted)
                    self.tend()
                    self.heartbeat()
                except redis.RedisError as exc:
                    # Workers keep running while Redis is away; they have their own reconnects.
                    log.warning("node %s cannot reach Redis: %s", self.name, exc)
                except Exception:
                    log.exception("node %s loop failed; continuing", self.name)
                self._wake.wait(self.settings.node_heartbeat_s)
        finally:
            self._shutdown()

    # -- desired state ----------------------------------------------------------------
    def desired(self) -> dict[str, Assignment]:
        raw = self.client.hgetall(self.keys.node_assignments(self.name))
        wanted: dict[str, Assignment] = {}
        for key, value in raw.items():
            try:
                assignment = Assignment.from_json(value)
            except (ValueError, TypeError) as exc:
                log.error("ignoring a malformed assignment %r: %s", key, exc)
                continue
            wanted[assignment.assignment_id] = assignment
        return wanted

    def _redis_restarted(self) -> bool:
        """True once after each restart of the Redis server (its run_id changes)."""
        run_id = str(self.client.info("server").get("run_id", ""))
        before, self._redis_run_id = self._redis_run_id, run_id
        return before is not None and run_id != before

    def _restore_desired(self) -> dict[str, Assignment]:
        """Redis came back without its data (no persistence): what this node was asked to
        run is what it runs, so write that back rather than stop every worker. The
        launched models' specs come back with it, so the API routes them again."""
        kept = {i: m.assignment for i, m in self.workers.items() if m.state != "stopping"}
        if not kept:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for assignment in kept.values():
            pipe.hset(
                self.keys.node_assignments(self.name),
                assignment.assignment_id,
                assignment.to_json(),
            )
            deployment = Deployment(assignment.uid, assignment.spec, assignment.created)
            pipe.hsetnx(self.keys.deployments, assignment.uid, deployment.to_json())
        pipe.execute()
        log.warning(
            "Redis restarted without node %s's assignments; restored the %d it runs",
            self.name,
            len(kept),
        )
        for managed in self.workers.values():
            if managed.assignment.assignment_id in kept:
                self._event(managed, "restored", "Redis restarted empty; assignment written back")
        return kept

    def reconcile(self, wanted: dict[str, Assignment]) -> None:
        for assignment_id, managed in list(self.workers.items()):
            if assignment_id not in wanted and managed.state != "stopping":
                self._begin_stop(managed)
        for assignment_id, assignment in wanted.items():
            if assignment_id not in self.workers:
                managed = ManagedWorker(assignment)
                self.workers[assignment_id] = managed
                self._spawn(managed)
                if managed.process is not None:
                    devices = ",".join(assignment.devices) or "-"
                    self._event(managed, "started", f"devices {devices}")

    def tend(self) -> None:
        """Notice exits: restart crashed workers after their delay, forget stopped ones."""
        now = time.monotonic()
        for assignment_id, managed in list(self.workers.items()):
            if managed.state == "stopping":
                if not managed.alive():
                    del self.workers[assignment_id]
                    self._event(managed, "stopped", self._exit_text(managed))
                elif now >= managed.stop_deadline and managed.process:
                    log.warning("worker %s did not stop in time; killing it", assignment_id)
                    managed.process.kill()
                continue
            if managed.state in ("restarting", "failed"):
                if now >= managed.next_start:
                    managed.restarts += 1
                    self._spawn(managed)
                    if managed.process is not None:
                        self._event(managed, "restarted", f"restart #{managed.restarts}")
                continue
            if managed.alive():
                if managed.state == "starting" and self._announced(managed):
                    managed.state = "running"
                    managed.since = time.time()
                continue
            self._crashed(managed, now)

    def _announced(self, managed: ManagedWorker) -> bool:
        """The worker is serving once its replica heartbeat names this assignment."""
        try:
            members = self.client.zrangebyscore(
                self.keys.replicas(managed.assignment.uid), time.time(), "+inf"
            )
            if not members:
                return False
            infos = self.client.mget([self.keys.replica_info(m.decode()) for m in members])
        except redis.RedisError:
            return False
        wanted = managed.assignment.assignment_id
        return any(info and json.loads(info).get("assignment") == wanted for info in infos)

    def _backoff(self, managed: ManagedWorker, ran: float) -> float:
        managed.consecutive_failures = (
            1 if ran >= STABLE_RUN_S else managed.consecutive_failures + 1
        )
        return min(
            self.settings.node_restart_max_backoff_s,
            2.0 ** (managed.consecutive_failures - 1),
        )

    def _failed_to_start(self, managed: ManagedWorker, reason: str) -> None:
        delay = self._backoff(managed, 0.0)
        managed.state = "failed"
        managed.last_exit_code = None
        managed.next_start = time.monotonic() + delay
        self._event(
            managed,
            "failed",
            f"the worker could not be started: {reason}; trying again in {delay:.0f}s",
        )
        log.error(
            "worker %s for %s could not be started: %s",
            managed.assignment.assignment_id,
            managed.assignment.uid,
            reason,
        )

    def _crashed(self, managed: ManagedWorker, now: float) -> None:
        if managed.process is None:
            return  # never started: _failed_to_start has said so
        managed.last_exit_code = managed.process.returncode
        ran = now - managed.started
        delay = self._backoff(managed, ran)
        managed.state = "restarting"
        managed.next_start = now + delay
        managed.since = time.time()
        why = self._load_failure(managed)
        self._event(
            managed,
            "crashed",
            f"{self._exit_text(managed)} after {ran:.1f}s"
            + (f": the model failed to load: {why}" if why else "")
            + f"; restarting in {delay:.0f}s",
        )
        log.warning(
            "worker %s for %s exited (%s); restarting in %.0fs",
            managed.assignment.assignment_id,
            managed.assignment.uid,
            managed.last_exit_code,
            delay,
        )

    def _load_failure(self, managed: ManagedWorker) -> str | None:
        """The reason this very process left for failing to load its engine, if it did."""
        try:
            raw = self.client.get(self.keys.model_error(managed.assignment.uid))
        except redis.RedisError:
            return None
        record = parse_load_error(raw)
        if record is None or managed.process is None or record.get("pid") != managed.process.pid:
            return None
        return str(record["reason"])

    @staticmethod
    def _exit_text(managed: ManagedWorker) -> str:
        code = managed.process.returncode if managed.process else managed.last_exit_code
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    # -- processes --------------------------------------------------------------------
    def _spawn(self, managed: ManagedWorker) -> None:
        """Start the worker; one that cannot even start (an argument list the kernel
        refuses, a missing interpreter) is a failed replica with an event, retried
        after a delay like a crash, never an exception that stops the node's loop."""
        managed.started = time.monotonic()
        managed.since = time.time()
        try:
            argv, extra = self._command(managed.assignment)
            env = dict(self._env)
            env.update(extra)
            managed.process = subprocess.Popen(guarded(argv), env=env)
        except (OSError, ValueError) as exc:
            managed.process = None
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            self._failed_to_start(managed, reason[:500])
            return
        managed.state = "starting"
        log.info(
            "started worker %s for %s on devices %s (pid %d)",
            managed.assignment.assignment_id,
            managed.assignment.uid,
            managed.assignment.devices,
            managed.process.pid,
        )

    def _begin_stop(self, managed: ManagedWorker) -> None:
        managed.state = "stopping"
        managed.since = time.time()
        managed.stop_deadline = time.monotonic() + self.settings.node_stop_grace_s
        if managed.alive() and managed.process:
            managed.process.send_signal(signal.SIGTERM)

    def _shutdown(self) -> None:
        for managed in self.workers.values():
            if managed.state != "stopping":
                self._begin_stop(managed)
        deadline = time.monotonic() + self.settings.node_stop_grace_s
        for managed in self.workers.values():
            if managed.process is None:
                continue
            try:
                managed.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                managed.process.kill()
                managed.process.wait()
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self.keys.nodes, self.name)
            pipe.delete(self.keys.node_info(self.name))
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not withdraw node %s: %s", self.name, exc)
        self._stopped.set()

    # -- reporting --------------------------------------------------------------------
    def heartbeat(self) -> None:
        report = NodeReport(
            name=self.name,
            host=socket.gethostname(),
            address=self.address,
            device_kind=self.device_kind,
            devices=self.devices,
            pid=os.getpid(),
            started_at=self.started_at,
            workers=[m.report() for m in self.workers.values()],
        )
        ttl = self.settings.node_heartbeat_ttl_s
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.keys.nodes, {self.name: time.time() + ttl})
        pipe.set(self.keys.node_info(self.name), report.to_json(), px=int(ttl * 1000))
        pipe.execute()

    def _event(self, managed: ManagedWorker, event: str, detail: str) -> None:
        record = node_event(managed.assignment.uid, managed.assignment.assignment_id, event, detail)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.lpush(self.keys.node_events(self.name), record)
            pipe.ltrim(self.keys.node_events(self.name), 0, MAX_NODE_EVENTS - 1)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not record event %s: %s", event, exc)
