"""Reading uploaded line files with a bound on each line's length.

A file's line may be gigabytes long (hostile or broken input); `readline()`
would hold all of it in memory. Here a line longer than the bound is skipped
in pieces and reported as too long instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

#: How much of an over-long line is read at a time while skipping it.
_SKIP_CHUNK = 1024 * 1024


class LineTooLong:
    """Stands for a line over the bound: its length is known, its content was not kept."""

    def __init__(self, size: int) -> None:
        self.size = size


def bounded_lines(handle: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | LineTooLong]]:
    """(line number from 1, the line's bytes or LineTooLong) for every line."""
    number = 0
    while True:
        raw = handle.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) <= limit or (raw.endswith(b"\n") and len(raw) == limit + 1):
            yield number, raw
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):
            raw = handle.readline(_SKIP_CHUNK)
            if not raw:
                break
            size += len(raw)
        yield number, LineTooLong(size)
