"""Reasoning split: the streaming parser, and recorded reasoning-model output run through
the same GenerationRunner a chat worker uses."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from app.engines.base import ChatEngine, GenerationEvent
from app.generation import GenerationRunner
from app.protocol.chat import GenerationTask
from app.reasoning import ReasoningParser, split_reasoning

# As DeepSeek-R1 writes it: its template opened <think> in the prompt already.
R1_OUTPUT = ["Okay, the user", " asks 2+2.", " That is 4.</th", "ink>\n\n", "The answer is **4**."]
# As Qwen3 writes it in thinking mode.
QWEN3_OUTPUT = ["<thi", "nk>\nLet me add: 2+2=4.\n", "</think>\n\n", "2 + 2 = 4."]


class RecordedEngine(ChatEngine):
    """Replays recorded model output piece by piece, as a real engine streams it."""

    context_length = 4096

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    @classmethod
    def load(cls, spec, devices):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def prompt_tokens(self, task: GenerationTask) -> int:
        return 7

    def generate(
        self, task: GenerationTask, should_stop: Callable[[], bool]
    ) -> Iterator[GenerationEvent]:
        for i, piece in enumerate(self.pieces, start=1):
            last = i == len(self.pieces)
            yield GenerationEvent(piece, 7, i, "stop" if last else None)


@pytest.mark.parametrize(
    ("parser", "pieces", "reasoning", "content"),
    [
        ("deepseek_r1", R1_OUTPUT, "Okay, the user asks 2+2. That is 4.", "The answer is **4**."),
        ("qwen3", QWEN3_OUTPUT, "\nLet me add: 2+2=4.\n", "2 + 2 = 4."),
        ("qwen3", ["No thinking here."], "", "No thinking here."),
    ],
)
def test_streamed_output_is_split_into_reasoning_and_content(
    parser: str, pieces: list[str], reasoning: str, content: str
) -> None:
    streamed: list[dict[str, str]] = []
    runner = GenerationRunner(RecordedEngine(pieces), reasoning_parser=parser)
    result = runner.run(GenerationTask(messages=[{"role": "user", "content": "2+2?"}]),
                        lambda: False, streamed.append)  # fmt: skip
    assert result["reasoning"] == reasoning
    assert result["text"] == content
    assert "".join(d["reasoning"] for d in streamed) == reasoning
    assert "".join(d["content"] for d in streamed) == content
    assert "<think>" not in result["text"] and "</think>" not in result["text"]
    assert result["completion_tokens"] == len(pieces)


def test_without_a_parser_everything_is_content() -> None:
    runner = GenerationRunner(RecordedEngine(QWEN3_OUTPUT))
    result = runner.run(GenerationTask(prompt="x"), lambda: False)
    assert result["reasoning"] is None
    assert result["text"] == "".join(QWEN3_OUTPUT)


def test_tags_split_at_every_position() -> None:
    text = "<think>abc</think>answer"
    for cut in range(1, len(text)):
        parser = ReasoningParser("qwen3")
        parts = [parser.feed(text[:cut]), parser.feed(text[cut:]), parser.finish()]
        assert "".join(p.reasoning for p in parts) == "abc"
        assert "".join(p.content for p in parts) == "answer"
    assert split_reasoning("deepseek_r1", "unfinished thought").reasoning == "unfinished thought"
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ReasoningParser("nope")


def test_stream_pieces_are_coalesced_after_the_first() -> None:
    from app.generation import StreamCoalescer

    sent: list[dict[str, str]] = []
    stream = StreamCoalescer(sent.append, window_s=60.0)
    stream.add({"content": "Hel", "reasoning": ""})
    assert sent == [{"content": "Hel", "reasoning": ""}]  # the first piece is never held
    stream.add({"content": "lo", "reasoning": ""})
    stream.add({"content": " world", "reasoning": "hmm"})
    assert len(sent) == 1
    stream.flush()
    assert sent[1] == {"content": "lo world", "reasoning": "hmm"}
    stream.flush()
    assert len(sent) == 2

    every: list[dict[str, str]] = []
    unbuffered = StreamCoalescer(every.append, window_s=0.0)
    for piece in ("a", "b", "c"):
        unbuffered.add({"content": piece})
    assert [d["content"] for d in every] == ["a", "b", "c"]
