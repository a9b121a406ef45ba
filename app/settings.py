"""One typed settings object shared by the API, the workers and the CLI.

Everything comes from the environment or a `.env` file with the `INFERQ_` prefix,
so a worker on another host only needs the same few variables as the API.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INFERQ_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Redis: broker, result channels and the replica directory. None means
    # "inferq up starts a private server"; every other command needs a URL.
    redis_url: str | None = None
    key_prefix: str = Field(
        default="inferq",
        description="Prefix of every Redis key and channel inferq (and its Celery broker) uses, "
        "so several deployments or test runs can share one Redis server.",
    )

    redis_max_connections: int = Field(
        default=100,
        gt=0,
        description="Redis connections one API process opens at most (fewer if the server's "
        "maxclients is small); a request that finds them all busy waits for one.",
    )
    redis_pool_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for a free Redis connection before the request is a 503.",
    )

    data_dir: Path = Path(".inferq")
    registry: Path | None = Field(default=None, description="YAML model registry file.")

    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`json`: one JSON object per log line (API and workers), for collectors.",
    )
    api_host: str = "127.0.0.1"
    api_port: int = 9997
    # Where the client commands (`inferq launch`, `list`, `terminate`, `embed`) reach the
    # API, and with which key: the server's bind address and key list are not that.
    api_url: str | None = Field(
        default=None,
        description="The API's base URL for client commands, e.g. http://10.0.0.5:9997; "
        "default: this host's INFERQ_API_HOST/PORT.",
    )
    api_key: str | None = Field(
        default=None,
        description="The key client commands send; default: the first of INFERQ_API_KEYS.",
    )

    # Sync request path.
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="A request's timeout, unless its model sets its own."
    )
    history_sample_s: float = Field(
        default=5.0,
        gt=0,
        description="How often the API samples each model for the console's charts (it "
        "keeps 120 samples).",
    )
    sse_keepalive_s: float = Field(
        default=15.0,
        gt=0,
        description="A streamed answer idle this long gets an SSE comment, so proxies keep it.",
    )
    max_request_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="The longest timeout X-Inferq-Timeout may ask for (a reasoning model's "
        "long answers).",
    )
    replica_check_interval_s: float = Field(
        default=1.0, gt=0, description="How often a waiting request re-checks that a replica lives."
    )

    resend_unaccepted_after_s: float = Field(
        default=3.0,
        gt=0,
        description="Re-queue a request that no worker has accepted after this long while its "
        "queue is empty: the broker lost it between pop and bookkeeping (see api/dispatch.py).",
    )
    max_resends: int = Field(default=3, ge=0)

    # Backpressure: beyond these, 429 with Retry-After (api/admission.py).
    max_queue_depth: int = Field(
        default=2000, gt=0, description="Requests waiting in one model's interactive queue."
    )
    max_inflight_requests: int = Field(
        default=1024, gt=0, description="Sync requests in flight in one API process."
    )
    max_queued_jobs: int = Field(
        default=200_000, gt=0, description="Async jobs waiting in one model's bulk queue."
    )
    overload_retry_after_s: float = Field(default=2.0, gt=0)
    admit_deadline_fraction: float = Field(
        default=0.75,
        gt=0,
        le=1,
        description="An embedding or rerank request is refused (429) at once when the work "
        "queued for its model, at its replicas' measured rate, would not finish within this "
        "fraction of its deadline.",
    )

    # Request limits, refused before anything is queued.
    max_inputs_per_request: int = Field(default=2048, gt=0)
    max_input_chars: int = Field(default=50_000, gt=0)
    max_body_bytes: int = Field(
        default=8 * 1024**2,
        gt=0,
        description="Largest JSON request body; a larger one is refused with 413 as soon as "
        "its bytes pass this (uploads to /v1/files have max_upload_bytes instead).",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A request body must arrive within this long of its headers, or the "
        "request is answered 408 and its connection closed (slow or stalled clients); "
        "for uploads, the longest wait for the next chunk.",
    )
    api_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="API processes sharing the port (uvicorn --workers). Each has its own "
        "reply channel; more of them let the API use more cores. /metrics then counts "
        "the requests of the process that answers the scrape (cluster figures are whole).",
    )
    keep_alive_s: int = Field(
        default=65,
        ge=1,
        description="How long the API keeps an idle HTTP connection open. Longer than "
        "clients keep theirs (httpx, and so the openai client, 5 s; load balancers 60 s), "
        "so a client never sends a request on a connection the server is closing.",
    )

    # Workers.
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_ttl_s: float = Field(default=5.0, gt=0)
    visibility_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds after a worker's last lease renewal before the broker hands its "
        "unacknowledged messages to another replica. Live workers renew their leases, so this "
        "bounds failover time, not task length.",
    )
    worker_concurrency: int = Field(
        default=64,
        gt=0,
        description="Messages a worker holds at once; enough to fill batches from many requests.",
    )
    batch_max_wait_ms: float = Field(
        default=5.0, ge=0, description="Longest an input waits for its batch to fill."
    )
    coalesce_ms: float = Field(
        default=2.0,
        ge=0,
        le=1000,
        description="Longest an embeddings or rerank request waits in the API for others "
        "of the same model to share its queue message (never longer than the batcher "
        "waits); only while other requests of that model are in flight. 0: one message "
        "per request.",
    )
    # The job store (SQLAlchemy URL). None means SQLite in the data directory, which
    # suits one host; workers on other hosts need a shared server (PostgreSQL).
    database_url: str | None = None
    job_max_attempts: int = Field(
        default=3,
        ge=1,
        description="Deliveries of a job before it fails (a worker died each time).",
    )
    job_lease_s: float = Field(
        default=60.0,
        gt=0,
        description="A running job's lease: its worker renews it while the job runs; a job "
        "whose lease ran out (its outcome could not be recorded, its worker hangs) is taken "
        "over by the next delivery, which the sweeper sends.",
    )
    job_run_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description="Longest one attempt at a job may run: its lease is no longer renewed "
        "after this, so a batch or corpus job never waits for ever on one child.",
    )
    job_retention_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="How long finished jobs keep their results."
    )
    job_queue_ttl_s: float = Field(
        default=24 * 3600.0, gt=0, description="A job not started within this long expires."
    )
    job_sweep_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="How often the API re-sends lost jobs, expires old ones and delivers webhooks.",
    )
    job_resend_after_s: float = Field(
        default=30.0,
        gt=0,
        description="A queued job whose message is nowhere to be seen after "
        "this long is queued again (duplicates are harmless: a job is claimed once).",
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, description="Overall deadline of one webhook delivery."
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Signs webhook deliveries (Standard Webhooks: webhook-id, "
        "webhook-timestamp, webhook-signature); a `whsec_` secret is base64.",
    )
    webhook_max_attempts: int = Field(default=5, ge=1)
    webhook_backoff_s: float = Field(default=2.0, gt=0, description="First retry delay; doubles.")
    webhook_allow_loopback: bool = Field(
        default=False,
        description="Allow webhooks to loopback and private addresses (tests, single-host setups).",
    )

    # Files, batches and corpus jobs. Workers read inputs and write shards here too, so
    # on several hosts it is a shared mount (NFS or similar) at the same path.
    files_dir: Path | None = Field(default=None, description="Default: <data_dir>/files.")
    max_upload_bytes: int = Field(
        default=8 * 1024**3,
        gt=0,
        description="Largest upload; counted as its bytes arrive, chunked uploads included.",
    )
    files_max_bytes_per_owner: int = Field(
        default=100 * 1024**3,
        gt=0,
        description="Bytes of files (uploaded and produced) one key may keep; an upload "
        "past it is refused (413).",
    )
    files_max_per_owner: int = Field(
        default=10_000, gt=0, description="Files one key may keep; an upload past it is a 413."
    )
    file_default_ttl_s: float | None = Field(
        default=None,
        gt=0,
        description="Uploads without `expires_after` are deleted this long after upload; "
        "None keeps them until deleted.",
    )
    batch_max_lines: int = Field(default=50_000, gt=0)
    bulk_max_line_bytes: int = Field(
        default=16 * 1024**2,
        gt=0,
        description="Longest line of a batch or JSONL/text corpus file; a longer one is an "
        "error line, never read into memory whole.",
    )
    corpus_shard_size: int = Field(default=1000, gt=0)
    bulk_poll_interval_s: float = Field(
        default=1.0, gt=0, description="How often batches and corpus jobs are advanced."
    )

    # API keys. Empty means no authentication; with keys, every /v1 call needs one and
    # jobs are visible only to the key that submitted them.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = Field(
        default=None, description="YAML file of named keys with scopes (app/keyring.py)."
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="Let the API listen on a non-loopback address with no keys configured.",
    )

    stream_coalesce_ms: float = Field(
        default=20.0,
        ge=0,
        description="Streamed pieces made within this many ms of the last sent one travel "
        "together; the first piece is never held. 0 sends every piece alone.",
    )

    # Flower, the Celery monitor (`inferq flower`): basic auth as `user:password`
    # (comma-separated for several users); empty refuses to start it on a non-loopback address.
    flower_basic_auth: str = ""
    flower_port: int = 5555
    flower_address: str = "127.0.0.1"
    task_events: bool = Field(
        default=True,
        description="Workers send Celery task events, so Flower shows tasks per worker and queue.",
    )

    # Node agents (`inferq node`): who this node is and what it offers.
    node_name: str = Field(default="", description="Default: the host name.")
    node_devices: Annotated[list[str], NoDecode] = Field(default_factory=list)
    node_device_kind: str = Field(default="cpu", pattern="^(cpu|cuda|vacc)$")
    node_address: str = Field(
        default="", description="Default: the address this host reaches Redis from."
    )
    node_heartbeat_s: float = Field(default=1.0, gt=0)
    node_heartbeat_ttl_s: float = Field(default=6.0, gt=0)
    node_reconcile_s: float = Field(
        default=2.0,
        gt=0,
        description="How often a node compares its worker processes with what it was asked "
        "to run, besides whenever a control message wakes it.",
    )
    node_restart_max_backoff_s: float = Field(default=30.0, gt=0)
    # The launch API (admin): what a launch request may ask nodes to run.
    model_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Directories (':'-separated) a launch request's model_path must lie "
        "under; none: launches may use registry models and installed packages only.",
    )
    launch_allow_trust_remote_code: bool = Field(
        default=False,
        description="Let launch requests set trust_remote_code (the model's own Python runs "
        "on the node); registry entries may always.",
    )
    launch_ready_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="How long POST /v1/models waits for the new replicas to load "
        "(Xinference's wait_ready, the default) before it answers 504; the launch goes on.",
    )
    node_stop_grace_s: float = Field(
        default=30.0, gt=0, description="A stopping worker finishes in-flight work this long."
    )

    worker_model: str | None = None
    # A launched model's spec (JSON), set by the node agent for the workers it starts:
    # launched models need not be in the registry file.
    worker_spec: str | None = None
    worker_node: str = ""
    worker_assignment: str = ""
    #: The node's device kind, for engines that run on several (vLLM: cuda or vacc).
    worker_device_kind: str = ""
    worker_devices: Annotated[list[str], NoDecode] = Field(default_factory=list)
    worker_replica: int = 0

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [r.strip() for r in value.split(os.pathsep) if r.strip()]
        return value

    @field_validator("worker_devices", "node_devices", mode="before")
    @classmethod
    def _split_devices(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_device_list(value)
        return value

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'inferq.db').resolve()}"

    def resolved_files_dir(self) -> Path:
        return (self.files_dir or self.data_dir / "files").resolve()

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "INFERQ_REDIS_URL is not set: set it, or use `inferq up`, which starts a private "
                "Redis server when none is configured."
            )
        return self.redis_url


def parse_device_list(text: str) -> list[str]:
    """Parse `0,1`, `0-3` or `0-3,8` into device ids; ranges save typing on 32-die hosts."""
    devices: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "-" in part and all(s.strip().isdigit() for s in part.split("-", 1)):
            lo, hi = (int(s) for s in part.split("-", 1))
            if hi < lo:
                raise ValueError(f"device range {part!r} runs backwards")
            devices.extend(str(i) for i in range(lo, hi + 1))
        else:
            devices.append(part)
    return devices


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
