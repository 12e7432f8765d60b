"""Cache keys: short, memcached-safe, unambiguous, and grouped by object."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from edge.cache.keys import cache_key, lock_key, object_prefix

MEMCACHED_SAFE = re.compile(r"^[!-~]{1,250}$")  # printable ASCII, no space, no control


def key(**parts: str) -> str:
    defaults = {
        "namespace": "v1",
        "pipeline_version": "1",
        "origin_identity": "s3:bucket/prefix",
        "object_key": "photos/cat.jpg",
        "canonical": "width=200&fit=cover",
        "output": "img:webp",
    }
    return cache_key(**(defaults | parts))


@given(st.lists(st.text(), min_size=6, max_size=6))
def test_every_key_is_short_and_memcached_safe(parts: list[str]) -> None:
    made = cache_key(*parts)
    assert MEMCACHED_SAFE.match(made)
    assert len(lock_key(made)) < 110


def test_the_key_starts_with_a_readable_prefix() -> None:
    assert key().startswith("edge:v1:p1:")


def test_every_part_changes_the_key() -> None:
    base = key()
    for name, other in {
        "namespace": "v2",
        "pipeline_version": "2",
        "origin_identity": "s3:other/prefix",
        "object_key": "photos/dog.jpg",
        "canonical": "width=201&fit=cover",
        "output": "img:avif",
    }.items():
        assert key(**{name: other}) != base, name


def test_parts_cannot_run_into_each_other() -> None:
    assert key(object_key="a:b", canonical="c") != key(object_key="a", canonical="b:c")


def test_namespaces_that_look_alike_in_the_prefix_still_differ() -> None:
    assert key(namespace="v 1") != key(namespace="v_1")


def test_every_variant_of_an_object_shares_its_prefix() -> None:
    prefix = object_prefix("v1", "1", "s3:bucket/prefix", "photos/cat.jpg")
    assert key().startswith(prefix)
    assert key(canonical="width=10", output="props:json").startswith(prefix)
    assert not key(object_key="photos/cat.jpg2").startswith(prefix)
