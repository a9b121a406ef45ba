"""The figures a worker reports through its heartbeat, and the names they travel under.

Each heartbeat writes one flat Redis hash of numbers per replica
(`KeySpace.replica_stats`); the API reads the hashes of a model's live replicas
and turns them into Prometheus metrics (api/metrics.py). Workers are never
scraped themselves: they may sit on machines a scraper cannot reach, and they
come and go. The field names below are that hash's schema; dashboards depend on
them through the API, so they only ever gain new names.

Fields, all totals since the worker process started unless said otherwise:

- task outcomes (`TASK_OUTCOMES`): `received`, `answered`, `failed`, `expired`,
  `cancelled` for sync calls; `jobs_started`, `jobs_succeeded`, `jobs_failed`,
  `jobs_skipped`, `jobs_discarded` for async jobs.
- `generated_tokens`: completion tokens of chat/completion requests.
- `tokens_per_second`: generated tokens per second over the last
  `RATE_WINDOW_S` (a gauge, not a total; see `TokenRate`).
- `in_flight`: requests and jobs in the engine at the beat (a gauge).
- batching (embedding and rerank workers, app/batcher.py `BatchStats`):
  `batches`, `batched_items`, `real_tokens`, `computed_tokens`, `batch_failures`,
  `engine_seconds` (busy wall time: batches and the gaps between ready ones),
  `items_per_second` (a gauge: inputs per busy second over the latest batches,
  what admission plans with),
  and two histograms, `batch_size` and `padding_efficiency`, each written as
  `<name>_le:<bound>` cumulative bucket counts (`+Inf` last) with `<name>_sum`
  and `<name>_count`, the layout of a Prometheus histogram.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence

TASK_OUTCOMES = (
    "received",
    "answered",
    "failed",
    "expired",
    "cancelled",
    "jobs_started",
    "jobs_succeeded",
    "jobs_failed",
    "jobs_skipped",
    "jobs_discarded",
)
GENERATED_TOKENS = "generated_tokens"
TOKENS_PER_SECOND = "tokens_per_second"
IN_FLIGHT = "in_flight"

ITEMS_PER_SECOND = "items_per_second"
ENGINE_SECONDS = "engine_seconds"
BATCHES = "batches"
BATCHED_ITEMS = "batched_items"
REAL_TOKENS = "real_tokens"
COMPUTED_TOKENS = "computed_tokens"
BATCH_FAILURES = "batch_failures"

BATCH_SIZE = "batch_size"
PADDING_EFFICIENCY = "padding_efficiency"
#: Fixed bounds, so the buckets of every replica add up bucket by bucket.
BATCH_SIZE_BOUNDS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
PADDING_EFFICIENCY_BOUNDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

#: How far back `tokens_per_second` looks: several heartbeats, so one beat's
#: jitter does not make the figure jump, and short enough to show a stall.
RATE_WINDOW_S = 10.0

BUCKET_MARK = "_le:"


def bucket_key(histogram: str, bound: float) -> str:
    """`batch_size_le:4.0`, `batch_size_le:+Inf`: one cumulative bucket's field."""
    return f"{histogram}{BUCKET_MARK}{'+Inf' if math.isinf(bound) else repr(float(bound))}"


class FixedHistogram:
    """Counts observations into fixed buckets; written by one thread, read by another.

    Only the engine thread observes and the heartbeat thread only reads, so no
    lock is needed; `flat` derives the count from the buckets it copied, so the
    `+Inf` bucket always equals `_count` as Prometheus requires.
    """

    def __init__(self, name: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.bounds = tuple(sorted(bounds))
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self._counts[i] += 1
                break
        else:
            self._counts[-1] += 1
        self._sum += value

    def flat(self) -> dict[str, float]:
        counts = list(self._counts)
        out: dict[str, float] = {}
        running = 0
        for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
            running += n
            out[bucket_key(self.name, bound)] = running
        out[f"{self.name}_sum"] = self._sum
        out[f"{self.name}_count"] = running
        return out


class TokenRate:
    """Tokens per second over the last `window` seconds, sampled at each heartbeat.

    The worker computes the rate itself rather than leaving it to the API: every
    API process and every scraper then sees the same figure, with no state kept
    between scrapes. For alerting and long ranges, prefer
    `rate(inferq_generated_tokens_total[...])`, which this mirrors.
    """

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()

    def update(self, total: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._samples.append((now, total))
        # Keep one sample at or before the window's start, so the rate spans it all.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        then, before = self._samples[0]
        if now <= then:
            return 0.0
        return max(0.0, total - before) / (now - then)
