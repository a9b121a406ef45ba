from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.webhooks import check_webhook_url, signature_headers
from app.errors import InvalidRequest
from tests.stack import Stack, running_stack, wait_job


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "https://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
    ],
)
def test_internal_targets_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_webhook_url(url, allow_internal=False)
    assert refused.value.param == "webhook"
    assert check_webhook_url(url, allow_internal=True) == url


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com/hook", "http:///nohost"])
def test_only_http_urls_are_webhooks(url: str) -> None:
    with pytest.raises(InvalidRequest):
        check_webhook_url(url, allow_internal=True)


def test_public_targets_pass() -> None:
    assert check_webhook_url("https://hooks.example.com/a", allow_internal=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://100.64.0.1/hook",  # shared address space (carrier-grade NAT)
        "http://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1
        "http://[::ffff:10.0.0.1]/hook",  # IPv4-mapped private
        "http://[2002:a00:1::]/hook",  # 6to4 of 10.0.0.1
        "http://192.0.0.1/hook",  # IETF protocol assignments
        "http://0.0.0.0/hook",
    ],
)
def test_only_globally_routable_addresses_are_webhook_targets(url: str) -> None:
    with pytest.raises(InvalidRequest):
        check_webhook_url(url, allow_internal=False)


@pytest.mark.parametrize("url", ["http://x.example:99999/", "http://[zz]/", "http://[::1/"])
def test_a_url_nobody_could_call_is_refused_at_submit(url: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_webhook_url(url, allow_internal=True)
    assert refused.value.param == "webhook"


def test_signatures_follow_standard_webhooks() -> None:
    """The Standard Webhooks specification's own example."""
    headers = signature_headers(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        b'{"test": 2432232314}',
        1614265330,
    )
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


# ---- delivery, end to end ------------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(b"inferq webhook test secret").decode()


class _Receiver(http.server.BaseHTTPRequestHandler):
    """`/slow` answers one byte every half second, forever; `/ok` checks the signature."""

    verified: list[str]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(600):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.5)
            return
        key = base64.b64decode(SECRET.removeprefix("whsec_"))
        signed = f"{self.headers['webhook-id']}.{self.headers['webhook-timestamp']}.".encode()
        expected = base64.b64encode(hmac.new(key, signed + body, hashlib.sha256).digest())
        if self.headers["webhook-signature"] == f"v1,{expected.decode()}":
            type(self).verified.append(json.loads(body)["id"])
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hooked(
    inferq_env: dict[str, str], database_urls: Any, log_dir: Path
) -> Iterator[tuple[Stack, str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"verified": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    extra = {"INFERQ_WEBHOOK_TIMEOUT_S": "2", "INFERQ_WEBHOOK_SECRET": SECRET}
    with running_stack(
        inferq_env, "hooks", database_urls("sqlite", "hooks"), log_dir, ("minilm",), extra
    ) as stack:
        yield stack, f"http://{host}:{port}", handler
    server.shutdown()


def _job(stack: Stack, webhook: str) -> str:
    with stack.http() as http:
        reply = http.post(
            "/v1/jobs",
            json={
                "endpoint": "/v1/embeddings",
                "body": {"model": "minilm", "input": "hook"},
                "webhook": webhook,
            },
        )
    assert reply.status_code == 202, reply.text
    return str(reply.json()["id"])


def test_a_trickling_target_holds_no_other_delivery_and_deliveries_are_signed(
    hooked: tuple[Stack, str, type[_Receiver]],
) -> None:
    stack, base, receiver = hooked
    slow = _job(stack, f"{base}/slow")
    time.sleep(2)  # its delivery has begun and trickles on
    quick = _job(stack, f"{base}/ok")
    deadline = time.monotonic() + 30
    while quick not in receiver.verified:
        assert time.monotonic() < deadline, "the signed delivery never came"
        time.sleep(0.2)
    done = wait_job(stack, slow, lambda j: (j["webhook"] or {}).get("status") == "failed", 60)
    assert "did not answer within 2 s" in done["webhook"]["last_error"], done["webhook"]
