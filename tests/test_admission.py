"""Admission's memory accounting: what queued requests hold counts against the limit."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from edge.admission import Admission
from edge.budget import Deadline
from edge.errors import MemoryShed
from edge.metrics import Metrics


def admission(limit: int) -> Admission:
    metrics = Metrics(CollectorRegistry())
    return Admission(slots=1, queue_size=4, memory_limit=limit, baseline=0, metrics=metrics)


async def test_originals_waiting_in_the_queue_count_against_the_limit() -> None:
    gate = admission(1000)
    running = await gate.admit(100, Deadline.after(5))
    waiting = asyncio.ensure_future(gate.admit(100, Deadline.after(5), held=500))
    await asyncio.sleep(0)  # it is queued, holding its 500-byte original
    assert gate.waiting == 1
    with pytest.raises(MemoryShed):  # 100 reserved + 500 queued + 450 is over 1000
        await gate.admit(450, Deadline.after(5))
    running.release()
    (await waiting).release()
    # once the queue is empty the same request fits
    (await gate.admit(450, Deadline.after(5))).release()
    assert gate.reserved == 0


async def test_a_waiter_that_gives_up_stops_counting() -> None:
    gate = admission(1000)
    running = await gate.admit(100, Deadline.after(5))
    waiting = asyncio.ensure_future(gate.admit(100, Deadline.after(5), held=500))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    queued = asyncio.ensure_future(gate.admit(450, Deadline.after(5)))
    await asyncio.sleep(0)
    assert gate.waiting == 1  # queued, not shed: the cancelled waiter's bytes are gone
    running.release()
    (await queued).release()
