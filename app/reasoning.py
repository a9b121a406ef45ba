"""Splitting a reasoning model's output into reasoning and answer.

DeepSeek-R1 and Qwen3 (thinking) write their reasoning between `<think>` and
`</think>`. DeepSeek-R1's chat template already opens the `<think>` block in
the prompt, so its output may start inside the reasoning with no opening tag;
Qwen3 with thinking switched off writes no tags at all. The parser works on a
stream of text pieces: a tag may arrive split across pieces, so a possible
partial tag is held back until the next piece decides it.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN = "<think>"
CLOSE = "</think>"

#: parser name -> whether output may begin inside the reasoning without `<think>`
PARSERS: dict[str, bool] = {"deepseek_r1": True, "qwen3": False}


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    def __init__(self, name: str) -> None:
        if name not in PARSERS:
            raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(PARSERS)}")
        self._implicit_open = PARSERS[name]
        self._state = "start"  # start -> thinking -> answer
        self._pending = ""

    def feed(self, text: str) -> Split:
        out = Split()
        buf = self._pending + text
        self._pending = ""
        while buf:
            if self._state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(OPEN):
                    buf = stripped[len(OPEN) :]
                    self._state = "thinking"
                elif OPEN.startswith(stripped):
                    self._pending = buf  # could still become "<think>"
                    return out
                elif self._implicit_open:
                    self._state = "thinking"
                else:
                    self._state = "answer"
            elif self._state == "thinking":
                end = buf.find(CLOSE)
                if end >= 0:
                    out.reasoning += buf[:end]
                    buf = buf[end + len(CLOSE) :].lstrip("\n")
                    self._state = "answer"
                    continue
                keep = partial_suffix(buf, CLOSE)
                out.reasoning += buf[: len(buf) - keep]
                self._pending = buf[len(buf) - keep :]
                return out
            else:
                out.content += buf
                return out
        return out

    def finish(self) -> Split:
        """Whatever was held back, once the stream has ended."""
        rest, self._pending = self._pending, ""
        if self._state == "thinking":
            return Split(reasoning=rest)
        return Split(content=rest)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_reasoning(name: str, text: str) -> Split:
    parser = ReasoningParser(name)
    first, last = parser.feed(text), parser.finish()
    return Split(first.reasoning + last.reasoning, first.content + last.content)
