"""Caching end to end: hits, canonical keys, single-flight, stale serving, shared tiers,
and a sick cache that never fails a request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import SHARED_IMAGES
from tests.fake_origin import FakeOrigin
from tests.helpers import FakeClock, decode, loader_format, metric, start_edge
from tests.services import (  # noqa: F401
    Service,
    memcached_server_fixture,
    redis_server_fixture,
)


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


async def edge(aiohttp_client: Any, origin: FakeOrigin, clock: Any = None, **env: str) -> Any:
    return await start_edge(aiohttp_client, {"EDGE_ORIGIN": origin.url, **env}, cache_clock=clock)


async def drain(client: Any) -> None:
    """Let cache writes scheduled after the response finish."""
    from edge.app import STATE

    background = client.server.app[STATE].background
    if background:
        await asyncio.wait(background, timeout=5)


async def test_second_request_is_a_hit_and_aliases_share_the_entry(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    first = await client.get("/ok/flowers-1920x1080.jpg?width=300&format=webp")
    assert first.headers["X-Edge-Cache"] == "miss"
    await drain(client)
    for query in ("w=300&f=webp", "fmt=WEBP&wid=300", "width=300&format=webp&utm_source=x"):
        again = await client.get(f"/ok/flowers-1920x1080.jpg?{query}")
        assert again.headers["X-Edge-Cache"] == "hit", query
        assert await again.read() == await first.read()
        assert again.headers["ETag"] == first.headers["ETag"]
    assert origin.events["request:ok"] == 1
    assert await metric(client, "edge_cache_requests_total", tier="memory", result="hit") == 3
    assert "cache_get;dur=" in again.headers["Server-Timing"]


async def test_identical_concurrent_misses_fetch_and_transform_once(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    path = "/stall/0.3/photo-2725x2225.jpg?width=500"
    responses = await asyncio.gather(*(client.get(path) for _ in range(8)))
    bodies = {await r.read() for r in responses}
    assert [r.status for r in responses] == [200] * 8
    assert len(bodies) == 1
    assert origin.events["request:stall"] == 1
    assert await metric(client, "edge_coalesced_requests_total") == 7


async def test_a_waiter_leaving_does_not_fail_the_others(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    path = "/stall/0.6/flowers-1920x1080.jpg?width=100"
    impatient = asyncio.create_task(client.get(path + "&backendTimeout=0.2"))
    patient = asyncio.create_task(client.get(path))
    assert (await impatient).status == 504
    assert (await patient).status == 200
    assert origin.events["request:stall"] == 1


async def test_a_404_evicts_the_stale_entry_instead_of_serving_it(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    clock = FakeClock()
    client = await edge(aiohttp_client, origin, clock, EDGE_CACHE_TTL="60")
    origin.put("k.jpg", (origin.root / "flowers-1920x1080.jpg").read_bytes())
    assert (await client.get("/ok/k.jpg?w=50")).status == 200
    await drain(client)
    clock.now += 120  # past the TTL, within the stale TTL
    origin.objects.clear()
    assert (await client.get("/ok/k.jpg?w=50")).status == 404
    await origin.stop()
    # evicted and remembered as missing: nothing stale is served with the origin down
    assert (await client.get("/ok/k.jpg?w=50")).status == 404
    assert await metric(client, "edge_requests_total", code="200", outcome="ok") == 1


async def test_stale_is_served_on_bad_gateway(aiohttp_client: Any, origin: FakeOrigin) -> None:
    """The same key cached through one path, then the origin starts failing."""
    clock = FakeClock()
    client = await edge(aiohttp_client, origin, clock, EDGE_CACHE_TTL="60")
    origin.put("flaky.jpg", (origin.root / "flowers-1920x1080.jpg").read_bytes())
    first = await client.get("/ok/flaky.jpg?w=40")
    assert first.status == 200
    await drain(client)
    clock.now += 61
    origin.objects["flaky.jpg"] = b"not an image any more"
    # the origin now answers garbage: a 400, which is not a reason to serve stale
    assert (await client.get("/ok/flaky.jpg?w=40")).status == 400
    clock.now += 1
    # an origin outage (connection refused) is
    await origin.stop()
    stale = await client.get("/ok/flaky.jpg?w=40")
    assert stale.status == 200
    assert stale.headers["X-Edge-Cache"] == "stale"
    assert await stale.read() == await first.read()
    assert await metric(client, "edge_requests_total", code="200", outcome="ok") == 2
    clock.now += 86400 * 2  # beyond TTL + stale TTL: gone
    assert (await client.get("/ok/flaky.jpg?w=40")).status == 502


async def test_missing_objects_are_remembered_briefly(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    for _ in range(3):
        response = await client.get("/ok/nothing.jpg?w=10")
        assert response.status == 404
        assert response.headers["Cache-Control"] == "public, max-age=60"
    assert origin.events["request:ok"] == 1


async def test_auto_format_varies_on_accept_and_keys_on_the_choice(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    path = "/ok/flowers-1920x1080.jpg?w=120&format=auto"
    webp = await client.get(path, headers={"Accept": "image/webp,*/*"})
    plain = await client.get(path, headers={"Accept": "*/*"})
    avif = await client.get(path, headers={"Accept": "image/avif,image/webp;q=0.9"})
    assert loader_format(decode(await webp.read())) == "webp"
    assert loader_format(decode(await plain.read())) == "jpeg"
    assert loader_format(decode(await avif.read())) == "heif"
    for response in (webp, plain, avif):
        assert response.headers["Vary"] == "Accept"
        assert response.headers["X-Edge-Cache"] == "miss"


async def test_hits_keep_to_the_format_each_accept_header_negotiated(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    path = "/ok/flowers-1920x1080.jpg?w=120&format=auto"
    expected = {"image/webp,*/*": "webp", "*/*": "jpeg"}
    for accept in expected:
        assert (await client.get(path, headers={"Accept": accept})).status == 200
    await drain(client)
    for _ in range(2):  # alternating: what one header negotiated never answers the other
        for accept, fmt in expected.items():
            hit = await client.get(path, headers={"Accept": accept})
            assert hit.headers["X-Edge-Cache"] == "hit"
            assert loader_format(decode(await hit.read())) == fmt
    assert origin.events["request:ok"] == 2


async def test_hits_keep_to_the_size_each_width_hint_asked_for(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    path = "/ok/flowers-1920x1080.jpg?format=png"
    widths = {"200": 200, "400": 400}
    for hint in widths:
        assert (await client.get(path, headers={"Sec-CH-Width": hint})).status == 200
    await drain(client)
    for _ in range(2):  # alternating: one hint's variant never answers the other
        for hint, width in widths.items():
            hit = await client.get(path, headers={"Sec-CH-Width": hint})
            assert hit.headers["X-Edge-Cache"] == "hit"
            assert "Sec-CH-Width" in hit.headers["Vary"]
            assert decode(await hit.read()).width == width
    assert origin.events["request:ok"] == 2


async def test_a_memory_tier_behind_redis_is_filled_and_read(
    aiohttp_client: Any, origin: FakeOrigin, redis_server: Service
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_CACHE=f"{redis_server.url},memory")
    path = "/ok/flowers-1920x1080.jpg?w=90"
    assert (await client.get(path)).headers["X-Edge-Cache"] == "miss"
    await drain(client)
    hit = await client.get(path)
    assert hit.headers["X-Edge-Cache"] == "hit"
    assert await metric(client, "edge_cache_requests_total", tier="redis", result="hit") == 1
    redis_server.kill()  # Redis, first in line, is gone: the memory tier behind it answers
    for _ in range(2):
        hit = await client.get(path)
        assert hit.headers["X-Edge-Cache"] == "hit"
        assert decode(await hit.read()).width == 90
    assert await metric(client, "edge_cache_requests_total", tier="memory", result="hit") == 2
    assert await metric(client, "edge_cache_requests_total", tier="redis", result="error") >= 1
    assert origin.events["request:ok"] == 1


async def test_a_memory_hit_answers_what_the_miss_did(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge(aiohttp_client, origin)
    path = "/ok/flowers-1920x1080.jpg?w=64&h=48&format=png"
    miss = await client.get(path)
    body = await miss.read()
    await drain(client)
    hit = await client.get(path)
    assert (hit.headers["X-Edge-Cache"], miss.headers["X-Edge-Cache"]) == ("hit", "miss")
    assert await hit.read() == body  # the very bytes this process rendered, kept as they were
    for name in ("Content-Type", "ETag", "Last-Modified", "Cache-Control", "Surrogate-Key"):
        assert hit.headers[name] == miss.headers[name]
    assert hit.headers["X-Request-Id"] != miss.headers["X-Request-Id"]


async def test_redis_tier_shares_results_between_processes(
    aiohttp_client: Any, origin: FakeOrigin, redis_server: Service
) -> None:
    tiers = f"memory,{redis_server.url}"
    one = await edge(aiohttp_client, origin, EDGE_CACHE=tiers)
    two = await edge(aiohttp_client, origin, EDGE_CACHE=tiers)
    first = await one.get("/ok/flowers-1920x1080.jpg?w=90")
    assert first.headers["X-Edge-Cache"] == "miss"
    await drain(one)
    second = await two.get("/ok/flowers-1920x1080.jpg?w=90")
    assert second.headers["X-Edge-Cache"] == "hit"
    assert await metric(two, "edge_cache_requests_total", tier="redis", result="hit") == 1
    # the Redis hit filled the memory tier
    third = await two.get("/ok/flowers-1920x1080.jpg?w=90")
    assert third.headers["X-Edge-Cache"] == "hit"
    assert await metric(two, "edge_cache_requests_total", tier="memory", result="hit") == 1
    assert origin.events["request:ok"] == 1


async def test_two_processes_racing_on_a_cold_key_transform_once(
    aiohttp_client: Any, origin: FakeOrigin, redis_server: Service
) -> None:
    tiers = f"memory,{redis_server.url}"
    one = await edge(aiohttp_client, origin, EDGE_CACHE=tiers)
    two = await edge(aiohttp_client, origin, EDGE_CACHE=tiers)
    path = "/stall/0.4/photo-2725x2225.jpg?w=333"
    first, second = await asyncio.gather(one.get(path), two.get(path))
    assert (first.status, second.status) == (200, 200)
    assert await first.read() == await second.read()
    assert origin.events["request:stall"] == 1


async def test_redis_dying_mid_test_never_fails_a_request(
    aiohttp_client: Any, origin: FakeOrigin, redis_server: Service
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_CACHE=f"memory,{redis_server.url}")
    assert (await client.get("/ok/flowers-1920x1080.jpg?w=70")).status == 200
    await drain(client)
    redis_server.kill()
    for width in (71, 72, 73):
        response = await client.get(f"/ok/flowers-1920x1080.jpg?w={width}")
        assert response.status == 200
    assert await metric(client, "edge_cache_requests_total", tier="redis", result="error") >= 1
    # what memory holds is still a hit
    assert (await client.get("/ok/flowers-1920x1080.jpg?w=70")).headers["X-Edge-Cache"] == "hit"


async def test_a_frozen_redis_costs_a_bounded_wait(
    aiohttp_client: Any, origin: FakeOrigin, redis_server: Service
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_CACHE=redis_server.url)
    redis_server.pause()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await client.get("/ok/flowers-1920x1080.jpg?w=60")
        assert response.status == 200
        assert loop.time() - started < 3
    finally:
        redis_server.resume()


async def test_memcached_tier(
    aiohttp_client: Any, origin: FakeOrigin, memcached_server: Service
) -> None:
    client = await edge(aiohttp_client, origin, EDGE_CACHE=memcached_server.url)
    assert (await client.get("/ok/flowers-1920x1080.jpg?w=80")).headers["X-Edge-Cache"] == "miss"
    await drain(client)
    hit = await client.get("/ok/flowers-1920x1080.jpg?w=80")
    assert hit.headers["X-Edge-Cache"] == "hit"
    assert await metric(client, "edge_cache_requests_total", tier="memcached", result="hit") == 1


async def test_cache_none_always_misses(aiohttp_client: Any, origin: FakeOrigin) -> None:
    client = await edge(aiohttp_client, origin, EDGE_CACHE="none")
    for _ in range(2):
        response = await client.get("/ok/flowers-1920x1080.jpg?w=30")
        assert response.headers["X-Edge-Cache"] == "miss"
    assert origin.events["request:ok"] == 2


async def test_an_expired_entry_is_revalidated_without_a_transform(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    clock = FakeClock()
    client = await edge(aiohttp_client, origin, clock, EDGE_CACHE_TTL="60")
    origin.put("r.jpg", (origin.root / "flowers-1920x1080.jpg").read_bytes())
    first = await client.get("/ok/r.jpg?w=64")
    await drain(client)
    clock.now += 61
    renewed = await client.get("/ok/r.jpg?w=64")
    assert renewed.status == 200
    assert renewed.headers["X-Edge-Cache"] == "hit"
    assert await renewed.read() == await first.read()
    timing = renewed.headers["Server-Timing"]
    assert "revalidate;dur=" in timing
    assert "transform" not in timing
    assert origin.events["not_modified"] == 1
    assert await metric(client, "edge_origin_requests_total", kind="http", code="304") == 1
    await drain(client)
    # renewed from now: fresh again without asking the origin
    clock.now += 30
    assert (await client.get("/ok/r.jpg?w=64")).headers["X-Edge-Cache"] == "hit"
    assert origin.events["not_modified"] == 1
    # a changed original is rendered afresh
    clock.now += 61
    origin.put("r.jpg", (origin.root / "photo-2725x2225.jpg").read_bytes())
    changed = await client.get("/ok/r.jpg?w=64")
    assert changed.headers["X-Edge-Cache"] == "miss"
    assert await changed.read() != await first.read()


async def test_file_origin_revalidates_too(aiohttp_client: Any, tmp_path: Any) -> None:
    clock = FakeClock()
    (tmp_path / "f.jpg").write_bytes((SHARED_IMAGES / "flowers-1920x1080.jpg").read_bytes())
    client = await start_edge(
        aiohttp_client,
        {"EDGE_ORIGIN": tmp_path.as_uri(), "EDGE_CACHE_TTL": "60"},
        cache_clock=clock,
    )
    assert (await client.get("/f.jpg?w=32")).status == 200
    await drain(client)
    clock.now += 61
    renewed = await client.get("/f.jpg?w=32")
    assert renewed.headers["X-Edge-Cache"] == "hit"
    assert await metric(client, "edge_origin_requests_total", kind="file", code="304") == 1
