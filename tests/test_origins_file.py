"""Origins by key prefix (EDGE_ORIGINS_FILE): the file checked at start, longest prefix
routing with the prefix stripped, per-origin headers, timeouts and S3 endpoints, and a
circuit breaker per origin driven by a clock the tests move (no sleeping)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edge.errors import (
    AddressRefused,
    BadKey,
    BucketNotAllowed,
    DynamicOriginDisabled,
    FetchTimeout,
    NotFound,
    OriginFailed,
    OriginForbidden,
    OriginMisconfigured,
    OriginOverloaded,
    OriginTimeout,
)
from edge.metrics import Metrics
from edge.origins import (
    BreakerState,
    CircuitBreaker,
    Fetched,
    FetchOptions,
    FileOrigin,
    NamedOrigin,
    Origins,
)
from edge.settings import BreakerConfig, OriginConfig, SettingsError, load_settings
from tests.fake_origin import FakeOrigin
from tests.helpers import FakeClock, metric, start_edge

PHOTO = "flowers-1920x1080.jpg"
OPTIONS = FetchOptions(max_bytes=50_000_000, request_id="req-1")
#: generous: a fetch cut by a 0.3 s timeout ends well within this
BOUND = 5.0


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def fake() -> AsyncIterator[FakeOrigin]:
    origin = await FakeOrigin().start()
    yield origin
    origin.release()  # nothing stays held when the test ends
    await origin.stop()


def write(tmp_path: Path, entries: Any, name: str = "origins.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(entries) if name.endswith(".json") else entries)
    return str(path)


async def open_origins(
    tmp_path: Path, entries: list[dict[str, Any]], metrics: Metrics, clock: FakeClock, **env: str
) -> Origins:
    settings = load_settings({"EDGE_ORIGINS_FILE": write(tmp_path, entries), **env})
    return await Origins.from_settings(settings, metrics, clock=clock)


def gauge(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value("edge_origin_circuit_open", {"origin": name})


def named(origins: Origins, name: str) -> NamedOrigin:
    return next(origin for origin in origins.named if origin.name == name)


# --- the file ------------------------------------------------------------------------------

YAML = """\
# origins by key prefix
- name: media
  prefix: media/
  url: https://media.example.com/images/
  timeout: 2.5
  headers:
    X-Api-Key: secret-1
    Authorization: Bearer operator
  breaker: {failures: 3, cooldown: 12}
- name: archive
  prefix: media/archive/
  url: s3://archive/originals
  s3_endpoint_url: http://minio.internal:9000
  s3_region: eu-central-1
- name: local
  prefix: local/
  url: file:///srv/images
"""


def test_a_yaml_file_is_read_into_origin_entries(tmp_path: Path) -> None:
    settings = load_settings({"EDGE_ORIGINS_FILE": write(tmp_path, YAML, "origins.yaml")})
    media, archive, local = settings.origins_file
    assert media == OriginConfig(
        name="media",
        prefix="media/",
        url="https://media.example.com/images/",
        timeout=2.5,
        headers=(("X-Api-Key", "secret-1"), ("Authorization", "Bearer operator")),
        breaker=BreakerConfig(failures=3, cooldown=12.0),
    )
    assert (archive.s3_endpoint_url, archive.s3_region) == (
        "http://minio.internal:9000",
        "eu-central-1",
    )
    assert archive.breaker == BreakerConfig(failures=5, cooldown=30.0)
    assert (local.timeout, local.headers) == (None, ())


def test_a_json_file_reads_the_same(tmp_path: Path) -> None:
    entries = [{"name": "media", "prefix": "media/", "url": "http://127.0.0.1:9/", "timeout": 1}]
    (origin,) = load_settings({"EDGE_ORIGINS_FILE": write(tmp_path, entries)}).origins_file
    assert (origin.name, origin.timeout) == ("media", 1.0)


def entry(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "media", "prefix": "media/", "url": "http://127.0.0.1:9/"}
    return {key: value for key, value in {**base, **fields}.items() if value is not None}


BAD_ENTRIES = [
    # (entries, words the message must hold besides the variable and the file)
    ([entry(url=None)], ["entry 1 ('media')", "url is missing"]),
    ([entry(timout=2)], ["entry 1", "unknown field timout"]),
    ([entry(url="ftp://example.com/")], ["entry 1", "url: expected"]),
    ([entry(name="has space")], ["entry 1", "name:"]),
    ([entry(name=None)], ["entry 1", "name is missing"]),
    ([entry(prefix="/media/")], ["prefix"]),
    ([entry(prefix="media/../x/")], ["prefix"]),
    ([entry(prefix="")], ["prefix"]),
    ([entry(timeout=-1)], ["timeout"]),
    ([entry(timeout="fast")], ["timeout"]),
    ([entry(timeout=True)], ["timeout"]),
    ([entry(url="s3://bucket/", headers={"X-Key": "1"})], ["headers apply only to http(s)"]),
    ([entry(headers={"Bad Header": "1"})], ["not a header name"]),
    ([entry(headers={"Host": "evil.example"})], ["Host is set by edge"]),
    ([entry(headers={"X-Key": "a\r\nInjected: 1"})], ["line break"]),
    ([entry(headers=["X-Key: 1"])], ["headers"]),
    ([entry(s3_region="eu-west-1")], ["apply only to s3"]),
    ([entry(url="s3://b/", s3_endpoint_url="minio:9000")], ["s3_endpoint_url"]),
    ([entry(breaker={"failures": 0})], ["failures"]),
    ([entry(breaker={"cooldown": 0})], ["cooldown"]),
    ([entry(breaker={"failures": 2, "after": 1})], ["breaker"]),
    ([entry(), entry(name="other")], ["prefix 'media/' is used by more than one entry"]),
    ([entry(), entry(prefix="other/")], ["name 'media' is used by more than one entry"]),
    ([entry(), "media/"], ["entry 2", "not an object"]),
    ({"name": "media"}, ["non-empty list"]),
    ([], ["non-empty list"]),
]


@pytest.mark.parametrize(("entries", "words"), BAD_ENTRIES)
def test_bad_entries_stop_start_naming_the_file_and_the_entry(
    tmp_path: Path, entries: Any, words: list[str]
) -> None:
    path = write(tmp_path, entries)
    with pytest.raises(SettingsError) as caught:
        load_settings({"EDGE_ORIGINS_FILE": path})
    text = "\n".join(caught.value.problems)
    assert "EDGE_ORIGINS_FILE" in text
    assert path in text
    for word in words:
        assert word in text, (word, text)


def test_every_bad_entry_is_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, [entry(timeout=0), entry(name="ok", prefix="ok/"), entry(name="x y")])
    with pytest.raises(SettingsError) as caught:
        load_settings({"EDGE_ORIGINS_FILE": path})
    text = "\n".join(caught.value.problems)
    assert "entry 1" in text
    assert "entry 3" in text
    assert "entry 2" not in text


@pytest.mark.parametrize(
    ("content", "name", "words"),
    [
        ("- name: [unclosed", "origins.yaml", ["not valid YAML"]),
        ("[{", "origins.json", ["not valid JSON"]),
    ],
)
def test_unreadable_files_stop_start(
    tmp_path: Path, content: str, name: str, words: list[str]
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SettingsError) as caught:
        load_settings({"EDGE_ORIGINS_FILE": str(path)})
    for word in words:
        assert word in "\n".join(caught.value.problems)
    with pytest.raises(SettingsError) as missing:
        load_settings({"EDGE_ORIGINS_FILE": str(tmp_path / "nowhere.yaml")})
    assert "cannot read it" in "\n".join(missing.value.problems)


# --- routing -------------------------------------------------------------------------------


def prefixed(fake: FakeOrigin) -> list[dict[str, Any]]:
    return [
        entry(name="media", prefix="media/", url=f"{fake.url}ok/"),
        entry(name="private", prefix="media/private/", url=f"{fake.url}status/403/"),
        entry(name="again", prefix="again/", url=f"{fake.url}ok/"),
    ]


async def test_the_longest_prefix_wins_and_is_stripped(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics
) -> None:
    origins = await open_origins(tmp_path, prefixed(fake), metrics, FakeClock())
    try:
        origin, key = origins.route(f"media/{PHOTO}", None, None)
        assert (named(origins, "media"), key) == (origin, PHOTO)
        fetched = await origin.fetch(key, OPTIONS)
        assert fetched.etag is not None
        assert fake.events["request:ok"] == 1

        origin, key = origins.route(f"media/private/{PHOTO}", None, None)
        assert (origin, key) == (named(origins, "private"), PHOTO)
        with pytest.raises(OriginForbidden):
            await origin.fetch(key, OPTIONS)
        assert fake.events["request:status"] == 1

        origin, key = origins.route("media-other/x.jpg", None, None)  # not under "media/"
        assert (origin, key) == (origins.default, "media-other/x.jpg")
        assert isinstance(origin, FileOrigin)
    finally:
        await origins.close()


async def test_identities_stay_distinct(tmp_path: Path, fake: FakeOrigin, metrics: Metrics) -> None:
    origins = await open_origins(
        tmp_path, prefixed(fake), metrics, FakeClock(), EDGE_ORIGIN=f"{fake.url}ok/"
    )
    try:
        identities = {origins.default.identity} | {origin.identity for origin in origins.named}
        assert len(identities) == 4  # media and again share a URL, and the default too
        assert named(origins, "again").identity.startswith("again@")
    finally:
        await origins.close()


async def test_select_and_the_request_overrides_still_work(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics
) -> None:
    origins = await open_origins(tmp_path, prefixed(fake), metrics, FakeClock())
    try:
        assert origins.select(None, None) is origins.default
        with pytest.raises(DynamicOriginDisabled):  # origin= names its host: no prefix routing
            origins.route(f"media/{PHOTO}", "cdn.example.com", None)
        with pytest.raises(BucketNotAllowed):  # bucket= needs an s3 origin
            origins.route(f"media/{PHOTO}", None, "other")
        with pytest.raises(BadKey):  # nothing left once the prefix is stripped
            origins.route("media/", None, None)
    finally:
        await origins.close()


async def test_static_headers_reach_the_origin(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics
) -> None:
    entries = [
        entry(
            name="media",
            url=f"{fake.url}ok/",
            headers={"X-Api-Key": "secret-1", "Authorization": "Bearer operator"},
        ),
        entry(name="plain", prefix="plain/", url=f"{fake.url}ok/"),
    ]
    origins = await open_origins(tmp_path, entries, metrics, FakeClock())
    try:
        for key in (f"media/{PHOTO}", f"plain/{PHOTO}"):
            origin, rest = origins.route(key, None, None)
            await origin.fetch(rest, OPTIONS)
    finally:
        await origins.close()
    media, plain = fake.headers
    assert media["x-api-key"] == "secret-1"
    assert media["authorization"] == "Bearer operator"
    assert media["x-request-id"] == "req-1"
    assert "x-api-key" not in plain
    assert "authorization" not in plain


async def test_the_origin_timeout_is_a_fetch_timeout(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics
) -> None:
    entries = [entry(name="slow", prefix="slow/", url=f"{fake.url}stall/30/", timeout=0.3)]
    origins = await open_origins(tmp_path, entries, metrics, FakeClock())
    try:
        origin, key = origins.route(f"slow/{PHOTO}", None, None)
        started = time.monotonic()
        with pytest.raises(FetchTimeout) as caught:
            await origin.fetch(key, OPTIONS)
        assert time.monotonic() - started < BOUND
        async with asyncio.timeout(BOUND):
            await fake.cancelled.wait()  # the origin saw the request given up
    finally:
        await origins.close()
    assert caught.value.status == 504
    assert caught.value.label == "fetch"
    assert "'slow'" in (caught.value.detail or "")


async def test_s3_origins_use_their_own_endpoint_and_region(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # With path addressing the fake sees /<bucket>/<key>: bucket "ok" serves the object.
    entries = [
        entry(
            name="store",
            prefix="store/",
            url="s3://ok/",
            s3_endpoint_url=fake.url,
            s3_region="eu-central-1",
            breaker={"failures": 1, "cooldown": 30},
        )
    ]
    origins = await open_origins(
        tmp_path,
        entries,
        metrics,
        FakeClock(),
        EDGE_S3_ENDPOINT_URL="http://127.0.0.1:9/",  # the global one is not used
        EDGE_BUCKETS_ALLOWED="status",
    )
    try:
        origin, key = origins.route(f"store/{PHOTO}", None, None)
        fetched = await origin.fetch(key, OPTIONS)
        assert len(fetched.data) > 1000
        assert "/eu-central-1/s3/aws4_request" in fake.headers[-1]["authorization"]
        # bucket= swaps the bucket of this origin, behind the same breaker
        override, key = origins.route(f"store/500/{PHOTO}", None, "status")
        assert override.identity != origin.identity
        with pytest.raises(OriginFailed):
            await override.fetch(key, OPTIONS)
        with pytest.raises(OriginOverloaded):
            await origin.fetch(PHOTO, OPTIONS)
    finally:
        await origins.close()


# --- circuit breakers ----------------------------------------------------------------------


async def flaky_origins(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics, clock: FakeClock, failures: int = 3
) -> Origins:
    entries = [
        entry(
            name="flaky",
            prefix="flaky/",
            url=fake.url,
            breaker={"failures": failures, "cooldown": 10},
        ),
        entry(name="calm", prefix="calm/", url=fake.url),
    ]
    return await open_origins(tmp_path, entries, metrics, clock)


async def get(origins: Origins, key: str) -> Fetched:
    origin, rest = origins.route(key, None, None)
    return await origin.fetch(rest, OPTIONS)


async def test_gauges_start_at_zero_for_every_named_origin(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics
) -> None:
    origins = await flaky_origins(tmp_path, fake, metrics, FakeClock())
    try:
        assert gauge(metrics, "flaky") == 0
        assert gauge(metrics, "calm") == 0
    finally:
        await origins.close()


async def test_the_breaker_opens_probes_and_closes(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics
) -> None:
    clock = FakeClock()
    origins = await flaky_origins(tmp_path, fake, metrics, clock)
    breaker = named(origins, "flaky").breaker
    try:
        # failures in a row count; an answer in between starts the count again
        for code in ("500", "502"):
            with pytest.raises(OriginFailed):
                await get(origins, f"flaky/status/{code}/{PHOTO}")
        await get(origins, f"flaky/ok/{PHOTO}")
        with pytest.raises(OriginFailed):
            await get(origins, f"flaky/status/500/{PHOTO}")
        with pytest.raises(OriginTimeout):
            await get(origins, f"flaky/status/504/{PHOTO}")
        assert breaker.state is BreakerState.CLOSED
        assert gauge(metrics, "flaky") == 0
        with pytest.raises(OriginFailed):
            await get(origins, f"flaky/status/500/{PHOTO}")
        assert breaker.state is BreakerState.OPEN
        assert gauge(metrics, "flaky") == 1
        seen = sum(fake.events.values())

        # open: refused at once, Retry-After the cooldown left; the origin is not asked
        with pytest.raises(OriginOverloaded) as refused:
            await get(origins, f"flaky/ok/{PHOTO}")
        assert (refused.value.status, refused.value.label) == (503, "origin")
        assert refused.value.retry_after == 10
        clock.now += 3.5
        with pytest.raises(OriginOverloaded) as later:
            await get(origins, f"flaky/ok/{PHOTO}")
        assert later.value.retry_after == 7
        assert sum(fake.events.values()) == seen
        await get(origins, f"calm/ok/{PHOTO}")  # other origins are not affected

        # half-open: one probe goes through, everyone else still gets 503
        clock.now += 6.5
        assert breaker.state is BreakerState.HALF_OPEN
        probe = asyncio.create_task(get(origins, f"flaky/hold/{PHOTO}"))
        async with asyncio.timeout(BOUND):
            await fake.holding.wait()
        assert breaker.probing
        with pytest.raises(OriginOverloaded) as meanwhile:
            await get(origins, f"flaky/ok/{PHOTO}")
        assert meanwhile.value.retry_after == 1
        assert gauge(metrics, "flaky") == 1

        # the probe succeeds: closed again, gauge back to 0, requests flow
        fake.release()
        async with asyncio.timeout(BOUND):
            await probe
        assert breaker.state is BreakerState.CLOSED
        assert gauge(metrics, "flaky") == 0
        await get(origins, f"flaky/ok/{PHOTO}")
    finally:
        await origins.close()


async def test_a_failed_probe_opens_the_circuit_again(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics
) -> None:
    clock = FakeClock()
    origins = await flaky_origins(tmp_path, fake, metrics, clock, failures=1)
    breaker = named(origins, "flaky").breaker
    try:
        with pytest.raises(OriginFailed):
            await get(origins, f"flaky/status/500/{PHOTO}")
        clock.now += 10
        with pytest.raises(OriginFailed):  # the probe
            await get(origins, f"flaky/status/502/{PHOTO}")
        assert breaker.state is BreakerState.OPEN
        assert gauge(metrics, "flaky") == 1
        with pytest.raises(OriginOverloaded) as refused:
            await get(origins, f"flaky/ok/{PHOTO}")
        assert refused.value.retry_after == 10  # a whole new cooldown
    finally:
        await origins.close()


async def test_a_cancelled_probe_frees_the_probe_slot(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics
) -> None:
    clock = FakeClock()
    origins = await flaky_origins(tmp_path, fake, metrics, clock, failures=1)
    breaker = named(origins, "flaky").breaker
    try:
        with pytest.raises(OriginFailed):
            await get(origins, f"flaky/status/500/{PHOTO}")
        clock.now += 10
        probe = asyncio.create_task(get(origins, f"flaky/hold/{PHOTO}"))
        async with asyncio.timeout(BOUND):
            await fake.holding.wait()
        probe.cancel()  # the request's budget ran out, or its client left
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert not breaker.probing
        assert breaker.state is BreakerState.HALF_OPEN
        await get(origins, f"flaky/ok/{PHOTO}")  # the next request is the probe
        assert breaker.state is BreakerState.CLOSED
    finally:
        await origins.close()


async def test_the_origin_timeout_counts_as_a_failure(
    tmp_path: Path, fake: FakeOrigin, metrics: Metrics
) -> None:
    entries = [
        entry(
            name="slow",
            prefix="slow/",
            url=f"{fake.url}stall/30/",
            timeout=0.2,
            breaker={"failures": 1, "cooldown": 5},
        )
    ]
    origins = await open_origins(tmp_path, entries, metrics, FakeClock())
    try:
        with pytest.raises(FetchTimeout):
            await get(origins, f"slow/{PHOTO}")
        with pytest.raises(OriginOverloaded):
            await get(origins, f"slow/{PHOTO}")
        assert gauge(metrics, "slow") == 1
    finally:
        await origins.close()


# What each failure does to a closed breaker with failures=2, by driving a stub backend.


class Stub:
    """A backend that raises (or returns) whatever the test queues."""

    kind = "http"
    identity = "stub://"

    def __init__(self) -> None:
        self.outcome: BaseException | None = None

    async def fetch(self, key: str, options: FetchOptions) -> Fetched:
        if self.outcome is not None:
            raise self.outcome
        return Fetched(b"x")

    async def close(self) -> None:
        return None


OUTCOMES: list[tuple[BaseException | None, str]] = [
    (OriginFailed("502"), "counts"),
    (OriginTimeout("504"), "counts"),
    (FetchTimeout("own timeout"), "counts"),
    (None, "resets"),
    (NotFound("404"), "resets"),
    (OriginForbidden("403"), "resets"),
    (OriginMisconfigured("our keys"), "neutral"),
    (OriginOverloaded("429", retry_after=7), "neutral"),
    (AddressRefused("guard"), "neutral"),
    (asyncio.CancelledError(), "neutral"),
]


@pytest.mark.parametrize(("outcome", "effect"), OUTCOMES)
async def test_which_outcomes_count(outcome: BaseException | None, effect: str) -> None:
    """A failure, the outcome, a failure, with failures=2: counted, the circuit opens on
    the outcome; neutral, on the last failure; a reset keeps it closed."""
    stub = Stub()
    origin = NamedOrigin("stub", "s/", stub, CircuitBreaker("stub", failures=2, clock=FakeClock()))

    async def attempt(result: BaseException | None) -> None:
        stub.outcome = result
        if result is None:
            await origin.fetch("k", OPTIONS)
            return
        with pytest.raises(type(result)):
            await origin.fetch("k", OPTIONS)

    await attempt(OriginFailed("first"))
    await attempt(outcome)
    if effect == "counts":
        assert origin.breaker.state is BreakerState.OPEN
        return
    assert origin.breaker.state is BreakerState.CLOSED
    await attempt(OriginFailed("last"))
    expected = BreakerState.CLOSED if effect == "resets" else BreakerState.OPEN
    assert origin.breaker.state is expected


def test_outcomes_of_requests_admitted_before_the_circuit_opened_are_ignored() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("b", failures=1, cooldown=10, clock=clock)
    early, late = breaker.admit(), breaker.admit()
    breaker.failed(early)
    assert breaker.state is BreakerState.OPEN
    clock.now += 8
    breaker.failed(late)  # does not restart the cooldown
    breaker.succeeded(late)  # nor closes the circuit
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == 2


def test_retry_after_is_capped_at_30_seconds() -> None:
    breaker = CircuitBreaker("b", failures=1, cooldown=300, clock=FakeClock())
    breaker.failed(breaker.admit())
    with pytest.raises(OriginOverloaded) as refused:
        breaker.admit()
    assert refused.value.retry_after == 30


def test_gauge_changes_are_reported() -> None:
    changes: list[bool] = []
    clock = FakeClock()
    breaker = CircuitBreaker("b", failures=1, cooldown=1, clock=clock, on_change=changes.append)
    breaker.failed(breaker.admit())
    clock.now += 1
    breaker.failed(breaker.admit())  # a failed probe: still open, no new report
    clock.now += 1
    breaker.succeeded(breaker.admit())
    assert changes == [True, False]


# --- over HTTP -----------------------------------------------------------------------------
def http_entries(fake: FakeOrigin) -> list[dict[str, Any]]:
    return [
        entry(name="media", prefix="media/", url=f"{fake.url}ok/", headers={"X-Api-Key": "k1"}),
        entry(name="slow", prefix="slow/", url=f"{fake.url}stall/30/", timeout=0.3),
        entry(name="flaky", prefix="flaky/", url=fake.url, breaker={"failures": 2, "cooldown": 30}),
    ]


async def edge_with_file(aiohttp_client: Any, tmp_path: Path, fake: FakeOrigin, **env: str) -> Any:
    path = write(tmp_path, http_entries(fake))
    return await start_edge(aiohttp_client, {"EDGE_ORIGINS_FILE": path, **env})


def breaker_of(client: Any, name: str) -> CircuitBreaker:
    from edge.app import SERVICE

    return named(client.server.app[SERVICE].origins, name).breaker


async def test_gauges_are_exported_at_zero_from_start(
    aiohttp_client: Any, tmp_path: Path, fake: FakeOrigin
) -> None:
    client = await edge_with_file(aiohttp_client, tmp_path, fake)
    response = await client.get("/metrics")
    text = await response.text()
    for name in ("media", "slow", "flaky"):
        assert f'edge_origin_circuit_open{{origin="{name}"}} 0.0' in text
    assert "127.0.0.1" not in text.split("edge_origin_circuit_open", 1)[1].split("\n# ")[0]


async def test_http_prefix_routing_headers_and_fallback(
    aiohttp_client: Any, tmp_path: Path, fake: FakeOrigin
) -> None:
    client = await edge_with_file(aiohttp_client, tmp_path, fake)
    response = await client.get(f"/media/{PHOTO}?width=100")
    assert response.status == 200
    assert fake.events["request:ok"] == 1  # /ok/<key>: the prefix was stripped
    assert fake.headers[-1]["x-api-key"] == "k1"
    fallback = await client.get("/photo-1200x980.jpg?width=100")  # EDGE_ORIGIN (samples)
    assert fallback.status == 200
    assert fake.events["request:ok"] == 1


async def test_http_origin_timeout_is_504(
    aiohttp_client: Any, tmp_path: Path, fake: FakeOrigin
) -> None:
    client = await edge_with_file(aiohttp_client, tmp_path, fake)
    started = time.monotonic()
    response = await client.get(f"/slow/{PHOTO}?width=100")
    assert response.status == 504
    assert time.monotonic() - started < BOUND
    assert await metric(client, "edge_backend_timeouts_total", stage="fetch") == 1


async def test_http_breaker_opens_answers_503_and_closes_after_a_probe(
    aiohttp_client: Any, tmp_path: Path, fake: FakeOrigin
) -> None:
    client = await edge_with_file(aiohttp_client, tmp_path, fake)
    clock = FakeClock()
    breaker = breaker_of(client, "flaky")
    breaker.clock = clock
    for _ in range(2):
        failed = await client.get(f"/flaky/status/500/{PHOTO}?width=100")
        assert failed.status == 502
    assert await metric(client, "edge_origin_circuit_open", origin="flaky") == 1
    asked = fake.events["request:ok"]
    refused = await client.get(f"/flaky/ok/{PHOTO}?width=100")
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "30"
    assert fake.events["request:ok"] == asked  # answered without asking the origin
    assert await metric(client, "edge_load_shed_total", reason="origin") == 1
    assert await metric(client, "edge_requests_total", code="503", outcome="overloaded") == 1
    clock.now += 30
    probe = await client.get(f"/flaky/ok/{PHOTO}?width=100")
    assert probe.status == 200
    assert await metric(client, "edge_origin_circuit_open", origin="flaky") == 0


def test_a_bad_origins_file_stops_the_cli(tmp_path: Path) -> None:
    path = write(tmp_path, [entry(timeout="soon")])
    env: Mapping[str, str] = {**os.environ, "EDGE_ORIGINS_FILE": path}
    result = subprocess.run(
        [sys.executable, "-m", "edge"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "EDGE_ORIGINS_FILE" in result.stderr
    assert "entry 1 ('media'): timeout" in result.stderr
    assert "Traceback" not in result.stderr
