"""Domain errors and the one table that maps them to HTTP status and OpenAI error JSON.

Engines raise their own exceptions; the worker turns those into these errors;
the API turns these into `{"error": {...}}` with the status chosen here and
nowhere else. Errors cross from worker to API as plain dicts (`to_wire`).
"""

from __future__ import annotations

from typing import Any, ClassVar


class InferqError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "message": self.message,
            "param": self.param,
            "code": self.code,
        }

    def to_openai(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    @staticmethod
    def from_wire(data: dict[str, Any]) -> InferqError:
        cls = ERROR_KINDS.get(str(data.get("kind")), InferqError)
        return cls(str(data.get("message", "")), param=data.get("param"), code=data.get("code"))


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error object, with the message again as `detail`: Xinference's clients
    (xinference-client, Dify, RAGFlow) read `detail`, the `openai` client reads `error`."""
    return {
        "error": {"message": message, "type": kind, "param": param, "code": code},
        "detail": message,
    }


class InvalidRequest(InferqError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(InferqError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class NotFound(InferqError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(InferqError):
    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class Conflict(InferqError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(InferqError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class BodyTimedOut(InferqError):
    """The request's body did not arrive in time (a stalled or trickling client)."""

    status = 408
    type = "invalid_request_error"
    default_code = "body_timeout"


class PermissionDenied(InferqError):
    status = 403
    type = "permission_error"
    default_code = "insufficient_scope"


class Overloaded(InferqError):
    """Too much waiting work; the caller should come back after `retry_after` seconds."""

    status = 429
    type = "rate_limit_error"
    default_code = "overloaded"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float = 1.0,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class ModelUnavailable(InferqError):
    status = 503
    type = "service_unavailable"
    default_code = "model_unavailable"


class BackendUnavailable(InferqError):
    status = 503
    type = "service_unavailable"
    default_code = "backend_unavailable"


def job_store_unavailable() -> BackendUnavailable:
    """The 503 for anything that needs the job database while it cannot be reached."""
    return BackendUnavailable(
        "the job database is unreachable (async jobs, files and batches are unavailable); "
        "try again shortly",
        code="job_store_unavailable",
    )


class RequestTimedOut(InferqError):
    status = 504
    type = "timeout"
    default_code = "request_timeout"


class RequestCancelled(InferqError):
    """The caller went away or cancelled: the answer has no reader (nginx's 499)."""

    status = 499
    type = "request_cancelled"
    default_code = "cancelled"


class EngineFailure(InferqError):
    status = 500
    type = "server_error"
    default_code = "engine_error"


ERROR_KINDS: dict[str, type[InferqError]] = {
    cls.__name__: cls
    for cls in (
        InferqError,
        InvalidRequest,
        AuthenticationFailed,
        PermissionDenied,
        NotFound,
        ModelNotFound,
        Conflict,
        PayloadTooLarge,
        BodyTimedOut,
        Overloaded,
        ModelUnavailable,
        BackendUnavailable,
        RequestTimedOut,
        RequestCancelled,
        EngineFailure,
    )
}


def backend_reason(exc: BaseException) -> str:
    """What a client may be told of a Redis or database failure: its kind, never the
    driver's text (it names hosts, ports, users and statements; that goes to the log)."""
    name = type(exc).__name__.lower()
    if "timeout" in name:
        return "it did not answer in time"
    if "auth" in name or "permission" in name or "password" in name:
        return "it refused inferq's credentials"
    if "connection" in name or "operational" in name or isinstance(exc, OSError):
        return "the connection failed"
    return "it failed"
