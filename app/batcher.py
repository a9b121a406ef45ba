"""Bucket batching: the heart of embedding and rerank throughput.

Every input is token-counted once by the caller and placed in the smallest
bucket whose length holds it. Each bucket keeps one open batch; a batch runs
when it is full (the bucket's batch size) or when its oldest input has waited
`max_wait_ms`. Inputs of many requests share a batch, one request may span
several batches and buckets, and each request's results are put back in input
order and handed over once all of its parts are done.

One engine thread runs the batches, so the engine sees one call at a time with
all of the machine's threads, while any number of requests feed it.

Requests come in two lanes: interactive (sync API calls) and bulk (async jobs).
Each lane has its own buckets; the engine thread always takes a ready
interactive batch before a bulk one, so a job of thousands of inputs queued
ahead of a sync call delays it by one batch at most, not by the whole job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from app import worker_stats as ws
from app.errors import EngineFailure, InferqError, RequestTimedOut
from app.worker_stats import FixedHistogram

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Batches the replica's rate is measured over.
RATE_BATCHES = 32

INTERACTIVE = 0
BULK = 1
LANES = (INTERACTIVE, BULK)


def wait_for_result(future: Future[list[Any]], deadline: float) -> list[Any]:
    """A submitted request's results, or RequestTimedOut once its deadline (and a
    second's grace for the batch already running) has passed."""
    wait = None if deadline == float("inf") else max(0.0, deadline - time.time()) + 1.0
    try:
        return future.result(timeout=wait)
    except FutureTimeout:
        raise RequestTimedOut("the request's deadline passed while it waited") from None


@dataclass(frozen=True, order=True)
class Bucket:
    max_tokens: int
    batch_size: int


#: Steps of at most 25%, so a batch padded to its longest member wastes little.
#: Measured on 2 CPU cores with all-MiniLM-L6-v2 (bench/embeddings.py): with 4
#: clients sending 64 mixed texts each, these buckets ran at 1.0x the raw
#: length-sorted encode, against 0.89x for 32/64/128/256; with 32 one-text
#: clients they gave 0.80x against 0.85x (fewer inputs per bucket).
DEFAULT_BUCKET_LENGTHS = (
    16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128,
    160, 192, 224, 256, 320, 384, 448, 512,
)  # fmt: skip


def default_buckets(model_max: int, batch_size: int, lengths: Sequence[int] = ()) -> list[Bucket]:
    """Registry buckets for shape-free engines: the given lengths up to the model's limit,
    and always one bucket that holds the longest input the model takes."""
    chosen = sorted({n for n in (lengths or DEFAULT_BUCKET_LENGTHS) if n < model_max})
    return [Bucket(n, batch_size) for n in [*chosen, model_max]]


@dataclass
class BatchStats:
    """Totals and per-batch histograms, reported by the worker's heartbeat.

    The histograms keep cumulative bucket counts with fixed bounds
    (app/worker_stats.py), so the API can add up the replicas of a model and
    show the distribution of batch sizes and padding, not only the averages.
    """

    batches: int = 0
    items: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    failures: int = 0
    sizes: FixedHistogram = field(
        default_factory=lambda: FixedHistogram(ws.BATCH_SIZE, ws.BATCH_SIZE_BOUNDS)
    )
    efficiencies: FixedHistogram = field(
        default_factory=lambda: FixedHistogram(ws.PADDING_EFFICIENCY, ws.PADDING_EFFICIENCY_BOUNDS)
    )
    #: Busy wall time: each batch's run, and the gap before it when it was ready.
    engine_seconds: float = 0.0
    #: (items, seconds) of the latest batches: the replica's rate when it is kept busy.
    recent: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=RATE_BATCHES))

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0

    def record(
        self, size: int, real: int, computed: int, seconds: float = 0.0, full: bool = True
    ) -> None:
        """One batch that ran: `real` tokens of input padded to `computed`, in `seconds`.
        Only `full` batches (at least half their bucket's size) set the rate: a trickle
        of one-input batches would make the replica look slower than it runs loaded."""
        self.batches += 1
        self.engine_seconds += seconds
        if full or not self.recent:
            self.recent.append((size, seconds))
        self.items += size
        self.real_tokens += real
        self.computed_tokens += computed
        self.sizes.observe(size)
        self.efficiencies.observe(real / computed if computed else 1.0)

    def items_per_second(self) -> float:
        """Inputs per busy second over the latest batches; 0 before any ran.

        A batch's time runs from the end of the one before when it was ready then
        (the replica was kept busy), else from its start: what the replica finishes
        per second of wall time under load, which admission (api/admission.py)
        plans with to refuse work that would miss its deadline."""
        recent = list(self.recent)
        seconds = sum(s for _, s in recent)
        return sum(n for n, _ in recent) / seconds if seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        """The flat hash the heartbeat writes; field names in app/worker_stats.py."""
        return {
            ws.ITEMS_PER_SECOND: self.items_per_second(),
            ws.ENGINE_SECONDS: self.engine_seconds,
            ws.BATCHES: self.batches,
            ws.BATCHED_ITEMS: self.items,
            ws.REAL_TOKENS: self.real_tokens,
            ws.COMPUTED_TOKENS: self.computed_tokens,
            ws.BATCH_FAILURES: self.failures,
            **self.sizes.flat(),
            **self.efficiencies.flat(),
        }


class _Request:
    """One caller's inputs on their way through the batches."""

    def __init__(self, count: int, deadline: float) -> None:
        self.future: Future[list[Any]] = Future()
        self.results: list[Any] = [None] * count
        self.remaining = count
        self.deadline = deadline
        self.lock = threading.Lock()

    def put(self, index: int, value: Any) -> None:
        with self.lock:
            if self.future.done():
                return
            self.results[index] = value
            self.remaining -= 1
            if self.remaining == 0:
                self.future.set_result(self.results)

    def fail(self, error: BaseException) -> None:
        with self.lock:
            if not self.future.done():
                self.future.set_exception(error)


@dataclass
class _Item(Generic[T]):
    request: _Request
    index: int
    payload: T
    length: int
    at: float = 0.0


@dataclass
class _OpenBatch(Generic[T]):
    bucket: Bucket
    items: list[_Item[T]] = field(default_factory=list)
    oldest: float = 0.0


class BucketBatcher(Generic[T]):
    """Feeds `run_batch(payloads, padded_length)` from many threads' submissions.

    `run_batch` returns one result per payload (rows of an array or a list).
    With `pad_to_bucket` the batch is padded to its bucket's length (engines
    with compiled shapes); otherwise to its longest member.
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        run_batch: Callable[[list[T], int], Sequence[Any] | np.ndarray],
        max_wait_ms: float = 5.0,
        pad_to_bucket: bool = False,
        name: str = "inferq-batcher",
        min_padding_efficiency: float = 0.92,
        run_when_idle: bool = False,
    ) -> None:
        if not buckets:
            raise ValueError("a batcher needs at least one bucket")
        self.buckets = sorted(buckets)
        self._run_batch = run_batch
        self._max_wait = max_wait_ms / 1000.0
        self._pad_to_bucket = pad_to_bucket
        self._min_efficiency = min_padding_efficiency
        self._run_when_idle = run_when_idle
        #: Submitters holding the engine back while they add related inputs.
        self._held = 0
        self._lanes: list[dict[Bucket, _OpenBatch[T]]] = [
            {b: _OpenBatch(b) for b in self.buckets} for _ in LANES
        ]
        self._full: list[list[_OpenBatch[T]]] = [[] for _ in LANES]
        self._cond = threading.Condition()
        self._stopped = False
        self.stats = BatchStats()
        self._busy_since = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1].max_tokens

    def bucket_for(self, length: int) -> Bucket:
        for bucket in self.buckets:
            if length <= bucket.max_tokens:
                return bucket
        raise ValueError(f"{length} tokens is longer than the largest bucket ({self.max_tokens})")

    def submit(
        self,
        payloads: Sequence[T],
        lengths: Sequence[int],
        deadline: float = float("inf"),
        lane: int = INTERACTIVE,
    ) -> Future[list[Any]]:
        """Queue one request's inputs; the future resolves to their results in input order."""
        request = _Request(len(payloads), deadline)
        if not payloads:
            request.future.set_result([])
            return request.future
        now = time.monotonic()
        items = [
            _Item(request, i, p, n, now)
            for i, (p, n) in enumerate(zip(payloads, lengths, strict=True))
        ]
        placed = [(self.bucket_for(item.length), item) for item in items]
        with self._cond:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            open_batches, full = self._lanes[lane], self._full[lane]
            for bucket, item in placed:
                batch = open_batches[bucket]
                if not batch.items:
                    batch.oldest = now
                batch.items.append(item)
                if len(batch.items) >= bucket.batch_size:
                    full.append(batch)
                    open_batches[bucket] = _OpenBatch(bucket)
            self._cond.notify()
        return request.future

    @contextmanager
    def holding(self) -> Iterator[None]:
        """While held, an idle engine does not start a batch that is not full (or due):
        a worker submitting the requests of one message submits them all first."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5)

    def _next_batch(self) -> _OpenBatch[T] | None:
        """Under the lock, with the engine idle: a full batch, else an open one whose
        oldest input waited enough (or any open one, with `run_when_idle` and nobody
        holding the engine back); the interactive lane first.

        `run_when_idle` suits engines whose batch costs grow with its size (no
        compiled shapes): a lone request runs at once instead of waiting
        `max_wait_ms` for company, and under load inputs gather while the batch
        before them runs, so batches stay large."""
        now = time.monotonic()
        eager = self._run_when_idle and not self._held
        for lane in LANES:
            if self._full[lane]:
                return self._full[lane].pop(0)
            open_batches = self._lanes[lane]
            due = [
                b
                for b in open_batches.values()
                if b.items and (eager or now - b.oldest >= self._max_wait)
            ]
            if due:
                batch = min(due, key=lambda b: b.oldest)
                open_batches[batch.bucket] = _OpenBatch(batch.bucket)
                self._top_up(batch, open_batches)
                return batch
        return None

    def _top_up(self, batch: _OpenBatch[T], open_batches: dict[Bucket, _OpenBatch[T]]) -> None:
        """Fill a partial batch with waiting inputs of smaller buckets, longest first,
        while the batch stays at least `min_padding_efficiency` real tokens.

        With few requests in flight, fine buckets alone give small batches; this
        keeps batches large without giving back what the buckets save in padding.
        Smaller inputs never raise the batch's padded length, and they fit any
        compiled shape the batch's own bucket has.
        """
        room = batch.bucket.batch_size - len(batch.items)
        if room <= 0:
            return
        padded = (
            batch.bucket.max_tokens
            if self._pad_to_bucket
            else max(item.length for item in batch.items)
        )
        real = sum(item.length for item in batch.items)
        for bucket in reversed(self.buckets):
            if bucket >= batch.bucket or room <= 0:
                continue
            other = open_batches[bucket]
            if not other.items:
                continue
            taken: list[_Item[T]] = []
            for item in sorted(other.items, key=lambda it: it.length, reverse=True):
                count = len(batch.items) + len(taken) + 1
                if (
                    room <= len(taken)
                    or (real + item.length) / (padded * count) < self._min_efficiency
                ):
                    break
                taken.append(item)
                real += item.length
            if not taken:
                break  # shorter buckets hold only shorter inputs: none will fit either
            batch.items.extend(taken)
            room -= len(taken)
            chosen = {id(item) for item in taken}
            other.items = [item for item in other.items if id(item) not in chosen]
            other.oldest = min((item.at for item in other.items), default=0.0)

    def _wait_time(self) -> float | None:
        oldest = [b.oldest for lane in self._lanes for b in lane.values() if b.items]
        if not oldest:
            return None
        return max(0.0, min(oldest) + self._max_wait - time.monotonic())

    def _loop(self) -> None:
        last_end = time.monotonic()
        while True:
            with self._cond:
                batch = self._next_batch()
                backlog = batch is not None
                while batch is None:
                    if self._stopped:
                        return
                    self._cond.wait(self._wait_time())
                    batch = self._next_batch()
            # With a batch ready as the last one ended, the time between the two counts:
            # under load the replica's rate is what it finishes per second of wall time
            # (tokenising threads take CPU from the engine), not per second in the engine.
            self._busy_since = last_end if backlog else time.monotonic()
            self._run(batch)
            last_end = time.monotonic()

    def _run(self, batch: _OpenBatch[T]) -> None:
        now = time.time()
        live = [item for item in batch.items if not item.request.future.done()]
        for item in live:
            if item.request.deadline < now:
                item.request.fail(RequestTimedOut("the request's deadline passed before it ran"))
        live = [item for item in live if not item.request.future.done()]
        if not live:
            return
        try:
            self._execute(live, batch.bucket)
        except Exception as exc:
            # Someone in this batch broke the engine. Retry each request's part on its
            # own, so only the request that caused the failure gets the error.
            self.stats.failures += 1
            log.warning("batch of %d failed (%s); retrying its requests alone", len(live), exc)
            by_request: dict[int, list[_Item[T]]] = {}
            for item in live:
                by_request.setdefault(id(item.request), []).append(item)
            for items in by_request.values():
                try:
                    self._execute(items, batch.bucket)
                except InferqError as err:
                    items[0].request.fail(err)
                except Exception as err:
                    items[0].request.fail(EngineFailure(f"the engine failed on this input: {err}"))

    def _execute(self, items: list[_Item[T]], bucket: Bucket) -> None:
        longest = max(item.length for item in items)
        padded = bucket.max_tokens if self._pad_to_bucket else longest
        started = min(time.monotonic(), self._busy_since)
        results = self._run_batch([item.payload for item in items], padded)
        if len(results) != len(items):
            raise EngineFailure(f"the engine returned {len(results)} results for {len(items)}")
        ended = time.monotonic()
        self.stats.record(
            len(items),
            sum(item.length for item in items),
            padded * len(items),
            ended - started,
            full=len(items) * 2 >= bucket.batch_size,
        )
        self._busy_since = ended
        for item, value in zip(items, results, strict=True):
            item.request.put(item.index, value)
