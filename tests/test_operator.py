"""Operator endpoints: purge every variant of an object from every tier, and stats."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edge.app import STATE
from tests.fake_origin import FakeOrigin
from tests.helpers import start_edge
from tests.services import Service, memcached_server_fixture, redis_server_fixture  # noqa: F401

TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VARIANTS = ("w=10", "w=20&fmt=webp", "w=30&fmt=png")


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


async def drain(client: Any) -> None:
    background = client.server.app[STATE].background
    if background:
        await asyncio.wait(background, timeout=5)


async def warm(client: Any, key: str) -> None:
    for query in VARIANTS:
        assert (await client.get(f"/{key}?{query}")).status == 200
    await drain(client)
    for query in VARIANTS:
        assert (await client.get(f"/{key}?{query}")).headers["X-Edge-Cache"] == "hit"


async def test_operator_endpoints_are_off_without_a_token(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {})
    response = await client.post("/_edge/purge?key=photo-1200x980.jpg", headers=AUTH)
    assert response.status == 404


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN])
async def test_purge_needs_the_bearer_token(aiohttp_client: Any, header: str | None) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_ADMIN_TOKEN": TOKEN})
    headers = {"Authorization": header} if header else {}
    response = await client.post("/_edge/purge?key=photo-1200x980.jpg", headers=headers)
    assert response.status == 401


@pytest.mark.parametrize("tiers", ["memory", "memory,redis", "memcached"])
async def test_purge_drops_every_variant_from_every_tier(
    aiohttp_client: Any,
    origin: FakeOrigin,
    redis_server: Service,
    memcached_server: Service,
    tiers: str,
) -> None:
    cache = tiers.replace("redis", redis_server.url).replace("memcached", memcached_server.url)
    env = {"EDGE_ADMIN_TOKEN": TOKEN, "EDGE_CACHE": cache, "EDGE_ORIGIN": origin.url}
    client = await start_edge(aiohttp_client, env)
    await warm(client, "ok/flowers-1920x1080.jpg")
    await warm(client, "ok/gallery-1024x772.webp")
    response = await client.post("/_edge/purge?key=ok/flowers-1920x1080.jpg", headers=AUTH)
    assert response.status == 200
    body = await response.json()
    tier_count = len(cache.split(","))
    assert body == {"key": "ok/flowers-1920x1080.jpg", "purged": len(VARIANTS) * tier_count}
    for query in VARIANTS:
        again = await client.get(f"/ok/flowers-1920x1080.jpg?{query}")
        assert again.headers["X-Edge-Cache"] == "miss"
        other = await client.get(f"/ok/gallery-1024x772.webp?{query}")
        assert other.headers["X-Edge-Cache"] == "hit"


async def test_successes_carry_one_surrogate_key_per_object(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {})
    tags = set()
    for query in VARIANTS:
        response = await client.get(f"/photo-1200x980.jpg?{query}")
        tags.add(response.headers["Surrogate-Key"])
        assert response.headers["Cache-Tag"] == response.headers["Surrogate-Key"]
    original = await client.get("/photo-1200x980.jpg")
    tags.add(original.headers["Surrogate-Key"])
    assert len(tags) == 1
    other = await client.get("/flowers-1920x1080.jpg?w=10")
    assert other.headers["Surrogate-Key"] not in tags
    missing = await client.get("/missing.jpg?w=10")
    assert "Surrogate-Key" not in missing.headers


async def test_stats_report_what_a_soak_watches(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_ADMIN_TOKEN": TOKEN})
    response = await client.get("/_edge/stats", headers=AUTH)
    assert response.status == 200
    stats = await response.json()
    assert stats["asyncio_tasks"] >= 1
    assert stats["threads"] >= 1
    assert stats["open_fds"] > 0
    assert stats["rss_bytes"] > 10_000_000
    assert stats["transforms_in_progress"] == 0


async def test_operator_calls_are_counted_as_what_they_were(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_ADMIN_TOKEN": TOKEN})
    assert (await client.get("/_edge/stats", headers=AUTH)).status == 200
    assert (await client.get("/_edge/stats")).status == 401
    text = await (await client.get("/metrics")).text()
    assert 'edge_requests_total{code="200",outcome="ok"} 1.0' in text
    assert 'edge_requests_total{code="401",outcome="unauthorized"} 1.0' in text
    assert 'edge_requests_total{code="500",outcome="internal_error"} 0.0' in text


async def test_a_purge_reaches_the_memory_of_every_worker(
    aiohttp_client: Any, tmp_path: Any
) -> None:
    """Two workers of one service share a purge log; each has its own memory tier."""
    from prometheus_client import CollectorRegistry

    from edge.app import create_app
    from tests.helpers import EdgeTestServer, settings_from

    settings = settings_from({"EDGE_ADMIN_TOKEN": TOKEN})
    log = tmp_path / "purges.log"
    one, two = [
        await aiohttp_client(
            EdgeTestServer(create_app(settings, registry=CollectorRegistry(), purge_log=log))
        )
        for _ in range(2)
    ]
    for client in (one, two):
        await warm(client, "photo-1200x980.jpg")
    response = await one.post("/_edge/purge?key=photo-1200x980.jpg", headers=AUTH)
    assert (await response.json())["purged"] == len(VARIANTS)
    # the other worker drops its copies on its next memory-watch tick
    give_up = asyncio.get_running_loop().time() + 5
    while (await two.get(f"/photo-1200x980.jpg?{VARIANTS[0]}")).headers["X-Edge-Cache"] == "hit":
        assert asyncio.get_running_loop().time() < give_up, "worker two kept the purged entry"
        await asyncio.sleep(0.1)
    for query in VARIANTS[1:]:
        assert (await two.get(f"/photo-1200x980.jpg?{query}")).headers["X-Edge-Cache"] == "miss"
