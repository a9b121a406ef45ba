"""Inference answers encoded with orjson.

A `/v1/embeddings` answer is mostly numbers: the standard library's encoder spent
more time on one than the rest of the route did (bench/overhead.py). orjson writes
the same JSON (UTF-8, no NaN: it writes null) several times faster.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
