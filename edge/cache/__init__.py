"""Caching of results: tiers behind aiocache, a bounded memory LRU, a no-pickle envelope,
in-process coalescing of identical misses and a cross-process fill lock.

The app needs little beyond these names::

    cache = ResultCache.from_settings(settings, metrics)
    key = cache.key(origin.identity, object_key, spec.canonical, "img:webp")
    lookup = await cache.get(key)                      # Lookup(entry, tier, fresh) | None
    result = await flights.run(key, deadline, work)    # SingleFlight(metrics)
    await cache.set(key, Entry(...))
"""

from edge.cache.envelope import CorruptEntry, Entry, decode, encode
from edge.cache.flight import Flight, FlightTimeout, SingleFlight
from edge.cache.keys import cache_key, object_prefix
from edge.cache.memory import BoundedMemoryCache
from edge.cache.tiers import Fill, Lookup, ResultCache, SetResult

__all__ = [
    "BoundedMemoryCache",
    "CorruptEntry",
    "Entry",
    "Fill",
    "Flight",
    "FlightTimeout",
    "Lookup",
    "ResultCache",
    "SetResult",
    "SingleFlight",
    "cache_key",
    "decode",
    "encode",
    "object_prefix",
]
