"""The worker's Celery app and its life-cycle hooks.

Pool choice: `inferq worker` runs Celery's *threads* pool. One process holds the
model once and every in-flight message shares it, which is what cross-request
batching needs. Prefork would load a copy of the model per child, trip the
4-second `worker_proc_alive_timeout` while a large model loads, and fork after
CUDA or a device SDK has initialised, which neither supports. Engine calls
release the GIL (torch, tokenizers, device SDKs), so threads cost little.

Batching across requests needs many messages in hand at once, while each
message must stay unacknowledged until its reply is published. The threads
pool gives both: the worker reserves up to `--concurrency` messages (prefetch
multiplier 1), each task thread tokenises its request and hands the inputs to
the one batcher thread (app/batcher.py), which groups inputs of all waiting
requests by length; the task thread then publishes the reply and returns, and
only then does Celery acknowledge (acks_late). celery-batches would also hand
over many messages, but groups them per task type and flush interval, not per
sequence length, and acknowledges the whole group together.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
from typing import Any

from celery import signals

from app import logs
from app.celery_app import create_celery
from app.settings import get_settings
from workers import runtime
from workers.broker import ResilientConsumer

log = logging.getLogger("inferq.worker")


class Consumer(ResilientConsumer):
    """Survives a broker restart (workers/broker.py), and stops renewing the lease of a
    message once it is settled."""

    def settled(self, delivery_tag: str) -> None:
        with contextlib.suppress(RuntimeError):
            runtime.get_runtime().lease.release(delivery_tag)


celery_app = create_celery(get_settings())
celery_app.conf.include = ["workers.tasks"]
celery_app.conf.worker_consumer = "workers.app:Consumer"


@signals.after_setup_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    """Celery's handlers, with the request id on each line and INFERQ_LOG_FORMAT."""
    logs.install(logger.handlers, get_settings().log_format)


@signals.worker_init.connect
def _load_model(**_: Any) -> None:
    """Load the engine before the consumer starts, so no message arrives before the model."""
    settings = get_settings()
    try:
        rt = runtime.load_runtime(settings)
    except Exception as exc:
        log.exception("the model could not be loaded; this worker stops")
        runtime.record_load_failure(settings, exc)
        sys.exit(3)
    if rt.relay_engine is not None:
        # Stopped when the process ends, after Celery has let the running tasks
        # finish (a warm shutdown), not when shutdown begins.
        atexit.register(rt.relay_engine.close)


@signals.worker_ready.connect
def _announce(**_: Any) -> None:
    rt = runtime.get_runtime()
    rt.lease.start()
    rt.announcer.start()
    log.info("replica %s of %s ready on devices %s", rt.info.label, rt.spec.name, rt.info.devices)


@signals.task_received.connect
def _hold_lease(request: Any = None, **_: Any) -> None:
    tag = (getattr(request, "delivery_info", None) or {}).get("delivery_tag")
    if tag:
        runtime.get_runtime().lease.hold(str(tag))


@signals.worker_shutting_down.connect
def _withdraw(**_: Any) -> None:
    try:
        rt = runtime.get_runtime()
    except RuntimeError:
        return
    rt.announcer.stop()
    rt.lease.stop()
    if rt.batcher:
        rt.batcher.stop()
