"""ResultCache over the memory tier: freshness by the injected clock, counting, writes."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from edge.budget import Deadline
from edge.cache import Entry, ResultCache
from edge.cache.backends import memory_tier
from edge.metrics import Metrics
from edge.settings import load_settings
from tests.helpers import FakeClock, counted

TTL = 100.0
STALE_TTL = 50.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def cache(clock: FakeClock, metrics: Metrics) -> ResultCache:
    tier = memory_tier(1 << 20, clock=clock)
    return ResultCache([tier], metrics, ttl=TTL, stale_ttl=STALE_TTL, clock=clock)


def made_at(created: float, body: bytes = b"result") -> Entry:
    return Entry(body, "image/webp", '"e1"', None, created)


def observed(metrics: Metrics, stage: str) -> float:
    value = metrics.registry.get_sample_value("edge_stage_duration_seconds_count", {"stage": stage})
    assert value is not None
    return value


async def test_an_entry_is_fresh_then_stale_then_gone(
    cache: ResultCache, clock: FakeClock, metrics: Metrics
) -> None:
    entry = made_at(clock.now)
    assert await cache.set("k", entry) == {"memory": "stored"}

    clock.now += TTL - 1
    assert await cache.get("k") == (entry, "memory", True)
    clock.now += 1
    assert await cache.get("k") == (entry, "memory", False)
    clock.now += STALE_TTL - 1
    stale = await cache.get("k")
    assert stale is not None
    assert not stale.fresh
    clock.now += 1
    assert await cache.get("k") is None

    assert counted(metrics, "memory", "hit") == 1
    assert counted(metrics, "memory", "stale") == 2
    assert counted(metrics, "memory", "miss") == 1


async def test_a_miss_is_counted_and_timed(cache: ResultCache, metrics: Metrics) -> None:
    deadline = Deadline.after(10)
    assert await cache.get("absent", deadline=deadline) is None
    assert counted(metrics, "memory", "miss") == 1
    assert observed(metrics, "cache_get") == 1
    assert "cache_get" in deadline.spent


async def test_set_is_timed_and_an_entry_too_old_to_serve_is_not_stored(
    cache: ResultCache, clock: FakeClock, metrics: Metrics
) -> None:
    ancient = made_at(clock.now - TTL - STALE_TTL)
    assert await cache.set("k", ancient) == {"memory": "skipped"}
    assert await cache.get("k") is None
    assert observed(metrics, "cache_set") == 1


async def test_an_entry_from_a_clock_ahead_of_ours_is_fresh(
    cache: ResultCache, clock: FakeClock
) -> None:
    entry = made_at(clock.now + 30)
    await cache.set("k", entry)
    assert await cache.get("k") == (entry, "memory", True)


async def test_negative_entries_live_for_their_own_short_ttl(
    cache: ResultCache, clock: FakeClock
) -> None:
    missing = Entry(b"Not Found", "text/plain", None, None, clock.now, 404, error="not_found")
    assert await cache.set_negative("k", missing, ttl=5)
    lookup = await cache.get("k")
    assert lookup is not None
    assert lookup.entry.status == 404
    clock.now += 5
    assert await cache.get("k") is None


async def test_delete_and_purge_drop_entries(cache: ResultCache, clock: FakeClock) -> None:
    cat = cache.object_prefix("file:///srv", "cat.jpg")
    variants = [cache.key("file:///srv", "cat.jpg", f"width={w}", "img:webp") for w in (1, 2)]
    dog = cache.key("file:///srv", "dog.jpg", "width=1", "img:webp")
    for key in [*variants, dog]:
        await cache.set(key, made_at(clock.now))
    assert await cache.delete(variants[0]) == 1
    assert await cache.delete(variants[0]) == 0
    await cache.set(variants[0], made_at(clock.now))
    assert await cache.purge(cat) == 2
    assert await cache.get(variants[1]) is None
    assert await cache.get(dog) is not None


async def test_a_cache_of_no_tiers_always_misses_and_counts_nothing(metrics: Metrics) -> None:
    settings = load_settings({"EDGE_CACHE": "none"})
    cache = ResultCache.from_settings(settings, metrics)
    assert not cache.enabled
    assert await cache.set("k", made_at(0)) == {}
    assert await cache.get("k") is None
    assert not await cache.set_negative("k", made_at(0), ttl=5)
    assert await cache.ping() == {}
    async with cache.fill_lock("k", wait=1) as fill:
        assert not fill.acquired
        assert fill.lookup is None
    assert counted(metrics, "memory", "miss") == 0
    await cache.close()


async def test_from_settings_builds_the_configured_tiers(metrics: Metrics) -> None:
    settings = load_settings(
        {
            "EDGE_CACHE": "memory,redis://127.0.0.1:1/2,memcached://127.0.0.1:1",
            "EDGE_CACHE_MEMORY_BYTES": "1MiB",
            "EDGE_CACHE_NAMESPACE": "blue",
        }
    )
    cache = ResultCache.from_settings(settings, metrics)
    try:
        assert [tier.name for tier in cache.tiers] == ["memory", "redis", "memcached"]
        assert cache.tiers[0].backend.max_bytes == 1024 * 1024
        assert cache.tiers[1].backend.db == 2
        assert cache.key("o", "k", "c", "img:png").startswith("edge:blue:")
    finally:
        await cache.close()
