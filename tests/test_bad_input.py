"""Hand-made bad input against a live API: broken bytes, hostile JSON, huge bodies, slow clients.

Every refusal must be OpenAI error JSON with the right status, come quickly, and
leave the service as it was: after the barrage the worker still lives and a
normal request gets the same answer it got before. The API here runs with a
short body timeout (INFERQ_BODY_TIMEOUT_S=2) and the default body limit
(INFERQ_MAX_BODY_BYTES, 8 MiB). Raw sockets stand in for clients that no HTTP
library would imitate: a body trickling in a byte a second, headers that never end.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import Proc, start_api

BODY_TIMEOUT_S = 2.0
MAX_BODY = 8 * 1024**2
CHAT = '"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]'
EMBED = '"model": "minilm", "input": "hello"'


@pytest.fixture(scope="module")
def guarded(inferq_env: dict[str, str], log_dir: Path, minilm_worker: Proc) -> Iterator[Any]:
    """The API (the suite's registry and minilm worker) and the answer to a normal request
    before any bad input arrived."""
    env = {**inferq_env, "INFERQ_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
    proc, base = start_api(env, log_dir)
    try:
        before = _embed(base, "the same text, before and after")
        yield base, proc, before
    finally:
        proc.stop()


def _embed(base: str, text: str) -> list[float]:
    resp = httpx.post(
        f"{base}/v1/embeddings", json={"model": "minilm", "input": [text]}, timeout=60
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["data"][0]["embedding"]


def post_raw(
    base: str, path: str, body: bytes, content_type: str | None = "application/json"
) -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(f"{base}{path}", content=body, headers=headers, timeout=60)


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI error object of a refusal with `status`."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


class RawClient:
    """One TCP connection, written and read by hand."""

    def __init__(self, base: str) -> None:
        url = httpx.URL(base)
        assert url.port is not None
        self.sock = socket.create_connection((url.host, url.port), timeout=30)
        self.host = f"{url.host}:{url.port}"
        self.buffer = b""

    def send(self, data: bytes) -> bool:
        """Send, unless the server already answered or hung up; False then."""
        if self.readable(0):
            return False
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def readable(self, timeout: float) -> bool:
        return bool(select.select([self.sock], [], [], timeout)[0])

    def response(self, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buffer:
            self._read(deadline)
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            self.buffer = rest
            self._read(deadline)
            rest = self.buffer
        self.buffer = rest[length:]
        return status, headers, rest[:length]

    def _read(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or not self.readable(left):
            raise TimeoutError("no answer from the server")
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection without an answer")
        self.buffer += chunk

    def closed_by_server(self, timeout: float = 3) -> bool:
        if not self.readable(timeout):
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def _request_head(client: RawClient, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {client.host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_invalid_utf8_is_400(guarded: Any) -> None:
    base, _, _ = guarded
    for body in (
        b'{"model": "minilm", "input": "\xff\xfe"}',
        b"\xc3\x28",
        b'{"a": "\xed\xa0\x80"}',
    ):
        started = time.monotonic()
        error = error_of(post_raw(base, "/v1/embeddings", body), 400)
        assert "UTF-8" in error["message"], error
        # At once: the whole body was in, nothing is left to wait for.
        assert time.monotonic() - started < 3


def test_deeply_nested_json_is_400_at_once(guarded: Any) -> None:
    base, _, _ = guarded
    deep = 100_000
    bodies = [
        "[" * deep + "]" * deep,
        '{"a": ' * deep + "1" + "}" * deep,
        "{" + EMBED + ', "extra": ' + "[" * deep + "]" * deep + "}",
        '{"model": "minilm", "input": ' + "[" * deep + "]" * deep + "}",
    ]
    for body in bodies:
        started = time.monotonic()
        error = error_of(post_raw(base, "/v1/embeddings", body.encode()), 400)
        assert time.monotonic() - started < 5
        assert error["type"] == "invalid_request_error"
    # Around Python's recursion limit: parsed or refused, never a server error.
    for depth in (100, 500, 900, 990, 1100, 5000):
        nested = "[" * depth + "]" * depth
        for body in (
            "{" + EMBED + ', "extra": ' + nested + "}",
            "{" + CHAT + ', "chat_template_kwargs": {"x": ' + nested + "}}",
        ):
            path = "/v1/chat/completions" if "smollm2" in body else "/v1/embeddings"
            resp = post_raw(base, path, body.encode())
            assert resp.status_code in (200, 400), (depth, resp.status_code, resp.text[:300])
            if resp.status_code == 400:
                error_of(resp, 400)
            elif path == "/v1/embeddings":
                assert len(resp.json()["data"]) == 1


HUGE = [
    ("/v1/embeddings", "{" + EMBED + ', "dimensions": 1e400}', "dimensions"),
    ("/v1/embeddings", "{" + EMBED + ', "dimensions": ' + "9" * 4000 + "}", "dimensions"),
    ("/v1/embeddings", "{" + EMBED + ', "dimensions": ' + "9" * 5000 + "}", None),
    ("/v1/embeddings", "{" + EMBED + ', "dimensions": -1e400}', "dimensions"),
    ("/v1/embeddings", '{"model": "minilm", "input": [1e400]}', "input"),
    ("/v1/embeddings", '{"model": "minilm", "input": [' + "7" * 4000 + "]}", "input"),
    ("/v1/chat/completions", "{" + CHAT + ', "max_tokens": 1e400}', "max_tokens"),
    ("/v1/chat/completions", "{" + CHAT + ', "max_tokens": 1e20}', "max_tokens"),
    ("/v1/chat/completions", "{" + CHAT + ', "max_tokens": ' + "9" * 4000 + "}", "max_tokens"),
    ("/v1/chat/completions", "{" + CHAT + ', "max_tokens": ' + "9" * 5000 + "}", None),
    ("/v1/chat/completions", "{" + CHAT + ', "max_completion_tokens": 1e300}', None),
    ("/v1/chat/completions", "{" + CHAT + ', "temperature": 1e400}', "temperature"),
    ("/v1/chat/completions", "{" + CHAT + ', "top_p": -1e400}', "top_p"),
    ("/v1/chat/completions", "{" + CHAT + ', "seed": ' + "9" * 30 + "}", "seed"),
    ("/v1/chat/completions", "{" + CHAT + ', "presence_penalty": 1e308}', "presence_penalty"),
    ("/v1/completions", '{"model": "smollm2", "prompt": "x", "max_tokens": 1e400}', "max_tokens"),
    (
        "/v1/rerank",
        '{"model": "tiny-rerank", "query": "q", "documents": ["d"], "top_n": 1e400}',
        None,
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), HUGE)
def test_huge_numbers_are_400(guarded: Any, path: str, body: str, param: str | None) -> None:
    base, _, _ = guarded
    error = error_of(post_raw(base, path, body.encode()), 400)
    if param is not None:
        assert error["param"] == param, error
    assert len(error["message"]) < 300, "the refusal should not echo the number"


NON_FINITE = [
    ("/v1/chat/completions", "{" + CHAT + ', "temperature": NaN}', "NaN"),
    ("/v1/chat/completions", "{" + CHAT + ', "top_p": Infinity}', "Infinity"),
    ("/v1/chat/completions", "{" + CHAT + ', "frequency_penalty": -Infinity}', "-Infinity"),
    ("/v1/chat/completions", "{" + CHAT + ', "chat_template_kwargs": {"x": NaN}}', "NaN"),
    ("/v1/embeddings", '{"model": "minilm", "input": [NaN]}', "NaN"),
    ("/v1/embeddings", "{" + EMBED + ', "ignored": [1, Infinity]}', "Infinity"),
    ("/v1/jobs", '{"endpoint": "/v1/embeddings", "body": {' + EMBED + ', "x": NaN}}', "NaN"),
]


@pytest.mark.parametrize(("path", "body", "literal"), NON_FINITE)
def test_nan_and_infinity_literals_are_400(
    guarded: Any, path: str, body: str, literal: str
) -> None:
    base, _, _ = guarded
    error = error_of(post_raw(base, path, body.encode()), 400)
    assert f"holds {literal}" in error["message"], error


def test_nan_and_infinity_as_text_are_fine(guarded: Any) -> None:
    base, _, _ = guarded
    words = ["NaN", "Infinity", "-Infinity", "NaNaNaN Infinity"]
    resp = httpx.post(f"{base}/v1/embeddings", json={"model": "minilm", "input": words}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == len(words)


def test_an_answer_decided_before_the_body_waits_for_it_and_keeps_the_connection(
    guarded: Any,
) -> None:
    """Some answers need only the headers (an unknown route here, the in-flight cap's 429
    likewise). Closing the connection on a client still sending its body would make the
    kernel reset it, which can destroy the answer before the client reads it: the body
    is read and dropped first, and the connection serves the next request."""
    base, _, _ = guarded
    client = RawClient(base)
    try:
        body = b'{"model": "minilm", "input": "sent late"}'
        head = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        assert client.send(_request_head(client, "/v1/no-such-route", head))
        time.sleep(0.5)
        assert client.send(body), "the server answered before the body came"
        status, headers, answer = client.response(timeout=5)
        assert status == 404, answer
        assert headers.get("connection") != "close"

        again = json.dumps({"model": "minilm", "input": "the next request"}).encode()
        head = {"Content-Type": "application/json", "Content-Length": str(len(again))}
        assert client.send(_request_head(client, "/v1/embeddings", head) + again)
        status, _, answer = client.response(timeout=30)
        assert status == 200, answer
        assert len(json.loads(answer)["data"]) == 1
    finally:
        client.close()


def test_ten_megabyte_body_is_413_before_it_is_read(guarded: Any) -> None:
    base, _, _ = guarded
    big = b'{"model": "minilm", "input": "' + b"a" * 10_000_000 + b'"}'
    started = time.monotonic()
    error = error_of(post_raw(base, "/v1/embeddings", big), 413)
    assert error["code"] == "payload_too_large"
    assert "INFERQ_MAX_BODY_BYTES" in error["message"]
    assert time.monotonic() - started < 10

    # Declared too large: the answer comes before a byte of the body is sent.
    client = RawClient(base)
    try:
        head = {"Content-Type": "application/json", "Content-Length": str(len(big))}
        client.send(_request_head(client, "/v1/embeddings", head))
        status, headers, body = client.response(timeout=5)
        assert status == 413
        assert json.loads(body)["error"]["code"] == "payload_too_large"
        assert headers.get("connection") == "close"
        assert client.closed_by_server()
    finally:
        client.close()

    # Chunked, no length declared: refused once the bytes pass the limit.
    client = RawClient(base)
    try:
        head = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        client.send(_request_head(client, "/v1/embeddings", head))
        piece = b"a" * (1024 * 1024)
        sent = 0
        while client.send(b"%x\r\n%s\r\n" % (len(piece), piece)):
            sent += len(piece)
            assert sent <= 3 * MAX_BODY, "the server kept reading past its limit"
        status, _, body = client.response(timeout=10)
        assert status == 413
        assert json.loads(body)["error"]["code"] == "payload_too_large"
    finally:
        client.close()


def test_uploads_are_not_held_to_the_json_limit(guarded: Any) -> None:
    """/v1/files has INFERQ_MAX_UPLOAD_BYTES; this API has no job store, so the route itself
    answers (503) rather than the body limit (413)."""
    base, _, _ = guarded
    files = {"file": ("big.jsonl", b"x" * (MAX_BODY + 1024))}
    resp = httpx.post(f"{base}/v1/files", data={"purpose": "batch"}, files=files, timeout=60)
    assert error_of(resp, 503)["code"] == "job_store_unavailable"


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("text/plain", "{" + EMBED + "}", 400),
        ("application/x-www-form-urlencoded", "model=minilm&input=hello", 400),
        ("multipart/form-data; boundary=x", "--x--\r\n", 400),
        (None, "{" + EMBED + "}", 400),
        ("application/json; charset=utf-8", "{" + EMBED + "}", 200),
        ("application/vnd.inferq+json", "{" + EMBED + "}", 200),
    ],
)
def test_content_types(guarded: Any, content_type: str | None, body: str, status: int) -> None:
    base, _, _ = guarded
    resp = post_raw(base, "/v1/embeddings", body.encode(), content_type)
    if status == 200:
        assert resp.status_code == 200, resp.text
    else:
        assert "JSON object" in error_of(resp, status)["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "missing"),
        (b"null", "JSON object"),
        (b"[]", "JSON object"),
        (b'"hello"', "JSON object"),
        (b"5", "JSON object"),
        (b"true", "JSON object"),
        (b"{}", "Field required"),
        (b'{"model": "minilm", "input": "hello"', "not valid JSON"),
    ],
)
def test_empty_and_non_object_bodies(guarded: Any, body: bytes, needle: str) -> None:
    base, _, _ = guarded
    error = error_of(post_raw(base, "/v1/embeddings", body), 400)
    assert needle in error["message"], error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"max_tokens": "ten"}, "max_tokens"),
        ("/v1/chat/completions", {"temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {"seed": "lucky"}, "seed"),
        ("/v1/chat/completions", {"stop": 5}, "stop"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"chat_template_kwargs": {"messages": []}}, None),
        ("/v1/embeddings", {"dimensions": "many"}, "dimensions"),
        ("/v1/embeddings", {"input": 5}, "input"),
        ("/v1/embeddings", {"input": [1.5]}, "input"),
    ],
)
def test_wrong_types_name_the_field(
    guarded: Any, path: str, body: dict[str, Any], param: str | None
) -> None:
    base, _, _ = guarded
    full = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    if path == "/v1/embeddings":
        full = {"model": "minilm", "input": "hello"}
    resp = httpx.post(f"{base}{path}", json={**full, **body}, timeout=60)
    error = error_of(resp, 400)
    if param is not None:
        assert error["param"] == param, error


def test_control_characters(guarded: Any) -> None:
    base, _, _ = guarded
    # Raw control characters inside a JSON string are not JSON.
    raw = b'{"model": "minilm", "input": "a\x01b\x1fc"}'
    assert "not valid JSON" in error_of(post_raw(base, "/v1/embeddings", raw), 400)["message"]
    # Escaped, they are text like any other.
    text = "tab\there, nul\x00 there, bell\x07, escape\x1b[31m"
    resp = httpx.post(
        f"{base}/v1/embeddings", json={"model": "minilm", "input": [text]}, timeout=60
    )
    assert resp.status_code == 200, resp.text
    # Lone surrogates: JSON's escapes allow them, Unicode does not (a tokenizer fails on
    # one). Pairs are one character, as JSON encoders with ensure_ascii write emoji.
    for lone in (b'"\\ud800"', b'"a\\udfffb"', b'"\\ude00\\ud83d"'):
        resp = post_raw(base, "/v1/embeddings", b'{"model": "minilm", "input": [' + lone + b"]}")
        assert "surrogate" in error_of(resp, 400)["message"]
    resp = post_raw(base, "/v1/embeddings", b'{"model": "\\udc00", "input": "x"}')
    assert "surrogate" in error_of(resp, 400)["message"]
    resp = post_raw(base, "/v1/embeddings", b'{"model": "minilm", "input": "\\ud83d\\ude00"}')
    assert resp.status_code == 200, resp.text
    # In a model's name they name no model.
    resp = httpx.post(f"{base}/v1/embeddings", json={"model": "mini\x00lm", "input": "x"})
    assert error_of(resp, 404)["code"] == "model_not_found"
    # Nor can a webhook's URL hold one (or any control character).
    for hook in ("http://example.com/\x00", "http://example.com/a b", "http://exa\x07mple.com/"):
        job = {"endpoint": "/v1/embeddings", "body": {"model": "minilm", "input": "x"}}
        resp = httpx.post(f"{base}/v1/jobs", json={**job, "webhook": hook}, timeout=10)
        assert error_of(resp, 400)["param"] == "webhook"
    # A NUL in the URL names nothing at all.
    for url in ("/v1/models/mini%00lm", "/v1/jobs?after=%00", "/v1/files/%00"):
        error = error_of(httpx.get(f"{base}{url}", timeout=10), 400)
        assert error["code"] == "invalid_url", error
    error_of(httpx.get(f"{base}/v1/models/%01%1f", timeout=10), 404)


def _still_serving(base: str) -> float:
    started = time.monotonic()
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    return time.monotonic() - started


def test_slow_body_is_cut_off_with_408(guarded: Any) -> None:
    base, _, _ = guarded
    for chunked in (False, True):
        client = RawClient(base)
        try:
            body = ("{" + EMBED + "}").encode()
            head = {"Content-Type": "application/json"}
            head |= {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": "1000"}
            client.send(_request_head(client, "/v1/embeddings", head))
            started = time.monotonic()
            for byte in body:  # one byte a second
                data = bytes([byte])
                if not client.send(b"1\r\n%s\r\n" % data if chunked else data):
                    break
                # The server keeps serving others meanwhile.
                assert _still_serving(base) < 2.0
                time.sleep(1.0)
            status, headers, answer = client.response(timeout=5)
            waited = time.monotonic() - started
            assert status == 408
            error = json.loads(answer)["error"]
            assert error["code"] == "body_timeout" and "INFERQ_BODY_TIMEOUT_S" in error["message"]
            assert BODY_TIMEOUT_S - 0.5 < waited < BODY_TIMEOUT_S + 3
            assert headers.get("connection") == "close"
            assert client.closed_by_server()
        finally:
            client.close()


def test_slow_headers_hold_a_socket_not_the_server(guarded: Any) -> None:
    """uvicorn has no deadline for a request's headers (h11 and httptools alike): a client
    that never finishes them keeps its connection open, but the app sees nothing until
    they are complete, and everyone else is served. The body timeout starts once they are."""
    base, _, _ = guarded
    client = RawClient(base)
    try:
        client.send(f"POST /v1/embeddings HTTP/1.1\r\nHost: {client.host}\r\n".encode())
        for i in range(int(BODY_TIMEOUT_S) + 2):
            assert client.send(f"X-Slow-{i}: {'y' * 10}\r\n".encode()), "the server hung up"
            assert _still_serving(base) < 2.0
            time.sleep(1.0)
        assert not client.readable(0), "the server answered headers that were never finished"
        body = ("{" + EMBED + "}").encode()
        tail = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        client.send(tail.encode() + body)
        status, _, answer = client.response(timeout=30)
        assert status == 200, answer[:300]
    finally:
        client.close()


def test_the_service_is_unharmed(guarded: Any, minilm_worker: Proc) -> None:
    """Runs last: the worker lives and gives the same answer as before the barrage."""
    base, api, before = guarded
    assert minilm_worker.popen.poll() is None, minilm_worker.tail()
    assert api.popen.poll() is None, api.tail()
    after = _embed(base, "the same text, before and after")
    assert max(abs(a - b) for a, b in zip(before, after, strict=True)) < 1e-6
    log = api.log_path.read_text(errors="replace")
    assert "unhandled error" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_long_timeout_header_is_refused_at_once(guarded: Any) -> None:
    """Checking the header takes no longer for 4,000 digits than for four (its pattern
    used to backtrack quadratically: 0.4 s of the event loop per request)."""
    base, _, _ = guarded
    body = {"model": "minilm", "input": "hello"}
    with httpx.Client(base_url=base, timeout=30) as http:
        for value in ("1" * 4000 + "x", "1" * 4000 + ".", "0", "abc"):
            started = time.monotonic()
            reply = http.post("/v1/embeddings", json=body, headers={"X-Inferq-Timeout": value})
            assert "X-Inferq-Timeout" in error_of(reply, 400)["message"]
            assert time.monotonic() - started < 0.25, value
        reply = http.post("/v1/embeddings", json=body, headers={"X-Inferq-Timeout": "2.5"})
        assert reply.status_code == 200, reply.text
