"""Chat on NVIDIA GPUs with vLLM, and on VACC cards through Vastai's vLLM build.

vLLM batches continuously inside one engine, so a worker feeds it many
generations at once: the worker's concurrency is `max_num_seqs`, each task
thread submits its request to one AsyncLLMEngine running on an event loop in
a background thread, and reads the pieces back through a thread-safe queue.

vLLM is imported only when a worker loads the engine. It does not run on the
CPU machines inferq is tested on; the registry rules, the engine arguments and
the sampling parameters below are plain Python and tested there.
"""

from __future__ import annotations

import asyncio
import queue
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from app.engines.base import ChatEngine, GenerationEvent, apply_chat_template

if TYPE_CHECKING:
    from app.protocol.chat import GenerationTask
    from app.registry import ModelSpec

#: Model directories of the vendor's deployment guide -> the served model name it uses.
FAMILIES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"deepseek-v3(-0324|\.1)?([-_].*)?$", re.I), "deepseek-v3"),
    (re.compile(r"deepseek-r1(-0528)?([-_].*)?$", re.I), "deepseek-r1"),
    (re.compile(r"qwen3-30b-a3b(-(instruct|thinking)-2507)?-fp8$", re.I), "qwen3"),
]
DEEPSEEK_TP = 32
DEEPSEEK_MAX_MODEL_LEN = 65536
QWEN3_TP = (2, 4)

#: Registry options passed straight to vLLM's engine arguments.
ENGINE_OPTIONS = (
    "max_model_len",
    "dtype",
    "quantization",
    "gpu_memory_utilization",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "trust_remote_code",
    "enforce_eager",
    "kv_cache_dtype",
)


def family_of(path: str) -> str | None:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return next((family for pattern, family in FAMILIES if pattern.match(name)), None)


def validate_spec(spec: ModelSpec) -> None:
    """The vendor guide's rules for the models it ships; raises ValueError naming the rule."""
    family = family_of(spec.path)
    if family is None:
        return
    if spec.name != family:
        raise ValueError(f"a {family} model directory is served under the name {family!r}")
    tps = {p.tp for p in spec.placements}
    max_len = spec.options.get("max_model_len")
    if family in ("deepseek-v3", "deepseek-r1"):
        if tps != {DEEPSEEK_TP}:
            raise ValueError(f"{family} runs with tp {DEEPSEEK_TP}, not {sorted(tps)}")
        if max_len is None or int(max_len) > DEEPSEEK_MAX_MODEL_LEN:
            raise ValueError(
                f"{family} needs options.max_model_len of at most {DEEPSEEK_MAX_MODEL_LEN}"
            )
    elif not tps <= set(QWEN3_TP):
        raise ValueError(f"qwen3 (30B-A3B FP8) runs with tp 2 or 4, not {sorted(tps)}")


def engine_args(spec: ModelSpec, devices: list[str]) -> dict[str, Any]:
    """vLLM engine arguments for one replica on `devices` (its tensor-parallel group)."""
    options = spec.options
    args: dict[str, Any] = {
        "model": str(spec.resolved_path()),
        "served_model_name": spec.name,
        "tensor_parallel_size": max(1, len(devices)),
    }
    args.update({key: options[key] for key in ENGINE_OPTIONS if key in options})
    mtp = options.get("mtp")
    if mtp:  # DeepSeek multi-token prediction as vLLM's speculative decoding
        args["speculative_config"] = {"method": "deepseek_mtp", "num_speculative_tokens": int(mtp)}
    if "speculative_config" in options:
        args["speculative_config"] = dict(options["speculative_config"])
    return args


def sampling_args(task: GenerationTask, max_tokens: int) -> dict[str, Any]:
    """vLLM SamplingParams fields for a request (OpenAI defaults where it gave none)."""
    args: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if task.temperature is None else task.temperature,
        "top_p": 1.0 if task.top_p is None else task.top_p,
        "stop": list(task.stop),
        "presence_penalty": task.presence_penalty or 0.0,
        "frequency_penalty": task.frequency_penalty or 0.0,
    }
    if task.seed is not None:
        args["seed"] = task.seed
    return args


class VllmEngine(ChatEngine):
    def __init__(self, engine: Any, tokenizer: Any, loop: asyncio.AbstractEventLoop,
                 context_length: int, parallel: int) -> None:  # fmt: skip
        self._engine = engine
        self._tokenizer = tokenizer
        self._loop = loop
        self.context_length = context_length
        self.parallel = parallel

    @classmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> VllmEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.engine.async_llm_engine import AsyncLLMEngine

        args = engine_args(spec, devices)
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="inferq-vllm-loop", daemon=True).start()

        async def build() -> Any:
            return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**args))

        engine = asyncio.run_coroutine_threadsafe(build(), loop).result()
        tokenizer = asyncio.run_coroutine_threadsafe(engine.get_tokenizer(), loop).result()
        config = asyncio.run_coroutine_threadsafe(engine.get_model_config(), loop).result()
        return cls(engine, tokenizer, loop, int(config.max_model_len),
                   int(spec.options.get("max_num_seqs", 64)))  # fmt: skip

    def _prompt(self, task: GenerationTask) -> str:
        if task.messages is None:
            assert task.prompt is not None
            return task.prompt
        return str(
            apply_chat_template(
                self._tokenizer.apply_chat_template,
                conversation=task.messages,
                tokenize=False,
                add_generation_prompt=True,
                **(task.chat_template_kwargs or {}),
            )
        )

    def prompt_tokens(self, task: GenerationTask) -> int:
        return len(self._tokenizer.encode(self._prompt(task), add_special_tokens=False))

    def generate(
        self, task: GenerationTask, should_stop: Callable[[], bool]
    ) -> Iterator[GenerationEvent]:
        from vllm import SamplingParams

        prompt = self._prompt(task)
        prompt_len = self.prompt_tokens(task)
        params = SamplingParams(
            **sampling_args(task, task.max_tokens or self.context_length - prompt_len)
        )
        request_id = uuid.uuid4().hex
        pieces: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async for output in self._engine.generate(prompt, params, request_id):
                    pieces.put(output)
            except Exception as exc:
                pieces.put(exc)
            pieces.put(None)

        asyncio.run_coroutine_threadsafe(pump(), self._loop)
        sent = 0
        steps = 0
        while (output := pieces.get()) is not None:
            if isinstance(output, Exception):
                raise output
            choice = output.outputs[0]
            steps += 1
            yield GenerationEvent(choice.text[sent:], prompt_len, len(choice.token_ids),
                                  choice.finish_reason if output.finished else None)  # fmt: skip
            sent = len(choice.text)
            if steps % 4 == 0 and should_stop():
                asyncio.run_coroutine_threadsafe(self._engine.abort(request_id), self._loop)
                return
