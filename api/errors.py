"""Every failure leaves the API as OpenAI error JSON; statuses come from app/errors.py."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import AuthenticationFailed, InferqError, InvalidRequest, Overloaded

log = logging.getLogger(__name__)


def error_response(exc: InferqError, headers: dict[str, str] | None = None) -> JSONResponse:
    if isinstance(exc, Overloaded):
        # Whole seconds, as HTTP wants them; the openai client honours this header.
        headers = {**(headers or {}), "Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if isinstance(exc, AuthenticationFailed):
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(exc.to_openai(), status_code=exc.status, headers=headers)


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and first.get("type") == "model_attributes_type":
        return "the request body must be a JSON object (Content-Type: application/json)", None
    msg = msg.removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InferqError)
    async def _domain(_: Request, exc: InferqError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return error_response(InvalidRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {
            "error": {
                "message": str(exc.detail),
                "type": kind,
                "param": None,
                "code": {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
            }
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = {
            "error": {
                "message": "internal error",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=500)
