"""Starting and stopping the real processes the integration tests talk to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from app.embedded_redis import free_port
from app.keys import KeySpace

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name.replace('/', '_')}-{time.time_ns()}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def alive_replica_count(env: dict[str, str], model: str) -> int:
    client = redis.Redis.from_url(env["INFERQ_REDIS_URL"])
    keys = KeySpace(env["INFERQ_KEY_PREFIX"])
    return int(client.zcount(keys.replicas(model), time.time(), "+inf"))


def start_worker(
    env: dict[str, str],
    log_dir: Path,
    model: str,
    devices: str = "",
    replica: int = 0,
    timeout: float = 90.0,
) -> Proc:
    before = alive_replica_count(env, model)
    argv = [sys.executable, "-m", "app", "worker", "--model", model, "--replica", str(replica)]
    if devices:
        argv += ["--devices", devices]
    proc = Proc(f"worker-{model}-{replica}", argv, env, log_dir)
    deadline = time.monotonic() + timeout
    while alive_replica_count(env, model) <= before:
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"worker for {model} did not come up:\n{proc.tail()}")
        time.sleep(0.2)
    return proc


def wait_http(url: str, proc: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"{proc.name} did not answer {url}:\n{proc.tail()}")
        time.sleep(0.2)


def inferq_command(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run one `inferq` command to its end, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_inferq(env: dict[str, str], *args: str) -> str:
    """An `inferq` command that must succeed; its output."""
    done = inferq_command(env, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def db_upgrade(env: dict[str, str]) -> str:
    """Migrate the job database of `env` (`inferq db upgrade`); its output."""
    return run_inferq(env, "db", "upgrade")


def start_api(
    env: dict[str, str], log_dir: Path, host: str = "127.0.0.1", loglevel: str = "warning"
) -> tuple[Proc, str]:
    port = free_port()
    argv = [sys.executable, "-m", "app", "api", "--host", host, "--port", str(port)]
    proc = Proc("api", [*argv, "--loglevel", loglevel], env, log_dir)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health", proc)
    return proc, base


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def node_alive(env: dict[str, str], name: str) -> bool:
    client = redis.Redis.from_url(env["INFERQ_REDIS_URL"])
    keys = KeySpace(env["INFERQ_KEY_PREFIX"])
    score = client.zscore(keys.nodes, name)
    return score is not None and score > time.time()


def start_node(
    env: dict[str, str],
    log_dir: Path,
    name: str,
    devices: str = "",
    device_kind: str = "cpu",
    timeout: float = 60.0,
) -> Proc:
    """`inferq node`, started and seen to register in Redis."""
    argv = [sys.executable, "-m", "app", "node", "--name", name, "--device-kind", device_kind]
    if devices:
        argv += ["--devices", devices]
    proc = Proc(f"node-{name}", argv, env, log_dir)
    deadline = time.monotonic() + timeout
    while not node_alive(env, name):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"node {name} did not register:\n{proc.tail()}")
        time.sleep(0.2)
    return proc
