"""The engine interface: small enough to read in one screen.

Engines work on token ids, not text: the worker token-counts every input once,
decides truncation and batching from those counts, and hands the engine
batches of ids. That keeps length accounting identical across engines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from app.batcher import Bucket, default_buckets

if TYPE_CHECKING:
    import numpy as np

    from app.protocol.chat import GenerationTask
    from app.registry import ModelSpec


class EmbeddingEngine(ABC):
    kind: ClassVar[str] = "embedding"
    #: Compiled-shape engines (VACC) must pad every batch to its bucket's length.
    pad_to_bucket: ClassVar[bool] = False

    #: Longest input the model accepts, special tokens included.
    max_tokens: int
    #: Native embedding width.
    dimensions: int
    #: Widths the model was trained to be cut to (Matryoshka), besides `dimensions`.
    matryoshka_dimensions: frozenset[int] = frozenset()
    #: Token ids must lie in [0, vocab_size).
    vocab_size: int

    @classmethod
    @abstractmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> EmbeddingEngine:
        """Load the model from `spec.resolved_path()` onto the pinned devices."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with the model's special tokens, not truncated."""

    @abstractmethod
    def add_special_tokens(self, ids: Sequence[int]) -> list[int]:
        """Wrap caller-supplied token ids the way `tokenize` wraps text."""

    @abstractmethod
    def truncate(self, ids: list[int], limit: int) -> list[int]:
        """Cut to `limit` tokens the way the model's tokenizer truncates (keeps end markers)."""

    def buckets(self, options: dict[str, Any]) -> list[Bucket]:
        """Sequence-length buckets: from the registry options for shape-free engines."""
        return default_buckets(
            self.max_tokens, int(options.get("batch_size", 32)), options.get("buckets", ())
        )

    @abstractmethod
    def embed(self, batch: Sequence[Sequence[int]], pad_to: int | None = None) -> np.ndarray:
        """float32 array [len(batch), dimensions], as the model itself would pool/normalise.

        `pad_to` pads every row to that length (compiled shapes, or to measure the cost
        of padding); by default rows are padded to the longest one.
        """


@dataclass(frozen=True)
class Pair:
    """A (query, document) pair as the model reads it."""

    ids: list[int]
    type_ids: list[int]


class RerankEngine(ABC):
    """A cross-encoder: scores (query, document) pairs directly."""

    kind: ClassVar[str] = "rerank"
    pad_to_bucket: ClassVar[bool] = False
    max_tokens: int

    @classmethod
    @abstractmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> RerankEngine: ...

    @abstractmethod
    def encode_pairs(
        self, query: str, documents: Sequence[str], truncate: bool
    ) -> tuple[list[Pair], list[int]]:
        """Tokenise every pair once; returns the pairs and the indices that were truncated.

        With `truncate` false an over-long pair is refused (`refuse_over_long`).
        """

    @abstractmethod
    def score(self, batch: Sequence[Pair], pad_to: int | None = None) -> np.ndarray:
        """Relevance per pair, float32 [len(batch)], after the model's activation."""

    def buckets(self, options: dict[str, Any]) -> list[Bucket]:
        return default_buckets(
            self.max_tokens, int(options.get("batch_size", 32)), options.get("buckets", ())
        )

    def refuse_over_long(self, index: int, length: int) -> None:
        from app.errors import InvalidRequest

        raise InvalidRequest(
            f"documents[{index}] with the query has {length} tokens, more than this model's "
            f"limit of {self.max_tokens}; send a shorter document or set truncate to true",
            param="documents",
            code="context_length_exceeded",
        )


@dataclass
class GenerationEvent:
    """One step of a generation: new text, and the running token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


def apply_chat_template(render: Callable[..., Any], **kwargs: Any) -> Any:
    """Render a model's chat template; a template that refuses the messages is a 400.

    Templates check what they are given (roles that must alternate, a system
    message they cannot place) and call `raise_exception`, which raises a Jinja
    TemplateError in transformers and a ValueError in llama-cpp-python: that is
    the request's fault, and the caller must hear why, not a 500.
    """
    from jinja2 import TemplateError

    try:
        return render(**kwargs)
    except (TemplateError, ValueError) as exc:
        from app.errors import InvalidRequest

        raise InvalidRequest(
            f"the model's chat template refused these messages: {exc}", param="messages"
        ) from None


class ChatEngine(ABC):
    """A text generator: chat messages through the model's own template, or a raw prompt."""

    kind: ClassVar[str] = "chat"
    #: Tokens the context holds: prompt and completion together.
    context_length: int
    #: Generations this engine runs at once; the worker holds as many messages.
    parallel: int = 1

    @classmethod
    @abstractmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> ChatEngine: ...

    @abstractmethod
    def prompt_tokens(self, task: GenerationTask) -> int:
        """Tokens the prompt takes, chat template applied."""

    @abstractmethod
    def generate(
        self, task: GenerationTask, should_stop: Callable[[], bool]
    ) -> Iterator[GenerationEvent]:
        """Yield text as it is generated; the last event carries the finish reason
        (`stop` or `length`). `should_stop` is polled every few tokens."""


class RelayEngine(ABC):
    """A chat engine that is a server of its own (vLLM's OpenAI server): the worker
    forwards each request body to it and passes its answer back as the server wrote
    it, so every field the server honours (tools, structured output, logprobs, `n`,
    its parsers) reaches the caller without inferq re-implementing it."""

    kind: ClassVar[str] = "chat"
    #: Requests the server runs at once; the worker holds as many messages.
    parallel: int
    #: The server's context, where the registry declares it.
    context_length: int | None
    #: Whether the server splits reasoning out (vLLM's `reasoning` -> `reasoning_content`).
    reasoning: bool
    relay: Any

    @classmethod
    @abstractmethod
    def load(cls, spec: ModelSpec, devices: list[str]) -> RelayEngine: ...

    @abstractmethod
    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Call `on_exit(reason)` if the server stops while it should be serving."""

    @abstractmethod
    def close(self) -> None:
        """Stop the server and everything it started."""
