"""Counting a chat prompt's tokens without the model, so the API can refuse a prompt
that does not fit before it is queued.

Only the tokenizer is loaded (for GGUF files, llama.cpp's vocabulary-only mode),
never the weights. Engines without a local tokenizer return None and the
worker checks instead.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from app.errors import InvalidRequest
from app.protocol.chat import GenerationTask
from app.registry import ModelSpec


class PromptSizer:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._vocab: Any = None
        self._template: Any = None
        self.context_length = int(spec.options.get("n_ctx", 4096))

    def count(self, task: GenerationTask) -> int:
        from app.engines.llama_cpp import add_bos_token, chat_template

        with self._lock:
            if self._vocab is None:
                from llama_cpp import Llama

                self._vocab = Llama(str(self.spec.resolved_path()), vocab_only=True, verbose=False)
                self._template = chat_template(self._vocab)
            if task.messages is not None:
                try:
                    formatted = self._template(
                        messages=task.messages, **(task.chat_template_kwargs or {})
                    )
                except Exception as exc:  # the template's raise_exception, a Jinja error
                    raise InvalidRequest(
                        f"the model's chat template cannot render these messages: {exc}",
                        param="messages",
                        code="chat_template_error",
                    ) from None
                return len(
                    self._vocab.tokenize(
                        formatted.prompt.encode("utf-8"),
                        add_bos=not formatted.added_special,
                        special=True,
                    )
                )
            assert task.prompt is not None
            return len(
                self._vocab.tokenize(
                    task.prompt.encode("utf-8"), add_bos=add_bos_token(self._vocab)
                )
            )


def sizer_for(spec: ModelSpec) -> PromptSizer | None:
    """None where this host cannot count: the engine has no local tokenizer, or the GGUF
    file lives only on the worker's host (docker/README.md's multi-host layout). The
    worker then counts, and refuses a prompt its context cannot hold as a 400."""
    if spec.engine != "llama_cpp":
        return None
    try:
        if not spec.resolved_path().is_file():
            return None
    except (OSError, ImportError, ValueError):  # a package: path whose package is absent
        return None
    return PromptSizer(spec)


#: How long "no GGUF file here" is believed before the path is looked at again.
ABSENT_RECHECK_S = 30.0


class PromptSizers:
    """One sizer per model as it is configured now: a model launched again under the
    same name with another file or context gets a new sizer, not the old one."""

    def __init__(self) -> None:
        self._sizers: dict[str, tuple[str, float, PromptSizer | None]] = {}

    def get(self, spec: ModelSpec) -> PromptSizer | None:
        identity = json.dumps([spec.engine, spec.path, spec.options], sort_keys=True, default=str)
        known = self._sizers.get(spec.name)
        now = time.monotonic()
        fresh = known is not None and (known[2] is not None or now - known[1] < ABSENT_RECHECK_S)
        if known is not None and known[0] == identity and fresh:
            return known[2]
        sizer = sizer_for(spec)
        self._sizers[spec.name] = (identity, now, sizer)
        return sizer
