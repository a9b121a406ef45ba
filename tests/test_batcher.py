"""The bucket batcher on its own: placement, batching across requests, order, failures."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batcher import Bucket, BucketBatcher, default_buckets
from app.errors import EngineFailure, RequestTimedOut


class Recorder:
    """An engine stand-in that doubles numbers and remembers every batch it ran."""

    def __init__(self, delay: float = 0.0, poison: int | None = None) -> None:
        self.batches: list[tuple[list[int], int]] = []
        self.delay = delay
        self.poison = poison
        self.lock = threading.Lock()

    def __call__(self, payloads: list[int], padded: int) -> list[int]:
        if self.poison is not None and self.poison in payloads:
            raise ValueError(f"cannot handle {self.poison}")
        with self.lock:
            self.batches.append((list(payloads), padded))
        time.sleep(self.delay)
        return [p * 2 for p in payloads]


BUCKETS = [Bucket(8, 4), Bucket(16, 2), Bucket(32, 2)]


def test_default_buckets_stop_at_the_model_limit() -> None:
    lengths = [b.max_tokens for b in default_buckets(256, 32)]
    assert lengths[0] == 16 and lengths[-1] == 256
    assert all(b / a <= 1.25 for a, b in itertools.pairwise(lengths))
    assert default_buckets(100, 8, [16, 500]) == [Bucket(16, 8), Bucket(100, 8)]


def test_inputs_go_to_the_smallest_bucket_that_holds_them() -> None:
    batcher = BucketBatcher(BUCKETS, Recorder(), max_wait_ms=1)
    try:
        assert batcher.bucket_for(1) == Bucket(8, 4)
        assert batcher.bucket_for(8) == Bucket(8, 4)
        assert batcher.bucket_for(9) == Bucket(16, 2)
        assert batcher.bucket_for(32) == Bucket(32, 2)
        with pytest.raises(ValueError, match="longer than the largest bucket"):
            batcher.bucket_for(33)
    finally:
        batcher.stop()


def test_full_batches_run_at_once_and_results_come_back_in_input_order() -> None:
    engine = Recorder()
    batcher = BucketBatcher(BUCKETS, engine, max_wait_ms=10_000)
    try:
        # 4 short inputs fill the 8-token bucket; 2 medium fill the 16-token bucket.
        future = batcher.submit([1, 2, 3, 4, 5, 6], [3, 12, 5, 2, 16, 7])
        assert future.result(timeout=2) == [2, 4, 6, 8, 10, 12]
        runs = sorted(engine.batches)
        assert runs == [([1, 3, 4, 6], 7), ([2, 5], 16)]  # padded to the longest member
    finally:
        batcher.stop()


def test_partial_batch_runs_after_max_wait() -> None:
    engine = Recorder()
    batcher = BucketBatcher(BUCKETS, engine, max_wait_ms=30)
    try:
        started = time.monotonic()
        assert batcher.submit([7], [3]).result(timeout=2) == [14]
        waited = time.monotonic() - started
        assert 0.02 <= waited < 1.0
    finally:
        batcher.stop()


def test_many_requests_share_batches_and_each_gets_its_own_results() -> None:
    engine = Recorder(delay=0.01)
    batcher = BucketBatcher([Bucket(8, 16), Bucket(32, 16)], engine, max_wait_ms=5)
    try:

        def request(n: int) -> list[int]:
            values = [n * 100 + i for i in range(3)]
            return batcher.submit(values, [1 + (v % 30) for v in values]).result(timeout=5)

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(request, range(64)))
        assert results == [[2 * (n * 100 + i) for i in range(3)] for n in range(64)]
        assert len(engine.batches) < 64  # inputs of different requests were batched together
        assert max(len(b) for b, _ in engine.batches) > 3
    finally:
        batcher.stop()


def test_pad_to_bucket_reports_bucket_length_and_padding_efficiency() -> None:
    engine = Recorder()
    batcher = BucketBatcher(BUCKETS, engine, max_wait_ms=1, pad_to_bucket=True)
    try:
        batcher.submit([1, 2], [4, 4]).result(timeout=2)
        assert engine.batches == [([1, 2], 8)]
        assert batcher.stats.padding_efficiency == pytest.approx(0.5)
    finally:
        batcher.stop()


def test_a_poisoned_input_fails_only_its_own_request() -> None:
    engine = Recorder(poison=13)
    batcher = BucketBatcher([Bucket(8, 8)], engine, max_wait_ms=50)
    try:
        good_a = batcher.submit([1, 2], [1, 1])
        bad = batcher.submit([3, 13], [1, 1])
        good_b = batcher.submit([4], [1])
        assert good_a.result(timeout=2) == [2, 4]
        assert good_b.result(timeout=2) == [8]
        with pytest.raises(EngineFailure, match="cannot handle 13"):
            bad.result(timeout=2)
        assert batcher.stats.failures == 1
    finally:
        batcher.stop()


def test_expired_requests_are_not_computed() -> None:
    engine = Recorder()
    batcher = BucketBatcher(BUCKETS, engine, max_wait_ms=1)
    try:
        late = batcher.submit([5], [1], deadline=time.time() - 1)
        with pytest.raises(RequestTimedOut):
            late.result(timeout=2)
        assert engine.batches == []
    finally:
        batcher.stop()


def test_a_partial_batch_is_topped_up_with_shorter_inputs_when_padding_allows() -> None:
    engine = Recorder(delay=0.2)
    batcher = BucketBatcher(
        [Bucket(8, 4), Bucket(10, 4), Bucket(32, 4)],
        engine,
        max_wait_ms=1,
        min_padding_efficiency=0.85,
    )
    try:
        blocker = batcher.submit([0], [30])  # keeps the engine busy while the rest queue up
        time.sleep(0.05)
        futures = [batcher.submit([v], [n]) for v, n in [(1, 10), (2, 10), (3, 7), (4, 2)]]
        assert [f.result(timeout=5) for f in futures] == [[2], [4], [6], [8]]
        blocker.result(timeout=5)
        runs = [payloads for payloads, _ in engine.batches]
        # The 7-token input joins the 10-token batch (27 of 30 tokens real); the
        # 2-token one would bring it to 29 of 40, below 85%, so it runs on its own.
        assert sorted(map(sorted, runs)) == [[0], [1, 2, 3], [4]]
    finally:
        batcher.stop()
