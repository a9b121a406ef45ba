"""Faults, with real processes: Redis stopped and restarted empty, the job database
unreachable, and a model whose engine cannot load.

Each test runs its own services (a private Redis server, a PostgreSQL forwarder
that can be cut, a node agent) on a key prefix of its own, so cutting them
touches no other test.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from api.results import CLIENT_NAME
from app.embedded_redis import free_port, redis_server_binary
from tests.cluster import AT_ONCE, ready_workers, running_cluster
from tests.procs import Proc, alive_replica_count, db_upgrade, start_api, start_node

EMBED = {"model": "minilm", "input": "a steady stream of small requests"}


class RedisServer:
    """A private redis-server that forgets everything when stopped (no RDB, no AOF)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"redis-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--logfile", str(self.log_path)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                pass
            assert self.process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@dataclass
class Sent:
    started: float
    took: float
    status: int
    code: str | None


@dataclass
class Load:
    """A few client threads sending small embedding requests until stopped."""

    base: str
    timeout: float
    headers: dict[str, str] = field(default_factory=dict)
    clients: int = 2
    sent: list[Sent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=self.timeout) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = http.post("/v1/embeddings", json=EMBED)
                    status, code = response.status_code, None
                    if status != 200:
                        code = response.json()["error"]["code"]
                except (ValueError, KeyError):  # not OpenAI error JSON
                    status, code = response.status_code, "not-an-openai-error"
                except httpx.HTTPError as exc:  # a hang is the failure this test looks for
                    status, code = 0, type(exc).__name__
                self.sent.append(Sent(started, time.monotonic() - started, status, code))
                if status != 200:
                    time.sleep(0.05)

    def start(self) -> None:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def answered(self) -> int:
        return sum(1 for s in self.sent if s.status == 200)


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error
    return error


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` held."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what} did not happen in {timeout}s"
        time.sleep(0.1)
    return time.monotonic() - started


def start_api_and_worker(env: dict[str, str], log_dir: Path, procs: list[Proc]) -> str:
    """The database migrated, then an API and a `minilm` worker starting side by side."""
    db_upgrade(env)
    argv = [sys.executable, "-m", "app", "worker", "--model", "minilm"]
    worker = Proc("worker-minilm", argv, env, log_dir)
    procs.append(worker)
    api, base = start_api(env, log_dir)
    procs.append(api)

    def up() -> bool:
        assert worker.popen.poll() is None, worker.tail()
        return alive_replica_count(env, "minilm") > 0

    wait_for("minilm's worker", up, 120)
    return base


class Forwarder:
    """A TCP forwarder to a server, that can be cut (connections refused, open ones
    closed) and restored on the same port: an unreachable database, on demand."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            if listener is not None:
                with contextlib.suppress(OSError):
                    listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
                listener.close()
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


REQUEST_TIMEOUT_S = 8.0


def test_redis_stopped_and_restarted_empty_under_load(
    inferq_env: dict[str, str], log_dir: Path, tmp_path: Path
) -> None:
    """minilm runs on a node agent, as launched models do: the node, its worker, the API
    and the jobs all come through a Redis restart that forgot everything."""
    server = RedisServer(log_dir)
    server.start()
    env = {
        **inferq_env,
        "INFERQ_REDIS_URL": server.url,
        "INFERQ_KEY_PREFIX": f"{inferq_env['INFERQ_KEY_PREFIX']}-redis-outage",
        "INFERQ_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}",
        "INFERQ_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        "INFERQ_JOB_SWEEP_INTERVAL_S": "0.5",
        "INFERQ_JOB_RESEND_AFTER_S": "2",
        "INFERQ_NODE_RECONCILE_S": "1",
        "INFERQ_NODE_HEARTBEAT_S": "0.5",
        "INFERQ_NODE_HEARTBEAT_TTL_S": "3",
    }
    procs: list[Proc] = []
    try:
        db_upgrade(env)
        procs.append(start_node(env, log_dir, "node-r"))
        api, base = start_api(env, log_dir)
        procs.append(api)
        http = httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S + 10)
        launched = http.post("/v1/models", json={"model_name": "minilm"}, params=AT_ONCE)
        assert launched.status_code == 200, launched.text
        wait_for("minilm's worker", lambda: alive_replica_count(env, "minilm") > 0, 120)
        [worker] = [w for w in http.get("/v1/cluster").json()["workers"] if w["pid"]]
        load = Load(base, REQUEST_TIMEOUT_S + 10)
        load.start()
        wait_for("steady load answered", lambda: load.answered() >= 5, 30)

        # A dropped result connection (the API's subscription, killed) costs no request:
        # those waiting are queued again, new ones wait the fraction of a second it is away.
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        sent, answered = len(load.sent), load.answered()
        routers = [c for c in admin.client_list() if c["name"] == CLIENT_NAME]
        assert routers, admin.client_list()
        for router in routers:
            admin.client_kill_filter(_id=router["id"])
        wait_for("answers after the drop", lambda: load.answered() >= answered + 10, 20)
        dropped = [(s.status, s.code) for s in load.sent[sent:] if s.status != 200]
        assert not dropped, dropped
        assert [c for c in admin.client_list() if c["name"] == CLIENT_NAME]  # subscribed again
        # Jobs for minilm run now or are running when Redis goes; jobs for idle-model,
        # which no worker serves yet, wait in its queue and are lost with Redis.
        jobs = []
        for i in range(4):
            model = "minilm" if i % 2 else "idle-model"
            body = {"model": model, "input": [f"job {i} text {j}" for j in range(20)]}
            response = http.post("/v1/jobs", json={"endpoint": "/v1/embeddings", "body": body})
            assert response.status_code == 202, response.text
            jobs.append(response.json()["id"])
        time.sleep(0.3)
        # idle-model's worker loads its model while Redis is away, so it consumes only
        # from the emptied Redis: its jobs' messages are gone, the sweeper sends them again.
        argv = [sys.executable, "-m", "app", "worker", "--model", "idle-model"]
        procs.append(Proc("worker-idle-model", argv, env, log_dir))

        server.stop()
        down_at = time.monotonic()
        for _ in range(5):
            probe_started = time.monotonic()
            response = http.post("/v1/embeddings", json=EMBED)
            took = time.monotonic() - probe_started
            error = assert_openai_error(response, 503, "backend_unavailable")
            assert took < 3.0, f"a 503 took {took:.1f}s: {error}"
            assert str(server.port) not in error["message"], error  # no driver text
            time.sleep(0.3)
        not_ready = http.get("/ready")
        assert not_ready.status_code == 503 and str(server.port) not in not_ready.text
        print(f"Redis down {time.monotonic() - down_at:.1f}s; last 503 in {took:.2f}s")

        server.start()
        up_at = time.monotonic()

        def serves() -> bool:
            return http.post("/v1/embeddings", json=EMBED).status_code == 200

        recovered = wait_for("the API serving again", serves, 20)
        print(f"the API served 200 again {recovered:.1f}s after Redis came back")
        assert recovered < 10
        answered = load.answered()
        wait_for("the load answered again", lambda: load.answered() >= answered + 10, 20)
        load.stop()
        after_up = [s for s in load.sent if s.started > up_at + recovered]
        assert after_up and all(s.status == 200 for s in after_up[-10:]), after_up[-10:]

        # The node and its worker lived through it, and the node wrote back what it runs.
        view = http.get("/v1/cluster").json()
        [node] = view["nodes"]
        assert node["alive"], node
        assert any(e["event"] == "restored" for e in node["events"]), node["events"]
        [row] = [m for m in view["models"] if m["id"] == "minilm"]
        assert row["launched"] and row["replicas_alive"] == 1, row
        [again] = [w for w in view["workers"] if w["model"] == "minilm" and w["pid"]]
        assert (again["pid"], again["assignment_id"]) == (worker["pid"], worker["assignment_id"])
        assert again["state"] == "ready"

        def all_succeeded() -> bool:
            statuses = [http.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in jobs]
            assert "failed" not in statuses and "expired" not in statuses, statuses
            return statuses == ["succeeded"] * len(jobs)

        wait_for("every job succeeded", all_succeeded, 90)
        print(f"all jobs succeeded {time.monotonic() - up_at:.1f}s after Redis came back")

        slowest = max(s.took for s in load.sent)
        outcomes = {(s.status, s.code) for s in load.sent}
        print(f"{len(load.sent)} load requests: {sorted(outcomes)}; slowest {slowest:.1f}s")
        # Answered, or a deliberate 503; none waited for its deadline (no 504, no hang).
        assert {code for _, code in outcomes} <= {None, "backend_unavailable", "model_unavailable"}
        assert slowest < REQUEST_TIMEOUT_S
    finally:
        for proc in procs:
            proc.stop()
        server.stop()


def test_the_job_database_away_and_back(
    inferq_env: dict[str, str], log_dir: Path, pg_schemas: Callable[[str], str]
) -> None:
    from sqlalchemy.engine import make_url

    direct = make_url(pg_schemas("db_outage"))
    forwarder = Forwarder((direct.host or "127.0.0.1", direct.port or 5432))
    forwarder.start()
    through = direct.set(host="127.0.0.1", port=forwarder.port)
    env = {
        **inferq_env,
        "INFERQ_KEY_PREFIX": f"{inferq_env['INFERQ_KEY_PREFIX']}-db-outage",
        "INFERQ_DATABASE_URL": through.render_as_string(hide_password=False),
        "INFERQ_JOB_SWEEP_INTERVAL_S": "0.5",
    }
    procs: list[Proc] = []
    try:
        base = start_api_and_worker(env, log_dir, procs)
        http = httpx.Client(base_url=base, timeout=30)

        def submit(text: str) -> httpx.Response:
            body = {"model": "minilm", "input": text}
            return http.post("/v1/jobs", json={"endpoint": "/v1/embeddings", "body": body})

        def succeeds(job_id: str) -> Callable[[], bool]:
            return lambda: http.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"

        before = submit("before the outage")
        assert before.status_code == 202, before.text
        wait_for("the first job", succeeds(before.json()["id"]), 30)

        forwarder.stop()
        for _ in range(3):
            assert http.post("/v1/embeddings", json=EMBED).status_code == 200
        calls = {
            "submit": lambda: submit("during the outage"),
            "get": lambda: http.get(f"/v1/jobs/{before.json()['id']}"),
            "list": lambda: http.get("/v1/jobs"),
            "cancel": lambda: http.post(f"/v1/jobs/{before.json()['id']}/cancel"),
            "files": lambda: http.get("/v1/files"),
            "batches": lambda: http.get("/v1/batches"),
        }
        for name, call in calls.items():
            call_started = time.monotonic()
            response = call()
            took = time.monotonic() - call_started
            error = assert_openai_error(response, 503, "job_store_unavailable")
            assert took < 5, f"{name} took {took:.1f}s"
            assert str(forwarder.port) not in error["message"], error  # no driver text
            print(f"{name} while the database is away: 503 in {took:.2f}s: {error['message']}")
        cluster = http.get("/v1/cluster")
        assert cluster.status_code == 200, cluster.text
        assert cluster.json()["jobs"] is None and cluster.json()["jobs_problem"]
        assert str(forwarder.port) not in cluster.json()["jobs_problem"]
        assert http.post("/v1/embeddings", json=EMBED).status_code == 200

        forwarder.start()
        back = wait_for("jobs accepted again", lambda: submit("after").status_code == 202, 20)
        print(f"jobs were accepted again {back:.1f}s after the database came back")
        after = submit("after the outage")
        assert after.status_code == 202, after.text
        wait_for("the job after the outage", succeeds(after.json()["id"]), 30)
        assert http.get("/v1/cluster").json()["jobs"]["succeeded"] >= 2
    finally:
        for proc in procs:
            proc.stop()
        forwarder.stop()


def test_a_model_whose_engine_cannot_load(
    inferq_env: dict[str, str], log_dir: Path, tmp_path: Path
) -> None:
    """`broken-model`'s path does not exist: its worker exits, says why, and only it is 503."""
    with running_cluster(inferq_env, "load-failure", log_dir, tmp_path) as cluster:
        cluster.add_node("node-lf")
        with cluster.http() as http:
            for name in ("broken-model", "minilm"):
                launched = http.post("/v1/models", json={"model_name": name}, params=AT_ONCE)
                assert launched.status_code == 200, launched.text

            def crashes(view: dict[str, Any]) -> list[dict[str, Any]]:
                (node,) = view["nodes"]
                return [
                    e
                    for e in node["events"]
                    if e["model"] == "broken-model" and e["event"] == "crashed"
                ]

            def broken_row(view: dict[str, Any]) -> dict[str, Any]:
                return next(m for m in view["models"] if m["id"] == "broken-model")

            view = cluster.wait(
                "the load failure",
                lambda v: bool(broken_row(v)["load_error"] and crashes(v)),
                timeout=90,
            )
            failure = broken_row(view)["load_error"]
            assert "/nonexistent/model" in failure["reason"], failure
            assert failure["host"] == socket.gethostname() and failure["node"] == "node-lf"
            assert time.time() - failure["time"] < 90
            crash = crashes(view)[-1]
            assert "exit code 3" in crash["detail"] and "failed to load" in crash["detail"]
            assert "/nonexistent/model" in crash["detail"], crash
            print(f"crash event: {crash['detail']}")

            response = http.post("/v1/embeddings", json={"model": "broken-model", "input": "x"})
            error = assert_openai_error(response, 503, "model_load_failed")
            assert error["message"].startswith(
                f"model 'broken-model' failed to load on host {socket.gethostname()}"
            ), error
            assert "/nonexistent/model" in error["message"]
            print(f"503: {error['message']}")

            cluster.wait("minilm ready", lambda v: bool(ready_workers(v, "minilm")), timeout=90)
            assert http.post("/v1/embeddings", json=EMBED).status_code == 200
            assert broken_row(cluster.view())["replicas_alive"] == 0
