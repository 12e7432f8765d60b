"""Admission control: transform slots, a bounded FIFO queue, and memory reservations.

A transform runs only while it holds a slot (EDGE_MAX_CONCURRENCY) and a memory
reservation sized from its probed header. Beyond the slots, at most EDGE_QUEUE_SIZE
requests wait; the next is shed at once (QueueFull); a waiter still queued when its
budget ends is shed (QueueTimeout, never a 504). Reservations plus the baseline RSS
measured at start, plus the originals held by queued requests, must fit
EDGE_MEMORY_LIMIT (MemoryShed); a measured RSS above the limit pulls an emergency brake
that holds until RSS falls below ``BRAKE_RELEASE`` of it. Cache hits and health checks
never come here, so they are never shed.

A slot is released when the transform's thread actually ends (see ``Ticket.release``),
not when the request gives up: a killed pipeline keeps its slot until libvips stops.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from edge.budget import Deadline
from edge.errors import MemoryShed, QueueFull, QueueTimeout
from edge.metrics import Metrics

BRAKE_RELEASE = 0.9


@dataclass
class Ticket:
    """A held slot and reservation; ``release`` is idempotent."""

    admission: Admission
    reserved: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._give_back(self)


class Admission:
    """Slots, queue and memory for one worker process."""

    def __init__(
        self,
        *,
        slots: int,
        queue_size: int,
        memory_limit: int,
        baseline: int,
        metrics: Metrics,
    ) -> None:
        self.slots = slots
        self.queue_size = queue_size
        self.memory_limit = memory_limit
        self.baseline = baseline
        self._metrics = metrics
        self._free = slots
        #: bytes held by requests waiting in the queue (see ``admit``)
        self._queued = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._reserved = 0
        self._braking = False
        metrics.memory_limit.set(memory_limit)

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def in_use(self) -> int:
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def shed_if_full(self) -> None:
        """Refuse at once (QueueFull) when no slot is free and the queue is full.

        Called before a miss fetches its original: under overload a request that could
        only be refused at admission would first spend a fetch and a header probe, in
        threads competing with the transforms, and its 503 would come late.
        """
        if self._free == 0 and len(self._waiters) >= self.queue_size:
            raise QueueFull(
                "too many transforms waiting", detail=f"EDGE_QUEUE_SIZE={self.queue_size}"
            )

    async def admit(self, reserve: int, deadline: Deadline, *, held: int = 0) -> Ticket:
        """Wait (FIFO, until the deadline) for a slot, then reserve ``reserve`` bytes.

        ``held`` is what the request already holds while it waits (its original): it
        counts against the limit until the request leaves the queue, so a queue of
        large originals cannot outgrow the limit unseen.
        """
        self._check_memory(reserve)
        self._queued += held
        try:
            await self._take_slot(deadline)
        finally:
            self._queued -= held
        self._reserved += reserve
        self._metrics.memory_reserved.set(self._reserved)
        self._metrics.transforms_in_progress.set(self.in_use)
        return Ticket(self, reserve)

    def observe_rss(self, rss: int) -> None:
        """Feed a fresh RSS reading: engages or releases the emergency brake."""
        if rss > self.memory_limit:
            self._braking = True
        elif rss < self.memory_limit * BRAKE_RELEASE:
            self._braking = False

    def _check_memory(self, reserve: int) -> None:
        if self._braking:
            raise MemoryShed("memory is over the limit; try again shortly")
        # An estimate that could never fit alone is still admitted when nothing else is
        # reserved: refusing it forever would turn an honest request into a permanent 503.
        held = self._reserved + self._queued
        over = self.baseline + held + reserve > self.memory_limit
        if over and self._reserved > 0:
            raise MemoryShed(
                "not enough memory for this transform right now",
                detail=f"reserved {self._reserved} + queued {self._queued} + {reserve} "
                f"over {self.memory_limit}",
            )

    async def _take_slot(self, deadline: Deadline) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self.queue_size:
            raise QueueFull(
                "too many transforms waiting", detail=f"EDGE_QUEUE_SIZE={self.queue_size}"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._metrics.queue_depth.set(len(self._waiters))
        try:
            async with deadline.timeout():
                await asyncio.shield(waiter)
        except BaseException as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout("the budget ended while waiting for a slot") from None
            raise
        finally:
            self._metrics.queue_depth.set(len(self._waiters))

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        """A waiter gave up; if a slot was handed to it in the meantime, pass it on."""
        if waiter.done() and not waiter.cancelled():
            self._hand_over()
        else:
            waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _give_back(self, ticket: Ticket) -> None:
        self._reserved -= ticket.reserved
        self._metrics.memory_reserved.set(self._reserved)
        self._hand_over()
        self._metrics.transforms_in_progress.set(self.in_use)

    def _hand_over(self) -> None:
        """Give a freed slot to the oldest live waiter, or back to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
