"""Every failure leaves the API as OpenAI error JSON; statuses come from app/errors.py."""

from __future__ import annotations

import logging
import math
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from app.db import unreachable
from app.errors import (
    AuthenticationFailed,
    InferqError,
    InvalidRequest,
    Overloaded,
    error_body,
    job_store_unavailable,
)

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object: what every refusal and failure answers with; `detail`
    repeats the message for clients of Xinference's API, which read that."""

    error: ErrorDetail
    detail: str


def _documented(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


#: The error statuses of the /v1 routes, documented in the OpenAPI schema with the
#: one body they all carry (`include_router(..., responses=ERROR_RESPONSES)`).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented("Invalid request: malformed JSON, wrong types, unsupported values"),
    401: _documented("No API key, or a wrong one (when INFERQ_API_KEYS is set)"),
    403: _documented("The API key lacks the scope this route needs"),
    404: _documented("Unknown model, job, file, batch or route"),
    408: _documented("The request body did not arrive within INFERQ_BODY_TIMEOUT_S"),
    409: _documented("Conflicting state: a reused Idempotency-Key, a finished job"),
    413: _documented("Too large: the body, the number of inputs, or one input"),
    429: _documented("Overloaded: retry after the Retry-After header's seconds"),
    503: _documented("No live replica, or Redis or the job store is unreachable"),
    504: _documented("No answer within the request timeout"),
}


class BodyRejected(StarletteHTTPException):
    """A request body refused while it streams in (api/request_guard.py).

    Raised from `receive`, so it is an HTTPException: FastAPI passes those on from
    its body reading to the handlers below instead of calling them parse errors.
    The connection is closed after the answer, since the body's rest is never read.
    """

    def __init__(self, error: InferqError) -> None:
        super().__init__(error.status, error.message, headers={"Connection": "close"})
        self.error = error


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
    if not loc and first.get("type") == "missing":
        return "the request body is missing: send a JSON object", None
    if not loc and first.get("type") == "model_attributes_type":
        return "the request body must be a JSON object (Content-Type: application/json)", None
    msg = msg.removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def _unparsable_body(cause: BaseException | None) -> str:
    """Why FastAPI could not read a body it calls only "an error parsing the body"."""
    if isinstance(cause, UnicodeDecodeError):
        return "the request body is not valid UTF-8 JSON"
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON: it is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        # Python converts integers of at most 4300 digits (sys.get_int_max_str_digits).
        return "the request body is not valid JSON: a number in it has too many digits"
    if isinstance(cause, ValueError):
        return "the request body is not valid JSON"
    return "the request body could not be read"


def _allowed_methods(request: Request, given: str | None) -> str | None:
    """Every method the request's path takes, from the app's OpenAPI paths. Starlette's
    own 405 names only the first route that matched, though GET and POST of one path
    are two routes here. Paths outside the schema keep Starlette's answer."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern, _, _ = compile_path(template)
        if pattern.match(request.url.path):
            methods |= {method.upper() for method in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods)) if methods else given


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InferqError)
    async def _domain(_: Request, exc: InferqError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return error_response(InvalidRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyRejected):
            return error_response(exc.error, headers=exc.headers)
        headers = exc.headers
        if exc.status_code == 405:
            allow = _allowed_methods(request, (headers or {}).get("Allow"))
            headers = {**(headers or {}), **({"Allow": allow} if allow else {})}
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = _unparsable_body(exc.__cause__)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        body = error_body(message, kind, None, code)
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(sqlalchemy.exc.SQLAlchemyError)
    async def _database(request: Request, exc: sqlalchemy.exc.SQLAlchemyError) -> JSONResponse:
        """Any route that reaches the job store (jobs, files, batches, corpus jobs) answers
        503 while the database is away, with the detail only in the log; other database
        errors are server errors."""
        if unreachable(exc):
            log.warning("the job database is unreachable: %s", exc)
            return error_response(job_store_unavailable())
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal error", "server_error", None, None), 500)

    _document_errors_as_raised(app)


def _document_errors_as_raised(app: FastAPI) -> None:
    """Drop FastAPI's default `422 HTTPValidationError` from the OpenAPI schema.

    The handler above answers validation errors with 400 and OpenAI error JSON, so
    that entry would describe a response no route gives; ERROR_RESPONSES documents
    the real ones.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        default_422 = "#/components/schemas/HTTPValidationError"
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                content = responses.get("422", {}).get("content", {})
                ref = content.get("application/json", {}).get("schema", {}).get("$ref")
                if ref == default_422:
                    del responses["422"]
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
