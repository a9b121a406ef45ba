"""The response shape shared by the list endpoints."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


def list_page(data: list[dict[str, Any]], has_more: bool) -> JSONResponse:
    """OpenAI's cursor page: pass `last_id` back as `after` for the next one."""
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )
