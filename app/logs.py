"""Log lines an operator can follow one request through: the request id on every line
written while a request is handled (in the API and in the worker that serves it), and
JSON lines on request (`INFERQ_LOG_FORMAT=json`) for log collectors.

The id lives in a context variable, so it follows the request through `await`s in
the API and stays with its task thread in the worker (Celery's threads pool).
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("inferq_request_id", default=None)
#: The task message header that carries it from the API to the worker.
TRACE_HEADER = "inferq_trace"

#: What a caller's `X-Request-Id` may be: a token that cannot forge log lines.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(threadName)s %(message)s"


def request_id_from(header: str | None) -> str:
    """The caller's id if it is a plain token, else a fresh one."""
    if header and REQUEST_ID_PATTERN.fullmatch(header):
        return header
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(JSON_FIELDS, rename_fields={"asctime": "time", "levelname": "level"})
    return logging.Formatter(TEXT_FORMAT)


def install(handlers: list[logging.Handler], log_format: str) -> None:
    """Give existing handlers (Celery's, uvicorn's) the request id and the format."""
    for handler in handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
        handler.setFormatter(formatter(log_format))


def configure(log_format: str, level: int = logging.INFO) -> None:
    """In a process whose root logger has no handler yet (uvicorn configures only its own
    loggers): one stderr handler there, which uvicorn's loggers write through too.
    A process that set up logging itself (a test run) is left as it is."""
    root = logging.getLogger()
    if root.handlers:
        return
    root.addHandler(logging.StreamHandler())
    root.setLevel(level)
    install(root.handlers, log_format)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if name == "uvicorn.access" and not logger.propagate and not logger.handlers:
            continue  # --no-access-log: the API logs each request itself
        logger.handlers.clear()
        logger.propagate = True
