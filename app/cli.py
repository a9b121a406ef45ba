"""The `inferq` command: `up`, `worker`, `api`, `db`, `embed`, `registry`.

`worker` and `api` replace themselves (exec) with Celery and uvicorn once the
environment is set, so the process a supervisor starts is the process that
serves, and device pinning happens before any engine library is imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from app.devices import pin_cpu_affinity, pinning_env
from app.engines import ENGINES
from app.registry import RegistryError, load_registry
from app.settings import Settings, get_settings, parse_device_list

log = logging.getLogger("inferq")


def _registry_or_exit(settings: Settings):  # type: ignore[no-untyped-def]
    try:
        return load_registry(settings.registry)
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def worker_argv(model: str, devices: Sequence[str], replica: int) -> list[str]:
    """How a supervisor starts one replica: the same as an operator would type."""
    argv = [sys.executable, "-m", "app", "worker", "--model", model, "--replica", str(replica)]
    if devices:
        argv += ["--devices", ",".join(devices)]
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    settings.require_redis_url()
    spec = _registry_or_exit(settings).get(args.model)
    if spec is None:
        print(f"model {args.model!r} is not in the registry", file=sys.stderr)
        return 2
    devices = parse_device_list(args.devices or "")
    entry = ENGINES[spec.engine]
    env = dict(os.environ)
    env.update(pinning_env(entry.device_kind, devices))
    env.update(
        {
            "INFERQ_WORKER_MODEL": spec.name,
            "INFERQ_WORKER_DEVICES": ",".join(devices),
            "INFERQ_WORKER_REPLICA": str(args.replica),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    if entry.device_kind == "cpu":
        pin_cpu_affinity(devices)
    # A chat engine runs `parallel` generations at once; more wait in the queue, where
    # another replica can take them. Embedding/rerank workers hold many to batch them.
    if spec.kind == "chat":
        concurrency = args.concurrency or int(spec.options.get("parallel", 1))
    else:
        concurrency = args.concurrency or settings.worker_concurrency
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app:celery_app",
        "worker",
        "-Q",
        # Order matters: with the "priority" queue order strategy the worker takes
        # from the bulk queue only while the interactive one is empty.
        f"{spec.queue},{spec.bulk_queue}",
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{spec.name}-r{args.replica}-{os.getpid()}@{socket.gethostname()}",
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        args.loglevel,
    ]
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def cmd_api(args: argparse.Namespace) -> int:
    settings = get_settings()
    settings.require_redis_url()
    _registry_or_exit(settings)
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "api.main:create_app",
        "--factory",
        "--host",
        args.host or settings.api_host,
        "--port",
        str(args.port or settings.api_port),
        "--timeout-graceful-shutdown",
        "5",
        "--log-level",
        args.loglevel,
    ]
    os.execv(sys.executable, argv)
    return 0  # not reached


def _ready(url: str) -> tuple[bool, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return False, json.loads(exc.read())
        except ValueError:
            return False, {}
    except (OSError, ValueError):
        return False, {}


def cmd_up(args: argparse.Namespace) -> int:
    from app.embedded_redis import EmbeddedRedis
    from app.supervisor import Child, Supervisor, child_env

    settings = get_settings()
    registry = _registry_or_exit(settings)
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    extra: dict[str, str] = {}
    embedded: EmbeddedRedis | None = None
    host = args.host or settings.api_host
    port = args.port or settings.api_port
    try:
        if settings.redis_url:
            print(f"inferq: using Redis at {settings.redis_url}", flush=True)
        else:
            embedded = EmbeddedRedis(settings.data_dir / "redis")
            embedded.start()
            extra["INFERQ_REDIS_URL"] = embedded.url
            print(f"inferq: started a private Redis server at {embedded.url}", flush=True)
        from app.jobs.migrate import upgrade

        database_url = settings.resolved_database_url()
        upgrade(database_url)
        extra["INFERQ_DATABASE_URL"] = database_url
        env = child_env(extra)
        api_argv = [sys.executable, "-m", "app", "api", "--host", host, "--port", str(port)]
        supervisor.add(Child("api", api_argv, env))
        this_host = socket.gethostname()
        for spec in registry.models:
            for replica, devices in enumerate(spec.replica_device_groups(this_host)):
                name = f"worker {spec.name}#{replica}"
                argv = worker_argv(spec.name, devices, replica)
                supervisor.add(Child(name, argv, env, restart=True))
        base = f"http://{host}:{port}"
        started = time.monotonic()
        announced = False

        def announce_when_ready() -> None:
            nonlocal announced
            if announced:
                return
            ok, body = _ready(f"{base}/ready")
            if ok:
                announced = True
                print(
                    f"inferq is ready ({time.monotonic() - started:.1f}s)\n"
                    f"  OpenAI API: {base}/v1\n  models:     {base}/v1/models\n"
                    f"  docs:       {base}/docs\n  press Ctrl-C to stop",
                    flush=True,
                )
            elif time.monotonic() - started > args.startup_timeout:
                announced = True
                print(f"inferq: not ready after {args.startup_timeout}s: {body}", flush=True)

        code = supervisor.watch(on_tick=announce_when_ready)
    finally:
        print("inferq: stopping", flush=True)
        supervisor.stop_all()
        if embedded:
            embedded.stop()
    return code


def cmd_db(args: argparse.Namespace) -> int:
    from app.db import create_db_engine
    from app.jobs import migrate

    url = get_settings().resolved_database_url()
    if args.action == "upgrade":
        migrate.upgrade(url, args.revision or "head")
    elif args.action == "downgrade":
        migrate.downgrade(url, args.revision or "-1")
    engine = create_db_engine(url)
    try:
        current = migrate.current_revision(engine)
    finally:
        engine.dispose()
    head = migrate.head_revision(url)
    state = "up to date" if current == head else f"newest is {head}"
    print(f"{engine.url.render_as_string(hide_password=True)}: {current or '(empty)'} ({state})")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from app.embed_cli import run_embed

    settings = get_settings()
    base = args.api or f"http://{settings.api_host}:{settings.api_port}"
    key = args.api_key or (settings.api_keys[0] if settings.api_keys else None)
    run_embed(
        base,
        key,
        Path(args.input),
        args.model,
        Path(args.out),
        output_format=args.format,
        text_field=args.text_field,
        id_field=args.id_field,
        shard_size=args.shard_size,
    )
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    settings = get_settings()
    if args.file:
        settings = settings.model_copy(update={"registry": args.file})
    registry = _registry_or_exit(settings)
    for spec in registry.models:
        groups = spec.replica_device_groups()
        print(f"{spec.name}\t{spec.kind}\t{spec.engine}\treplicas={len(groups)}\t{spec.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run Redis (if none is set), the API and every worker")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--startup-timeout", type=float, default=600.0)
    up.set_defaults(func=cmd_up)

    worker = sub.add_parser("worker", help="serve one replica of a model on pinned devices")
    worker.add_argument("--model", required=True)
    worker.add_argument("--devices", default="", help="e.g. 0,1 or 0-3 (CPU: core ids)")
    worker.add_argument("--replica", type=int, default=0)
    worker.add_argument("--concurrency", type=int, default=0)
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=cmd_worker)

    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.add_argument("--loglevel", default="info")
    api.set_defaults(func=cmd_api)

    db = sub.add_parser("db", help="migrate the job database (Alembic)")
    db.add_argument("action", choices=["upgrade", "downgrade", "current"])
    db.add_argument("revision", nargs="?", help="default: head (upgrade), -1 (downgrade)")
    db.set_defaults(func=cmd_db)

    embed = sub.add_parser("embed", help="embed a whole file as a corpus job on the cluster")
    embed.add_argument("input", help="JSONL, CSV, Parquet, or plain text (one text per line)")
    embed.add_argument("--model", required=True)
    embed.add_argument("--out", required=True, help="output file: .jsonl, .parquet or .npy")
    embed.add_argument("--format", choices=["jsonl", "parquet", "npy"])
    embed.add_argument("--text-field", help="field holding the text (default: text)")
    embed.add_argument("--id-field", help="field holding the id (default: the row number)")
    embed.add_argument("--shard-size", type=int)
    embed.add_argument("--api", help="API base URL (default: INFERQ_API_HOST/PORT)")
    embed.add_argument("--api-key", help="default: the first of INFERQ_API_KEYS")
    embed.set_defaults(func=cmd_embed)

    registry = sub.add_parser("registry", help="validate and list a model registry")
    registry.add_argument("file", nargs="?")
    registry.set_defaults(func=cmd_registry)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))
