from __future__ import annotations

import pytest

from api.webhooks import check_webhook_url
from app.errors import InvalidRequest


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
