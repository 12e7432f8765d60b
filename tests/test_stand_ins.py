"""Scene7-style error handling: default images, error images, ErrorDetail, req= requests,
and the operator's parameter policies."""

from __future__ import annotations

import json
from typing import Any
from xml.etree import ElementTree

import pytest

from edge.origins import Fetched, FetchOptions
from tests.fake_origin import FakeOrigin
from tests.helpers import decode, loader_format, mean_difference, metric, start_edge


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


async def test_default_image_stands_in_for_a_missing_one(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_DEFAULT_IMAGE": "flowers-1920x1080.jpg"})
    response = await client.get("/missing.jpg?w=200&h=200&fit=fill&fmt=png&blur=30")
    assert response.status == 200
    assert response.headers["X-Edge-Error"] == "not_found"
    assert response.headers["Cache-Control"] == "public, max-age=60"
    image = decode(await response.read())
    assert loader_format(image) == "png"
    # DefaultImageMode 0: size, format and quality only; fit=fill and blur are not applied
    assert (image.width, image.height) == (200, 113)
    sharp = decode(await (await client.get("/flowers-1920x1080.jpg?w=200&fmt=png")).read())
    assert mean_difference(image, sharp) < 2
    assert await metric(client, "edge_requests_total", code="200", outcome="not_found") == 1


async def test_default_image_parameter_overrides_and_empty_disables(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_DEFAULT_IMAGE": "flowers-1920x1080.jpg"})
    response = await client.get("/missing.jpg?w=100&defaultImage=photo-1200x980.jpg")
    assert response.status == 200
    assert (decode(await response.read()).width, response.headers["X-Edge-Error"]) == (
        100,
        "not_found",
    )
    disabled = await client.get("/missing.jpg?w=100&defaultImage=")
    assert disabled.status == 404
    assert "X-Edge-Error" not in disabled.headers


async def test_a_missing_default_image_is_a_plain_404(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_DEFAULT_IMAGE": "also-missing.jpg"})
    response = await client.get("/missing.jpg?w=100")
    assert response.status == 404
    assert response.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("path", "outcome", "size", "cache_control"),
    [
        ("/missing.jpg?w=300&h=200&fmt=webp", "not_found", (300, 200), "public, max-age=60"),
        ("/photo-1200x980.jpg?w=120&bogus=1", "bad_request", (120, 120), "public, max-age=60"),
        ("/ok/truncated.jpg?w=150&fmt=png", "bad_request", (150, 150), "no-store"),
        ("/stall/5/x.jpg?w=80&h=40&backendTimeout=0.2", "timeout", (80, 40), "no-store"),
    ],
)
async def test_generated_error_image(
    aiohttp_client: Any,
    origin: FakeOrigin,
    path: str,
    outcome: str,
    size: tuple[int, int],
    cache_control: str,
) -> None:
    env = {"EDGE_ERROR_IMAGE": "generated"}
    if path.startswith(("/ok", "/stall")):
        env["EDGE_ORIGIN"] = origin.url
    client = await start_edge(aiohttp_client, env)
    response = await client.get(path)
    assert response.status == 200
    assert response.headers["X-Edge-Error"] == outcome
    assert response.headers["Cache-Control"] == cache_control
    image = decode(await response.read())
    assert (image.width, image.height) == size
    status = {"not_found": "200", "bad_request": "200", "timeout": "200"}[outcome]
    assert await metric(client, "edge_requests_total", code=status, outcome=outcome) == 1
    if outcome == "timeout":
        assert await metric(client, "edge_backend_timeouts_total", stage="fetch") == 1


async def test_no_error_image_for_overload(aiohttp_client: Any, origin: FakeOrigin) -> None:
    client = await start_edge(
        aiohttp_client, {"EDGE_ERROR_IMAGE": "generated", "EDGE_ORIGIN": origin.url}
    )
    response = await client.get("/status/503/x.jpg?w=10")
    assert response.status == 503
    assert "X-Edge-Error" not in response.headers


async def test_error_image_from_an_origin_key(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_ERROR_IMAGE": "blackbug-alpha-640x480.png"})
    response = await client.get("/missing.jpg?w=64&fmt=webp")
    assert response.status == 200
    assert response.headers["X-Edge-Error"] == "not_found"
    image = decode(await response.read())
    assert (loader_format(image), image.width, image.height) == ("webp", 64, 48)


async def test_a_missing_error_image_key_refuses_to_start(aiohttp_client: Any) -> None:
    with pytest.raises(Exception, match="no such image"):
        await start_edge(aiohttp_client, {"EDGE_ERROR_IMAGE": "no-such-error-image.png"})


async def test_property_requests_answer_errors_in_their_format(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_ERROR_IMAGE": "generated"})
    response = await client.get("/missing.jpg?req=props,xml")
    assert response.status == 404
    root = ElementTree.fromstring(await response.text())
    assert (root.tag, root.get("status")) == ("error", "404")


@pytest.mark.parametrize(
    "query", ["width=2001&req=props,json", "zzz=1&req=props,json", "req=bogus,json"]
)
async def test_a_property_request_that_does_not_parse_gets_its_error_not_an_image(
    aiohttp_client: Any, query: str
) -> None:
    client = await start_edge(
        aiohttp_client,
        {"EDGE_ERROR_IMAGE": "generated", "EDGE_IMAGE_PARAM_VALIDATIONS": '{"width":{"max":2000}}'},
    )
    response = await client.get(f"/photo-1200x980.jpg?{query}")
    assert response.status == 400
    assert response.content_type == "application/json"
    assert json.loads(await response.text())["error"]["status"] == 400


@pytest.mark.parametrize("fmt", ["text", "json", "xml"])
async def test_property_requests(aiohttp_client: Any, fmt: str) -> None:
    client = await start_edge(aiohttp_client, {})
    props = await read_props(client, f"/photo-1200x980.jpg?w=300&fmt=webp&req=props,{fmt}", fmt)
    assert props["image.width"] == 300
    assert props["image.height"] == 245
    assert props["image.format"] == "webp"
    assert props["image.bytes"] > 0
    source = await read_props(client, f"/blackbug-alpha-640x480.png?req=imageprops,{fmt}", fmt)
    assert (source["image.width"], source["image.height"]) == (640, 480)
    assert source["image.format"] == "png"
    assert source["image.hasAlpha"] in (1, True)
    assert source["image.pages"] == 1
    found = await read_props(client, f"/flowers-1920x1080.jpg?req=exists,{fmt}", fmt)
    missing = await read_props(client, f"/nothing-here.jpg?req=exists,{fmt}", fmt)
    assert (found["catalogRecord.exists"], missing["catalogRecord.exists"]) == (1, 0)
    # a missing source is outcome ok for req=exists
    assert await metric(client, "edge_requests_total", code="404", outcome="not_found") == 0


async def read_props(client: Any, path: str, fmt: str) -> dict[str, Any]:
    response = await client.get(path)
    assert response.status == 200, await response.text()
    text = await response.text()
    if fmt == "json":
        return dict(json.loads(text))
    if fmt == "xml":
        root = ElementTree.fromstring(text)
        return {p.get("name"): _number(p.get("value") or "") for p in root.iter("property")}
    return {k: _number(v) for k, v in (line.split("=", 1) for line in text.splitlines())}


def _number(text: str) -> Any:
    return int(text) if text.lstrip("-").isdigit() else text


async def test_params_outside_the_allowed_list_are_401(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_IMAGE_PARAMS_ALLOWED": "width,format"})
    assert (await client.get("/photo-1200x980.jpg?wid=100&fmt=png")).status == 200
    response = await client.get("/photo-1200x980.jpg?w=100&blur=3")
    assert response.status == 401
    assert "blur" in await response.text()


async def test_param_validations_name_the_rule(aiohttp_client: Any) -> None:
    rules = '{"width":{"max":500},"format":{"allowed":["webp","jpeg"]}}'
    client = await start_edge(aiohttp_client, {"EDGE_IMAGE_PARAM_VALIDATIONS": rules})
    assert (await client.get("/photo-1200x980.jpg?w=500")).status == 200
    too_wide = await client.get("/photo-1200x980.jpg?w=501")
    assert too_wide.status == 400
    assert "500" in await too_wide.text()
    png = await client.get("/photo-1200x980.jpg?w=50&fmt=png")
    assert png.status == 400
    assert "format" in await png.text()


async def test_original_requests_can_be_turned_off(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_ALLOW_ORIGINAL_IMAGE_REQUEST": "false"})
    assert (await client.get("/flowers-1920x1080.jpg")).status == 401
    assert (await client.get("/flowers-1920x1080.jpg?w=10")).status == 200


class BrokenOrigin:
    """An origin with a bug: every fetch raises something no layer translates."""

    kind = "file"
    identity = "broken://"

    async def fetch(self, key: str, options: FetchOptions) -> Fetched:
        raise RuntimeError("secret internal state")

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("level", [1, 3])
async def test_a_bug_is_a_500_with_a_traceback_only_at_level_3(
    aiohttp_client: Any, level: int
) -> None:
    client = await start_edge(
        aiohttp_client, {"EDGE_ERROR_DETAIL": str(level)}, origin=BrokenOrigin()
    )
    response = await client.get("/x.jpg?w=10")
    assert response.status == 500
    body = await response.text()
    assert ("Traceback" in body) is (level == 3)
    assert response.headers["X-Request-Id"] in body
    assert await metric(client, "edge_requests_total", code="500", outcome="internal_error") == 1
