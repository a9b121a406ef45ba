"""The single name -> engine table.

Each entry names the module that holds the engine, so choosing an engine never
imports torch, vLLM or vaststreamx until a worker actually loads it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.engines.base import ChatEngine, EmbeddingEngine, RelayEngine, RerankEngine
    from app.registry import ModelSpec

    Engine = EmbeddingEngine | RerankEngine | ChatEngine | RelayEngine


@dataclass(frozen=True)
class EngineEntry:
    target: str  # "module:Class"
    kinds: frozenset[str]
    device_kind: str  # "cpu", "cuda" or "vacc": how a worker pins its devices
    install_hint: str
    #: "module:function" checking a registry entry for this engine (no heavy imports).
    validator: str | None = None
    #: Other device kinds it also runs on (Vastai ships a vLLM build for VACC).
    also_runs_on: frozenset[str] = frozenset()
    #: The engine is an OpenAI server of its own that requests are forwarded to: it
    #: validates every chat field and names its own parsers (app/engines/base.py).
    relay: bool = False
    #: The registry option that says how many requests a replica runs at once, and its
    #: default: the worker holds that many messages.
    slots_option: str = "parallel"
    default_slots: int = 1
    #: Chat/completion request fields the engine honours; any other field a caller sets
    #: is a 400 naming it. Relay engines honour whatever their server does.
    honours: frozenset[str] = frozenset()

    #: "module:function" narrowing the device kinds for one model path (no heavy imports).
    path_kinds: str | None = None

    def kinds_for(self, path: str) -> tuple[str, ...]:
        """The device kinds a model at `path` can be placed on."""
        if self.path_kinds is None:
            return self.device_kinds
        module_name, _, func = self.path_kinds.partition(":")
        kinds: tuple[str, ...] = getattr(importlib.import_module(module_name), func)(
            path, self.device_kinds
        )
        return kinds

    def slots(self, options: dict[str, Any]) -> int:
        return max(1, int(options.get(self.slots_option, self.default_slots)))

    @property
    def device_kinds(self) -> tuple[str, ...]:
        return (self.device_kind, *sorted(self.also_runs_on))


#: What llama.cpp does of a chat/completion request (app/engines/llama_cpp.py); `n`
#: only at its neutral 1, so it is not listed.
LLAMA_CPP_FIELDS = frozenset(
    {
        *("model", "messages", "prompt", "stream", "stream_options", "user"),
        *("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop"),
        *("seed", "presence_penalty", "frequency_penalty", "repetition_penalty"),
        *("response_format", "chat_template_kwargs", "parallel_tool_calls"),
    }
)

ENGINES: dict[str, EngineEntry] = {
    # A bi-encoder; as a rerank model it scores by cosine similarity (app/rerank.py).
    "sentence_transformers": EngineEntry(
        "app.engines.sentence_transformers:SentenceTransformersEngine",
        frozenset({"embedding", "rerank"}),
        "cpu",
        "pip install 'inferq[cpu]'",
    ),
    "vacc": EngineEntry(
        "app.engines.vacc:load_vacc_engine",
        frozenset({"embedding", "rerank"}),
        "vacc",
        "run the worker in the Vastai VACC image, which ships vaststreamx",
    ),
    "llama_cpp": EngineEntry(
        "app.engines.llama_cpp:LlamaCppEngine",
        frozenset({"chat"}),
        "cpu",
        "pip install 'inferq[cpu]'",
        honours=LLAMA_CPP_FIELDS,
    ),
    "vllm": EngineEntry(
        "app.engines.vllm:VllmEngine",
        frozenset({"chat"}),
        "cuda",
        "install vLLM in a virtualenv of its own and name its interpreter in the "
        "registry (options.python), or run the worker in Vastai's VACC vLLM image",
        validator="app.engines.vllm:validate_spec",
        # Vastai ships a vLLM build for VACC; vLLM's CPU build runs on plain cores.
        also_runs_on=frozenset({"vacc", "cpu"}),
        relay=True,
        slots_option="max_num_seqs",
        default_slots=256,
        path_kinds="app.engines.vllm:device_kinds_for",
    ),
    "cross_encoder": EngineEntry(
        "app.engines.cross_encoder:CrossEncoderEngine",
        frozenset({"rerank"}),
        "cpu",
        "pip install 'inferq[cpu]'",
    ),
}


class EngineLoadError(RuntimeError):
    """The engine's library or model files are missing or broken."""


def load_engine(spec: ModelSpec, devices: list[str]) -> Engine:
    entry = ENGINES[spec.engine]
    module_name, _, class_name = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineLoadError(
            f"engine {spec.engine!r} needs a library that is not installed ({exc.name}); "
            f"install it with: {entry.install_hint}"
        ) from exc
    loader: Any = getattr(module, class_name)
    try:
        engine: Engine = (
            loader.load(spec, devices) if isinstance(loader, type) else loader(spec, devices)
        )
    except ImportError as exc:  # the engine's library, imported when the model loads
        raise EngineLoadError(
            f"engine {spec.engine!r} needs a library that is not installed "
            f"({exc.name or exc}); install it with: {entry.install_hint}"
        ) from exc
    return engine


def validate_for_engine(spec: ModelSpec) -> None:
    entry = ENGINES[spec.engine]
    if entry.validator:
        module_name, _, func = entry.validator.partition(":")
        getattr(importlib.import_module(module_name), func)(spec)
