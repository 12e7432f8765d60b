"""The Redis tier against a real redis-server: round trips, fill-up, garbage, failures."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry

from edge.cache import Entry, ResultCache
from edge.cache.backends import memory_tier, redis_tier
from edge.metrics import Metrics
from tests.helpers import FakeClock, counted
from tests.services import Service, raw_redis_fixture, redis_server_fixture  # noqa: F401

TTL = 100.0
STALE_TTL = 50.0
TIMEOUT = 0.2
#: far above TIMEOUT, far below anything a hung call without a bound would take
GENEROUS = 2.0


MakeCache = Callable[..., ResultCache]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def make_cache(
    redis_server: Service, clock: FakeClock, metrics: Metrics
) -> AsyncIterator[MakeCache]:
    """Build memory+Redis caches on the test's server (each its own 'process')."""
    made: list[ResultCache] = []

    def make(*, retry_after: float = 1.0, metrics: Metrics = metrics) -> ResultCache:
        tiers = [memory_tier(1 << 20, clock=clock), redis_tier(redis_server.url, timeout=TIMEOUT)]
        cache = ResultCache(
            tiers,
            metrics,
            ttl=TTL,
            stale_ttl=STALE_TTL,
            timeout=TIMEOUT,
            retry_after=retry_after,
            clock=clock,
        )
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.close()


def made_at(created: float, body: bytes = b"result") -> Entry:
    return Entry(body, "image/avif", '"e1"', None, created, vary="Accept")


async def timed(call: Awaitable[object]) -> tuple[object, float]:
    begun = time.monotonic()
    result = await call
    return result, time.monotonic() - begun


async def test_an_entry_round_trips_through_redis_with_its_ttl(
    make_cache: MakeCache, clock: FakeClock, raw_redis: redis.Redis
) -> None:
    cache = make_cache()
    entry = made_at(clock.now, body=bytes(range(256)) * 1000)
    assert await cache.set("k", entry) == {"memory": "stored", "redis": "stored"}
    assert await raw_redis.get("k") is not None
    life_ms = await raw_redis.pttl("k")
    assert (TTL + STALE_TTL - 1) * 1000 < life_ms <= (TTL + STALE_TTL) * 1000

    other_process = make_cache()
    assert await other_process.get("k") == (entry, "redis", True)


async def test_a_redis_hit_fills_the_memory_tier(
    make_cache: MakeCache, clock: FakeClock, metrics: Metrics
) -> None:
    writer = make_cache(metrics=Metrics(CollectorRegistry()))
    reader = make_cache()
    entry = made_at(clock.now)
    await writer.set("k", entry)

    first = await reader.get("k")
    second = await reader.get("k")
    assert first == (entry, "redis", True)
    assert second == (entry, "memory", True)
    assert counted(metrics, "memory", "miss") == 1
    assert counted(metrics, "redis", "hit") == 1
    assert counted(metrics, "memory", "hit") == 1


async def test_a_fresh_redis_entry_beats_a_stale_memory_one(
    make_cache: MakeCache, clock: FakeClock, metrics: Metrics
) -> None:
    reader = make_cache()
    writer = make_cache(metrics=Metrics(CollectorRegistry()))
    await reader.set("k", made_at(clock.now - TTL - 1, b"old"))
    await writer.set("k", made_at(clock.now, b"new"))

    lookup = await reader.get("k")
    assert lookup is not None
    assert (lookup.entry.body, lookup.tier, lookup.fresh) == (b"new", "redis", True)
    assert counted(metrics, "memory", "stale") == 1
    refreshed = await reader.get("k")
    assert refreshed is not None
    assert (refreshed.entry.body, refreshed.tier) == (b"new", "memory")


async def test_garbage_in_redis_is_an_error_and_a_miss(
    make_cache: MakeCache, metrics: Metrics, raw_redis: redis.Redis
) -> None:
    cache = make_cache()
    await raw_redis.set("k", b"\x80\x04\x95 this is not an envelope")
    assert await cache.get("k") is None
    assert counted(metrics, "redis", "error") == 1
    assert counted(metrics, "redis", "miss") == 0
    # the tier itself is healthy: the next key is looked up normally
    assert await cache.get("other") is None
    assert counted(metrics, "redis", "miss") == 1


async def test_a_killed_redis_fails_open_fast_and_is_counted(
    make_cache: MakeCache, redis_server: Service, clock: FakeClock, metrics: Metrics
) -> None:
    cache = make_cache(retry_after=0)  # no rest: every call really goes to the dead server
    entry = made_at(clock.now)
    await cache.set("k", entry)
    redis_server.kill()

    lookup, took = await timed(cache.get("absent"))
    assert lookup is None
    assert took < GENEROUS
    results, took = await timed(cache.set("k2", entry))
    assert results == {"memory": "stored", "redis": "error"}
    assert took < GENEROUS
    assert await cache.get("k") == (entry, "memory", True)
    assert counted(metrics, "redis", "error") == 2
    assert await cache.ping() == {"memory": True, "redis": False}


async def test_a_hung_redis_costs_one_timeout_then_rests(
    make_cache: MakeCache, redis_server: Service, clock: FakeClock, metrics: Metrics
) -> None:
    cache = make_cache(retry_after=5)
    await cache.get("warm-up")  # a pooled connection exists before the server freezes
    redis_server.pause()

    lookup, took = await timed(cache.get("k"))
    assert lookup is None
    assert TIMEOUT * 0.5 <= took < GENEROUS
    assert counted(metrics, "redis", "error") == 1

    # resting: the tier is skipped without a call, still counted as an error
    results, took = await timed(cache.set("k", made_at(clock.now)))
    assert results == {"memory": "stored", "redis": "error"}
    assert took < TIMEOUT * 0.5
    assert counted(metrics, "redis", "error") == 2

    redis_server.resume()
    clock.now += 5
    assert await cache.set("k", made_at(clock.now)) == {"memory": "stored", "redis": "stored"}
    assert await cache.ping() == {"memory": True, "redis": True}


async def test_delete_and_purge_reach_redis(
    make_cache: MakeCache, clock: FakeClock, raw_redis: redis.Redis
) -> None:
    cache = make_cache()
    keys = [cache.key("s3:b", "cat.jpg", f"width={w}", "img:jpeg") for w in range(5)]
    dog = cache.key("s3:b", "dog.jpg", "width=1", "img:jpeg")
    for key in [*keys, dog]:
        await cache.set(key, made_at(clock.now))
    assert await cache.delete(keys[0]) == 2  # memory and redis
    # memory holds 4 variants and redis 4: a purge drops all eight
    assert await cache.purge(cache.object_prefix("s3:b", "cat.jpg")) == 8
    assert await raw_redis.exists(*keys) == 0
    assert await raw_redis.exists(dog) == 1


async def test_purge_pages_through_many_variants(
    make_cache: MakeCache, raw_redis: redis.Redis
) -> None:
    cache = make_cache()
    prefix = cache.object_prefix("s3:b", "popular.jpg")
    await raw_redis.mset({f"{prefix}{n}": b"x" for n in range(1203)})
    await raw_redis.set("edge:v1:p1:unrelated", b"x")
    assert await cache.purge(prefix) == 1203
    assert await raw_redis.dbsize() == 1
