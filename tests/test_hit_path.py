"""The hit path: a URL already worked out whose image is fresh in the memory tier is
answered before routing, and exactly as the full pipeline would answer it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from edge.app import SERVICE, STATE, RequestLog, create_app
from tests.conftest import SHARED_IMAGES
from tests.fake_origin import FakeOrigin
from tests.helpers import EdgeTestServer, FakeClock, decode, metric, settings_from

URL = "/ok/flowers-1920x1080.jpg?width=200&format=jpeg"
#: headers whose values differ between two answers of the same request
VARYING = {"date", "server-timing", "x-request-id"}


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


async def serve(
    aiohttp_client: Any,
    origin: FakeOrigin,
    server: type[TestServer],
    clock: FakeClock | None = None,
    **env: str,
) -> Any:
    settings = settings_from({"EDGE_ORIGIN": origin.url, **env})
    app = create_app(settings, registry=CollectorRegistry(), cache_clock=clock)
    return await aiohttp_client(server(app))


async def warm(client: Any, path: str, headers: Mapping[str, str] | None = None) -> None:
    response = await client.get(path, headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["X-Edge-Cache"] == "miss"
    background = client.server.app[STATE].background
    if background:  # the cache write runs after the response
        await asyncio.wait(background, timeout=5)


def lasting(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in VARYING}


def refuse_the_pipeline(client: Any) -> None:
    async def handle(incoming: Any) -> Any:
        raise AssertionError("a hit reached the pipeline")

    client.server.app[SERVICE].handle = handle


async def test_a_hot_url_is_answered_without_the_pipeline(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await serve(aiohttp_client, origin, EdgeTestServer)
    await warm(client, URL)
    refuse_the_pipeline(client)
    hit = await client.get(URL)
    assert hit.status == 200
    assert hit.headers["X-Edge-Cache"] == "hit"
    assert (decode(await hit.read()).width, hit.headers["Content-Type"]) == (200, "image/jpeg")
    # a URL not yet worked out goes through the application, here to the refusing pipeline
    other = await client.get("/ok/flowers-1920x1080.jpg?width=201&format=jpeg")
    assert other.status == 500


@pytest.mark.parametrize(
    ("method", "path", "headers", "env"),
    [
        ("GET", URL, {}, {}),
        ("HEAD", URL, {}, {}),
        ("GET", URL, {"X-Request-Id": "given-1"}, {}),
        ("GET", "/ok/flowers-1920x1080.jpg?width=150&format=auto", {"Accept": "image/webp"}, {}),
        ("GET", "/ok/flowers-1920x1080.jpg?width=150", {"Sec-CH-DPR": "2"}, {}),
        ("GET", URL, {"Origin": "https://a.example"}, {"EDGE_CORS_ORIGINS": "https://a.example"}),
    ],
)
async def test_the_hit_path_answers_as_the_pipeline_does(
    aiohttp_client: Any,
    origin: FakeOrigin,
    method: str,
    path: str,
    headers: dict[str, str],
    env: dict[str, str],
) -> None:
    answers = []
    for server in (TestServer, EdgeTestServer):  # the application alone; edge's runner
        client = await serve(aiohttp_client, origin, server, **env)
        await warm(client, path, headers)
        if server is EdgeTestServer:
            refuse_the_pipeline(client)
        response = await client.request(method, path, headers=headers)
        assert response.status == 200
        answers.append((response, await response.read()))
    again = await client.request(method, path, headers=headers)  # a shared head stays as made
    (full, full_body), (fast, fast_body) = answers
    assert fast.headers["X-Edge-Cache"] == full.headers["X-Edge-Cache"] == "hit"
    assert fast_body == full_body == await again.read()
    assert lasting(fast.headers) == lasting(full.headers) == lasting(again.headers)
    if "X-Request-Id" in headers:
        assert fast.headers["X-Request-Id"] == headers["X-Request-Id"]
    stages = [part.split(";")[0] for part in fast.headers["Server-Timing"].split(", ")]
    assert stages == ["cache_get"]


async def test_a_hit_revalidated_by_etag_is_a_304(aiohttp_client: Any, origin: FakeOrigin) -> None:
    client = await serve(aiohttp_client, origin, EdgeTestServer)
    await warm(client, URL)
    etag = (await client.get(URL)).headers["ETag"]
    refuse_the_pipeline(client)
    again = await client.get(URL, headers={"If-None-Match": etag})
    assert again.status == 304
    assert (again.headers["ETag"], await again.read()) == (etag, b"")
    assert await metric(client, "edge_requests_total", code="304", outcome="not_modified") == 1


async def test_hits_are_counted_and_logged_as_every_request(
    aiohttp_client: Any, origin: FakeOrigin, caplog: pytest.LogCaptureFixture
) -> None:
    client = await serve(aiohttp_client, origin, EdgeTestServer)
    await warm(client, URL)
    refuse_the_pipeline(client)
    caplog.set_level(logging.INFO, logger="edge.access")
    sizes = []
    for _ in range(3):
        hit = await client.get(URL)
        sizes.append(len(await hit.read()))
    assert await metric(client, "edge_requests_total", code="200", outcome="ok") == 4
    assert await metric(client, "edge_cache_requests_total", tier="memory", result="hit") == 3
    assert await metric(client, "edge_cache_requests_total", tier="memory", result="miss") == 1
    assert await metric(client, "edge_response_bytes_total", format="jpeg") == 4 * sizes[0]
    assert await metric(client, "edge_inflight_requests") == 0
    assert await metric(client, "edge_stage_duration_seconds_count", stage="cache_get") == 4
    lines = [r.msg for r in caplog.records if r.name == "edge.access"]
    assert [(line["status"], line["cache"], line["bytes"]) for line in lines] == [
        (200, "hit", sizes[0])
    ] * 3
    assert all(set(line["stages_ms"]) == {"cache_get"} for line in lines)


async def test_what_is_not_a_fresh_image_goes_through_the_pipeline(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await serve(aiohttp_client, origin, EdgeTestServer, EDGE_ERROR_MAX_AGE="60")
    missing = "/ok/nothing-here.jpg?width=200"
    first = await client.get(missing)
    assert first.status == 404
    # remembered as missing: the pipeline answers from its negative entry, not the hit path
    second = await client.get(missing)
    assert (second.status, second.headers["Cache-Control"]) == (404, "public, max-age=60")
    assert await metric(client, "edge_requests_total", code="404", outcome="not_found") == 2
    # another method than the image route's is the router's: 405
    await warm(client, URL)
    refuse_the_pipeline(client)
    assert (await client.post(URL)).status == 405


async def test_a_hit_after_a_new_render_carries_the_new_image(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    """The hit path keeps an entry's headers between hits: a re-rendered entry gets its own."""
    clock = FakeClock()
    client = await serve(aiohttp_client, origin, EdgeTestServer, clock, EDGE_CACHE_TTL="60")
    origin.put("k.jpg", (SHARED_IMAGES / "flowers-1920x1080.jpg").read_bytes())
    path = "/ok/k.jpg?width=200&format=jpeg"
    await warm(client, path)
    before = await client.get(path)
    assert before.headers["X-Edge-Cache"] == "hit"
    assert decode(await before.read()).height == 113
    origin.put("k.jpg", (SHARED_IMAGES / "photo-2725x2225.jpg").read_bytes())
    clock.now += 3600  # past the TTL: revalidated, and the changed original is rendered again
    await warm(client, path)
    after = await client.get(path)
    assert after.headers["X-Edge-Cache"] == "hit"
    assert after.headers["ETag"] != before.headers["ETag"]
    assert decode(await after.read()).height == 163


async def test_a_client_gone_while_a_hit_is_sent_is_a_499_that_holds_nothing(
    aiohttp_client: Any,
    origin: FakeOrigin,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = await serve(aiohttp_client, origin, EdgeTestServer)
    await warm(client, URL)
    refuse_the_pipeline(client)
    caplog.set_level(logging.INFO, logger="edge.access")
    sending = StreamWriter.write_eof

    async def cut_off(self: StreamWriter, *args: Any, **kwargs: Any) -> None:
        assert self.transport is not None
        self.transport.abort()
        await sending(self, *args, **kwargs)

    gc.collect()
    gc.disable()  # what a cycle holds stays visible below, until gc runs
    try:
        with monkeypatch.context() as patch:
            patch.setattr(StreamWriter, "write_eof", cut_off)
            with contextlib.suppress(aiohttp.ClientError):
                await client.get(URL)
            for _ in range(100):
                if any(r.name == "edge.access" for r in caplog.records):
                    break
                await asyncio.sleep(0.01)
        line = next(r.msg for r in caplog.records if r.name == "edge.access")
        assert (line["status"], line["outcome"], line["cache"]) == (499, "client_closed", "hit")
        # nothing but a reference cycle could keep the request's log (and the body) alive
        assert not [o for o in gc.get_objects() if isinstance(o, RequestLog)]
    finally:
        gc.enable()
    assert await metric(client, "edge_client_disconnects_total", stage="send") == 1


async def test_a_request_expecting_continue_goes_to_the_application(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await serve(aiohttp_client, origin, EdgeTestServer)
    await warm(client, URL)
    service = client.server.app[SERVICE]
    calls = []
    handle = service.handle

    async def counted(incoming: Any) -> Any:
        calls.append(incoming)
        return await handle(incoming)

    service.handle = counted
    assert (await client.get(URL)).status == 200
    assert calls == []
    again = await client.get(URL, headers={"Expect": "100-continue"})
    assert (again.status, again.headers["X-Edge-Cache"]) == (200, "hit")
    assert len(calls) == 1
