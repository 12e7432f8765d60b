"""The bounded memory tier: a byte bound that holds, LRU eviction, lazy expiry, aiocache API."""

from __future__ import annotations

import sys
from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.cache.envelope import Entry, entry_size
from edge.cache.memory import BoundedMemoryCache, item_size
from tests.helpers import FakeClock


def value(size: int, fill: bytes = b"x") -> bytes:
    return fill * size


def room_for(count: int, size: int) -> int:
    """A bound that fits exactly ``count`` items of ``size`` value bytes under 1-char keys."""
    return count * item_size("k", len(value(size)))


async def test_values_round_trip_through_the_aiocache_api() -> None:
    cache = BoundedMemoryCache(1 << 20)
    assert await cache.set("k", b"\x00\xffbytes") is True
    assert await cache.get("k") == b"\x00\xffbytes"
    assert await cache.exists("k")
    assert await cache.multi_get(["k", "absent"]) == [b"\x00\xffbytes", None]
    assert await cache.delete("k") == 1
    assert await cache.get("k") is None
    assert await cache.delete("k") == 0


async def test_the_bound_holds_by_bytes_and_the_oldest_go_first() -> None:
    cache = BoundedMemoryCache(room_for(3, 100))
    for key in "abc":
        await cache.set(key, value(100))
    await cache.set("d", value(100))
    assert await cache.get("a") is None
    assert [await cache.exists(key) for key in "bcd"] == [True, True, True]
    assert cache.size_bytes == room_for(3, 100)


async def test_reading_an_item_saves_it_from_eviction() -> None:
    cache = BoundedMemoryCache(room_for(3, 100))
    for key in "abc":
        await cache.set(key, value(100))
    await cache.get("a")
    await cache.set("d", value(100))
    assert await cache.exists("a")
    assert not await cache.exists("b")


async def test_one_large_item_evicts_as_many_small_ones_as_it_needs() -> None:
    cache = BoundedMemoryCache(room_for(4, 100))
    for key in "abcd":
        await cache.set(key, value(100))
    # twice an item's charge: exactly the two oldest must go
    await cache.set("e", value(2 * 100 + item_size("k", len(b""))))
    assert [await cache.exists(key) for key in "abcde"] == [False, False, True, True, True]
    assert cache.size_bytes == cache.max_bytes


async def test_an_item_larger_than_the_bound_is_not_stored_and_drops_the_old_value() -> None:
    cache = BoundedMemoryCache(room_for(2, 100))
    await cache.set("a", value(100))
    await cache.set("b", value(100))
    assert await cache.set("a", value(10_000)) is False
    assert await cache.get("a") is None
    assert await cache.get("b") == value(100)
    assert cache.size_bytes == item_size("b", len(value(100)))


async def test_replacing_a_value_recharges_its_size() -> None:
    cache = BoundedMemoryCache(1 << 20)
    await cache.set("a", value(500))
    await cache.set("a", value(10))
    assert cache.size_bytes == item_size("a", len(value(10)))
    assert len(cache) == 1


async def test_items_expire_by_ttl_on_the_injected_clock() -> None:
    clock = FakeClock(1000.0)
    cache = BoundedMemoryCache(1 << 20, clock=clock)
    await cache.set("short", b"1", ttl=10)
    await cache.set("forever", b"2")
    clock.now += 9.9
    assert await cache.get("short") == b"1"
    clock.now += 0.1
    assert await cache.get("short") is None
    assert await cache.get("forever") == b"2"
    assert cache.size_bytes == item_size("forever", len(b"2"))


async def test_expire_add_and_clear_follow_aiocache_semantics() -> None:
    clock = FakeClock(1000.0)
    cache = BoundedMemoryCache(1 << 20, clock=clock)
    await cache.add("a:1", b"1")
    with pytest.raises(ValueError, match="already exists"):
        await cache.add("a:1", b"again")
    await cache.multi_set([("a:2", b"2"), ("b:1", b"3")])
    assert await cache.expire("a:2", 5) is True
    assert await cache.expire("absent", 5) is False
    clock.now += 5
    assert not await cache.exists("a:2")
    await cache.clear(namespace="a:")
    assert await cache.multi_get(["a:1", "b:1"]) == [None, b"3"]
    await cache.clear()
    assert len(cache) == 0
    assert cache.size_bytes == 0


async def test_delete_prefix_counts_what_it_dropped() -> None:
    cache = BoundedMemoryCache(1 << 20)
    await cache.multi_set([("obj1:a", b"1"), ("obj1:b", b"2"), ("obj2:a", b"3")])
    assert cache.delete_prefix("obj1:") == 2
    assert await cache.get("obj2:a") == b"3"


async def test_only_values_size_of_can_weigh_are_stored() -> None:
    cache = BoundedMemoryCache(1 << 20)
    await cache.set("k", b"kept")
    with pytest.raises(TypeError):
        await cache.set("k", "text")
    with pytest.raises(TypeError):
        await cache.set("k", {"a": 1})
    assert await cache.get("k") == b"kept"  # a refused value changes nothing


async def test_objects_are_held_as_they_are_and_weighed_by_size_of() -> None:
    cache = BoundedMemoryCache(1 << 20, size_of=lambda value: value["weight"])
    heavy = {"weight": 5000}
    await cache.set("k", heavy)
    assert cache.peek("k") is heavy  # the same object: nothing copied or re-parsed
    assert await cache.get("k") is heavy
    assert cache.size_bytes == item_size("k", 5000)


operations = st.lists(
    st.tuples(
        st.sampled_from(["set", "get", "delete"]),
        st.sampled_from("abcdefgh"),
        st.integers(min_value=0, max_value=700),
    ),
    max_size=60,
)


@given(operations)
async def test_the_cache_behaves_like_a_byte_bounded_lru(ops: list[tuple[str, str, int]]) -> None:
    bound = 2000
    cache = BoundedMemoryCache(bound)
    model: OrderedDict[str, int] = OrderedDict()
    for op, key, size in ops:
        if op == "set":
            await cache.set(key, value(size))
            model.pop(key, None)
            if item_size(key, len(value(size))) <= bound:
                model[key] = size
            while sum(item_size(k, len(value(s))) for k, s in model.items()) > bound:
                model.popitem(last=False)
        elif op == "get":
            got = await cache.get(key)
            assert got == (value(model[key]) if key in model else None)
            if key in model:
                model.move_to_end(key)
        else:
            await cache.delete(key)
            model.pop(key, None)
        assert cache.size_bytes == sum(item_size(k, len(value(s))) for k, s in model.items())
        assert cache.size_bytes <= bound


async def test_entries_are_charged_what_they_take_in_memory() -> None:
    # a flood of tiny negative entries: the objects, not their few bytes of text, are
    # what fills memory, so they must be what fills the bound
    cache = BoundedMemoryCache(100_000, size_of=entry_size)
    for index in range(2000):
        missing = Entry(b"", "text/plain", None, None, 1.0, status=404, error="not_found")
        await cache.set(f"k{index}", missing)
    held = [cache.peek(f"k{index}") for index in range(2000)]
    live = [entry for entry in held if entry is not None]
    parts = [(entry, entry.body, entry.content_type, entry.error) for entry in live]
    actual = sum(sys.getsizeof(part) for four in parts for part in four)
    assert cache.size_bytes <= 100_000
    assert cache.size_bytes >= actual  # never charged less than the objects take
