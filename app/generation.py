"""Text generation as a chat worker does it: check the context, run the engine,
split reasoning from the answer, and hand pieces to the caller as they come."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.engines.base import ChatEngine
from app.errors import InvalidRequest
from app.protocol.chat import GenerationTask
from app.reasoning import ReasoningParser, Split


def check_context(prompt_tokens: int, max_tokens: int | None, context: int) -> None:
    """Refuse a prompt that does not fit, or a completion budget that cannot."""
    if prompt_tokens >= context:
        raise InvalidRequest(
            f"the prompt has {prompt_tokens} tokens; this model's context holds {context}",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > context:
        raise InvalidRequest(
            f"max_tokens {max_tokens} plus the prompt's {prompt_tokens} tokens exceed this "
            f"model's context of {context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )


class GenerationRunner:
    def __init__(self, engine: ChatEngine, reasoning_parser: str | None = None) -> None:
        self.engine = engine
        self.reasoning_parser = reasoning_parser

    def run(
        self,
        task: GenerationTask,
        should_stop: Callable[[], bool],
        emit: Callable[[dict[str, str]], None] | None = None,
    ) -> dict[str, Any]:
        check_context(self.engine.prompt_tokens(task), task.max_tokens, self.engine.context_length)
        parser = ReasoningParser(self.reasoning_parser) if self.reasoning_parser else None
        content: list[str] = []
        reasoning: list[str] = []
        finish, prompt_tokens, completion_tokens = "stop", 0, 0

        def take(piece: Split) -> None:
            if piece.reasoning:
                reasoning.append(piece.reasoning)
            if piece.content:
                content.append(piece.content)
            if emit and (piece.reasoning or piece.content):
                emit({"content": piece.content, "reasoning": piece.reasoning})

        for event in self.engine.generate(task, should_stop):
            prompt_tokens, completion_tokens = event.prompt_tokens, event.completion_tokens
            if event.text:
                take(parser.feed(event.text) if parser else Split(content=event.text))
            if event.finish_reason:
                finish = event.finish_reason
        if parser:
            take(parser.finish())
        return {
            "text": "".join(content),
            "reasoning": "".join(reasoning) if parser else None,
            "finish_reason": finish,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }


class StreamCoalescer:
    """Joins streamed pieces that come closer together than `window_s`.

    The first piece goes out at once (time to first token is what a reader
    feels); after it, pieces made within one window travel as one message.
    Each message costs a Redis publish, a JSON round and an SSE event in the
    API, which on a busy host is CPU taken from the engine. Pieces are only
    sent when the next one arrives or on `flush`, so nothing waits on a timer.
    """

    def __init__(self, emit: Callable[[dict[str, str]], None], window_s: float) -> None:
        self._emit = emit
        self._window = window_s
        self._last = float("-inf")
        self._content: list[str] = []
        self._reasoning: list[str] = []

    def add(self, delta: dict[str, str]) -> None:
        if delta.get("content"):
            self._content.append(delta["content"])
        if delta.get("reasoning"):
            self._reasoning.append(delta["reasoning"])
        if time.monotonic() - self._last >= self._window:
            self.flush()

    def flush(self) -> None:
        if not self._content and not self._reasoning:
            return
        self._emit({"content": "".join(self._content), "reasoning": "".join(self._reasoning)})
        self._content.clear()
        self._reasoning.clear()
        self._last = time.monotonic()
