"""The result cache: the configured tiers read in order, written together, never fatal.

``ResultCache`` is the one object the app talks to. Look-ups try each tier in order
(memory first); a hit in a lower tier is copied into the memory tier. An entry is fresh
for EDGE_CACHE_TTL after it was made, stale for EDGE_CACHE_STALE_TTL more (served only
when a refresh fails), and a miss after that. Every call to a tier is bounded by a short
timeout; a tier that is down, slow, or holds garbage is a miss, counted as
``edge_cache_requests_total{result="error"}`` and logged, and a shared tier that failed is
rested for a moment so a dead Redis costs each request nothing rather than the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

from edge import PIPELINE_VERSION
from edge.budget import Deadline
from edge.cache.backends import Tier, open_tier
from edge.cache.envelope import CorruptEntry, Entry, check_storable, decode, encode
from edge.cache.keys import cache_key, lock_key, object_prefix
from edge.cache.lock import RedisFillLock
from edge.metrics import Metrics
from edge.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: what ``set`` did in one tier
SetResult = Literal["stored", "skipped", "error"]

#: bound of one purge's scan of a Redis tier (an operator action, not a request)
PURGE_SECONDS = 10.0
_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")


class Lookup(NamedTuple):
    """A cached entry, the tier it came from, and whether it may be served as a hit."""

    entry: Entry
    tier: str
    #: False: stale, to be served only when refreshing it fails
    fresh: bool


@dataclass(frozen=True, slots=True)
class Fill:
    """What ``fill_lock`` settled: fill the key ourselves, or use what another process put.

    ``acquired`` is True when this process holds the cross-process lock. ``lookup`` is a
    fresh entry another process stored while we waited: serve it and do no work. When
    both are unset (no shared tier, Redis down, or the wait ran out) do the work anyway:
    the lock only saves duplicate work, it never blocks a request.
    """

    acquired: bool
    lookup: Lookup | None = None


_RESULT_OF_FRESHNESS = {True: "hit", False: "stale", None: "miss"}


class TierFailed(Exception):
    """A tier call failed, timed out, or was skipped while the tier rests (internal)."""


class ResultCache:
    """Owns the tiers: look-up order and fill-up, writes, freshness, bounds and counting."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        metrics: Metrics,
        *,
        ttl: float,
        stale_ttl: float,
        namespace: str = "v1",
        timeout: float = 0.25,
        retry_after: float = 1.0,
        lock_hold: float = 30.0,
        lock_poll: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``timeout`` bounds each tier call; a shared tier that failed is skipped for
        ``retry_after`` seconds. ``lock_hold`` is how long a fill lock lives unless
        released (longer than any fill takes); ``lock_poll`` how often waiters look.
        ``clock`` is unix time, used for entry ages and rests (tests inject a fake)."""
        self._tiers = tuple(tiers)
        self._memory = next((tier for tier in self._tiers if tier.name == "memory"), None)
        self._ttl = ttl
        self._stale_ttl = stale_ttl
        self.namespace = namespace
        self._timeout = timeout
        self._retry_after = retry_after
        self._lock_hold = lock_hold
        self._lock_poll = lock_poll
        self._clock = clock
        self._resting_until: dict[int, float] = {}
        self._metrics = metrics
        # labelled children resolved once: the hit path is counted on every request
        self._counters = {
            (tier.name, result): metrics.cache_requests.labels(tier=tier.name, result=result)
            for tier in self._tiers
            for result in ("hit", "miss", "stale", "error")
        }
        self._skipped = {
            tier.name: metrics.cache_skipped.labels(tier=tier.name) for tier in self._tiers
        }
        self._timers = {
            stage: metrics.stage_duration.labels(stage=stage)
            for stage in ("cache_get", "cache_set")
        }

    def now(self) -> float:
        """The cache's clock: what ``Entry.created`` must be measured with."""
        return self._clock()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        metrics: Metrics,
        *,
        timeout: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> ResultCache:
        """The tiers EDGE_CACHE names (none for ``none``: every look-up misses)."""
        tiers = [
            open_tier(spec, memory_bytes=settings.cache_memory_bytes, timeout=timeout, clock=clock)
            for spec in settings.cache
        ]
        return cls(
            tiers,
            metrics,
            ttl=settings.cache_ttl,
            stale_ttl=settings.cache_stale_ttl,
            namespace=settings.cache_namespace,
            timeout=timeout,
            # a fill never outlives the request budget that started it
            lock_hold=settings.backend_timeout + 1.0,
            clock=clock,
        )

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return self._tiers

    @property
    def enabled(self) -> bool:
        return bool(self._tiers)

    # --- keys -----------------------------------------------------------------------------

    def key(self, origin_identity: str, object_key: str, canonical: str, output: str) -> str:
        """``cache_key`` with this cache's namespace and the current pipeline version."""
        return cache_key(
            self.namespace, PIPELINE_VERSION, origin_identity, object_key, canonical, output
        )

    def object_prefix(self, origin_identity: str, object_key: str) -> str:
        """The prefix of every variant of one object (what ``purge`` takes)."""
        return object_prefix(self.namespace, PIPELINE_VERSION, origin_identity, object_key)

    # --- reading --------------------------------------------------------------------------

    async def get(self, key: str, *, deadline: Deadline | None = None) -> Lookup | None:
        """The freshest entry under ``key`` in any tier, or None.

        A fresh entry from the first tier holding one wins; failing that, the first stale
        one. Observes the cache_get stage (and records it in ``deadline`` if given).
        """
        if not self._tiers:
            return None
        begun = time.perf_counter()
        timed = deadline.stage("cache_get") if deadline is not None else nullcontext()
        try:
            with timed:  # the request's record of the stage (and its tracing span)
                memory = self._memory
                if memory is not self._tiers[0]:
                    return await self._look_up(key, self._tiers, None)
                # the memory tier in front answers a hot key without awaiting anything
                first = self._read_memory(memory, key)
                if first is not None and first.fresh:
                    return first
                stale = (first, memory) if first is not None else None
                return await self._look_up(key, self._tiers[1:], stale)
        finally:
            self._observe("cache_get", time.perf_counter() - begun, None)

    def fresh_in_memory(self, key: str, deadline: Deadline) -> Entry | None:
        """A fresh image under ``key`` in the memory tier in front, read without awaiting
        anything; None otherwise (uncounted: the full ``get`` that follows counts it).

        Negative entries are left to ``get`` as well: they answer with an error.
        """
        memory = self._memory
        if memory is None or memory is not self._tiers[0]:
            return None
        begun = time.perf_counter()
        entry: Entry | None = memory.backend.peek(key)
        if entry is None or entry.status != 200 or self._freshness(entry) is not True:
            return None
        self._count(memory, "hit")
        self._observe("cache_get", time.perf_counter() - begun, deadline)
        return entry

    async def _look_up(
        self, key: str, tiers: Sequence[Tier], stale: tuple[Lookup, Tier] | None
    ) -> Lookup | None:
        for tier in tiers:
            if tier is self._memory:
                lookup = self._read_memory(tier, key)
            else:
                lookup = await self._read_shared(tier, key)
            if lookup is None:
                continue
            if lookup.fresh:
                await self._fill_memory(tier, key, lookup.entry)
                return lookup
            stale = stale or (lookup, tier)
        if stale is None:
            return None
        lookup, tier = stale
        await self._fill_memory(tier, key, lookup.entry)
        return lookup

    def _read_memory(self, tier: Tier, key: str) -> Lookup | None:
        """The memory tier's entry (kept decoded: nothing to parse, no timer, no rest)."""
        entry = tier.backend.peek(key)
        if entry is None:
            self._count(tier, "miss")
            return None
        return self._judged(tier, entry)

    def _judged(self, tier: Tier, entry: Entry) -> Lookup | None:
        """``entry`` as a fresh or stale look-up (None: expired), counted."""
        fresh = self._freshness(entry)
        self._count(tier, _RESULT_OF_FRESHNESS[fresh])
        if fresh is None:
            return None
        return Lookup(entry, tier.name, fresh)

    async def _read_shared(self, tier: Tier, key: str) -> Lookup | None:
        """A shared tier's entry under ``key``, counted as hit, stale, miss or error."""
        try:
            raw = await self._bounded(tier, lambda: tier.backend.get(key))
        except TierFailed:
            self._count(tier, "error")
            return None
        if raw is None:
            self._count(tier, "miss")
            return None
        try:
            entry = decode(raw)
        except CorruptEntry as exc:
            log.warning("cache tier %s holds a corrupt entry under %s: %s", tier.name, key, exc)
            self._count(tier, "error")
            return None
        return self._judged(tier, entry)

    def _freshness(self, entry: Entry) -> bool | None:
        """True fresh, False stale, None expired (a miss)."""
        # a negative age (another host's clock ahead of ours) counts as brand new
        age = self._clock() - entry.created
        if age < self._ttl:
            return True
        if age < self._ttl + self._stale_ttl:
            return False
        return None

    async def _fill_memory(self, source: Tier, key: str, entry: Entry) -> None:
        memory = self._memory
        if memory is None or memory is source:
            return
        life = self._remaining_life(entry)
        if life > 0:
            await self._write(memory, key, entry, life)

    # --- writing --------------------------------------------------------------------------

    async def set(self, key: str, entry: Entry) -> dict[str, SetResult]:
        """Store ``entry`` in every tier until it is too old to serve even stale.

        Never raises for a tier's failure: each tier's result is returned by tier name
        (``skipped``: too large for that tier, or already too old). Observes cache_set.
        """
        if not self._tiers:
            return {}
        begun = time.perf_counter()
        try:
            # the memory tier keeps the entry itself; shared tiers get one envelope
            shared = any(tier is not self._memory for tier in self._tiers)
            raw = encode(entry) if shared else b""  # encode checks the entry too
            if not shared:
                check_storable(entry)
            life = self._remaining_life(entry)
            if life <= 0:
                return {tier.name: "skipped" for tier in self._tiers}
            results = await asyncio.gather(
                *(
                    self._write(tier, key, entry if tier is self._memory else raw, life)
                    for tier in self._tiers
                )
            )
            return {tier.name: result for tier, result in zip(self._tiers, results, strict=True)}
        finally:
            self._observe("cache_set", time.perf_counter() - begun, None)

    async def set_negative(self, key: str, entry: Entry, ttl: float) -> bool:
        """Keep a short negative entry (a 404 or parameter 400) for ``ttl`` seconds, in the
        memory tier only: shared tiers must not spread one worker's view of a missing
        object. True if stored."""
        memory = self._memory
        if memory is None or ttl <= 0:
            return False
        check_storable(entry)
        return await self._write(memory, key, entry, ttl) == "stored"

    async def _write(self, tier: Tier, key: str, value: Entry | bytes, life: float) -> SetResult:
        """Store ``value``: the entry itself in the memory tier, its envelope in shared ones."""
        limit = tier.max_item_bytes
        if limit is not None and isinstance(value, bytes) and len(value) > limit:
            log.debug("not caching %s in %s: over its item size limit", key, tier.name)
            self._skipped[tier.name].inc()
            return "skipped"
        ttl = tier.ttl_for(life, self._clock())
        try:
            stored = await self._bounded(tier, lambda: tier.backend.set(key, value, ttl=ttl))
            if stored and tier.name == "memcached":
                await self._bounded(tier, lambda: _index_variant(tier, key, ttl))
        except TierFailed:
            self._count(tier, "error")
            return "error"
        return "stored" if stored else "skipped"

    def _remaining_life(self, entry: Entry) -> float:
        return entry.created + self._ttl + self._stale_ttl - self._clock()

    # --- removing -------------------------------------------------------------------------

    async def delete(self, key: str) -> int:
        """Drop ``key`` from every tier; how many tiers held it (failures count as 0)."""
        deleted = await asyncio.gather(*(self._delete_in(tier, key) for tier in self._tiers))
        return sum(deleted)

    async def _delete_in(self, tier: Tier, key: str) -> int:
        try:
            return int(await self._bounded(tier, lambda: tier.backend.delete(key)))
        except TierFailed:
            self._count(tier, "error")
            return 0

    async def purge(self, prefix: str) -> int:
        """Drop every key starting with ``prefix`` (see ``object_prefix``) from the memory
        and Redis tiers; the number of entries dropped.

        memcached cannot list its keys: each write there also appends the key to a
        per-object index entry, and a purge deletes what the index names. Redis is
        scanned, which takes time on a large keyspace, hence its own longer bound; a
        failure there is logged and skipped.
        """
        total = 0
        for tier in self._tiers:
            if tier is self._memory:
                total += tier.backend.delete_prefix(prefix)
            elif tier.name == "redis":
                total += await self._purge_redis(tier, prefix)
            elif tier.name == "memcached":
                total += await self._purge_memcached(tier, prefix)
        return total

    def purge_memory(self, prefix: str) -> int:
        """Drop ``prefix``'s entries from this process's memory tier only (a purge made
        by another worker, which already reached the shared tiers)."""
        return self._memory.backend.delete_prefix(prefix) if self._memory else 0

    async def _purge_memcached(self, tier: Tier, prefix: str) -> int:
        """memcached cannot list keys: drop the variants its per-object index names."""
        client = tier.backend.client
        index = _variant_index(prefix).encode()
        try:
            async with asyncio.timeout(PURGE_SECONDS):
                listed = await client.get(index) or b""
                keys = {line for line in listed.split(b"\n") if line.startswith(prefix.encode())}
                deleted = [await client.delete(key) for key in keys]
                await client.delete(index)
        except Exception as exc:  # fail open: a purge that cannot reach memcached is partial
            log.warning("purge of %s in memcached failed: %r", prefix, exc)
            return 0
        return sum(1 for done in deleted if done)

    async def _purge_redis(self, tier: Tier, prefix: str) -> int:
        client = tier.backend.client
        pattern = _GLOB_SPECIALS.sub(r"\\\1", prefix) + "*"
        purged = 0
        batch: list[bytes] = []
        try:
            async with asyncio.timeout(PURGE_SECONDS):
                async for found in client.scan_iter(match=pattern, count=1000):
                    batch.append(found)
                    if len(batch) >= 500:
                        purged += int(await client.unlink(*batch))
                        batch.clear()
                if batch:
                    purged += int(await client.unlink(*batch))
        except Exception as exc:  # fail open: a purge that cannot reach Redis is partial
            log.warning("purge of %s in redis stopped after %d entries: %r", prefix, purged, exc)
        return purged

    # --- the cross-process fill lock ------------------------------------------------------

    @asynccontextmanager
    async def fill_lock(
        self, key: str, *, wait: float, hold: float | None = None
    ) -> AsyncIterator[Fill]:
        """Coordinate filling a cold ``key`` with other processes sharing a Redis tier.

        Takes the lock (SET NX PX, ``hold`` seconds) or, if another process holds it,
        polls until that process releases it or ``wait`` seconds pass, then yields a
        ``Fill``. Without a Redis tier, or with Redis down, it yields at once with nothing
        settled: proceed without the lock. Released on exit, only if still ours.
        """
        tier = self._lock_tier()
        if tier is None:
            yield Fill(acquired=False)
            return
        lock = RedisFillLock(tier.backend, lock_key(key))
        fill = await self._acquire_or_wait(tier, lock, key, wait, hold or self._lock_hold)
        try:
            yield fill
        finally:
            if fill.acquired:
                await self._release(tier, lock)

    async def _acquire_or_wait(
        self, tier: Tier, lock: RedisFillLock, key: str, wait: float, hold: float
    ) -> Fill:
        give_up = time.monotonic() + wait
        while True:
            try:
                if await self._bounded(tier, lambda: lock.try_acquire(hold)):
                    return await self._recheck_after_acquiring(tier, lock, key)
                released = await self._wait_for_release(tier, lock, give_up)
            except TierFailed:
                return Fill(acquired=False)
            lookup = await self._peek_fresh(tier, key)
            if lookup is not None:
                return Fill(acquired=False, lookup=lookup)
            if not released:
                return Fill(acquired=False)
            # the holder let go without storing a fresh result: try to take over

    async def _recheck_after_acquiring(self, tier: Tier, lock: RedisFillLock, key: str) -> Fill:
        # the previous holder may have stored and released between our caller's miss and
        # our acquiring: without this check that fill would be done twice
        lookup = await self._peek_fresh(tier, key)
        if lookup is None:
            return Fill(acquired=True)
        await self._release(tier, lock)
        return Fill(acquired=False, lookup=lookup)

    async def _wait_for_release(self, tier: Tier, lock: RedisFillLock, give_up: float) -> bool:
        """True once nobody holds the lock; False if ``give_up`` (monotonic) comes first."""
        while await self._bounded(tier, lock.is_held):
            left = give_up - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(self._lock_poll, left))
        return True

    async def _peek_fresh(self, tier: Tier, key: str) -> Lookup | None:
        """A fresh entry in ``tier``, not counted (the caller's own look-up was)."""
        try:
            raw = await self._bounded(tier, lambda: tier.backend.get(key))
            entry = decode(raw) if raw is not None else None
        except (TierFailed, CorruptEntry):
            return None
        if entry is None or self._freshness(entry) is not True:
            return None
        await self._fill_memory(tier, key, entry)
        return Lookup(entry, tier.name, True)

    async def _release(self, tier: Tier, lock: RedisFillLock) -> None:
        try:
            await self._bounded(tier, lock.release)
        except TierFailed:
            log.warning("could not release fill lock %s; it expires by itself", lock.name)

    def _lock_tier(self) -> Tier | None:
        return next((tier for tier in self._tiers if tier.name == "redis"), None)

    # --- lifecycle and diagnostics --------------------------------------------------------

    async def ping(self) -> dict[str, bool]:
        """Whether each tier answers now, by tier name (ignores rests; for diagnostics)."""
        answers = await asyncio.gather(*(self._ping(tier) for tier in self._tiers))
        return {tier.name: ok for tier, ok in zip(self._tiers, answers, strict=True)}

    async def _ping(self, tier: Tier) -> bool:
        command = {"redis": "ping", "memcached": "version"}.get(tier.name)
        if command is None:
            return True
        try:
            async with asyncio.timeout(self._timeout):
                await tier.backend.raw(command)
        except Exception:  # any failure means "not answering"
            return False
        return True

    async def close(self) -> None:
        """Close every tier's connections."""
        for tier in self._tiers:
            with suppress(Exception):
                await tier.backend.close()

    # --- the bound, the rest and the counting ---------------------------------------------

    async def _bounded(self, tier: Tier, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` within the timeout; ``TierFailed`` on any failure or while resting."""
        index = self._tiers.index(tier)
        if self._clock() < self._resting_until.get(index, -math.inf):
            raise TierFailed(f"{tier.name} is resting after a failure")
        try:
            if not tier.shared:
                # in-process: nothing to wait for, so no timer on the hit path
                return await call()
            async with asyncio.timeout(self._timeout):
                return await call()
        except Exception as exc:  # fail open: whatever a tier does wrong is a miss
            self._rest(index, tier, exc)
            raise TierFailed(tier.name) from exc

    def _rest(self, index: int, tier: Tier, exc: Exception) -> None:
        if tier.shared and self._retry_after > 0:
            self._resting_until[index] = self._clock() + self._retry_after
        # one line per failure: while resting, the calls skipped are not logged
        log.warning("cache tier %s failed (%r); treating it as a miss", tier.name, exc)

    def _count(self, tier: Tier, result: str) -> None:
        self._metrics.add(self._counters[tier.name, result])

    def _observe(self, stage: str, seconds: float, deadline: Deadline | None) -> None:
        self._timers[stage].observe(seconds)
        if deadline is not None:
            deadline.record(stage, seconds)


def _variant_index(prefix: str) -> str:
    """The memcached key listing an object's cached variants (one key per line)."""
    return prefix + "variants"


async def _index_variant(tier: Tier, key: str, ttl: float | int) -> None:
    """Record ``key`` in its object's variant index so a purge can find it.

    ``append`` fails when the index does not exist yet; ``add`` then creates it (a race
    with another writer's ``add`` loses one name, which only makes that variant live out
    its ttl). The index lives as long as the newest variant could.
    """
    head, colon, _ = key.rpartition(":")
    if not colon:
        return  # not a key made by cache_key(): no object to index it under
    client = tier.backend.client
    prefix = head + colon
    index, line = _variant_index(prefix).encode(), key.encode() + b"\n"
    if await client.append(index, line):
        await client.touch(index, int(ttl))  # the index outlives its newest variant
    else:
        await client.add(index, line, exptime=int(ttl))
