"""The cluster web page: `GET /` and its assets under `/ui/`.

The page itself needs no API key: it is static, and its script sends the key
the operator enters with every `/v1` call it makes.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import NotFound

STATIC = Path(__file__).resolve().parent.parent / "static"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}

#: Everything the page loads comes from here; nothing inline, nothing from elsewhere.
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(include_in_schema=False)


def _asset(name: str) -> FileResponse:
    path = STATIC / name
    media_type = MEDIA_TYPES.get(path.suffix)
    if media_type is None or path.parent != STATIC or not path.is_file():
        raise NotFound(f"no such file: /ui/{name}")
    return FileResponse(path, media_type=media_type, headers=HEADERS)


@router.get("/")
async def index() -> FileResponse:
    return _asset("index.html")


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    return _asset(name)
