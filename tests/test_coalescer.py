"""The API's coalescer on its own: when requests travel together, and when alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from api.coalesce import Coalescer
from app.registry import ModelSpec

SPEC = ModelSpec(name="m", kind="embedding", engine="sentence_transformers", path="/x", options={})


class Recorder:
    def __init__(self, fail: bool = False, delay: float = 0.0) -> None:
        self.groups: list[list[dict[str, Any]]] = []
        self.fail = fail
        self.delay = delay

    async def __call__(self, spec: ModelSpec, task: str, entries: list[dict[str, Any]]) -> None:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("broker down")
        self.groups.append(list(entries))


def coalescer(rec: Recorder, busy: bool, window: float = 0.05, cap: int = 32) -> Coalescer:
    return Coalescer(rec, lambda _: window, lambda _: cap, lambda _: busy)


def test_a_lone_request_leaves_at_once() -> None:
    async def main() -> float:
        rec = Recorder()
        c = coalescer(rec, busy=False, window=5.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await c.send(SPEC, "t", {"id": 1}, 1)
        assert rec.groups == [[{"id": 1}]]
        return loop.time() - started

    assert asyncio.run(main()) < 1.0


def test_requests_arriving_together_share_one_message() -> None:
    async def main() -> Recorder:
        rec = Recorder()
        c = coalescer(rec, busy=True)
        await asyncio.gather(*(c.send(SPEC, "t", {"id": i}, 1) for i in range(10)))
        await asyncio.gather(c.send(SPEC, "u", {"id": "other task"}, 1))
        return rec

    rec = asyncio.run(main())
    assert [len(g) for g in rec.groups] == [10, 1]


def test_a_full_gathering_leaves_without_waiting_out_the_window() -> None:
    async def main() -> tuple[Recorder, float]:
        rec = Recorder()
        c = coalescer(rec, busy=True, window=5.0, cap=4)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(c.send(SPEC, "t", {"id": i}, 2) for i in range(4)))
        return rec, loop.time() - started

    rec, took = asyncio.run(main())
    assert [len(g) for g in rec.groups] == [2, 2]
    assert took < 1.0


def test_a_cancelled_caller_does_not_stop_the_others_message() -> None:
    async def main() -> Recorder:
        rec = Recorder(delay=0.05)
        c = coalescer(rec, busy=True, window=0.01)
        first = asyncio.create_task(c.send(SPEC, "t", {"id": 1}, 1))
        second = asyncio.create_task(c.send(SPEC, "t", {"id": 2}, 1))
        await asyncio.sleep(0.02)  # the gathering is being published
        first.cancel()
        await second
        with pytest.raises(asyncio.CancelledError):
            await first
        return rec

    assert asyncio.run(main()).groups == [[{"id": 1}, {"id": 2}]]


def test_a_failed_publish_reaches_every_caller_of_the_message() -> None:
    async def main() -> list[BaseException | None]:
        c = coalescer(Recorder(fail=True), busy=True, window=0.01)
        return await asyncio.gather(
            *(c.send(SPEC, "t", {"id": i}, 1) for i in range(3)), return_exceptions=True
        )

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
