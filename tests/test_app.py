"""End to end through HTTP: statuses, bodies, headers, metrics and images as users see them."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from yarl import URL

from tests.conftest import SHARED_IMAGES
from tests.fake_origin import FakeOrigin
from tests.helpers import decode, loader_format, mean_difference, metric, start_edge


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def samples(aiohttp_client: Any) -> Any:
    """edge on its embedded defaults: the bundled sample folder."""
    return await start_edge(aiohttp_client, {})


@pytest.fixture
async def via_http(aiohttp_client: Any, origin: FakeOrigin) -> Any:
    """edge in front of the misbehaving HTTP origin."""
    return await start_edge(
        aiohttp_client, {"EDGE_ORIGIN": origin.url, "EDGE_BACKEND_TIMEOUT": "5"}
    )


async def test_readme_example_gives_a_300px_webp(samples: Any) -> None:
    response = await samples.get("/flowers-1920x1080.jpg?width=300&format=webp")
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/webp"
    image = decode(await response.read())
    assert loader_format(image) == "webp"
    assert (image.width, image.height) == (300, 169)


@pytest.mark.parametrize(
    ("query", "size", "fmt"),
    [
        ("width=400", (400, 327), "jpeg"),
        ("w=400", (400, 327), "jpeg"),
        ("wid=400&fmt=png", (400, 327), "png"),
        ("WIDTH=400&F=PNG", (400, 327), "png"),
        ("h=100&format=webp", (122, 100), "webp"),
        ("hei=100&qlt=50,1", (122, 100), "jpeg"),
        ("width=300&height=300&fit=cover", (300, 300), "jpeg"),
        ("width=300&height=300&fit=crop", (300, 300), "jpeg"),
        ("width=300&height=300&fit=contain&bg=ff0000", (300, 300), "jpeg"),
        ("width=300&height=300&fit=fill", (300, 300), "jpeg"),
        ("width=300&height=100&fit=inside", (122, 100), "jpeg"),
        ("width=300&height=100&fit=outside", (300, 245), "jpeg"),
        ("width=200&dpr=2", (400, 327), "jpeg"),
        ("width=5000", (1200, 980), "jpeg"),
        ("width=5000&upscale=1", (5000, 4083), "jpeg"),
    ],
)
async def test_transforms_have_the_asked_size_and_format(
    samples: Any, query: str, size: tuple[int, int], fmt: str
) -> None:
    response = await samples.get(f"/photo-1200x980.jpg?{query}")
    assert response.status == 200, await response.text()
    image = decode(await response.read())
    assert (image.width, image.height) == size
    assert loader_format(image) == fmt


async def test_output_looks_like_the_source(samples: Any) -> None:
    response = await samples.get("/photo-1200x980.jpg?width=300")
    output = decode(await response.read())
    source = decode((SHARED_IMAGES / "photo-2725x2225.jpg").read_bytes())
    assert mean_difference(output, source) < 6


async def test_contain_pads_with_the_background(samples: Any) -> None:
    response = await samples.get(
        "/photo-1200x980.jpg?width=300&height=400&fit=contain&bg=ff0000&format=png"
    )
    image = decode(await response.read())
    assert (image.width, image.height) == (300, 400)
    top_left = image.crop(0, 0, 4, 4).colourspace("srgb")
    assert [round(v) for v in top_left.getpoint(1, 1)[:3]] == [255, 0, 0]


async def test_alpha_is_flattened_onto_background_for_jpeg(samples: Any) -> None:
    response = await samples.get("/blackbug-alpha-640x480.png?width=320&format=jpeg&bg=00ff00")
    image = decode(await response.read())
    assert image.bands == 3
    assert not image.hasalpha()
    corner = image.getpoint(0, 0)
    assert corner[1] > 200
    assert corner[0] < 60


async def test_original_request_returns_the_bytes_unchanged(samples: Any) -> None:
    response = await samples.get("/flowers-1920x1080.jpg")
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    data = await response.read()
    assert data == (SHARED_IMAGES / "flowers-1920x1080.jpg").read_bytes()
    assert response.headers["ETag"]


async def test_head_is_get_without_the_body(samples: Any) -> None:
    get = await samples.get("/photo-1200x980.jpg?width=200")
    body = await get.read()
    head = await samples.head("/photo-1200x980.jpg?width=200")
    assert head.status == 200
    assert await head.read() == b""
    assert head.headers["Content-Length"] == str(len(body))
    assert head.headers["ETag"] == get.headers["ETag"]


async def test_every_response_carries_the_contract_headers(samples: Any) -> None:
    for path in ("/photo-1200x980.jpg?width=100", "/nope.jpg", "/x.jpg?width=0"):
        response = await samples.get(path, headers={"X-Request-Id": "abc-123"})
        assert response.headers["X-Request-Id"] == "abc-123"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
        assert response.headers["Accept-Ranges"] == "none"


async def test_a_hostile_request_id_is_replaced(samples: Any) -> None:
    response = await samples.get("/nope.jpg", headers={"X-Request-Id": "a b\tc" * 30})
    assert response.headers["X-Request-Id"] != "a b\tc" * 30
    assert len(response.headers["X-Request-Id"]) == 32


async def test_range_is_ignored(samples: Any) -> None:
    response = await samples.get("/photo-1200x980.jpg?width=100", headers={"Range": "bytes=0-9"})
    assert response.status == 200
    assert len(await response.read()) > 10


async def test_success_caching_headers_and_304(samples: Any) -> None:
    first = await samples.get("/photo-1200x980.jpg?width=120")
    assert first.headers["Cache-Control"] == "public, max-age=86400"
    etag = first.headers["ETag"]
    again = await samples.get("/photo-1200x980.jpg?width=120", headers={"If-None-Match": etag})
    assert again.status == 304
    assert again.headers["ETag"] == etag
    other = await samples.get("/photo-1200x980.jpg?width=121")
    assert other.headers["ETag"] != etag


@pytest.mark.parametrize(
    ("path", "status", "outcome", "needle"),
    [
        ("/missing.jpg", 404, "not_found", "no such image"),
        ("/photo-1200x980.jpg?width=abc", 400, "bad_request", "width"),
        ("/photo-1200x980.jpg?bogus=1", 400, "bad_request", "bogus"),
        ("/photo-1200x980.jpg?w=10&width=20", 400, "bad_request", "width"),
        ("/photo-1200x980.jpg?fit=hfit", 400, "bad_request", "fit"),
        ("/photo-1200x980.jpg?width=9000", 400, "bad_request", "8192"),
        ("/a/%2e%2e/photo-1200x980.jpg", 400, "bad_request", ""),
        ("/a%2Fb.jpg", 400, "bad_request", ""),
        ("/a%5Cb.jpg", 400, "bad_request", ""),
        ("/a%00b.jpg", 400, "bad_request", ""),
        ("/%ff.jpg", 400, "bad_request", ""),
        ("/photo-1200x980.jpg?origin=example.com", 401, "unauthorized", "origin"),
    ],
)
async def test_status_table_on_the_sample_folder(
    samples: Any, path: str, status: int, outcome: str, needle: str
) -> None:
    before = await metric(samples, "edge_requests_total", code=str(status), outcome=outcome)
    response = await samples.get(URL(path, encoded=True))
    body = await response.text()
    assert response.status == status, body
    assert needle in body
    assert response.headers["X-Request-Id"] in body  # ErrorDetail 1 carries the request id
    after = await metric(samples, "edge_requests_total", code=str(status), outcome=outcome)
    assert after == before + 1


@pytest.mark.parametrize(
    ("path", "status", "outcome"),
    [
        ("ok/flowers-1920x1080.jpg?width=50", 200, "ok"),
        ("status/404/x.jpg?width=50", 404, "not_found"),
        ("status/410/x.jpg?width=50", 404, "not_found"),
        ("status/400/x.jpg?width=50", 400, "bad_request"),
        ("status/401/x.jpg?width=50", 401, "unauthorized"),
        ("status/403/x.jpg?width=50", 403, "forbidden"),
        ("status/418/x.jpg?width=50", 502, "bad_gateway"),
        ("status/500/x.jpg?width=50", 502, "bad_gateway"),
        ("status/429/x.jpg?width=50", 503, "overloaded"),
        ("status/503/x.jpg?width=50", 503, "overloaded"),
        ("status/504/x.jpg?width=50", 504, "timeout"),
        ("reset/photo-2725x2225.jpg?width=50", 502, "bad_gateway"),
        ("lie/flowers-1920x1080.jpg?width=50", 502, "bad_gateway"),
        ("garbage/x.jpg?width=50", 400, "bad_request"),
        ("ok/truncated.jpg?width=50", 400, "bad_request"),
        ("redirect/2/flowers-1920x1080.jpg?width=50", 200, "ok"),
        ("redirect/9/flowers-1920x1080.jpg?width=50", 502, "bad_gateway"),
        ("stall/3/flowers-1920x1080.jpg?width=50&backendTimeout=0.3", 504, "timeout"),
    ],
)
async def test_status_table_against_a_misbehaving_origin(
    via_http: Any, path: str, status: int, outcome: str
) -> None:
    before = await metric(via_http, "edge_requests_total", code=str(status), outcome=outcome)
    response = await via_http.get("/" + path)
    body = await response.read()
    assert response.status == status, body
    assert "Set-Cookie" not in response.headers
    after = await metric(via_http, "edge_requests_total", code=str(status), outcome=outcome)
    assert after == before + 1
    if status == 503:
        assert response.headers["Retry-After"] == "7"
    if status >= 400:
        assert response.headers["Cache-Control"] in ("no-store", "public, max-age=60")


async def test_error_detail_levels(aiohttp_client: Any) -> None:
    bodies = {}
    for level in range(3):
        client = await start_edge(aiohttp_client, {"EDGE_ERROR_DETAIL": str(level)})
        response = await client.get("/missing-key.jpg?width=10")
        bodies[level] = await response.text()
    assert bodies[0].strip() == "404 Not Found"
    assert "no such image" in bodies[1]
    assert "missing-key" not in bodies[1]
    assert "missing-key" in bodies[2]


async def test_errors_in_json_when_asked(samples: Any) -> None:
    response = await samples.get("/missing.jpg?req=props,json")
    assert response.status == 404
    assert response.headers["Content-Type"].startswith("application/json")
    assert json.loads(await response.text())["error"]["status"] == 404


async def test_health_ready_and_metrics_are_served(samples: Any) -> None:
    assert (await samples.get("/healthz")).status == 200
    assert (await samples.get("/readyz")).status == 200
    response = await samples.get("/metrics")
    text = await response.text()
    assert 'edge_requests_total{code="504",outcome="timeout"} 0.0' in text
    assert "edge_build_info{" in text
    assert "edge_origin_requests_total" in text
    # reserved paths are not requests of the image pipeline
    assert await metric(samples, "edge_requests_total", code="200", outcome="ok") == 0


async def test_one_json_access_log_line_per_request(
    samples: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge.access")
    await samples.get("/photo-1200x980.jpg?width=64&s=topsecret")
    await samples.get("/missing.jpg")
    lines = [r.msg for r in caplog.records if r.name == "edge.access"]
    assert len(lines) == 2
    first, second = lines
    assert isinstance(first, dict)
    assert first["status"] in (200, 400)
    assert "topsecret" not in first["path"]
    assert second["status"] == 404
    assert second["outcome"] == "not_found"
    for line in lines:
        assert {"time", "request_id", "method", "path", "duration_ms", "stages_ms"} <= set(line)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("ok/flowers-1920x1080.jpg?w=20", "200"),
        ("reset/photo-2725x2225.jpg?w=20", "error"),
        ("status/500/x.jpg?w=20", "500"),
        ("stall/5/x.jpg?w=20&backendTimeout=0.2", "cancelled"),
    ],
)
async def test_each_origin_fetch_is_counted_once_as_it_ended(
    via_http: Any, path: str, code: str
) -> None:
    await via_http.get("/" + path)
    text = await (await via_http.get("/metrics")).text()
    counted = {
        line.split('code="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("edge_origin_requests_total{code=")
        or (line.startswith("edge_origin_requests_total{") and 'kind="http"' in line)
    }
    assert counted == {code: 1.0}


async def test_a_dpr_hint_never_turns_a_working_url_into_a_400(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_MAX_OUTPUT_PIXELS": "4000000"})
    url = "/flowers-1920x1080.jpg?w=1500&h=1500&fit=fill&upscale=1&fmt=png"
    assert (await client.get(url)).status == 200
    hinted = await client.get(url, headers={"Sec-CH-DPR": "2"})  # 3000x3000 would be 9 MP
    assert hinted.status == 200, await hinted.text()
    image = decode(await hinted.read())
    assert image.width == image.height
    assert image.width > 1500
    assert 3_900_000 < image.width * image.height <= 4_000_000
    assert "Sec-CH-DPR" in hinted.headers["Vary"]
