"""SingleFlight: identical concurrent misses share one piece of work (DESIGN.md section 2)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from edge.budget import Deadline
from edge.cache import Flight, FlightTimeout, SingleFlight
from edge.errors import ClientClosed, NotFound
from edge.metrics import Metrics

#: long enough never to pass during a test
LATER = 30.0
#: a deadline that passes quickly, for waiters meant to time out
SOON = 0.05


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def flights(metrics: Metrics) -> SingleFlight:
    return SingleFlight(metrics)


def coalesced(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("edge_coalesced_requests_total")
    assert value is not None
    return value


async def settle(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds (a bounded number of loop turns)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


class Work:
    """A piece of shared work that waits for a gate, counting calls and keeping its Flight."""

    def __init__(self, result: str = "image") -> None:
        self.result = result
        self.gate = asyncio.Event()
        self.calls = 0
        self.flights: list[Flight] = []
        self.cancelled = asyncio.Event()

    async def __call__(self, flight: Flight) -> str:
        self.calls += 1
        self.flights.append(flight)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return self.result


def start(flights: SingleFlight, work: Work, seconds: float = LATER) -> asyncio.Task[str]:
    return asyncio.create_task(flights.run("k", Deadline.after(seconds), work))


async def test_many_identical_callers_share_one_call(
    flights: SingleFlight, metrics: Metrics
) -> None:
    work = Work()
    callers = [start(flights, work) for _ in range(50)]
    await settle(lambda: coalesced(metrics) == 49)
    assert "k" in flights
    work.gate.set()
    assert await asyncio.gather(*callers) == ["image"] * 50
    assert work.calls == 1
    assert len(flights) == 0


async def test_different_keys_do_not_share(flights: SingleFlight, metrics: Metrics) -> None:
    async def work(flight: Flight) -> int:
        return id(flight)

    a, b = await asyncio.gather(
        flights.run("a", Deadline.after(LATER), work),
        flights.run("b", Deadline.after(LATER), work),
    )
    assert a != b
    assert coalesced(metrics) == 0


async def test_a_finished_flight_is_not_a_cache(flights: SingleFlight) -> None:
    work = Work()
    work.gate.set()
    await start(flights, work)
    await start(flights, work)
    assert work.calls == 2
    assert len(flights) == 0


async def test_the_leader_leaving_does_not_fail_the_others(
    flights: SingleFlight, metrics: Metrics
) -> None:
    work = Work()
    leader = start(flights, work)
    followers = [start(flights, work) for _ in range(3)]
    await settle(lambda: coalesced(metrics) == 3 and work.calls == 1)

    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert not work.flights[0].is_set()

    work.gate.set()
    assert await asyncio.gather(*followers) == ["image"] * 3
    assert work.calls == 1
    assert not work.cancelled.is_set()


async def test_the_work_is_killed_when_every_waiter_has_gone(
    flights: SingleFlight, metrics: Metrics
) -> None:
    work = Work()
    callers = [start(flights, work) for _ in range(3)]
    await settle(lambda: coalesced(metrics) == 2 and work.calls == 1)

    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    await asyncio.wait_for(work.cancelled.wait(), LATER)
    flight = work.flights[0]
    assert flight.is_set()
    assert flight.reason == "client_closed"
    assert "k" not in flights


async def test_a_waiter_whose_deadline_passes_gets_a_flight_timeout_with_the_stage(
    flights: SingleFlight,
) -> None:
    async def work(flight: Flight) -> str:
        flight.stage = "transform"
        await asyncio.Event().wait()
        return "never"

    with pytest.raises(FlightTimeout) as raised:
        await flights.run("k", Deadline.after(SOON), work)
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.stage == "transform"
    assert "k" not in flights


async def test_the_last_waiter_timing_out_kills_the_work_as_a_timeout(
    flights: SingleFlight,
) -> None:
    work = Work()
    with pytest.raises(FlightTimeout):
        await start(flights, work, SOON)
    await asyncio.wait_for(work.cancelled.wait(), LATER)
    assert work.flights[0].reason == "timeout"


async def test_a_caller_already_out_of_time_never_waits(flights: SingleFlight) -> None:
    work = Work()
    with pytest.raises(FlightTimeout) as raised:
        await start(flights, work, 0)
    assert raised.value.stage is None
    assert "k" not in flights


async def test_the_work_runs_on_to_the_latest_waiters_deadline(
    flights: SingleFlight, metrics: Metrics
) -> None:
    work = Work()
    hurried = start(flights, work, SOON)
    await settle(lambda: work.calls == 1)
    patient_deadline = Deadline.after(LATER)
    patient = asyncio.create_task(flights.run("k", patient_deadline, work))
    await settle(lambda: coalesced(metrics) == 1)
    assert work.flights[0].deadline.at == patient_deadline.at

    with pytest.raises(FlightTimeout):
        await hurried
    assert not work.flights[0].is_set()
    work.gate.set()
    assert await patient == "image"
    assert work.calls == 1


async def test_a_failure_is_shared_by_every_waiter(flights: SingleFlight, metrics: Metrics) -> None:
    gate = asyncio.Event()

    async def work(flight: Flight) -> str:
        await gate.wait()
        raise NotFound("no such object")

    callers = [asyncio.create_task(flights.run("k", Deadline.after(LATER), work)) for _ in range(4)]
    await settle(lambda: coalesced(metrics) == 3)
    gate.set()
    failures = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(failure, NotFound) for failure in failures)
    assert all(failure is failures[0] for failure in failures)
    assert len(flights) == 0


async def test_a_client_closed_from_the_leaders_work_is_not_shared(
    flights: SingleFlight, metrics: Metrics
) -> None:
    gate = asyncio.Event()

    async def leaders_work(flight: Flight) -> str:
        await gate.wait()
        raise ClientClosed("client went away", label="send")

    followers_work = Work()
    followers_work.gate.set()
    leader = asyncio.create_task(flights.run("k", Deadline.after(LATER), leaders_work))
    await settle(lambda: "k" in flights)
    followers = [start(flights, followers_work) for _ in range(3)]
    await settle(lambda: coalesced(metrics) == 3)

    gate.set()
    with pytest.raises(ClientClosed):
        await leader
    assert await asyncio.gather(*followers) == ["image"] * 3
    assert followers_work.calls == 1  # the followers ran one new flight between them


async def test_work_cancelled_from_outside_is_run_again_for_the_waiters(
    flights: SingleFlight, metrics: Metrics
) -> None:
    work = Work()
    callers = [start(flights, work) for _ in range(2)]
    await settle(lambda: coalesced(metrics) == 1 and work.calls == 1)
    (flight_task,) = [task for task in asyncio.all_tasks() if task.get_name() == "flight k"]

    flight_task.cancel()
    await settle(lambda: work.calls == 2)
    work.gate.set()
    assert await asyncio.gather(*callers) == ["image"] * 2
    assert len(flights) == 0
