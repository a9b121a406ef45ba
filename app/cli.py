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
from app.registry import RegistryError, load_registry, worker_model_spec
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
    try:
        spec = worker_model_spec(settings, args.model)
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        return 2
    devices = parse_device_list(args.devices or "")
    entry = ENGINES[spec.engine]
    kind = settings.worker_device_kind
    device_kind = kind if kind in entry.device_kinds else entry.device_kind
    env = dict(os.environ)
    env.update(pinning_env(device_kind, devices))
    env.update(
        {
            "INFERQ_WORKER_MODEL": spec.name,
            "INFERQ_WORKER_DEVICES": ",".join(devices),
            "INFERQ_WORKER_REPLICA": str(args.replica),
            "INFERQ_WORKER_DEVICE_KIND": device_kind,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    if device_kind == "cpu":
        pin_cpu_affinity(devices)
    # A chat engine runs as many generations at once as it has slots (llama.cpp's
    # `parallel` contexts, vLLM's `max_num_seqs`); more wait in the queue, where another
    # replica can take them. Embedding/rerank workers hold many to batch them.
    if spec.kind == "chat":
        concurrency = args.concurrency or entry.slots(spec.options)
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


def redacted(url: str) -> str:
    """A Redis URL fit to print: its password masked (kombu's own sanitiser)."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def _address_towards(url: str) -> str:
    """The local address this host uses to reach `url`'s host: how other nodes see it."""
    from urllib.parse import urlparse

    host = urlparse(url).hostname or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def cmd_node(args: argparse.Namespace) -> int:
    from app.keys import node_queue

    settings = get_settings()
    redis_url = settings.require_redis_url()
    name = args.name or settings.node_name or socket.gethostname()
    devices = parse_device_list(args.devices) if args.devices else settings.node_devices
    kind = args.device_kind or settings.node_device_kind
    if kind not in ("cpu", "cuda", "vacc"):
        print(f"unknown device kind {kind!r}: cpu, cuda or vacc", file=sys.stderr)
        return 2
    address = args.address or settings.node_address or _address_towards(redis_url)
    env = dict(os.environ)
    env.update(
        {
            "INFERQ_NODE_NAME": name,
            "INFERQ_NODE_DEVICES": ",".join(devices),
            "INFERQ_NODE_DEVICE_KIND": kind,
            "INFERQ_NODE_ADDRESS": address,
        }
    )
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.node:node_app",
        "worker",
        "-Q",
        node_queue(name),
        "--pool",
        "threads",
        "--concurrency",
        "1",
        "--hostname",
        f"node@{name}",
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        args.loglevel,
    ]
    os.execve(sys.executable, argv, env)
    return 0  # not reached


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def open_bind_problem(settings: Settings, host: str) -> str | None:
    """Why the API must not listen on `host` as configured, or None.

    A server reachable from the network without keys would let anyone run the
    models and launch or terminate them; that takes an explicit setting.
    """
    from app.keyring import KeyFileError, KeyRing

    try:
        keyring = KeyRing.load(settings.api_keys, settings.api_keys_file)
    except KeyFileError as exc:
        return str(exc)
    if keyring.open and host not in LOOPBACK and not settings.allow_unauthenticated:
        return (
            f"refusing to serve the API on {host} without API keys: set INFERQ_API_KEYS or "
            "INFERQ_API_KEYS_FILE, or INFERQ_ALLOW_UNAUTHENTICATED=true to serve it open"
        )
    return None


def cmd_api(args: argparse.Namespace) -> int:
    settings = get_settings()
    settings.require_redis_url()
    _registry_or_exit(settings)
    problem = open_bind_problem(settings, args.host or settings.api_host)
    if problem:
        print(problem, file=sys.stderr)
        return 2
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
        "--timeout-keep-alive",
        str(settings.keep_alive_s),
        "--log-level",
        args.loglevel,
        # The API logs each request itself, with its X-Request-Id (api/request_ids.py).
        "--no-access-log",
    ]
    if settings.api_workers > 1:
        argv += ["--workers", str(settings.api_workers)]
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
    problem = open_bind_problem(settings, args.host or settings.api_host)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    extra: dict[str, str] = {}
    embedded: EmbeddedRedis | None = None
    host = args.host or settings.api_host
    port = args.port or settings.api_port
    try:
        if settings.redis_url:
            print(f"inferq: using Redis at {redacted(settings.redis_url)}", flush=True)
        else:
            embedded = EmbeddedRedis(settings.data_dir / "redis")
            embedded.start()
            extra["INFERQ_REDIS_URL"] = embedded.url
            print(
                f"inferq: started a private Redis server at {redacted(embedded.url)} "
                f"(password in {embedded.data_dir / 'redis.conf'})",
                flush=True,
            )
        from app.jobs.migrate import upgrade

        database_url = settings.resolved_database_url()
        upgrade(database_url)
        extra["INFERQ_DATABASE_URL"] = database_url
        env = child_env(extra)
        api_argv = [sys.executable, "-m", "app", "api", "--host", host, "--port", str(port)]
        supervisor.add(Child("api", api_argv, env))
        if args.flower:
            flower = [sys.executable, "-m", "app", "flower"]
            supervisor.add(Child("flower", flower, env, restart=True))
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

    base, key = api_target(args)
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


def api_target(args: argparse.Namespace) -> tuple[str, str | None]:
    """The API a client command talks to, and its key: `--api`/`--api-key`, else
    INFERQ_API_URL/INFERQ_API_KEY, else this host's API (a wildcard bind address is
    reached on loopback) and the first of its keys."""
    settings = get_settings()
    host = settings.api_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    base = args.api or settings.api_url or f"http://{host}:{settings.api_port}"
    key = args.api_key or settings.api_key or (settings.api_keys[0] if settings.api_keys else None)
    return base.rstrip("/"), key


def _api_client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from app.cluster_cli import api_client

    return api_client(*api_target(args))


def _option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    import yaml

    return key, yaml.safe_load(raw)  # numbers and booleans as such, the rest as text


def cmd_launch(args: argparse.Namespace) -> int:
    from app.cluster_cli import launch, launch_from_registry

    with _api_client(args) as client:
        if args.registry:
            launch_from_registry(
                client, args.registry, [args.model] if args.model else [], args.wait, args.timeout
            )
            return 0
        if not args.model:
            print("name the model to launch (or give --registry FILE)", file=sys.stderr)
            return 2
        body: dict[str, object] = {"model_name": args.model, "replica": args.replica}
        optional = {
            "model_uid": args.uid,
            "model_type": args.type,
            "model_engine": args.engine,
            "model_path": args.path,
            "n_gpu": args.n_gpu,
            "worker_ip": args.node,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if args.devices:
            body["devices"] = parse_device_list(args.devices)
        if args.option:
            body["model_options"] = dict(args.option)
        launch(client, body, args.wait, args.timeout)
    return 0


def cmd_terminate(args: argparse.Namespace) -> int:
    from app.cluster_cli import terminate

    with _api_client(args) as client:
        terminate(client, args.model, args.replica)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from app.cluster_cli import list_models

    with _api_client(args) as client:
        list_models(client, as_json=args.json)
    return 0


def flower_argv(settings: Settings, port: int | None, address: str | None) -> list[str]:
    """Flower on the same broker and key prefix as the workers, behind basic auth."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "app.flower_app:celery_app",
        "flower",
        f"--port={port or settings.flower_port}",
        f"--address={address or settings.flower_address}",
    ]
    return argv


def flower_env(settings: Settings) -> dict[str, str]:
    """Flower reads its options from FLOWER_* variables too: the login goes there, where
    `ps` does not show it to every user of the machine, not into the command line."""
    from app.supervisor import child_env

    env = child_env({"FLOWER_BASIC_AUTH": settings.flower_basic_auth or ""})
    if not settings.flower_basic_auth:
        del env["FLOWER_BASIC_AUTH"]
    return env


def cmd_flower(args: argparse.Namespace) -> int:
    settings = get_settings()
    settings.require_redis_url()
    address = args.address or settings.flower_address
    if not settings.flower_basic_auth and address not in LOOPBACK:
        print(
            f"refusing to serve Flower on {address} without a login: set "
            "INFERQ_FLOWER_BASIC_AUTH=user:password",
            file=sys.stderr,
        )
        return 2
    argv = flower_argv(settings, args.port, address)
    os.execve(sys.executable, argv, flower_env(settings))
    return 0  # not reached


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
    from app import __version__

    parser = argparse.ArgumentParser(
        prog="inferq",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings come from INFERQ_* environment variables (see the README); "
        "flags override them.\n`inferq COMMAND --help` shows each command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"inferq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, *examples: str) -> argparse.ArgumentParser:
        epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
        return sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def loglevel(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument(
            "--loglevel", default="info", help="debug, info, warning or error (default: info)"
        )

    up = command(
        "up",
        "run Redis (if none is set), the API and every worker",
        "inferq up",
        "inferq up --host 0.0.0.0 --port 8000 --flower",
    )
    up.add_argument("--host", help="the API's bind address (default: INFERQ_API_HOST, 127.0.0.1)")
    up.add_argument("--port", type=int, help="the API's port (default: INFERQ_API_PORT, 9997)")
    up.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for every worker to load its model (default: 600)",
    )
    up.add_argument("--flower", action="store_true", help="also run Flower (basic auth)")
    up.set_defaults(func=cmd_up)

    worker = command(
        "worker",
        "serve one replica of a model on pinned devices",
        "inferq worker --model bge-m3 --devices 0",
        "inferq worker --model qwen3 --devices 0-3 --replica 1",
    )
    worker.add_argument("--model", required=True, help="a model name from the registry")
    worker.add_argument("--devices", default="", help="e.g. 0,1 or 0-3 (CPU: core ids)")
    worker.add_argument(
        "--replica", type=int, default=0, help="this replica's number, for logs (default: 0)"
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="messages held at once (default: what the engine runs at once)",
    )
    loglevel(worker)
    worker.set_defaults(func=cmd_worker)

    node = command(
        "node",
        "the node agent: offers this machine's devices and runs launched models",
        "inferq node --devices 0-15 --device-kind vacc",
        "inferq node --name gpu-2 --devices 0-7 --device-kind cuda --address 10.0.0.12",
    )
    node.add_argument("--name", help="default: INFERQ_NODE_NAME or the host name")
    node.add_argument("--devices", help="e.g. 0-15 (accelerators) or CPU core ids")
    node.add_argument("--device-kind", choices=["cpu", "cuda", "vacc"], help="default: cpu")
    node.add_argument("--address", help="how other hosts reach this one (default: detected)")
    loglevel(node)
    node.set_defaults(func=cmd_node)

    api = command("api", "serve the HTTP API", "inferq api --host 0.0.0.0 --port 9997")
    api.add_argument("--host", help="bind address (default: INFERQ_API_HOST, 127.0.0.1)")
    api.add_argument("--port", type=int, help="port (default: INFERQ_API_PORT, 9997)")
    loglevel(api)
    api.set_defaults(func=cmd_api)

    db = command(
        "db", "migrate the job database (Alembic)", "inferq db upgrade", "inferq db current"
    )
    db.add_argument("action", choices=["upgrade", "downgrade", "current"], help="what to do")
    db.add_argument("revision", nargs="?", help="default: head (upgrade), -1 (downgrade)")
    db.set_defaults(func=cmd_db)

    def api_flags(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument(
            "--api",
            help="the API's base URL, e.g. http://10.0.0.5:9997 (default: INFERQ_API_URL, "
            "else this host's INFERQ_API_HOST/PORT)",
        )
        cmd.add_argument(
            "--api-key", help="default: INFERQ_API_KEY, else the first of INFERQ_API_KEYS"
        )

    embed = command(
        "embed",
        "embed a whole file as a corpus job on the cluster",
        "inferq embed corpus.jsonl --model bge-m3 --out vectors.parquet",
        "inferq embed docs.csv --model bge-m3 --text-field body --id-field doc_id --out v.npy",
    )
    embed.add_argument("input", help="JSONL, CSV, Parquet, or plain text (one text per line)")
    embed.add_argument("--model", required=True, help="an embedding model the API serves")
    embed.add_argument("--out", required=True, help="output file: .jsonl, .parquet or .npy")
    embed.add_argument("--format", choices=["jsonl", "parquet", "npy"], help="default: --out's")
    embed.add_argument("--text-field", help="field holding the text (default: text)")
    embed.add_argument("--id-field", help="field holding the id (default: the row number)")
    embed.add_argument("--shard-size", type=int, help="texts per shard (default: the API's)")
    api_flags(embed)
    embed.set_defaults(func=cmd_embed)

    launch = command(
        "launch",
        "launch replicas of a model on nodes (via the API)",
        "inferq launch bge-m3 --replica 2",
        "inferq launch qwen3 --type chat --engine vllm --path /models/Qwen3-30B-A3B-FP8 "
        "--n-gpu 2 --option max_model_len=32768",
        "inferq launch --registry docker/registry/launched-only.yaml",
    )
    launch.add_argument("model", nargs="?", help="model name (a registry entry, or a new one)")
    launch.add_argument("--uid", help="the name clients call it by (default: the model name)")
    launch.add_argument(
        "--type", choices=["embedding", "rerank", "chat", "LLM"], help="default: the registry's"
    )
    launch.add_argument("--engine", help="e.g. vllm, sentence_transformers (default: registry's)")
    launch.add_argument("--path", help="model directory or file (or package:<module>/<sub>)")
    launch.add_argument("--replica", type=int, default=1, help="replicas to add (default: 1)")
    launch.add_argument("--n-gpu", type=int, help="devices per replica")
    launch.add_argument(
        "--devices",
        help="explicit devices, shared out over the replicas (or in groups of --n-gpu)",
    )
    launch.add_argument("--node", help="node name or address (xinference's worker_ip)")
    launch.add_argument(
        "--option",
        action="append",
        type=_option,
        metavar="KEY=VALUE",
        help="engine option, repeatable (e.g. --option max_model_len=8192)",
    )
    launch.add_argument("--registry", help="launch entries of this registry file as written")
    launch.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until every new replica serves (default: yes)",
    )
    launch.add_argument("--timeout", type=float, default=900.0, help="seconds --wait waits")
    api_flags(launch)
    launch.set_defaults(func=cmd_launch)

    terminate = command(
        "terminate",
        "stop a launched model, or one replica",
        "inferq terminate bge-m3",
        "inferq terminate bge-m3 --replica 3f2a9c1b",
    )
    terminate.add_argument("model", help="the model's uid")
    terminate.add_argument("--replica", help="one replica id (see `inferq list` / the API)")
    api_flags(terminate)
    terminate.set_defaults(func=cmd_terminate)

    listing = command(
        "list",
        "list models with replicas alive and wanted",
        "inferq list",
        "inferq list --json --api http://10.0.0.5:9997",
    )
    listing.add_argument("--json", action="store_true", help="the API's model entries as JSON")
    api_flags(listing)
    listing.set_defaults(func=cmd_list)

    flower = command(
        "flower", "Flower, the Celery monitor, with basic auth", "inferq flower --port 5555"
    )
    flower.add_argument("--port", type=int, help="default: INFERQ_FLOWER_PORT")
    flower.add_argument("--address", help="bind address (default: INFERQ_FLOWER_ADDRESS)")
    flower.set_defaults(func=cmd_flower)

    registry = command(
        "registry",
        "validate and list a model registry",
        "inferq registry",
        "inferq registry models.yaml",
    )
    registry.add_argument("file", nargs="?", help="default: INFERQ_REGISTRY, else the built-in")
    registry.set_defaults(func=cmd_registry)
    return parser


def _failure(exc: BaseException) -> str | None:
    """One line for a failure a person can act on (a service not reached, a setting that
    does not parse), rather than a traceback; None for a real bug."""
    import httpx
    import redis
    from pydantic import ValidationError

    if isinstance(exc, httpx.TransportError):
        try:
            url = str(exc.request.url)
        except RuntimeError:  # raised without its request
            url = "the API"
        return (
            f"cannot reach the API ({url}): {exc or type(exc).__name__}; "
            "set --api or INFERQ_API_URL"
        )
    if isinstance(exc, redis.RedisError):
        return f"cannot reach Redis: {exc} (INFERQ_REDIS_URL)"
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or exc.title
        return f"invalid setting INFERQ_{where.upper()}: {first.get('msg')}"
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _failure(exc)
        if message is None:
            raise
        print(f"inferq: {message}", file=sys.stderr)
        return 1
