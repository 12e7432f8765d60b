"""Origin selection: the origin= and bucket= policy, identities, and dynamic origin lifetimes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import pytest
from prometheus_client import CollectorRegistry

from edge.errors import (
    AddressRefused,
    BucketNotAllowed,
    DynamicOriginDisabled,
    EdgeError,
    HostNotAllowed,
    InvalidParameter,
)
from edge.metrics import Metrics
from edge.origins import FetchOptions, FileOrigin, HttpOrigin, Origin, Origins, S3Origin
from edge.origins.router import DYNAMIC_ORIGINS_KEPT, host_allowed, parse_origin_param
from edge.origins.s3 import S3Location
from edge.settings import load_settings
from tests.fake_origin import FakeOrigin

DYNAMIC = {"EDGE_ALLOW_DYNAMIC_ORIGIN": "true"}
PHOTO = "flowers-1920x1080.jpg"


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def make_origins(
    env: Mapping[str, str], metrics: Metrics, default: Origin | None = None
) -> Origins:
    return await Origins.from_settings(load_settings(dict(env)), metrics, default)


def s3_default(metrics: Metrics) -> S3Origin:
    """An S3 origin for policy checks only: it is never asked to fetch."""
    return S3Origin(None, S3Location("images", "prod/"), metrics)


ONLY_CDN = {**DYNAMIC, "EDGE_HOSTS_ALLOWED": "cdn.example.com"}
SUBDOMAINS = {**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*.example.com"}

POLICY = [
    # (environment, origin=, bucket=, expected error or None for an origin)
    ({}, "images.example.com", None, DynamicOriginDisabled),
    ({"EDGE_HOSTS_ALLOWED": "*"}, "images.example.com", None, DynamicOriginDisabled),
    (DYNAMIC, "images.example.com", None, HostNotAllowed),
    (
        {**DYNAMIC, "EDGE_HOSTS_ALLOWED": "cdn.example.com"},
        "images.example.com",
        None,
        HostNotAllowed,
    ),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "images.example.com"}, "images.example.com", None, None),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "images.example.com"}, "IMAGES.Example.COM.", None, None),
    (SUBDOMAINS, "a.example.com", None, None),
    (
        {**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*.example.com"},
        "https://a.b.example.com:8443",
        None,
        None,
    ),
    (SUBDOMAINS, "example.com", None, HostNotAllowed),
    (SUBDOMAINS, "badexample.com", None, HostNotAllowed),
    (
        {**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*.example.com"},
        "example.com.evil.net",
        None,
        HostNotAllowed,
    ),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*"}, "http://anything.test:8080", None, None),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "127.0.0.1"}, "http://127.0.0.1:8080", None, None),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "[::1]"}, "http://[0:0::1]:8080", None, None),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*.0.0.1"}, "127.0.0.1", None, HostNotAllowed),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*"}, "ftp://images.example.com", None, InvalidParameter),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*"}, "images.example.com/path", None, InvalidParameter),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*"}, "user:pw@images.example.com", None, InvalidParameter),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*"}, "images.example.com:99999", None, InvalidParameter),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*"}, "images.example.com?x=1", None, InvalidParameter),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*"}, "", None, InvalidParameter),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*"}, "bad_host!.com", None, InvalidParameter),
    ({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*"}, "a.example.com", "other", BucketNotAllowed),
    ({"EDGE_BUCKETS_ALLOWED": "other"}, None, "other", BucketNotAllowed),  # not an s3 origin
]


@pytest.mark.parametrize(("env", "origin", "bucket", "expected"), POLICY)
async def test_select_policy(
    env: Mapping[str, str],
    origin: str | None,
    bucket: str | None,
    expected: type[EdgeError] | None,
    metrics: Metrics,
) -> None:
    origins = await make_origins(env, metrics)
    try:
        if expected is None:
            assert isinstance(origins.select(origin, bucket), HttpOrigin)
        else:
            with pytest.raises(expected):
                origins.select(origin, bucket)
    finally:
        await origins.close()


async def test_no_parameters_select_the_default(metrics: Metrics) -> None:
    origins = await make_origins({}, metrics)
    try:
        assert isinstance(origins.default, FileOrigin)
        assert origins.select(None, None) is origins.default
    finally:
        await origins.close()


BUCKETS = {"EDGE_BUCKETS_ALLOWED": "other, images"}


@pytest.mark.parametrize(("bucket", "allowed"), [("other", True), ("private", False), ("", False)])
async def test_bucket_policy(bucket: str, allowed: bool, metrics: Metrics) -> None:
    origins = await make_origins(BUCKETS, metrics, s3_default(metrics))
    try:
        if allowed:
            chosen = origins.select(None, bucket)
            assert isinstance(chosen, S3Origin)
            assert chosen.bucket == bucket
        else:
            with pytest.raises(BucketNotAllowed):
                origins.select(None, bucket)
    finally:
        await origins.close()


async def test_bucket_overrides_have_distinct_identities(metrics: Metrics) -> None:
    default = s3_default(metrics)
    origins = await make_origins(BUCKETS, metrics, default)
    try:
        other = origins.select(None, "other")
        assert other is origins.select(None, "other")
        assert origins.select(None, "images") is default  # naming the default's own bucket
        assert other.identity != default.identity
        assert other.identity == "s3://other/prod/"
    finally:
        await origins.close()


async def test_dynamic_identities(metrics: Metrics) -> None:
    env = {**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*.example.com"}
    origins = await make_origins(env, metrics)
    try:
        implicit = origins.select("a.example.com", None)
        assert origins.select("https://A.example.com:443", None) is implicit
        plain = origins.select("http://a.example.com", None)
        other = origins.select("b.example.com", None)
        identities = {origins.default.identity, implicit.identity, plain.identity, other.identity}
        assert len(identities) == 4
        assert implicit.identity == "https://a.example.com:443/"
        assert plain.identity == "http://a.example.com:80/"
    finally:
        await origins.close()


async def test_dynamic_origins_are_bounded(metrics: Metrics) -> None:
    origins = await make_origins({**DYNAMIC, "EDGE_HOSTS_ALLOWED": "*"}, metrics)
    try:
        first = origins.select("host-0.test", None)
        assert isinstance(first, HttpOrigin)
        for index in range(1, DYNAMIC_ORIGINS_KEPT + 1):
            origins.select(f"host-{index}.test", None)
        # the least recently used one was evicted: asking again opens a new one
        assert origins.select("host-0.test", None) is not first
    finally:
        await origins.close()
    # evicted origins are closed by close() even before their grace period ends
    assert first._session.closed


def test_parse_origin_param_canonical_forms() -> None:
    assert parse_origin_param("Images.Example.com").base_url == "https://images.example.com:443/"
    assert parse_origin_param("http://[::1]:8080/").base_url == "http://[::1]:8080/"
    assert parse_origin_param("bücher.example").host == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("host", "patterns", "allowed"),
    [
        ("a.example.com", ["*.example.com"], True),
        ("example.com", ["*.example.com"], False),
        ("a.example.com", ["*.EXAMPLE.com."], True),
        ("a.example.com", [], False),
        ("10.0.0.1", ["*"], True),
        ("::1", ["0::1"], True),
    ],
)
def test_host_patterns(host: str, patterns: list[str], allowed: bool) -> None:
    assert host_allowed(host, patterns) is allowed


@pytest.fixture
async def fake() -> AsyncIterator[FakeOrigin]:
    origin = await FakeOrigin().start()
    yield origin
    await origin.stop()


@pytest.mark.parametrize("allow_private", [False, True])
async def test_dynamic_origin_passes_the_address_guard(
    fake: FakeOrigin, metrics: Metrics, allow_private: bool
) -> None:
    env = {
        **DYNAMIC,
        "EDGE_HOSTS_ALLOWED": "127.0.0.1",
        "EDGE_ALLOW_PRIVATE_ADDRESSES": str(allow_private).lower(),
    }
    origins = await make_origins(env, metrics)
    options = FetchOptions(max_bytes=50_000_000)
    try:
        origin = origins.select(f"http://127.0.0.1:{fake.port}", None)
        if allow_private:
            assert (await origin.fetch(f"ok/{PHOTO}", options)).data[:2] == b"\xff\xd8"
        else:
            with pytest.raises(AddressRefused):
                await origin.fetch(f"ok/{PHOTO}", options)
    finally:
        await origins.close()
    assert fake.events["request:ok"] == (1 if allow_private else 0)


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.1", "017.0.0.1", "0x7f000001"])
def test_other_ipv4_spellings_are_invalid(host: str) -> None:
    # resolvers read these as 127.0.0.1; host policy would read them as names
    with pytest.raises(InvalidParameter):
        parse_origin_param(f"http://{host}:8080")
