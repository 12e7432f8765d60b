"""In-process coalescing: identical concurrent misses share one piece of work.

DESIGN.md section 2: the work runs until the latest waiter's deadline, each waiter gives
up at its own, the work is killed when no waiter remains, and waiters get the leader's
failure except a 499. Here the work runs as its own task, apart from every request, so
no single request's cancellation reaches it; only the last waiter leaving does.

What a waiter sees from ``SingleFlight.run``:

- the work's result, or the exception the work raised (the same object for everyone);
- ``FlightTimeout`` (a ``TimeoutError``) when its own deadline passes first, carrying
  the stage the work had reached, so the caller can answer 504 (fetch, transform) or
  503 queue_timeout (queue) as the contract asks;
- its own ``CancelledError`` when its request is cancelled (the others carry on).

A ``ClientClosed`` raised by the work belongs to whichever client's closure started it,
and a work cancelled by anyone but us (shutdown) answers nobody; in both cases the
other waiters run the flight again (joining or leading a new one) rather than fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

from edge.budget import Deadline, KillSwitch
from edge.errors import ClientClosed
from edge.metrics import Metrics

T = TypeVar("T")


class FlightTimeout(TimeoutError):
    """This waiter's own deadline passed before the shared work finished."""

    def __init__(self, stage: str | None) -> None:
        super().__init__(f"deadline passed while the shared work was in stage {stage}")
        #: the stage the work had reached (``Flight.stage``), None if it never said
        self.stage = stage


class Flight(KillSwitch):
    """What the shared work is handed: a kill switch plus the budget it runs under.

    ``deadline`` starts as the leader's and moves later (never earlier) as waiters with
    later deadlines join, so the work's own time checks follow the latest waiter. The work
    sets ``stage`` as it goes (queue, fetch, transform) for waiters who time out.
    """

    __slots__ = ("_stage", "deadline")

    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline
        self._stage: str | None = None

    @property
    def stage(self) -> str | None:
        """The stage set explicitly, else the one the work's deadline is timing now."""
        return self._stage or self.deadline.current

    @stage.setter
    def stage(self, value: str | None) -> None:
        self._stage = value

    def extend_to(self, at: float) -> None:
        """Let the work run until ``at`` (monotonic seconds) if that is later."""
        self.deadline.extend_to(at)


@dataclass(eq=False)
class _Shared:
    """One key's work in flight and how many callers are waiting for it."""

    flight: Flight
    task: asyncio.Task[Any]
    waiters: int = 0


class _Rerun(Exception):
    """The shared work ended in a way that answers nobody; this waiter tries again."""


class SingleFlight:
    """Owns the table of work in flight: at most one task per key, shared by every caller
    that asks for the key while it runs, removed as soon as the task ends."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._flights: dict[str, _Shared] = {}

    def __len__(self) -> int:
        """Keys with work in flight."""
        return len(self._flights)

    def __contains__(self, key: object) -> bool:
        return key in self._flights

    async def run(self, key: str, deadline: Deadline, work: Callable[[Flight], Awaitable[T]]) -> T:
        """``work``'s result for ``key``, started now or joined if already running.

        Waits until ``deadline`` at most (then raises ``FlightTimeout``); see the module
        docstring for everything else it may raise. A waiter that leaves early has the
        work's stage copied to ``deadline.current``, so its 499 or 504 names that stage.
        """
        joined_before = False
        while True:
            shared = self._flights.get(key)
            leads = shared is None
            if shared is None:
                shared = self._start(key, deadline, work)
            else:
                shared.flight.extend_to(deadline.at)
                if not joined_before:
                    self._metrics.coalesced.inc()
                    joined_before = True
            try:
                return cast(T, await self._wait(key, shared, deadline, leads=leads))
            except _Rerun:
                continue

    def _start(
        self, key: str, deadline: Deadline, work: Callable[[Flight], Awaitable[T]]
    ) -> _Shared:
        flight = Flight(deadline.sharing())

        async def call() -> T:
            return await work(flight)

        shared = _Shared(flight, asyncio.create_task(call(), name=f"flight {key}"))
        self._flights[key] = shared
        shared.task.add_done_callback(partial(self._finished, key, shared))
        return shared

    async def _wait(self, key: str, shared: _Shared, deadline: Deadline, *, leads: bool) -> Any:
        shared.waiters += 1
        # why we leave if we leave early; asyncio.wait never cancels the task it watches
        leaving_because = "client_closed"
        try:
            done, _ = await asyncio.wait({shared.task}, timeout=deadline.remaining())
            if not done:
                leaving_because = "timeout"
                raise FlightTimeout(shared.flight.stage)
            leaving_because = ""
        finally:
            if leaving_because:
                deadline.current = shared.flight.stage
            self._leave(key, shared, leaving_because)
        return self._answer(shared.task, leads=leads)

    def _leave(self, key: str, shared: _Shared, reason: str) -> None:
        shared.waiters -= 1
        if shared.waiters > 0 or shared.task.done() or not reason:
            return
        # nobody wants the result any more: stop the fetch or transform where it is
        shared.flight.kill(reason)
        shared.task.cancel()
        # a caller arriving now starts afresh rather than joining work being torn down
        self._forget(key, shared)

    def _answer(self, task: asyncio.Task[Any], *, leads: bool) -> Any:
        if task.cancelled():
            raise _Rerun
        failure = task.exception()
        if failure is None:
            return task.result()
        if isinstance(failure, ClientClosed) and not leads:
            raise _Rerun
        raise failure

    def _finished(self, key: str, shared: _Shared, task: asyncio.Task[Any]) -> None:
        self._forget(key, shared)
        if not task.cancelled():
            # mark the exception retrieved: every waiter may have left before it came
            task.exception()

    def _forget(self, key: str, shared: _Shared) -> None:
        if self._flights.get(key) is shared:
            del self._flights[key]
