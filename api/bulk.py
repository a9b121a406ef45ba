"""Drives batches and corpus jobs from submitted to finished.

One API process at a time (a Redis lease, as for the job sweeper) advances
every open batch and corpus job each `INFERQ_BULK_POLL_INTERVAL_S`:

- a batch: validate its input file line by line, write bad lines to the error
  file and the rest as child jobs; then follow the children's counts; when
  none is left running, write the output and error files in input order.
- a corpus job: normalise its input into shards (one child job each); then
  follow the shards; when all are done, assemble the output file.

All state lives in the database and on disk, so a restarted API (or another
one) continues where the last one stopped. Files are read and written
streaming, and children are handled in pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from api.calls import CALLS
from api.jobs import JobQueue
from api.lease import RedisLease
from app.celery_app import CORPUS_SHARD
from app.errors import InferqError
from app.jobs.bulk_store import PAGE, BulkStore
from app.jobs.corpus import assemble, normalise
from app.jobs.files import FileStore
from app.jobs.lines import LineTooLong, bounded_lines
from app.jobs.models import (
    ACTIVE,
    Batch,
    BatchStatus,
    CorpusJob,
    CorpusStatus,
    Job,
    JobStatus,
)
from app.jobs.store import epoch_s, new_job_id, request_fingerprint, utcnow
from app.keys import KeySpace
from app.settings import Settings

log = logging.getLogger(__name__)

#: The widest custom_id the job store holds (its column's width).
MAX_CUSTOM_ID_CHARS = 512
BULK_PRIORITY = 2  # below the default job priority: interactive first, jobs next, bulk last
OPEN_BATCH = [
    BatchStatus.validating,
    BatchStatus.in_progress,
    BatchStatus.finalizing,
    BatchStatus.cancelling,
]
OPEN_CORPUS = [CorpusStatus.validating, CorpusStatus.in_progress, CorpusStatus.assembling]
ENDED_CORPUS = [CorpusStatus.completed, CorpusStatus.failed, CorpusStatus.cancelled]
#: A corpus working directory whose job this database does not know is removed this old.
ORPHAN_AGE_S = 7 * 24 * 3600.0


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


#: How often expired files and ended corpus jobs' working files are deleted.
HOUSEKEEPING_INTERVAL_S = 10.0
HOUSEKEEPING = "housekeeping"


def corpus_dir(job_id: str) -> str:
    return f"corpus/{job_id}"


class BulkCoordinator:
    def __init__(
        self,
        services: Any,
        queue: JobQueue,
        bulk: BulkStore,
        files: FileStore,
        redis_client: aioredis.Redis,
        keys: KeySpace,
        settings: Settings,
    ) -> None:
        self._services = services
        self._queue = queue
        self._bulk = bulk
        self._files = files
        self._redis = redis_client
        self._keys = keys
        self._settings = settings
        self._lease = RedisLease(redis_client, f"{keys.prefix}:bulk:coordinator")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: The running step of each batch or corpus job, by id (and the housekeeping).
        self._steps: dict[str, asyncio.Task[None]] = {}
        self._housekept = float("-inf")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="bulk")

    def nudge(self) -> None:
        """Something new was submitted: do not wait for the next tick."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        interval = self._settings.bulk_poll_interval_s
        # Each tick renews the lease; items run as tasks of their own across ticks, so
        # the lease stays renewed while a long validation runs.
        ttl = max(interval * 5, 30.0)
        try:
            while True:
                try:
                    if await self._lease.hold(ttl):
                        await self.advance()
                    else:
                        self._cancel_steps()  # another process leads now
                except (RedisError, OSError, SQLAlchemyError) as exc:
                    log.warning("bulk step failed: %s", exc)
                    self._cancel_steps()  # the lease may lapse before it can be renewed
                except Exception:
                    log.exception("bulk step failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
                self._wake.clear()
        finally:
            self._cancel_steps()

    def _cancel_steps(self) -> None:
        for task in self._steps.values():
            task.cancel()
        self._steps.clear()

    async def advance(self) -> None:
        """Start a step for each open batch and corpus job that has none running.

        Each item runs in a task of its own: a slow or failing item never holds back
        another, and any error but a backend blip ends that item as `failed`."""
        self._steps = {k: t for k, t in self._steps.items() if not t.done()}
        bulk = self._bulk
        open_batches = await asyncio.to_thread(bulk.in_status, Batch, OPEN_BATCH)
        open_corpus = await asyncio.to_thread(bulk.in_status, CorpusJob, OPEN_CORPUS)
        loop = asyncio.get_running_loop()
        for batch in open_batches:
            if batch.id not in self._steps:
                step = self._isolated(batch.id, self._advance_batch(batch), self._fail_batch, batch)
                self._steps[batch.id] = loop.create_task(step, name=f"bulk-{batch.id}")
        for job in open_corpus:
            if job.id not in self._steps:
                step = self._isolated(job.id, self._advance_corpus(job), self._fail_corpus, job)
                self._steps[job.id] = loop.create_task(step, name=f"bulk-{job.id}")
        now = loop.time()
        if now - self._housekept >= HOUSEKEEPING_INTERVAL_S and HOUSEKEEPING not in self._steps:
            self._housekept = now
            self._steps[HOUSEKEEPING] = loop.create_task(
                self._housekeep(), name="bulk-housekeeping"
            )

    async def _housekeep(self) -> None:
        """Delete expired files, and the working files of corpus jobs that have ended."""
        try:
            gone = await asyncio.to_thread(self._files.delete_expired)
            if gone:
                log.info("deleted %d expired file(s)", gone)
            await asyncio.to_thread(self._remove_ended_corpus_work)
        except (OSError, SQLAlchemyError) as exc:
            log.warning("housekeeping failed: %s", exc)

    def _remove_ended_corpus_work(self) -> None:
        """A corpus job's normalised input and shards are only needed while it is open:
        once it completed, failed or was cancelled (or is gone), its directory goes."""
        root = self._files.root / corpus_dir("")
        if not root.is_dir():
            return
        names = [p.name for p in root.iterdir() if p.is_dir()]
        for start in range(0, len(names), PAGE):
            some = names[start : start + PAGE]
            ended = self._bulk.among(CorpusJob, some, ENDED_CORPUS)
            known = self._bulk.among(CorpusJob, some, [*OPEN_CORPUS, *ENDED_CORPUS])
            for name in some:
                # A directory of no job here may belong to another deployment sharing the
                # files directory: only an old one (its job purged) is removed.
                unknown_and_old = name not in known and _older_than(root / name, ORPHAN_AGE_S)
                if name in ended or unknown_and_old:
                    shutil.rmtree(root / name, ignore_errors=True)

    async def wait_idle(self) -> None:
        """Until the steps started so far are over (for callers that advance by hand)."""
        await asyncio.gather(*self._steps.values(), return_exceptions=True)

    async def _isolated(
        self,
        item_id: str,
        step: Awaitable[None],
        fail: Callable[[Any, str, str], Awaitable[None]],
        item: Any,
    ) -> None:
        try:
            await step
        except (RedisError, SQLAlchemyError) as exc:
            # The broker or the database blinked: the item is taken up again next tick.
            log.warning("bulk step for %s failed: %s", item_id, exc)
        except Exception as exc:
            log.exception("bulk step for %s failed; the item fails", item_id)
            reason = f"{type(exc).__name__}: {exc}"[:500]
            with contextlib.suppress(RedisError, OSError, SQLAlchemyError):
                await self._stop_children(item_id)
                await fail(item, "processing_error", f"could not be processed: {reason}")

    async def _send_children(self, parent_id: str) -> None:
        while page := await asyncio.to_thread(self._bulk.unsent_children, parent_id):
            for child in page:
                if not await self._queue.send(child):
                    return  # broker away: the next tick tries again

    # ---- batches ------------------------------------------------------------------

    def _batch_path(self, batch_id: str, kind: str) -> Path:
        """Working files of a batch: `invalid` (validation), `output` and `errors`."""
        path = self._files.root / "batches" / f"{batch_id}.{kind}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    async def _advance_batch(self, batch: Batch) -> None:
        now = utcnow()
        if batch.status in (BatchStatus.validating, BatchStatus.in_progress) and (
            batch.expires_at < now
        ):
            await self._stop_children(batch.id)
            await asyncio.to_thread(
                self._bulk.move,
                Batch,
                batch.id,
                [batch.status],
                BatchStatus.cancelling,
                expired_at=now,
            )
            return
        if batch.status == BatchStatus.validating:
            await self._validate_batch(batch)
        elif batch.status == BatchStatus.in_progress:
            await self._send_children(batch.id)
            counts = await asyncio.to_thread(self._bulk.child_counts, batch.id)
            await self._record_counts(batch, counts)
            if not any(counts.get(s, 0) for s in ACTIVE):
                await asyncio.to_thread(
                    self._bulk.move,
                    Batch,
                    batch.id,
                    [BatchStatus.in_progress],
                    BatchStatus.finalizing,
                    finalizing_at=utcnow(),
                )
                await self._finish_batch(batch.id, BatchStatus.completed, "completed_at")
        elif batch.status == BatchStatus.finalizing:
            await self._finish_batch(batch.id, BatchStatus.completed, "completed_at")
        elif batch.status == BatchStatus.cancelling:
            await self._stop_children(batch.id)
            counts = await asyncio.to_thread(self._bulk.child_counts, batch.id)
            if counts.get(JobStatus.running, 0) == 0:
                expired = batch.expired_at is not None
                final = BatchStatus.expired if expired else BatchStatus.cancelled
                await self._finish_batch(batch.id, final, None if expired else "cancelled_at")

    async def _stop_children(self, parent_id: str) -> None:
        running = await asyncio.to_thread(self._bulk.cancel_children, parent_id)
        for job_id in running:
            await self._queue.stop_running(job_id)

    async def _record_counts(self, batch: Batch, counts: dict[str, int]) -> None:
        completed = counts.get(JobStatus.succeeded, 0)
        failed = counts.get(JobStatus.failed, 0) + counts.get(JobStatus.expired, 0)
        await asyncio.to_thread(
            self._bulk.set, Batch, batch.id, completed=completed, failed=failed + batch.invalid
        )

    async def _validate_batch(self, batch: Batch) -> None:
        record = await asyncio.to_thread(self._files.get, batch.input_file_id)
        if record is None:
            await self._fail_batch(batch, "file_not_found", "the input file no longer exists")
            return
        path = self._files.path_of(record)
        # Children are sent only once validation is over, so a validation cut off by a
        # restart left held rows at most: start again from the first line.
        await asyncio.to_thread(self._bulk.delete_children, batch.id)
        # Reading and checking lines is blocking work: a thread does it, and only each
        # body's preparation (model lookup, prompt sizing) comes back to the loop.
        loop = asyncio.get_running_loop()
        outcome = await asyncio.to_thread(self._validate_lines, batch, path, loop)
        if isinstance(outcome, InferqError):
            await self._fail_batch(batch, outcome.code or "invalid_file", outcome.message)
            return
        total, invalid, model = outcome
        started = await asyncio.to_thread(
            self._bulk.release_children,
            Batch,
            batch.id,
            [BatchStatus.validating],
            BatchStatus.in_progress,
            total=total,
            invalid=invalid,
            failed=invalid,
            model=model,
            in_progress_at=utcnow(),
        )
        if started:
            await self._send_children(batch.id)

    def _validate_lines(
        self, batch: Batch, path: Path, loop: asyncio.AbstractEventLoop
    ) -> tuple[int, int, str | None] | InferqError:
        """Check every line, write bad ones to the `invalid` file and the rest as held
        children; (lines, invalid lines, model), or the error that fails the batch."""
        settings = self._settings
        invalid_path = self._batch_path(batch.id, "invalid")
        total = invalid = 0
        model: str | None = None
        pending: list[Job] = []

        def bad(out: TextIO, custom_id: Any, code: str, message: str, line: int) -> None:
            nonlocal invalid
            invalid += 1
            entry = {
                "id": f"batch_req_{batch.id}_{line}",
                "custom_id": custom_id if isinstance(custom_id, str) else None,
                "response": None,
                "error": {"code": code, "message": f"line {line}: {message}"},
            }
            out.write(json.dumps(entry) + "\n")

        def flush(out: TextIO) -> None:
            for job in self._bulk.add_children(list(pending)):
                bad(
                    out,
                    job.custom_id,
                    "duplicate_custom_id",
                    f"custom_id {job.custom_id!r} is used by an earlier line",
                    (job.seq or 0) + 1,
                )
            pending.clear()

        with invalid_path.open("w", encoding="utf-8") as out, path.open("rb") as lines:
            for number, raw in bounded_lines(lines, settings.bulk_max_line_bytes):
                if isinstance(raw, LineTooLong):
                    total += 1
                    bad(
                        out,
                        None,
                        "line_too_long",
                        f"the line is {raw.size} bytes; at most {settings.bulk_max_line_bytes}",
                        number,
                    )
                    continue
                if not raw.strip():
                    continue
                total += 1
                if total > settings.batch_max_lines:
                    return InferqError(
                        f"the file has more than {settings.batch_max_lines} requests",
                        code="too_many_lines",
                    )
                checked = self._check_line(batch, raw, model, loop)
                if isinstance(checked, tuple):
                    code, message, custom_id = checked
                    bad(out, custom_id, code, message, number)
                    continue
                model = checked.model
                checked.seq = number - 1
                pending.append(checked)
                if len(pending) >= PAGE:
                    flush(out)
            if pending:
                flush(out)
        return total, invalid, model

    def _check_line(
        self, batch: Batch, raw: bytes, model: str | None, loop: asyncio.AbstractEventLoop
    ) -> Job | tuple[str, str, Any]:
        """The line's child job, or (code, message, custom_id) saying why it is refused."""
        try:
            line = json.loads(raw.decode("utf-8", errors="replace"))
        except ValueError:
            return "invalid_json", "not valid JSON", None
        except RecursionError:
            return "invalid_json", "the JSON is nested too deeply", None
        if not isinstance(line, dict):
            return "invalid_request", "a line must be a JSON object", None
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return "missing_custom_id", "custom_id must be a string", custom_id
        if len(custom_id) > MAX_CUSTOM_ID_CHARS or "\x00" in custom_id:
            message = f"custom_id must be at most {MAX_CUSTOM_ID_CHARS} characters and hold no NUL"
            return "invalid_custom_id", message, custom_id
        if line.get("method", "POST") != "POST":
            return "invalid_method", "method must be POST", custom_id
        url = line.get("url")
        if not isinstance(url, str) or url not in CALLS:
            return "invalid_url", f"url {str(url)[:200]!r} is not supported", custom_id
        if url != batch.endpoint:
            message = f"url {url!r} is not this batch's endpoint {batch.endpoint!r}"
            return "mismatched_url", message, custom_id
        call = CALLS[url]
        try:
            body = call.parse(line.get("body"))
            if getattr(body, "stream", False):
                raise InferqError("a batch request cannot stream", code="invalid_body")
            if model is not None and body.model != model:
                message = f"model {body.model!r} differs from the batch's {model!r}"
                return "model_mismatch", message, custom_id
            future = asyncio.run_coroutine_threadsafe(call.prepare(body, self._services), loop)
            prepared = future.result()
        except InferqError as exc:
            return exc.code or "invalid_body", exc.message, custom_id
        except RecursionError:
            return "invalid_body", "the body is nested too deeply", custom_id
        return Job(
            id=new_job_id(),
            owner=batch.owner,
            endpoint=url,
            model=prepared.spec.name,
            task=prepared.task,
            status=JobStatus.held,
            priority=BULK_PRIORITY,
            request=line["body"],
            request_hash=request_fingerprint(line["body"]),
            payload=prepared.payload,
            attempts=0,
            created_at=batch.created_at,
            expires_at=batch.expires_at,
            webhook_attempts=0,
            parent_id=batch.id,
            custom_id=custom_id,
        )

    async def _fail_batch(self, batch: Batch, code: str, message: str) -> None:
        await asyncio.to_thread(
            self._bulk.move,
            Batch,
            batch.id,
            OPEN_BATCH,
            BatchStatus.failed,
            failed_at=utcnow(),
            errors=[{"code": code, "message": message, "line": None, "param": None}],
        )
        await asyncio.to_thread(self._bulk.delete_children, batch.id, True)

    async def _finish_batch(self, batch_id: str, final: str, stamp: str | None) -> None:
        batch = await asyncio.to_thread(self._bulk.get, Batch, batch_id)
        if batch is None:
            return
        output_id, error_id, completed, failed = await asyncio.to_thread(
            self._write_batch_files, batch
        )
        values: dict[str, Any] = {
            "output_file_id": output_id,
            "error_file_id": error_id,
            "completed": completed,
            "failed": failed,
        }
        if stamp:
            values[stamp] = utcnow()
        await asyncio.to_thread(
            self._bulk.move,
            Batch,
            batch.id,
            [BatchStatus.finalizing, BatchStatus.cancelling, BatchStatus.in_progress],
            final,
            **values,
        )
        # Only now: a finalisation done again before this point still needs it.
        self._batch_path(batch.id, "invalid").unlink(missing_ok=True)

    def _write_batch_files(self, batch: Batch) -> tuple[str | None, str | None, int, int]:
        """Output and error files in input order; (ids, completed, failed).

        Both are written afresh from the validation errors and the children, so
        a finalisation cut off by a restart is simply done again.
        """
        out_tmp = self._batch_path(batch.id, "output")
        error_path = self._batch_path(batch.id, "errors")
        invalid_path = self._batch_path(batch.id, "invalid")
        completed = 0
        failed = batch.invalid
        created = epoch_s(batch.created_at) or 0
        with (
            out_tmp.open("w", encoding="utf-8") as out,
            error_path.open("w", encoding="utf-8") as errors,
        ):
            if invalid_path.is_file():
                with invalid_path.open(encoding="utf-8") as invalid:
                    shutil.copyfileobj(invalid, errors)
            for job in self._bulk.iter_children(
                batch.id, [JobStatus.succeeded, JobStatus.failed, JobStatus.expired]
            ):
                entry: dict[str, Any] = {"id": f"batch_req_{job.id}", "custom_id": job.custom_id}
                if job.status == JobStatus.succeeded and job.result is not None:
                    call = CALLS[job.endpoint]
                    body = call.render(
                        call.parse(job.request), job.model, job.result, job.id, created
                    )
                    entry["response"] = {"status_code": 200, "request_id": job.id, "body": body}
                    entry["error"] = None
                    out.write(json.dumps(entry) + "\n")
                    completed += 1
                else:
                    error = job.error or {}
                    entry["response"] = {
                        "status_code": int(error.get("status") or 500),
                        "request_id": job.id,
                        "body": {
                            "error": {k: error.get(k) for k in ("message", "type", "param", "code")}
                        },
                    }
                    entry["error"] = None
                    errors.write(json.dumps(entry) + "\n")
                    failed += 1
        output_id = error_id = None
        if completed:
            output_id = self._files.adopt(
                batch.owner, "batch_output", f"{batch.id}_output.jsonl", out_tmp
            ).id
        else:
            out_tmp.unlink(missing_ok=True)
        if failed:
            error_id = self._files.adopt(
                batch.owner, "batch_output", f"{batch.id}_errors.jsonl", error_path
            ).id
        else:
            error_path.unlink(missing_ok=True)
        return output_id, error_id, completed, failed

    # ---- corpus jobs --------------------------------------------------------------

    async def _advance_corpus(self, job: CorpusJob) -> None:
        if job.status == CorpusStatus.validating:
            await self._split_corpus(job)
        elif job.status == CorpusStatus.in_progress:
            await self._send_children(job.id)
            counts = await asyncio.to_thread(self._bulk.child_counts, job.id)
            if counts.get(JobStatus.failed, 0) or counts.get(JobStatus.expired, 0):
                await self._stop_children(job.id)
                await asyncio.to_thread(
                    self._bulk.move,
                    CorpusJob,
                    job.id,
                    [CorpusStatus.in_progress],
                    CorpusStatus.failed,
                    finished_at=utcnow(),
                    error={"code": "shard_failed", "message": "a shard failed; see its job"},
                )
            elif counts.get(JobStatus.succeeded, 0) == job.shards_total:
                await asyncio.to_thread(
                    self._bulk.move,
                    CorpusJob,
                    job.id,
                    [CorpusStatus.in_progress],
                    CorpusStatus.assembling,
                )
                await self._assemble(job.id)
        elif job.status == CorpusStatus.assembling:
            await self._assemble(job.id)

    async def _split_corpus(self, job: CorpusJob) -> None:
        record = await asyncio.to_thread(self._files.get, job.file_id)
        if record is None:
            await self._fail_corpus(job, "file_not_found", "the input file no longer exists")
            return
        directory = self._files.root / corpus_dir(job.id)
        directory.mkdir(parents=True, exist_ok=True)
        normalised = directory / "input.jsonl"
        await asyncio.to_thread(self._bulk.delete_children, job.id)  # as for batches
        try:
            shards, texts = await asyncio.to_thread(
                self._write_shard_jobs, job, self._files.path_of(record), normalised
            )
        except InferqError as exc:
            await self._fail_corpus(job, exc.code or "invalid_file", exc.message)
            return
        except (RedisError, SQLAlchemyError):
            raise  # a backend blip: the split is done again next tick
        except Exception as exc:
            # Whatever the file made its reader raise (a CSV or Arrow error, bad UTF-8,
            # nesting too deep): this corpus job fails, no other is touched.
            reason = f"{type(exc).__name__}: {exc}"[:500]
            await self._fail_corpus(job, "invalid_file", f"the file could not be read: {reason}")
            return
        started = await asyncio.to_thread(
            self._bulk.release_children,
            CorpusJob,
            job.id,
            [CorpusStatus.validating],
            CorpusStatus.in_progress,
            shards_total=shards,
            texts_total=texts,
            started_at=utcnow(),
        )
        if started:
            await self._send_children(job.id)

    def _write_shard_jobs(self, job: CorpusJob, source: Path, target: Path) -> tuple[int, int]:
        """Normalise the input and add one child job per shard; (shards, texts)."""
        rel_input = f"{corpus_dir(job.id)}/input.jsonl"
        expires = job.created_at + timedelta(seconds=self._settings.job_queue_ttl_s)
        page: list[Job] = []
        shards = texts = 0
        for shard in normalise(
            source,
            job.input_format,
            target,
            job.shard_size,
            job.text_field,
            job.id_field,
            self._settings.bulk_max_line_bytes,
        ):
            shards, texts = shard.index + 1, shard.first + shard.count
            payload = {
                "input": rel_input,
                "start": shard.start,
                "end": shard.end,
                "index": shard.index,
                "dir": corpus_dir(job.id),
            }
            page.append(
                Job(
                    id=new_job_id(),
                    owner=job.owner,
                    endpoint="corpus",
                    model=job.model,
                    task=CORPUS_SHARD,
                    status=JobStatus.held,
                    priority=BULK_PRIORITY,
                    request={"shard": shard.index, "count": shard.count},
                    request_hash=request_fingerprint(payload),
                    payload=payload,
                    attempts=0,
                    created_at=job.created_at,
                    expires_at=expires,
                    webhook_attempts=0,
                    parent_id=job.id,
                    seq=shard.index,
                )
            )
            if len(page) >= PAGE:
                self._bulk.add_children(page)
                page = []
        if page:
            self._bulk.add_children(page)
        return shards, texts

    async def _fail_corpus(self, job: CorpusJob, code: str, message: str) -> None:
        await asyncio.to_thread(
            self._bulk.move,
            CorpusJob,
            job.id,
            OPEN_CORPUS,
            CorpusStatus.failed,
            finished_at=utcnow(),
            error={"code": code, "message": message},
        )
        await asyncio.to_thread(self._bulk.delete_children, job.id, True)

    async def _assemble(self, job_id: str) -> None:
        job = await asyncio.to_thread(self._bulk.get, CorpusJob, job_id)
        if job is None or job.status != CorpusStatus.assembling:
            return
        directory = self._files.root / corpus_dir(job.id)
        out = directory / f"embeddings.{job.output_format}"
        ids_path = await asyncio.to_thread(
            assemble, directory, job.shards_total, job.texts_total, job.output_format, out
        )
        name = f"{job.id}.{job.output_format}"
        output = await asyncio.to_thread(self._files.adopt, job.owner, "corpus_output", name, out)
        ids_id = None
        if ids_path is not None:
            ids_file = await asyncio.to_thread(
                self._files.adopt, job.owner, "corpus_output", f"{job.id}.ids.jsonl", ids_path
            )
            ids_id = ids_file.id
        await asyncio.to_thread(
            self._bulk.move,
            CorpusJob,
            job.id,
            [CorpusStatus.assembling],
            CorpusStatus.completed,
            output_file_id=output.id,
            ids_file_id=ids_id,
            finished_at=utcnow(),
        )
        # Its outputs were moved into the file store: the input copy and shards go.
        await asyncio.to_thread(shutil.rmtree, directory, True)
