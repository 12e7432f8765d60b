"""Budgets and failure classes: 499, 503 and 504 answered fast, counted, and cleaned up.

Each test asserts a generous time bound plus causal evidence: the origin saw its request
cancelled, the transform slot came back (the libvips pipeline was killed), gauges are
back at zero, and the contract's invariants between counters hold.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

import aiohttp
import pytest

from edge.app import SERVICE, TRANSFORM_NICE
from tests.fake_origin import FakeOrigin
from tests.helpers import metric, metric_sum, start_edge

# Several seconds of single-threaded libvips work: upsample, blur hard, encode PNG.
SLOW = "ok/photo-2725x2225.jpg?width=6000&upscale=1&blur=60&format=png"
GAUGES = (
    "edge_inflight_requests",
    "edge_queue_depth",
    "edge_transforms_in_progress",
    "edge_memory_reserved_bytes",
)


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


async def edge(aiohttp_client: Any, origin: FakeOrigin, **env: str) -> Any:
    base = {"EDGE_ORIGIN": origin.url, "EDGE_BACKEND_TIMEOUT": "20", "EDGE_CACHE": "none"}
    return await start_edge(aiohttp_client, {**base, **env})


async def settled(client: Any, within: float = 10.0) -> None:
    """Wait until every gauge is back at zero (killed transforms release their slot)."""
    give_up = time.monotonic() + within
    while True:
        values = {name: await metric(client, name) for name in GAUGES}
        # the /metrics request itself is not counted as in flight (reserved path)
        if all(value == 0 for value in values.values()):
            return
        if time.monotonic() > give_up:
            raise AssertionError(f"gauges did not settle: {values}")
        await asyncio.sleep(0.05)


async def assert_invariants(client: Any) -> None:
    pairs = (
        ("edge_load_shed_total", "overloaded"),
        ("edge_backend_timeouts_total", "timeout"),
        ("edge_client_disconnects_total", "client_closed"),
    )
    for counter, outcome in pairs:
        total = await metric_sum(client, counter)
        requests = 0.0
        for code in ("499", "503", "504"):
            requests += await metric(client, "edge_requests_total", code=code, outcome=outcome)
        assert total == requests, (counter, total, requests)


async def disconnect_after(client: Any, path: str, seconds: float) -> None:
    """A client that gives up after ``seconds`` and closes its connection."""
    url = str(client.make_url(path))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.get(url, timeout=aiohttp.ClientTimeout(total=seconds))


async def wait_for_metric(client: Any, name: str, value: float, **labels: str) -> None:
    give_up = time.monotonic() + 10
    while await metric(client, name, **labels) != value:
        if time.monotonic() > give_up:
            raise AssertionError(f"{name}{labels} never reached {value}")
        await asyncio.sleep(0.05)


async def test_fetch_past_the_budget_is_504_and_the_origin_request_is_cancelled(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    started = time.monotonic()
    response = await client.get("/stall/30/flowers-1920x1080.jpg?w=10&backendTimeout=0.5")
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert elapsed < 0.5 + 0.6
    await asyncio.wait_for(origin.cancelled.wait(), 5)
    assert await metric(client, "edge_backend_timeouts_total", stage="fetch") == 1
    await settled(client)
    await assert_invariants(client)


async def test_a_coalesced_request_keeps_its_own_longer_budget(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    # the shared fetch runs until the latest waiter's deadline, not the first one's
    client = await edge(aiohttp_client, origin, EDGE_BACKEND_TIMEOUT="5", EDGE_CACHE="memory")
    path = "/stall/1.5/flowers-1920x1080.jpg?w=30"
    short = asyncio.create_task(client.get(path + "&backendTimeout=0.5"))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    patient = await client.get(path)
    assert patient.status == 200, await patient.text()
    assert time.monotonic() - started > 1.0  # it did wait for the origin
    assert (await short).status == 504
    assert await metric(client, "edge_coalesced_requests_total") == 1
    assert origin.events["request:stall"] == 1


async def test_envoy_header_shortens_the_budget(aiohttp_client: Any, origin: FakeOrigin) -> None:
    client = await edge(aiohttp_client, origin)
    started = time.monotonic()
    response = await client.get(
        "/stall/30/flowers-1920x1080.jpg?w=10", headers={"X-Envoy-Expected-Rq-Timeout-Ms": "600"}
    )
    assert response.status == 504
    assert time.monotonic() - started < 0.5 + 0.6


async def test_backend_timeout_parameter_cannot_lengthen_the_budget(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_BACKEND_TIMEOUT="0.5")
    started = time.monotonic()
    response = await client.get("/stall/30/flowers-1920x1080.jpg?w=10&backendTimeout=60")
    assert response.status == 504
    assert time.monotonic() - started < 0.5 + 0.6


async def test_transform_past_the_budget_is_504_and_the_pipeline_is_killed(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_MAX_CONCURRENCY="1")
    started = time.monotonic()
    response = await client.get("/" + SLOW + "&backendTimeout=1")
    assert response.status == 504
    assert time.monotonic() - started < 1 + 0.6
    assert await metric(client, "edge_backend_timeouts_total", stage="transform") == 1
    # the slot comes back only when the libvips thread has stopped: killed, not finished
    await settled(client, within=3)
    await assert_invariants(client)


async def test_client_gone_while_fetching_is_499_fetch(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    await disconnect_after(client, "/stall/30/flowers-1920x1080.jpg?w=10", 0.3)
    await wait_for_metric(client, "edge_client_disconnects_total", 1, stage="fetch")
    await asyncio.wait_for(origin.cancelled.wait(), 5)
    assert await metric(client, "edge_requests_total", code="499", outcome="client_closed") == 1
    await settled(client)
    await assert_invariants(client)


async def test_client_gone_while_transforming_is_499_and_the_work_stops(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_MAX_CONCURRENCY="1")
    await disconnect_after(client, "/" + SLOW, 0.8)
    await wait_for_metric(client, "edge_client_disconnects_total", 1, stage="transform")
    await settled(client, within=3)
    await assert_invariants(client)


async def test_full_queue_sheds_at_once_with_retry_after(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_MAX_CONCURRENCY="1", EDGE_QUEUE_SIZE="0")
    slow = asyncio.create_task(client.get("/" + SLOW + "&backendTimeout=2"))
    await wait_for_metric(client, "edge_transforms_in_progress", 1)
    started = time.monotonic()
    response = await client.get("/ok/flowers-1920x1080.jpg?w=20")
    assert response.status == 503
    assert time.monotonic() - started < 0.5
    assert response.headers["Retry-After"].isdigit()
    assert response.headers["Cache-Control"] == "no-store"
    assert await metric(client, "edge_load_shed_total", reason="queue_full") == 1
    # refused before fetching: only the slow request reached the origin
    assert origin.events["request:ok"] == 1
    # health checks are never shed, and stay fast while every slot is busy
    started = time.monotonic()
    assert (await client.get("/healthz")).status == 200
    assert time.monotonic() - started < 0.2
    assert (await slow).status == 504
    await settled(client)
    await assert_invariants(client)


async def test_still_queued_when_the_budget_ends_is_503_queue_timeout(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_MAX_CONCURRENCY="1", EDGE_QUEUE_SIZE="4")
    slow = asyncio.create_task(client.get("/" + SLOW + "&backendTimeout=2"))
    await wait_for_metric(client, "edge_transforms_in_progress", 1)
    response = await client.get("/ok/flowers-1920x1080.jpg?w=20&backendTimeout=0.4")
    assert response.status == 503
    assert "Retry-After" in response.headers
    assert await metric(client, "edge_load_shed_total", reason="queue_timeout") == 1
    assert await metric(client, "edge_backend_timeouts_total", stage="transform") == 0
    await slow
    await settled(client)
    await assert_invariants(client)


async def test_client_gone_while_queued_is_499_queue(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_MAX_CONCURRENCY="1")
    slow = asyncio.create_task(client.get("/" + SLOW + "&backendTimeout=2"))
    await wait_for_metric(client, "edge_transforms_in_progress", 1)
    await disconnect_after(client, "/ok/flowers-1920x1080.jpg?w=20", 0.4)
    await wait_for_metric(client, "edge_client_disconnects_total", 1, stage="queue")
    await slow
    await settled(client)
    await assert_invariants(client)


async def test_memory_over_the_limit_sheds_with_503_memory(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    # A limit below the process's own RSS engages the emergency brake at the first sample.
    client = await edge(aiohttp_client, origin, EDGE_MEMORY_LIMIT="1MiB")
    give_up = time.monotonic() + 5
    while True:
        response = await client.get("/ok/flowers-1920x1080.jpg?w=20")
        if response.status == 503 or time.monotonic() > give_up:
            break
        await asyncio.sleep(0.1)
    assert response.status == 503
    assert await metric(client, "edge_load_shed_total", reason="memory") >= 1
    assert await metric(client, "edge_memory_limit_bytes") == 1024 * 1024
    # originals need no transform and are never shed for memory
    assert (await client.get("/ok/flowers-1920x1080.jpg")).status == 200
    await assert_invariants(client)


async def test_client_gone_while_sending_is_499_send(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_CACHE="memory")
    # a large body, cached first so the second request's only stage is sending
    path = "/ok/photo-2725x2225.jpg?width=5000&upscale=1&format=png"
    warm = await client.get(path)
    assert warm.status == 200
    assert len(await warm.read()) > 10_000_000
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")  # headers arrived: the body is being sent
    writer.transport.abort()  # hang up mid-body
    await wait_for_metric(client, "edge_client_disconnects_total", 1, stage="send")
    await settled(client)
    await assert_invariants(client)


async def test_cache_hits_are_served_while_every_slot_and_the_queue_are_full(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(
        aiohttp_client, origin, EDGE_CACHE="memory", EDGE_MAX_CONCURRENCY="1", EDGE_QUEUE_SIZE="0"
    )
    hot = "/ok/flowers-1920x1080.jpg?w=64"
    assert (await client.get(hot)).status == 200
    slow = asyncio.create_task(client.get("/" + SLOW + "&backendTimeout=2"))
    await wait_for_metric(client, "edge_transforms_in_progress", 1)
    assert (await client.get("/ok/flowers-1920x1080.jpg?w=65")).status == 503  # a miss: shed
    hit = await client.get(hot)
    assert hit.status == 200
    assert hit.headers["X-Edge-Cache"] == "hit"
    await slow


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice is per thread on Linux")
async def test_transforms_run_below_the_event_loops_cpu_priority(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    assert (await client.get("/ok/flowers-1920x1080.jpg?w=20")).status == 200

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    pool = client.server.app[SERVICE].pool
    in_pool = await asyncio.get_running_loop().run_in_executor(pool, nice)
    assert in_pool == min(19, nice() + TRANSFORM_NICE)
