"""The per-request time budget: one deadline, the time each stage spent, and a kill switch.

A ``Deadline`` is made once when a request arrives and only ever shortened; the copy
that work shared by coalesced requests runs under moves later as later waiters join. Stages
(fetch, queue, transform, cache_get, cache_set) record what they spent so Server-Timing,
the access log and the stage histogram agree. The ``KillSwitch`` is how an async caller
stops a libvips pipeline running in a worker thread: imaging.py polls it from the
pipeline's progress signal and kills the image when it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any


class KillSwitch:
    """Set by the event loop, read by a transform thread; one-way (never cleared)."""

    __slots__ = ("_event", "reason")

    def __init__(self) -> None:
        self._event = threading.Event()
        #: why it was set: "timeout" or "client_closed" (or None while unset)
        self.reason: str | None = None

    def kill(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass(slots=True)
class Deadline:
    """When the request's budget ends (``time.monotonic`` seconds) and how it was spent."""

    at: float
    started: float = field(default_factory=time.monotonic)
    #: seconds spent per stage, in the order stages ran
    spent: dict[str, float] = field(default_factory=dict)
    #: the stage running now (None between stages): where a disconnect or timeout happened
    current: str | None = None
    #: wraps each stage (tracing spans); None: nothing but timing
    observer: Callable[[str], AbstractContextManager[Any]] | None = None
    #: the asyncio timeouts waiting on this deadline now, moved with it by ``extend_to``
    _timeouts: list[asyncio.Timeout] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        now = time.monotonic()
        return cls(at=now + max(seconds, 0.0), started=now)

    def sharing(self) -> Deadline:
        """A deadline for work shared with other requests: same end, own stage record."""
        return Deadline(at=self.at, started=self.started, observer=self.observer)

    def shorten_to(self, seconds: float) -> None:
        """Move the deadline earlier (never later) to ``seconds`` after the start."""
        self.at = min(self.at, self.started + max(seconds, 0.0))

    def extend_to(self, at: float) -> None:
        """Move the deadline later (never earlier) to ``at``, and every timeout waiting on
        it: work shared by coalesced requests runs until the latest one's deadline."""
        if at <= self.at:
            return
        self.at = at
        for timeout in self._timeouts:
            timeout.reschedule(self._loop_time())

    @contextlib.asynccontextmanager
    async def timeout(self) -> AsyncIterator[None]:
        """TimeoutError in the enclosed block once the deadline passes, wherever
        ``extend_to`` has moved it by then."""
        async with asyncio.timeout_at(self._loop_time()) as timeout:
            self._timeouts.append(timeout)
            try:
                yield
            finally:
                self._timeouts.remove(timeout)

    def _loop_time(self) -> float:
        # the loop's clock need not be time.monotonic (uvloop keeps its own)
        return asyncio.get_running_loop().time() + (self.at - time.monotonic())

    def remaining(self) -> float:
        return max(self.at - time.monotonic(), 0.0)

    def record(self, stage: str, seconds: float) -> None:
        self.spent[stage] = self.spent.get(stage, 0.0) + seconds

    def stage(self, name: str) -> Stage:
        """Time the enclosed block as ``name`` (recorded even when it raises)."""
        return Stage(self, name)


class Stage:
    """One timed stage of a Deadline (a class, not a generator: it runs on every hit)."""

    __slots__ = ("_begun", "_deadline", "_name", "_outer", "_span")

    def __init__(self, deadline: Deadline, name: str) -> None:
        self._deadline, self._name = deadline, name
        self._span: AbstractContextManager[Any] | None = None

    def __enter__(self) -> None:
        deadline = self._deadline
        self._begun, self._outer = time.monotonic(), deadline.current
        deadline.current = self._name
        if deadline.observer is not None:
            self._span = deadline.observer(self._name)
            self._span.__enter__()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        deadline = self._deadline
        try:
            if self._span is not None:
                self._span.__exit__(kind, error, trace)
        finally:
            deadline.record(self._name, time.monotonic() - self._begun)
        # Only a stage that completed hands ``current`` back: after a failure or a
        # cancellation it still names the stage the request was in, for the 499/504 label.
        if kind is None:
            deadline.current = self._outer
