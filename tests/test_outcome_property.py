"""Every request ends in exactly one outcome, whatever the origin, budget and client do.

Hypothesis draws a batch of requests, each with an origin behaviour (stall, drip, reset
mid-body, lying Content-Length, garbage, 4xx/5xx, fine), a budget, and whether its client
hangs up early; the batch runs concurrently against one edge. Afterwards the statuses
seen, the outcome counters, the access-log lines and the stage counters must agree, and
every slot, reservation and gauge must be back at zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import event, given, settings
from hypothesis import strategies as st

from edge.app import RESERVED, HitsFirst
from edge.errors import OUTCOMES
from tests.fake_origin import FakeOrigin
from tests.helpers import metric, metric_sum, running_edge

BEHAVIOURS = [
    "ok/flowers-1920x1080.jpg?w=40",
    "ok/photo-2725x2225.jpg?w=600&blur=5",
    "stall/{stall}/flowers-1920x1080.jpg?w=40",
    "drip/gallery-1024x772.webp?w=40",
    "reset/photo-2725x2225.jpg?w=40",
    "lie/flowers-1920x1080.jpg?w=40",
    "garbage/x.jpg?w=40",
    "ok/truncated.jpg?w=40",
    "ok/missing.jpg?w=40",
    "status/{code}/x.jpg?w=40",
    "ok/flowers-1920x1080.jpg?w=40&bogus=1",
]
#: seconds the access log must stay the same length before a batch counts as settled
QUIET = 0.2
GAUGES = (
    "edge_inflight_requests",
    "edge_queue_depth",
    "edge_transforms_in_progress",
    "edge_memory_reserved_bytes",
)
STATUS_OF = {outcome: status for outcome, status in OUTCOMES.items()}

request_plans = st.fixed_dictionaries(
    {
        "behaviour": st.sampled_from(BEHAVIOURS),
        "stall": st.sampled_from(["0.05", "0.4", "3"]),
        "code": st.sampled_from(["400", "401", "403", "404", "429", "500", "503", "504"]),
        "budget": st.sampled_from([None, "0.15", "0.5", "2"]),
        "hang_up_after": st.sampled_from([None, None, 0.05, 0.3]),
    }
)


def target(plan: dict[str, Any]) -> str:
    path = "/" + plan["behaviour"].format(stall=plan["stall"], code=plan["code"])
    if plan["budget"] is not None:
        path += f"&backendTimeout={plan['budget']}"
    return path


async def run_one(url: str, hang_up_after: float | None) -> int | None:
    """The status seen, or None when this client hung up first."""
    timeout = aiohttp.ClientTimeout(total=hang_up_after or 30)
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(url, timeout=timeout) as response:
                await response.read()
                return response.status
        except TimeoutError:
            return None


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


@settings(max_examples=25)
@given(plans=st.lists(request_plans, min_size=1, max_size=8))
async def test_every_request_ends_in_exactly_one_consistent_outcome(
    origin: FakeOrigin, caplog: pytest.LogCaptureFixture, plans: list[dict[str, Any]]
) -> None:
    caplog.set_level(logging.INFO, logger="edge.access")
    caplog.clear()
    env = {
        "EDGE_ORIGIN": origin.url,
        "EDGE_BACKEND_TIMEOUT": "4",
        "EDGE_CACHE": "none",
        "EDGE_MAX_CONCURRENCY": "1",
        "EDGE_QUEUE_SIZE": "2",
    }
    received: list[str] = []
    handle = HitsFirst.__call__

    async def receive(self: HitsFirst, request: web.BaseRequest) -> web.StreamResponse:
        if request.path not in RESERVED:
            received.append(request.path)
        return await handle(self, request)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HitsFirst, "__call__", receive)
        async with running_edge(env) as client:
            await check_batch(client, plans, caplog, received)


async def check_batch(
    client: Any, plans: list[dict[str, Any]], caplog: Any, received: list[str]
) -> None:
    statuses = await asyncio.gather(
        *(run_one(str(client.make_url(target(p))), p["hang_up_after"]) for p in plans)
    )
    # A client's time limit covers connecting too: one that gives up within 50 ms may do
    # so before its request is even sent. Every request edge received ends in one line.
    answered = sum(1 for status in statuses if status is not None)
    await settled(client, received, caplog=caplog)

    lines = [r.msg for r in caplog.records if r.name == "edge.access"]
    assert len(lines) == len(received)
    assert answered <= len(received) <= len(plans)
    logged = Counter((line["status"], line["outcome"]) for line in lines)
    for status, outcome in logged:
        event(f"{status} {outcome}")
    for (status, outcome), count in logged.items():
        # the status sent is the outcome's own (no error images here)
        assert STATUS_OF[outcome] == status
        counted = await metric(client, "edge_requests_total", code=str(status), outcome=outcome)
        assert counted == count, (status, outcome)
    # every status a client saw was logged
    seen = Counter(s for s in statuses if s is not None)
    for status, count in seen.items():
        assert sum(n for (s, _), n in logged.items() if s == status) >= count
    assert 500 not in seen
    await assert_invariants(client)


async def settled(client: Any, received: list[str], *, caplog: Any) -> None:
    """Wait (bounded) until every gauge is back at zero and every request edge received
    is logged, with no new request or line for a moment."""
    give_up = time.monotonic() + 25
    last, still_since = (-1, -1), time.monotonic()
    while True:
        lines = sum(1 for r in caplog.records if r.name == "edge.access")
        if (lines, len(received)) != last:
            last, still_since = (lines, len(received)), time.monotonic()
        values = [await metric(client, name) for name in GAUGES]
        quiet = time.monotonic() - still_since >= QUIET
        if lines >= len(received) and not any(values) and quiet:
            return
        if time.monotonic() > give_up:
            raise AssertionError(f"not settled: {lines} lines, gauges {values}")
        await asyncio.sleep(0.05)


async def assert_invariants(client: Any) -> None:
    for counter, outcome, code in (
        ("edge_load_shed_total", "overloaded", "503"),
        ("edge_backend_timeouts_total", "timeout", "504"),
        ("edge_client_disconnects_total", "client_closed", "499"),
    ):
        total = await metric_sum(client, counter)
        assert total == await metric(client, "edge_requests_total", code=code, outcome=outcome)
