"""Request size limits, checked in the API before anything is queued."""

from __future__ import annotations

from collections.abc import Sequence

from app.errors import PayloadTooLarge
from app.protocol.embeddings import EmbeddingInput
from app.settings import Settings


def check_input_limits(
    inputs: Sequence[EmbeddingInput], settings: Settings, param: str = "input"
) -> None:
    if len(inputs) > settings.max_inputs_per_request:
        raise PayloadTooLarge(
            f"{len(inputs)} {param} items in one request; the limit is "
            f"{settings.max_inputs_per_request} (INFERQ_MAX_INPUTS_PER_REQUEST)",
            param=param,
        )
    for i, item in enumerate(inputs):
        if len(item) > settings.max_input_chars:
            unit = "characters" if isinstance(item, str) else "tokens"
            raise PayloadTooLarge(
                f"{param}[{i}] has {len(item)} {unit}; the limit is {settings.max_input_chars} "
                "(INFERQ_MAX_INPUT_CHARS)",
                param=param,
            )
