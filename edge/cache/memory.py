"""The in-process cache tier: an LRU of values bounded by their total size in bytes.

aiocache's own memory backend is unbounded (and expires entries with one timer each), so
a busy worker would grow until the kernel kills it. ``BoundedMemoryCache`` speaks the same
aiocache interface but holds at most ``max_bytes`` (keys, values and a fixed per-item
allowance), evicting the least recently used items first. Expiry is checked lazily on
access against an injectable clock (an expired item nobody asks for leaves through the LRU
order), so no timers pile up and tests need not sleep.

Values stay Python objects: nothing leaves the process, so nothing needs encoding, and a
hit hands back the very object stored (the result cache keeps decoded entries here, so a
hot image is never parsed again). ``size_of`` says what a value weighs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from aiocache.base import BaseCache
from aiocache.serializers import NullSerializer

#: bookkeeping charged per item (dict slot, tuple, object headers), so a flood of tiny
#: negative entries still counts against the bound
ITEM_OVERHEAD = 128


def item_size(key: str, value_size: int) -> int:
    """Bytes an item is charged against the bound."""
    return len(key) + value_size + ITEM_OVERHEAD


def bytes_size(value: object) -> int:
    """The default ``size_of``: values must be bytes."""
    if not isinstance(value, bytes):
        raise TypeError(f"values are bytes, not {type(value).__name__}")
    return len(value)


class _Item(NamedTuple):
    value: Any
    #: clock() time it expires at, or None for never
    expires: float | None
    size: int


class BoundedMemoryCache(BaseCache):  # type: ignore[misc]  # aiocache is untyped
    """Owns the worker's cached values: at most ``max_bytes`` of them, least recently used
    out first.

    ``size_of`` weighs a value in bytes and raises TypeError for one it cannot (the
    default takes only ``bytes``). An item larger than the whole bound is not stored
    (``set`` returns False and any older value under that key is dropped, so a reader
    never sees a result older than one that was refused).
    """

    NAME = "memory"

    def __init__(
        self,
        max_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        size_of: Callable[[Any], int] = bytes_size,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("serializer", NullSerializer())
        # in-process calls cannot hang; aiocache's default 5 s wait_for would only add cost
        kwargs.setdefault("timeout", None)
        super().__init__(**kwargs)
        self.max_bytes = max_bytes
        self._clock = clock
        self._size_of = size_of
        self._items: OrderedDict[str, _Item] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """Bytes currently charged against the bound."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._live(key) is not None

    def peek(self, key: str) -> Any:
        """``get`` without aiocache's wrappers (plugins, timeout): the hit path's read."""
        item = self._live(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item.value

    # --- aiocache backend interface -------------------------------------------------------

    async def _get(self, key: str, encoding: str | None = None, _conn: Any = None) -> Any:
        return self.peek(key)

    async def _gets(self, key: str, encoding: str | None = None, _conn: Any = None) -> Any:
        return await self._get(key, encoding)

    async def _multi_get(
        self, keys: list[str], encoding: str | None = None, _conn: Any = None
    ) -> list[Any]:
        return [await self._get(key, encoding) for key in keys]

    async def _set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        _cas_token: Any = None,
        _conn: Any = None,
    ) -> bool:
        if _cas_token is not None and _cas_token != await self._get(key):
            return False
        return self._store(key, value, ttl)

    async def _multi_set(
        self, pairs: list[tuple[str, Any]], ttl: float | None = None, _conn: Any = None
    ) -> bool:
        for key, value in pairs:
            self._store(key, value, ttl)
        return True

    async def _add(self, key: str, value: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        if self._live(key) is not None:
            raise ValueError(f"Key {key} already exists, use .set to update the value")
        return self._store(key, value, ttl)

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return self._live(key) is not None

    async def _expire(self, key: str, ttl: float, _conn: Any = None) -> bool:
        item = self._live(key)
        if item is None:
            return False
        self._items[key] = item._replace(expires=self._expiry(ttl))
        return True

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return 1 if self._discard(key) else 0

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        self.delete_prefix(namespace or "")
        return True

    async def _redlock_release(self, key: str, value: Any) -> int:
        item = self._live(key)
        if item is None or item.value != value:
            return 0
        return 1 if self._discard(key) else 0

    # --- beyond aiocache ------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        """Drop every item whose key starts with ``prefix``; the number dropped."""
        doomed = [key for key in self._items if key.startswith(prefix)]
        for key in doomed:
            self._discard(key)
        return len(doomed)

    # --- internals ------------------------------------------------------------------------

    def _store(self, key: str, value: Any, ttl: float | None) -> bool:
        size = item_size(key, self._size_of(value))  # raises before anything changes
        self._discard(key)
        if size > self.max_bytes:
            return False
        self._items[key] = _Item(value, self._expiry(ttl), size)
        self._bytes += size
        self._evict_to_bound()
        return True

    def _evict_to_bound(self) -> None:
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._items))
            self._discard(oldest)

    def _live(self, key: str) -> _Item | None:
        """The item under ``key`` unless absent or expired (an expired one is dropped)."""
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires is not None and self._clock() >= item.expires:
            self._discard(key)
            return None
        return item

    def _discard(self, key: str) -> bool:
        item = self._items.pop(key, None)
        if item is None:
            return False
        self._bytes -= item.size
        return True

    def _expiry(self, ttl: float | None) -> float | None:
        # aiocache's convention: no ttl (None or 0) means no expiry
        return self._clock() + ttl if ttl else None
