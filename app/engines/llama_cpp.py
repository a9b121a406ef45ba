"""Chat on CPU with llama.cpp from a local GGUF file (default: SmolLM2-135M-Instruct Q4_1).

The chat template is the model's own, read from the GGUF metadata and applied
exactly as llama-cpp-python's `create_chat_completion` applies it, so a reply
equals what the library gives in-process with the same seed and settings.
llama.cpp contexts are single-threaded: `parallel: N` opens N contexts (the
weights are memory-mapped once) and the worker serves N generations at once.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from app.engines.base import ChatEngine, GenerationEvent, apply_chat_template
from app.errors import InvalidRequest
from app.reasoning import partial_suffix

if TYPE_CHECKING:
    from app.protocol.chat import GenerationTask
    from app.registry import ModelSpec

#: Poll for cancellation every this many generated pieces.
CANCEL_CHECK_EVERY = 4


class LlamaCppEngine(ChatEngine):
    def __init__(self, contexts: list[Any], template: Any, add_bos: bool) -> None:
        self._free: queue.Queue[Any] = queue.Queue()
        for ctx in contexts:
            self._free.put(ctx)
        self._sizer = contexts[0]
        self._template = template
        self._add_bos = add_bos
        self.context_length = int(contexts[0].n_ctx())
        self.parallel = len(contexts)

    @classmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> LlamaCppEngine:
        from llama_cpp import Llama

        path = spec.resolved_path()
        if not path.is_file():
            raise FileNotFoundError(f"model {spec.name!r}: GGUF file {path} does not exist")
        options = spec.options
        threads = int(options.get("threads", 0)) or len(devices) or os.cpu_count() or 1
        contexts = [
            Llama(
                str(path),
                n_ctx=int(options.get("n_ctx", 4096)),
                n_threads=threads,
                n_batch=int(options.get("n_batch", 512)),
                verbose=False,
            )
            for _ in range(int(options.get("parallel", 1)))
        ]
        return cls(contexts, chat_template(contexts[0]), add_bos_token(contexts[0]))

    def _chat_prompt(self, task: GenerationTask) -> tuple[list[int], list[str], Any]:
        assert task.messages is not None
        formatted = apply_chat_template(
            self._template, messages=task.messages, **(task.chat_template_kwargs or {})
        )
        tokens = self._sizer.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop]
        return tokens, [s for s in stops if s], formatted.stopping_criteria

    def _tokens(self, task: GenerationTask) -> tuple[list[int], list[str], Any]:
        if task.messages is not None:
            return self._chat_prompt(task)
        assert task.prompt is not None
        return self._sizer.tokenize(task.prompt.encode("utf-8"), add_bos=self._add_bos), [], None

    def prompt_tokens(self, task: GenerationTask) -> int:
        return len(self._tokens(task)[0])

    def generate(
        self, task: GenerationTask, should_stop: Callable[[], bool]
    ) -> Iterator[GenerationEvent]:
        tokens, template_stops, criteria = self._tokens(task)
        room = self.context_length - len(tokens)
        if room <= 0:
            raise InvalidRequest(
                f"the prompt has {len(tokens)} tokens; this model's context holds "
                f"{self.context_length}",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = min(task.max_tokens or room, room)
        llm = self._free.get()
        try:
            yield from self._run(
                llm, task, tokens, template_stops, criteria, max_tokens, should_stop
            )
        finally:
            self._free.put(llm)

    def _run(
        self,
        llm: Any,
        task: GenerationTask,
        prompt: list[int],
        template_stops: list[str],
        criteria: Any,
        max_tokens: int,
        should_stop: Callable[[], bool],
    ) -> Iterator[GenerationEvent]:
        """The token loop of llama-cpp-python's own completion, with exact token counts.

        Same sampler settings as `Llama.create_completion`, so the same seed gives the
        same tokens; text is released only when it is whole UTF-8 and cannot be the
        start of a stop sequence.
        """
        import random

        from llama_cpp import llama_vocab_is_eog

        stops = [*task.stop, *template_stops]
        llm.set_seed(task.seed if task.seed is not None else random.randint(0, 2**31))
        generated: list[int] = []
        sent = 0  # characters of the completion already handed out
        finish = "length"
        text = ""
        for token in llm.generate(
            prompt,
            top_k=40 if task.top_k is None else task.top_k,
            top_p=1.0 if task.top_p is None else task.top_p,
            min_p=0.05,
            typical_p=1.0,
            temp=1.0 if task.temperature is None else task.temperature,
            tfs_z=1.0,
            repeat_penalty=1.0 if task.repetition_penalty is None else task.repetition_penalty,
            frequency_penalty=task.frequency_penalty or 0.0,
            presence_penalty=task.presence_penalty or 0.0,
            stopping_criteria=criteria,
            grammar=json_grammar(task.json_schema) if task.json_mode else None,
        ):
            if llama_vocab_is_eog(llm._model.vocab, token):
                finish = "stop"
                break
            generated.append(token)
            raw = llm.detokenize(generated, prev_tokens=prompt)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                if len(generated) >= max_tokens:
                    break
                continue  # a character split across tokens: wait for the rest
            cut = _first_stop(text, stops)
            if cut is not None:
                text = text[:cut]
                finish = "stop"
                break
            if len(generated) >= max_tokens:
                break
            hold = max((partial_suffix(text, s) for s in stops), default=0)
            if len(text) - hold > sent:
                yield GenerationEvent(text[sent : len(text) - hold], len(prompt), len(generated))
                sent = len(text) - hold
            if len(generated) % CANCEL_CHECK_EVERY == 0 and should_stop():
                return
        else:
            finish = "stop"  # a stopping criterion (the template's end token) ended it
        if len(generated) >= max_tokens and finish != "stop":
            finish = "length"
        final = llm.detokenize(generated, prev_tokens=prompt).decode("utf-8", errors="ignore")
        if finish == "stop":
            cut = _first_stop(final, stops)
            final = final[:cut] if cut is not None else final
        yield GenerationEvent(final[sent:], len(prompt), len(generated), finish)


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def chat_template(llm: Any) -> Any:
    """The GGUF's own chat template, as llama-cpp-python's chat handler builds it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("this GGUF file carries no chat template")

    def token(key: str) -> str:
        index = llm.metadata.get(key)
        return llm._model.token_get_text(int(index)) if index is not None else ""

    return Jinja2ChatFormatter(
        template=template,
        eos_token=token("tokenizer.ggml.eos_token_id"),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        stop_token_ids=[llm.token_eos()],
    )


def add_bos_token(llm: Any) -> bool:
    return str(llm.metadata.get("tokenizer.ggml.add_bos_token", "true")).lower() == "true"


def json_grammar(schema: dict[str, Any] | None = None) -> Any:
    """Any JSON value, or with a schema, JSON that satisfies it (llama.cpp's grammar
    from the schema; a schema it cannot turn into one is the caller's 400)."""
    import json

    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if schema is None:
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    try:
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception as exc:
        raise InvalidRequest(
            f"response_format.json_schema cannot be used: {exc}",
            param="response_format.json_schema.schema",
        ) from None
