"""The cross-process fill lock: one process fills a cold key, the others use its result."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry

from edge.cache import Entry, ResultCache
from edge.cache.backends import memory_tier, redis_tier
from edge.cache.keys import lock_key
from edge.metrics import Metrics
from tests.helpers import FakeClock
from tests.services import Service, raw_redis_fixture, redis_server_fixture  # noqa: F401

TIMEOUT = 0.2
GENEROUS = 5.0
KEY = "edge:v1:p1:object:variant"


MakeCache = Callable[[], ResultCache]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_cache(redis_server: Service, clock: FakeClock) -> AsyncIterator[MakeCache]:
    """Each cache built is one 'process': its own memory tier, the shared Redis."""
    made: list[ResultCache] = []

    def make() -> ResultCache:
        tiers = [memory_tier(1 << 20, clock=clock), redis_tier(redis_server.url, timeout=TIMEOUT)]
        cache = ResultCache(
            tiers,
            Metrics(CollectorRegistry()),
            ttl=100,
            stale_ttl=100,
            timeout=TIMEOUT,
            lock_poll=0.01,
            clock=clock,
        )
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.close()


class Filler:
    """What the app does on a miss: look up, take the fill lock, work only if still needed."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.works = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.holding = asyncio.Event()

    async def fill(self, cache: ResultCache) -> Entry:
        lookup = await cache.get(KEY)
        if lookup is not None:
            return lookup.entry
        async with cache.fill_lock(KEY, wait=GENEROUS) as fill:
            if fill.lookup is not None:
                return fill.lookup.entry
            self.works += 1
            self.holding.set()
            await self.gate.wait()
            entry = Entry(b"transformed", "image/webp", None, None, self.clock.now)
            await cache.set(KEY, entry)
            return entry


async def is_polling_the_lock(raw_redis: redis.Redis) -> bool:
    """Evidence a waiter is polling the lock: Redis has served it EXISTS commands."""
    stats = await raw_redis.info("commandstats")
    return int(stats.get("cmdstat_exists", {}).get("calls", 0)) > 0


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it holds, failing after a generous bound."""
    for _ in range(int(GENEROUS / 0.01)):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def test_two_processes_racing_on_a_cold_key_do_the_work_once(
    make_cache: MakeCache, clock: FakeClock, raw_redis: redis.Redis
) -> None:
    first, second = make_cache(), make_cache()
    filler = Filler(clock)
    filler.gate.clear()
    holder = asyncio.create_task(filler.fill(first))
    await asyncio.wait_for(filler.holding.wait(), GENEROUS)
    waiter = asyncio.create_task(filler.fill(second))
    # the second process is polling the lock, not racing past it
    await eventually(lambda: is_polling_the_lock(raw_redis))

    filler.gate.set()
    assert await holder == await waiter
    assert filler.works == 1
    assert await raw_redis.exists(lock_key(KEY)) == 0
    # the waiter's result came from Redis and now sits in its own memory tier
    lookup = await second.get(KEY)
    assert lookup is not None
    assert lookup.tier == "memory"


async def test_many_processes_racing_do_the_work_once(
    make_cache: MakeCache, clock: FakeClock
) -> None:
    filler = Filler(clock)
    caches = [make_cache() for _ in range(6)]
    results = await asyncio.gather(*(filler.fill(cache) for cache in caches))
    assert filler.works == 1
    assert len({entry.body for entry in results}) == 1


async def test_a_waiter_takes_over_when_the_holder_fails_without_storing(
    make_cache: MakeCache, raw_redis: redis.Redis
) -> None:
    first, second = make_cache(), make_cache()
    holding, failing = asyncio.Event(), asyncio.Event()

    async def fail_while_holding() -> None:
        async with first.fill_lock(KEY, wait=GENEROUS) as fill:
            assert fill.acquired
            holding.set()
            await failing.wait()
            raise RuntimeError("origin failed")

    holder = asyncio.create_task(fail_while_holding())
    await asyncio.wait_for(holding.wait(), GENEROUS)
    waiting = asyncio.create_task(_acquired(second))
    await eventually(lambda: is_polling_the_lock(raw_redis))
    failing.set()
    with pytest.raises(RuntimeError):
        await holder
    assert await waiting is True


async def _acquired(cache: ResultCache) -> bool:
    async with cache.fill_lock(KEY, wait=GENEROUS) as fill:
        return fill.acquired


async def test_a_wait_that_runs_out_proceeds_without_the_lock(
    make_cache: MakeCache, raw_redis: redis.Redis
) -> None:
    await raw_redis.set(lock_key(KEY), b"someone-else", px=60_000)
    begun = time.monotonic()
    async with make_cache().fill_lock(KEY, wait=0.2) as fill:
        assert (fill.acquired, fill.lookup) == (False, None)
    assert 0.2 <= time.monotonic() - begun < GENEROUS
    assert await raw_redis.get(lock_key(KEY)) == b"someone-else"


async def test_redis_down_means_no_lock_and_no_wait(
    make_cache: MakeCache, redis_server: Service
) -> None:
    cache = make_cache()
    redis_server.kill()
    begun = time.monotonic()
    async with cache.fill_lock(KEY, wait=GENEROUS) as fill:
        assert (fill.acquired, fill.lookup) == (False, None)
    assert time.monotonic() - begun < 1.0


async def test_release_never_drops_a_lock_someone_else_now_holds(
    make_cache: MakeCache, raw_redis: redis.Redis
) -> None:
    async with make_cache().fill_lock(KEY, wait=GENEROUS, hold=30) as fill:
        assert fill.acquired
        assert 29_000 < await raw_redis.pttl(lock_key(KEY)) <= 30_000
        # our lock expired and another process took it
        await raw_redis.set(lock_key(KEY), b"successor", px=60_000)
    assert await raw_redis.get(lock_key(KEY)) == b"successor"


async def test_a_result_stored_just_before_acquiring_is_used_not_redone(
    make_cache: MakeCache, clock: FakeClock, raw_redis: redis.Redis
) -> None:
    entry = Entry(b"already there", "image/png", None, None, clock.now)
    await make_cache().set(KEY, entry)
    async with make_cache().fill_lock(KEY, wait=GENEROUS) as fill:
        assert not fill.acquired
        assert fill.lookup == (entry, "redis", True)
        assert await raw_redis.exists(lock_key(KEY)) == 0


async def test_a_stale_entry_does_not_count_as_filled(
    make_cache: MakeCache, clock: FakeClock
) -> None:
    await make_cache().set(KEY, Entry(b"old", "image/png", None, None, clock.now - 150))
    async with make_cache().fill_lock(KEY, wait=GENEROUS) as fill:
        assert fill.acquired
        assert fill.lookup is None
