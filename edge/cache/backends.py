"""Cache tiers as aiocache backends, built from EDGE_CACHE entries, all storing raw bytes.

A ``Tier`` pairs a backend with what the tier set needs to know about it: its metrics
label, the largest value it accepts, how it wants a ttl expressed, and whether it is
shared between processes (and so can hold the cross-process fill lock).

memcached refuses items over its item size limit (1 MiB by default). Oversize values are
skipped, not chunked: a result split over several items can be partly evicted and would
need several round trips per look-up, while the memory and Redis tiers hold large results
whole. A skipped write is reported by ``ResultCache.set`` as ``"skipped"`` and logged at
debug level; it is not an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomcache
from aiocache import MemcachedCache, RedisCache
from aiocache.base import BaseCache

from edge.cache.envelope import entry_size
from edge.cache.memory import BoundedMemoryCache
from edge.cache.serializer import BytesSerializer

#: memcached's default item size limit (-I 1m), less room for the key and item header
MEMCACHED_MAX_ITEM_BYTES = 1024 * 1024 - 1024
#: memcached reads an expiry above 30 days as an absolute unix time
_MEMCACHED_RELATIVE_LIMIT = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Tier:
    """One cache tier: an aiocache backend and how the tier set must treat it."""

    #: metrics label: memory, redis or memcached
    name: str
    backend: BaseCache
    #: values larger than this are not written (None: no limit beyond the backend's own)
    max_item_bytes: int | None = None
    #: reachable from every process, so a fill lock taken here is seen by all of them
    shared: bool = False

    def ttl_for(self, seconds: float, now: float) -> float | int:
        """``seconds`` of life in the form this backend wants."""
        if self.name != "memcached":
            return seconds
        whole = max(1, math.ceil(seconds))
        return whole if whole <= _MEMCACHED_RELATIVE_LIMIT else math.ceil(now + whole)


def open_tier(
    spec: str,
    *,
    memory_bytes: int,
    timeout: float,
    clock: Callable[[], float] = time.time,
) -> Tier:
    """The tier an EDGE_CACHE entry names: ``memory``, ``redis://…`` or ``memcached://…``."""
    if spec == "memory":
        return memory_tier(memory_bytes, clock=clock)
    scheme = urlsplit(spec).scheme
    if scheme == "redis":
        return redis_tier(spec, timeout=timeout)
    if scheme == "memcached":
        return memcached_tier(spec)
    raise ValueError(f"unknown cache tier {spec!r}")


def memory_tier(max_bytes: int, *, clock: Callable[[], float] = time.time) -> Tier:
    return Tier("memory", BoundedMemoryCache(max_bytes, clock=clock, size_of=entry_size))


def redis_tier(url: str, *, timeout: float) -> Tier:
    """``redis://[:password@]host[:port][/db]``; sockets time out after ``timeout``."""
    parts = urlsplit(url)
    backend = _RedisBytesCache(
        endpoint=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=int(parts.path.strip("/") or 0),
        password=unquote(parts.password) if parts.password else None,
        serializer=BytesSerializer(),
        # each call is bounded by ResultCache; aiocache's own wait_for would be a second one
        timeout=None,
        create_connection_timeout=timeout,
        # a hung server must not hold a connection forever; no retries (the defaults
        # of a pool built by hand), so a refused connection fails at once
        connection_pool_kwargs={"socket_timeout": timeout},
    )
    return Tier("redis", backend, shared=True)


def memcached_tier(
    url: str, *, max_item_bytes: int | None = MEMCACHED_MAX_ITEM_BYTES, pool_size: int = 8
) -> Tier:
    """``memcached://host[:port]``; values over ``max_item_bytes`` are skipped (None: let
    the server refuse them, counted as errors). ``pool_size`` connections are opened on
    first use; aiomcache queues calls for them (its default of 2 would serialise a busy
    worker's look-ups)."""
    parts = urlsplit(url)
    backend = _MemcachedBytesCache(
        endpoint=parts.hostname or "127.0.0.1",
        port=parts.port or 11211,
        pool_size=pool_size,
        serializer=BytesSerializer(),
        timeout=None,
    )
    return Tier("memcached", backend, max_item_bytes=max_item_bytes, shared=True)


class _RedisBytesCache(RedisCache):  # type: ignore[misc]  # aiocache is untyped
    """aiocache's Redis backend, closed with ``aclose`` (``close`` is deprecated in redis-py)."""

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        await self.client.aclose()


class _MemcachedBytesCache(MemcachedCache):  # type: ignore[misc]  # aiocache is untyped
    """aiocache's memcached backend over a client that survives cancelled calls."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = _InterruptSafeClient(self.endpoint, self.port, pool_size=self.pool_size)


class _InterruptSafeClient(aiomcache.Client):
    """An aiomcache client that never reuses a connection a call left mid-reply, and
    never spins on a connection the server closed.

    aiomcache marks a connection broken only when a call raises an ``Exception``; a call
    cancelled by a timeout (``CancelledError``) returns its connection to the pool with
    the reply still unread, and the next call on it would read that reply as its own: a
    look-up could return another key's value. Poisoning the reader on any interruption
    makes the pool close the connection instead.

    aiomcache's reply reader also loops on ``readline()`` until it sees CRLF; at EOF
    (memcached died) that returns ``b""`` at once, forever, without yielding, so no
    timeout can fire and the whole event loop hangs. ``readuntil`` raises instead.
    """

    async def _execute_simple_command(self, conn: Any, raw_command: bytes) -> bytes:
        try:
            conn.writer.write(raw_command)
            await conn.writer.drain()
            reply: bytes = await conn.reader.readuntil(b"\r\n")
        except BaseException as exc:
            _poison(conn, exc)
            raise
        return reply[:-2]

    async def _multi_get(self, conn: Any, *keys: bytes, with_cas: bool = True) -> Any:
        try:
            if with_cas:
                return await super()._multi_get(conn, *keys, with_cas=True)
            return await super()._multi_get(conn, *keys, with_cas=False)
        except BaseException as exc:
            _poison(conn, exc)
            raise


def _poison(conn: Any, exc: BaseException) -> None:
    if conn.reader.exception() is None:
        conn.reader.set_exception(ConnectionAbortedError(f"call interrupted: {exc!r}"))
