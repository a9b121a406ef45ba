"""The model launch request, shaped like xinference's `POST /v1/models` where it maps."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from app.registry import ModelKind

#: xinference's model types and what they are here.
MODEL_TYPES: dict[str, ModelKind] = {
    "LLM": ModelKind.chat,
    "llm": ModelKind.chat,
    "chat": ModelKind.chat,
    "embedding": ModelKind.embedding,
    "rerank": ModelKind.rerank,
}


#: The most JSON bytes `model_options` may hold.
MAX_OPTIONS_BYTES = 16 * 1024

#: The most devices one range in `devices` may name (`0-3` names four).
MAX_DEVICES = 4096

#: What `devices` and `gpu_idx` accept, as the schema says it (see `_as_strings`).
DEVICES_SCHEMA = {
    "anyOf": [
        {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        {"type": "string", "description": "A device list such as `0,1` or `0-3`."},
        {"type": "integer"},
        {"type": "null"},
    ]
}
Devices = Annotated[list[str] | None, WithJsonSchema(DEVICES_SCHEMA)]
N_GPU_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 1, "maximum": 64},
        {"type": "string", "pattern": "^(auto|[0-9]+)$"},
        {"type": "null"},
    ]
}


class LaunchRequest(BaseModel):
    # Unknown fields are the engine keyword arguments xinference-client passes through
    # (`launch_model(..., max_model_len=8192)`): they join model_options.
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_uid: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
        max_length=128,
        description="The name clients call the model by; default: model_name.",
    )
    model_name: str = Field(min_length=1, max_length=128)
    model_type: Literal["LLM", "llm", "chat", "embedding", "rerank"] | None = None
    model_engine: str | None = None
    model_path: str | None = Field(default=None, max_length=4096)
    model_options: dict[str, Any] = Field(default_factory=dict)
    replica: int = Field(default=1, ge=1, le=256)
    n_gpu: Annotated[int | Literal["auto"] | None, WithJsonSchema(N_GPU_SCHEMA)] = Field(
        default=None, description="Devices per replica; 'auto' or none: the engine's default."
    )
    devices: Devices = Field(
        default=None, description="Explicit device ids, split into groups of n_gpu."
    )
    gpu_idx: Devices = Field(default=None, description="xinference's name for devices.")
    worker_ip: str | None = Field(default=None, description="A node name or address.")
    # Accepted from xinference clients; a local model path already says all of them.
    model_size_in_billions: int | str | None = None
    model_format: str | None = None
    quantization: str | None = None
    # What xinference-client's launch_model sends besides; `xinference_extras` says
    # which are honoured, ignored with a warning, or refused.
    n_worker: int | None = Field(default=None, ge=1, le=256)
    request_limits: int | None = Field(default=None, ge=1)
    peft_model_config: dict[str, Any] | None = None
    replica_config: list[dict[str, Any]] | None = None
    enable_thinking: bool | None = None
    enable_virtual_env: bool | None = None
    virtual_env_packages: list[str] | None = None
    virtual_env_find_links: list[str] | None = None
    envs: dict[str, str] | None = None

    @field_validator("devices", "gpu_idx", mode="before")
    @classmethod
    def _as_strings(cls, value: object) -> object:
        if isinstance(value, int):
            return [str(value)]
        if isinstance(value, str):
            from app.settings import parse_device_list

            for part in value.split(","):
                lo, dash, hi = (s.strip() for s in part.partition("-"))
                if not (dash and lo.isdigit() and hi.isdigit()):
                    continue
                if len(hi) > 9 or int(hi) - int(lo) >= MAX_DEVICES:
                    raise ValueError(f"a device range holds at most {MAX_DEVICES} devices")
            return parse_device_list(value)
        if isinstance(value, list):
            if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
                raise ValueError("device ids are strings or integers")
            return [str(v) for v in value]
        return value

    @field_validator("model_options")
    @classmethod
    def _bounded_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        # They travel to the node and into the worker's environment, which the kernel
        # bounds (a 200 KB option string would make the worker impossible to start).
        if len(json.dumps(value, default=str)) > MAX_OPTIONS_BYTES:
            raise ValueError(f"model_options hold at most {MAX_OPTIONS_BYTES} bytes of JSON")
        return value

    @model_validator(mode="after")
    def _engine_kwargs(self) -> LaunchRequest:
        extra = self.model_extra or {}
        if extra:
            given = {k: v for k, v in extra.items() if v is not None}  # null: not given
            self.model_options = {**given, **self.model_options}
            extra.clear()
            type(self)._bounded_options(self.model_options)
        return self

    @field_validator("n_gpu")
    @classmethod
    def _positive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("n_gpu must be between 1 and 64")
        return value

    @property
    def uid(self) -> str:
        return self.model_uid or self.model_name

    @property
    def kind(self) -> ModelKind | None:
        return MODEL_TYPES[self.model_type] if self.model_type else None

    @property
    def wanted_devices(self) -> list[str]:
        return list(self.devices or self.gpu_idx or [])

    @property
    def devices_per_replica(self) -> int | None:
        return self.n_gpu if isinstance(self.n_gpu, int) else None
