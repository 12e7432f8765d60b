"""The memcached tier against a real memcached: round trips, oversize items, interruptions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from edge.cache import Entry, ResultCache
from edge.cache.backends import MEMCACHED_MAX_ITEM_BYTES, memcached_tier, memory_tier
from edge.metrics import Metrics
from tests.helpers import counted
from tests.services import Service, memcached_server_fixture  # noqa: F401

DAY = 24 * 3600.0
TIMEOUT = 0.2


MakeCache = Callable[..., ResultCache]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def make_cache(memcached_server: Service, metrics: Metrics) -> AsyncIterator[MakeCache]:
    made: list[ResultCache] = []

    def make(
        *, ttl: float = 100.0, max_item_bytes: int | None = MEMCACHED_MAX_ITEM_BYTES
    ) -> ResultCache:
        # memcached expires by its own real clock, so these tests use real time too
        tiers = [
            memory_tier(64 << 20),
            memcached_tier(memcached_server.url, max_item_bytes=max_item_bytes),
        ]
        cache = ResultCache(tiers, metrics, ttl=ttl, stale_ttl=ttl, timeout=TIMEOUT)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.close()


def made_now(body: bytes = b"result") -> Entry:
    return Entry(body, "image/png", '"m1"', "Wed, 21 Oct 2015 07:28:00 GMT", time.time())


async def test_an_entry_round_trips_through_memcached(make_cache: MakeCache) -> None:
    entry = made_now(bytes(range(256)) * 100)
    assert await make_cache().set("k", entry) == {"memory": "stored", "memcached": "stored"}
    lookup = await make_cache().get("k")
    assert lookup == (entry, "memcached", True)


async def test_an_oversize_item_is_skipped_not_an_error(
    make_cache: MakeCache, metrics: Metrics
) -> None:
    entry = made_now(b"\x00" * (2 << 20))
    assert await make_cache().set("big", entry) == {"memory": "stored", "memcached": "skipped"}
    assert await make_cache().get("big") is None
    assert counted(metrics, "memcached", "miss") == 1
    assert counted(metrics, "memcached", "error") == 0
    skipped = metrics.registry.get_sample_value("edge_cache_skipped_total", {"tier": "memcached"})
    assert skipped == 1


async def test_an_item_the_server_refuses_is_an_error_and_the_tier_recovers(
    make_cache: MakeCache, metrics: Metrics
) -> None:
    cache = make_cache(max_item_bytes=None)  # let the server decide
    results = await cache.set("big", made_now(b"\x00" * (2 << 20)))
    assert results == {"memory": "stored", "memcached": "error"}
    assert counted(metrics, "memcached", "error") == 1
    small = made_now()
    fresh_cache = make_cache()
    assert await fresh_cache.set("small", small) == {"memory": "stored", "memcached": "stored"}
    assert await make_cache().get("small") == (small, "memcached", True)


async def test_a_ttl_beyond_thirty_days_is_sent_as_an_absolute_time(
    make_cache: MakeCache,
) -> None:
    entry = made_now()
    await make_cache(ttl=40 * DAY).set("k", entry)
    # read as relative seconds, 80 days would be a date in 1970: already expired
    assert await make_cache(ttl=40 * DAY).get("k") == (entry, "memcached", True)


def test_ttl_for_memcached_is_whole_seconds_relative_up_to_thirty_days() -> None:
    tier = memcached_tier("memcached://127.0.0.1:1")
    now = 1_700_000_000.0
    assert tier.ttl_for(0.2, now) == 1
    assert tier.ttl_for(99.5, now) == 100
    assert tier.ttl_for(30 * DAY, now) == 30 * DAY
    assert tier.ttl_for(30 * DAY + 1, now) == now + 30 * DAY + 1


async def test_a_call_cut_off_mid_reply_never_hands_its_reply_to_the_next_call(
    make_cache: MakeCache, memcached_server: Service
) -> None:
    backend = make_cache().tiers[1].backend
    values = {f"key{i}": f"value{i}".encode() for i in range(4)}
    for key, value in values.items():
        await backend.set(key, value)
    memcached_server.pause()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(TIMEOUT):
            await backend.get("key0")
    memcached_server.resume()
    # the reply to key0 arrives now; every pooled connection is used below
    for key, value in values.items():
        assert await backend.get(key) == value


async def test_a_killed_memcached_fails_open_fast(
    make_cache: MakeCache, memcached_server: Service, metrics: Metrics
) -> None:
    cache = make_cache()
    assert await cache.set("k", made_now()) == {"memory": "stored", "memcached": "stored"}
    assert await cache.ping() == {"memory": True, "memcached": True}
    memcached_server.kill()  # pooled connections now meet EOF on their next call

    begun = time.monotonic()
    assert await cache.ping() == {"memory": True, "memcached": False}
    assert await make_cache().get("k") is None
    assert await cache.set("k2", made_now()) == {"memory": "stored", "memcached": "error"}
    assert time.monotonic() - begun < 3 * TIMEOUT + 1.0
    assert counted(metrics, "memcached", "error") == 2
