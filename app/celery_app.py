"""The Celery app object: broker, serialisation, routing and delivery guarantees.

It is configuration, so it lives in `app/`; the tasks live in `workers/` and
the API sends them by name.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.keys import KeySpace
from app.registry import bulk_queue, model_queue
from app.settings import Settings

EMBEDDINGS_TASK = "inferq.embeddings"
RERANK_TASK = "inferq.rerank"
GENERATE_TASK = "inferq.generate"
#: Embeddings or rerank requests for one model that an API process sends as one message.
BATCHED_TASK = "inferq.batched"
JOB_TASK = "inferq.job"
#: Not a Celery task: the `task` of a job that embeds one shard of a corpus file.
CORPUS_SHARD = "inferq.corpus_shard"


def route_by_model(
    name: str, args: Any, kwargs: dict[str, Any] | None, options: dict[str, Any], **_: Any
) -> dict[str, str] | None:
    """Sync inference tasks go to their model's queue, `model.<name>`; async jobs to its
    bulk queue, `model.<name>.bulk`, which workers serve only while the first is empty."""
    model = (kwargs or {}).get("model")
    if name == JOB_TASK and model:
        return {"queue": bulk_queue(model)}
    if name.startswith("inferq.") and model:
        return {"queue": model_queue(model)}
    return None


def create_celery(settings: Settings) -> Celery:
    keys = KeySpace(settings.key_prefix)
    app = Celery("inferq", broker=settings.require_redis_url(), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,  # replies travel over pub/sub, not a result backend
        result_backend=None,
        task_routes=(route_by_model,),
        task_default_queue=f"{keys.prefix}.default",
        task_create_missing_queues=True,
        # A message is acknowledged only after its reply is published; if the worker
        # dies first, the broker hands the message to another replica.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "global_keyprefix": keys.broker_prefix,
            # Workers renew the lease of every message they hold (workers/lease.py),
            # so this is the failover delay after a worker dies, not a task length cap.
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": max(1, int(settings.visibility_timeout_s / 4)),
            "unacked_restore_throttle": 1,
            # The restore sweep holds a mutex; a worker killed while holding it must
            # not block every other worker's sweep for kombu's default 5 minutes.
            "unacked_mutex_expire": max(5, int(settings.visibility_timeout_s)),
            # A worker consumes `model.<name>` and then `model.<name>.bulk`, and BRPOP
            # takes from the first non-empty list in that order: async jobs run only
            # while no interactive request waits.
            "queue_order_strategy": "priority",
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        worker_hijack_root_logger=False,
        # Task events let Flower show each worker's tasks per queue; they cost one
        # small pub/sub message per state change.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
    )
    return app
