"""What inferq uses of its dependencies exists in the versions installed: `.ci/lowest`
runs this against the oldest releases pyproject.toml allows, so a floor set below
the release that brought a feature fails here, not silently on a site (kombu 5.6
ignores the unacked-restore options and falls back to its own sweep)."""

from __future__ import annotations

import inspect


def test_kombu_restores_unacked_messages_on_the_options_inferq_sets() -> None:
    from kombu.transport import redis as kombu_redis

    channel_options = set(vars(kombu_redis.Channel)) | set(
        kombu_redis.Channel.from_transport_options
    )
    for option in ("unacked_restore_interval", "unacked_restore_throttle", "unacked_mutex_expire"):
        assert option in channel_options, option


def test_celery_consumers_settle_messages_through_call_soon_ack() -> None:
    from celery.worker.consumer import Consumer

    from workers.broker import ResilientConsumer

    assert hasattr(Consumer, "call_soon_ack")
    assert issubclass(ResilientConsumer, Consumer)


def test_settings_and_forms_have_what_inferq_calls() -> None:
    from pydantic_settings import NoDecode  # noqa: F401
    from starlette.requests import Request

    assert "max_part_size" in inspect.signature(Request.form).parameters


def test_the_api_and_its_offline_docs_build() -> None:
    from api.main import create_app
    from app.registry import Registry
    from app.settings import Settings

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"), Registry(models=[]))
    assert {"/v1/cluster/auth", "/v2/rerank"} <= set(app.openapi()["paths"])
    assert {"/docs", "/docs-assets"} <= {getattr(r, "path", None) for r in app.routes}
