"""Bounds on request values that no schema type states by itself.

JSON numbers have no size limit and Python's integers none either: without a
bound, a 4000-digit `max_tokens` would pass validation and reach code (and C
libraries) that cannot hold it. The bounds are the widest any client needs.

Names and ids that end up in the job store's text columns must not hold NUL:
PostgreSQL cannot store one, nor even compare a column with one, so such a
value would fail as a server error instead of a 400 or 404.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field

INT32_MAX = 2**31 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not hold a NUL character")
    return value


def stored_text(max_length: int | None = None) -> Any:
    """A string stored in or looked up in the job store: any text but NUL, and at most
    `max_length` characters where its column has a width."""
    return Annotated[
        str,
        Field(max_length=max_length, json_schema_extra={"pattern": "^[^\\u0000]*$"}),
        AfterValidator(_no_nul),
    ]


StoredText = stored_text()
