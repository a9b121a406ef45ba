"""GET /metrics end to end: a real API, an embedding and a chat worker, Prometheus' own parser.

Every figure is compared before and after traffic, so the test holds on an API
other tests in the session have already used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.worker_stats import FixedHistogram, TokenRate
from tests.procs import Proc, start_worker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(api: str) -> Samples:
    resp = httpx.get(f"{api}/metrics", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def has(samples: Samples, name: str, **labels: str) -> bool:
    return (name, frozenset(labels.items())) in samples


def wait_for(check: Callable[[Samples], bool], api: str, timeout: float = 10.0) -> Samples:
    """Scrape until `check` holds: worker figures arrive with the next heartbeat (0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(api)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.25)


@pytest.fixture(scope="module")
def chat_worker(inferq_env: dict[str, str], log_dir: Path) -> Iterator[Proc]:
    proc = start_worker(inferq_env, log_dir, "smollm2")
    yield proc
    proc.stop()


def test_metrics_parse_and_move_with_traffic(api: str, client: Any, chat_worker: Proc) -> None:
    before = scrape(api)
    assert value(before, "inferq_redis_up") == 1
    assert value(before, "inferq_replicas_alive", model="minilm") == 1
    assert value(before, "inferq_replicas_alive", model="smollm2") == 1
    assert value(before, "inferq_replicas_alive", model="idle-model") == 0
    for model in ("minilm", "smollm2", "idle-model"):
        for queue in ("interactive", "bulk"):
            assert has(before, "inferq_queue_depth", model=model, queue=queue)

    texts = ["a short one", "a somewhat longer sentence to embed " * 3, "x"]
    for _ in range(2):
        client.embeddings.create(model="minilm", input=texts)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    chat = openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Count to five."}]
    reply = chat.chat.completions.create(model="smollm2", messages=messages, max_tokens=12)
    assert reply.usage.completion_tokens > 0
    streamed = list(
        chat.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, stream=True)
    )
    assert streamed[-1].choices[0].finish_reason is not None  # SSE still flows to the end
    assert httpx.get(f"{api}/v1/models/minilm").status_code == 200
    assert httpx.get(f"{api}/no/such/path").status_code == 404

    def moved(s: Samples) -> bool:
        return (
            value(s, "inferq_worker_tasks_total", model="minilm", outcome="answered")
            >= value(before, "inferq_worker_tasks_total", model="minilm", outcome="answered") + 2
            and value(s, "inferq_worker_tasks_total", model="smollm2", outcome="answered")
            >= value(before, "inferq_worker_tasks_total", model="smollm2", outcome="answered") + 2
            and value(s, "inferq_tokens_per_second", model="smollm2") > 0
        )

    after = wait_for(moved, api)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # The API's own requests: route templates, known model names only, status codes.
    ok = {"endpoint": "/v1/embeddings", "method": "POST", "model": "minilm", "status": "200"}
    assert delta("inferq_requests_total", **ok) == 2
    assert delta("inferq_request_errors_total", **ok) == 0
    missing = {**ok, "model": "", "status": "404"}
    assert delta("inferq_requests_total", **missing) == 1
    assert delta("inferq_request_errors_total", **missing) == 1
    assert not any("no-such-model" in str(key) for key in after)
    timed = {"endpoint": "/v1/embeddings", "method": "POST", "model": "minilm"}
    assert delta("inferq_request_duration_seconds_count", **timed) == 2
    assert delta("inferq_request_duration_seconds_sum", **timed) > 0
    chat_ok = {**ok, "endpoint": "/v1/chat/completions", "model": "smollm2"}
    assert delta("inferq_requests_total", **chat_ok) == 2
    templated = {
        dict(labels)["endpoint"]
        for (name, labels), v in after.items()
        if name == "inferq_requests_total" and dict(labels)["endpoint"].startswith("/v1/models/")
    }
    assert templated and all(e.startswith("/v1/models/{") for e in templated)  # no raw paths
    unmatched = {"endpoint": "unmatched", "method": "GET", "model": "", "status": "404"}
    assert delta("inferq_requests_total", **unmatched) == 1

    # The workers' figures, through their heartbeats in Redis.
    assert value(after, "inferq_replicas_alive", model="minilm") == 1
    assert value(after, "inferq_replicas_alive", model="smollm2") == 1
    assert value(after, "inferq_queue_depth", model="minilm", queue="interactive") >= 0
    for outcome in ("received", "answered"):
        assert delta("inferq_worker_tasks_total", model="minilm", outcome=outcome) >= 2
        assert delta("inferq_worker_tasks_total", model="smollm2", outcome=outcome) >= 2
    assert delta("inferq_batches_total", model="minilm") >= 2
    assert delta("inferq_batch_tokens_total", model="minilm", kind="real") > 0
    batches = delta("inferq_batch_size_count", model="minilm")
    assert batches >= 2
    assert delta("inferq_batch_size_sum", model="minilm") >= 6  # three inputs per request
    assert value(after, "inferq_batch_size_bucket", model="minilm", le="+Inf") == value(
        after, "inferq_batch_size_count", model="minilm"
    )
    assert delta("inferq_padding_efficiency_count", model="minilm") == batches
    assert delta("inferq_padding_efficiency_bucket", model="minilm", le="1.0") == batches
    mean = delta("inferq_padding_efficiency_sum", model="minilm") / batches
    assert 0 < mean <= 1
    assert delta("inferq_generated_tokens_total", model="smollm2") >= reply.usage.completion_tokens
    assert value(after, "inferq_tokens_per_second", model="smollm2") > 0
    # A chat worker runs no batches: no batch figures for it.
    assert not has(after, "inferq_batch_size_count", model="smollm2")


def test_fixed_histogram_is_cumulative_with_inf_equal_to_count() -> None:
    histogram = FixedHistogram("h", (1.0, 2.0, 4.0))
    for v in (1, 2, 3, 5, 5):
        histogram.observe(v)
    assert histogram.flat() == {
        "h_le:1.0": 1,
        "h_le:2.0": 2,
        "h_le:4.0": 3,
        "h_le:+Inf": 5,
        "h_sum": 16.0,
        "h_count": 5,
    }


def test_token_rate_spans_the_window() -> None:
    rate = TokenRate(window=10.0)
    assert rate.update(0, now=0.0) == 0.0
    assert rate.update(50, now=5.0) == pytest.approx(10.0)
    assert rate.update(100, now=10.0) == pytest.approx(10.0)
    # Idle afterwards: the rate falls to zero once the window holds no new tokens.
    assert rate.update(100, now=15.0) == pytest.approx(5.0)
    assert rate.update(100, now=25.0) == pytest.approx(0.0)
    assert math.isfinite(rate.update(100, now=25.0))


def test_middleware_counts_failures_and_streams_in_process() -> None:
    """A route that raises is counted as the 500 the error handler answers; a stream is
    timed to its end and reaches the client whole."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from fastapi.testclient import TestClient

    from api.errors import install_error_handlers
    from api.metrics import install_metrics, note_model

    app = FastAPI()
    install_error_handlers(app)
    metrics = install_metrics(app)

    @app.get("/boom/{name}")
    def boom(name: str) -> None:  # a sync route: runs in a thread with a copied context
        note_model("known")
        raise RuntimeError(name)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts() -> Any:
            for i in range(3):
                await asyncio.sleep(0.05)
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(parts(), media_type="text/event-stream")

    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.get("/boom/x").status_code == 500
        assert http.get("/stream").text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    failed = {"endpoint": "/boom/{name}", "method": "GET", "model": "known", "status": "500"}
    assert sample("inferq_requests_total", **failed) == 1
    assert sample("inferq_request_errors_total", **failed) == 1
    streamed = {"endpoint": "/stream", "method": "GET", "model": ""}
    assert sample("inferq_requests_total", **streamed, status="200") == 1
    took = sample("inferq_request_duration_seconds_sum", **streamed)
    assert took is not None and took >= 0.15


def test_scrapes_in_a_loop_read_redis_once_a_second(api: str, redis_client: Any) -> None:
    """/metrics needs no key: a client scraping it in a tight loop must not turn each
    scrape into a cluster read (a key scan and two pipelines)."""

    def scans() -> int:
        return int(redis_client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))

    time.sleep(1.2)
    before = scans()
    scrape(api)
    per_read = scans() - before
    assert per_read >= 1
    started, before = time.monotonic(), scans()
    for _ in range(40):
        scrape(api)
    took = time.monotonic() - started
    reads = (scans() - before) / per_read
    assert reads <= took + 2, f"{reads:.0f} cluster reads for 40 scrapes in {took:.1f}s"
