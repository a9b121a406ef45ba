"""Embeddings and rerank requests for one model that arrive together leave as one message.

One queue message per request costs a publish here, and a delivery, a claim, an
acceptance, a reply and an acknowledgement on the worker, whatever the size of
the request: in front of a fast model that is most of the work. So requests
for the same model and task gather for a moment and travel as one message of
the batched task (workers/tasks.py), which the worker feeds to its batcher at
once and answers with one reply message per API process.

The moment is short and only taken when it can pay: a request for a model with
nothing else in flight from this process leaves at once (at the next turn of
the event loop, so requests that arrived together still share it); otherwise it
waits at most the coalescing window, never longer than the model's batcher
waits for company itself, and a gathering leaves as soon as it holds a batch's
worth of inputs. Each request keeps its own id, deadline, attempt and reply,
so failover, resends, cancellation and errors stay per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app.registry import ModelSpec

#: (spec, task, entries) -> None: publishes one message holding the entries.
SendGroup = Callable[[ModelSpec, str, list[dict[str, Any]]], Awaitable[None]]


@dataclass
class _Gathering:
    spec: ModelSpec
    task: str
    sent: asyncio.Future[None]
    entries: list[dict[str, Any]] = field(default_factory=list)
    work: int = 0
    handle: asyncio.Handle | None = None
    leaving: bool = False


class Coalescer:
    def __init__(
        self,
        send_group: SendGroup,
        window_s: Callable[[ModelSpec], float],
        capacity: Callable[[ModelSpec], int],
        busy: Callable[[str], bool],
    ) -> None:
        self._send_group = send_group
        self._window_s = window_s
        self._capacity = capacity
        self._busy = busy
        self._open: dict[tuple[str, str], _Gathering] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def send(self, spec: ModelSpec, task: str, entry: dict[str, Any], work: int) -> None:
        """Returns once the message holding `entry` is on the queue; raises what publishing
        it raised. A caller cancelled meanwhile does not stop the others' message."""
        key = (spec.name, task)
        gathering = self._open.get(key)
        if gathering is None:
            loop = asyncio.get_running_loop()
            gathering = _Gathering(spec, task, loop.create_future())
            self._open[key] = gathering
            wait = self._window_s(spec) if self._busy(spec.name) else 0.0
            if wait > 0:
                gathering.handle = loop.call_later(wait, self._leave, key, gathering)
            else:
                gathering.handle = loop.call_soon(self._leave, key, gathering)
        gathering.entries.append(entry)
        gathering.work += max(1, work)
        if gathering.work >= self._capacity(spec):
            self._leave(key, gathering)
        await asyncio.shield(gathering.sent)

    def _leave(self, key: tuple[str, str], gathering: _Gathering) -> None:
        if gathering.leaving:
            return
        gathering.leaving = True
        if gathering.handle is not None:
            gathering.handle.cancel()
        if self._open.get(key) is gathering:
            del self._open[key]
        task = asyncio.get_running_loop().create_task(self._publish(gathering))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _publish(self, gathering: _Gathering) -> None:
        try:
            await self._send_group(gathering.spec, gathering.task, gathering.entries)
        except BaseException as exc:
            if not gathering.sent.done():
                gathering.sent.set_exception(exc)
                # Retrieved here too: every caller may have gone away meanwhile.
                gathering.sent.exception()
            if not isinstance(exc, Exception):
                raise
        else:
            if not gathering.sent.done():
                gathering.sent.set_result(None)
