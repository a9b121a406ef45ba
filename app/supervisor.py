"""Run and watch the child processes of `inferq up`: API, workers, embedded Redis.

Children get SIGTERM if this process dies (Linux parent-death signal), so even
a killed `inferq up` leaves no orphans; on Ctrl-C or SIGTERM every child is
stopped, gracefully first.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from app.child_guard import guarded

log = logging.getLogger("inferq.up")


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restart: bool = False
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    history: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.process = subprocess.Popen(guarded(self.argv), env=self.env)
        self.history.append(time.monotonic())
        log.info("started %s (pid %d)", self.name, self.process.pid)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self) -> None:
        self.children: list[Child] = []
        self._stopping = False

    def add(self, child: Child) -> Child:
        self.children.append(child)
        child.start()
        return child

    def request_stop(self, *_: object) -> None:
        self._stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def watch(self, on_tick: Callable[[], None] | None = None, interval: float = 0.5) -> int:
        """Restart crashed workers with backoff until asked to stop; a dead API ends the run."""
        while not self._stopping:
            for child in self.children:
                if child.alive() or child.process is None:
                    continue
                code = child.process.returncode
                if not child.restart:
                    log.error("%s exited with code %s; stopping", child.name, code)
                    return 1
                now = time.monotonic()
                if child.next_start == 0.0:
                    child.restarts += 1
                    delay = min(30.0, 2.0 ** min(child.restarts, 5))
                    child.next_start = now + delay
                    log.warning("%s exited (code %s); restarting in %.0fs", child.name, code, delay)
                elif now >= child.next_start:
                    child.next_start = 0.0
                    child.start()
            if on_tick:
                on_tick()
            time.sleep(interval)
        return 0

    def stop_all(self, grace: float = 15.0, order: Sequence[Child] | None = None) -> None:
        children = list(order or reversed(self.children))
        for child in children:
            if child.alive() and child.process:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", child.name)
                child.process.kill()
                child.process.wait()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
