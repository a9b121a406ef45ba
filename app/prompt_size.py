"""Counting a chat prompt's tokens without the model, so the API can refuse a prompt
that does not fit before it is queued.

Only the tokenizer is loaded (for GGUF files, llama.cpp's vocabulary-only mode),
never the weights. Engines without a local tokenizer return None and the
worker checks instead.
"""

from __future__ import annotations

import threading
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
    if spec.engine == "llama_cpp":
        return PromptSizer(spec)
    return None
