"""The per-request time budget: one deadline, the time each stage spent, and a kill switch.

A ``Deadline`` is made once when a request arrives and only ever shortened. Stages
(fetch, queue, transform, cache_get, cache_set) record what they spent so Server-Timing,
the access log and the stage histogram agree. The ``KillSwitch`` is how an async caller
stops a libvips pipeline running in a worker thread: imaging.py polls it from the
pipeline's progress signal and kills the image when it is set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
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


@dataclass
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

    def remaining(self) -> float:
        return max(self.at - time.monotonic(), 0.0)

    def record(self, stage: str, seconds: float) -> None:
        self.spent[stage] = self.spent.get(stage, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as ``name`` (recorded even when it raises)."""
        begun, outer = time.monotonic(), self.current
        self.current = name
        try:
            with self.observer(name) if self.observer else nullcontext():
                yield
        finally:
            self.record(name, time.monotonic() - begun)
        # Only a stage that completed hands ``current`` back: after a failure or a
        # cancellation it still names the stage the request was in, for the 499/504 label.
        self.current = outer
