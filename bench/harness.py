"""Shared pieces of the benchmarks: a private inferq deployment and load generation."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from app.embedded_redis import EmbeddedRedis, free_port
from app.keys import KeySpace

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "host": platform.node()}


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


@dataclass
class Deployment:
    """Redis (the machine's, or an embedded one), an API process, workers on demand."""

    registry_yaml: str
    #: INFERQ_* settings of this deployment's processes, beyond the defaults.
    settings: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    base_url: str = ""
    _embedded: EmbeddedRedis | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="inferq-bench-")
        tmp = Path(self._tmp.name)
        (tmp / "registry.yaml").write_text(self.registry_yaml)
        url = os.environ.get("INFERQ_REDIS_URL")
        if not url:
            try:
                redis.Redis(socket_connect_timeout=0.5).ping()
                url = "redis://127.0.0.1:6379/0"
            except redis.RedisError:
                self._embedded = EmbeddedRedis(tmp / "redis")
                self._embedded.start()
                url = self._embedded.url
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
        env.update(
            {
                "INFERQ_REDIS_URL": url,
                "INFERQ_KEY_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
                "INFERQ_REGISTRY": str(tmp / "registry.yaml"),
                "INFERQ_DATA_DIR": str(tmp / "data"),
                "HF_HUB_OFFLINE": "1",
                **self.settings,
            }
        )
        self.env = env
        # The job store (SQLite in the data dir) must be at the newest schema.
        subprocess.run(
            [sys.executable, "-m", "app", "db", "upgrade"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "app", "api", "--port", str(port), "--loglevel", "warning"]
        self._spawn(argv)
        self._wait(lambda: _get(f"{self.base_url}/health") is not None, "the API")

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(Path(self._tmp.name) / f"{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start; logs in {self._tmp.name}")
            time.sleep(0.2)

    def alive(self, model: str) -> int:
        client = redis.Redis.from_url(self.env["INFERQ_REDIS_URL"])
        keys = KeySpace(self.env["INFERQ_KEY_PREFIX"])
        return int(client.zcount(keys.replicas(model), time.time(), "+inf"))

    def worker_stats(self) -> dict[str, float]:
        client = redis.Redis.from_url(self.env["INFERQ_REDIS_URL"])
        keys = KeySpace(self.env["INFERQ_KEY_PREFIX"])
        totals: dict[str, float] = {}
        for key in client.scan_iter(match=keys.replica_stats("*")):
            for name, value in client.hgetall(key).items():
                totals[name.decode()] = totals.get(name.decode(), 0.0) + float(value)
        return totals

    @contextmanager
    def worker(
        self, model: str, devices: str = "", startup_timeout: float = 120
    ) -> Iterator[subprocess.Popen[bytes]]:
        before = self.alive(model)
        argv = [sys.executable, "-m", "app", "worker", "--model", model, "--loglevel", "warning"]
        if devices:
            argv += ["--devices", devices]
        proc = self._spawn(argv)
        self._wait(lambda: self.alive(model) > before, f"the worker for {model}", startup_timeout)
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(30)
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._embedded:
            self._embedded.stop()
        if self._tmp:
            self._tmp.cleanup()


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.read()
    except OSError:
        return None


async def run_clients(
    jobs: list[Any], concurrency: int, send: Callable[[Any], Awaitable[float]]
) -> tuple[float, list[float]]:
    """Send `jobs` with `concurrency` clients; returns wall time and per-request latencies."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    latencies: list[float] = []

    async def client() -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            latencies.append(await send(job))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies
