"""Small shared test helpers: building an app client, reading metrics, decoding images."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pyvips
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edge.app import EdgeRunner, create_app
from edge.metrics import Metrics
from edge.origins import Origin
from edge.settings import Settings, load_settings

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


class EdgeTestServer(TestServer):
    """aiohttp's TestServer on edge's own runner, so hits take edge's hit path as in
    production (a plain TestServer would send every request through the application)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return EdgeRunner(self.app, **kwargs)


class FakeClock:
    """A clock the tests move forward (``clock.now += 61``) instead of sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings_from(env: Mapping[str, str]) -> Settings:
    return load_settings(dict(env))


async def start_edge(
    aiohttp_client: Any,
    env: Mapping[str, str],
    origin: Origin | None = None,
    cache_clock: Callable[[], float] | None = None,
) -> TestClient[Any, Any]:
    app = create_app(
        settings_from(env), registry=CollectorRegistry(), origin=origin, cache_clock=cache_clock
    )
    # aiohttp's TestServer runs handlers with handler_cancellation on, as edge's server does
    client: TestClient[Any, Any] = await aiohttp_client(EdgeTestServer(app))
    return client


@asynccontextmanager
async def running_edge(
    env: Mapping[str, str], origin: Origin | None = None
) -> AsyncIterator[TestClient[Any, Any]]:
    """edge on a loopback port for the duration of the block (for hypothesis examples,
    where a function-scoped fixture would keep every example's server alive)."""
    app = create_app(settings_from(env), registry=CollectorRegistry(), origin=origin)
    server = EdgeTestServer(app)  # handler_cancellation on, as in edge's own server
    async with TestClient(server) as client:
        yield client


async def metric(client: TestClient[Any, Any], name: str, **labels: str) -> float:
    """The value of one sample from /metrics (0 when the series is absent)."""
    response = await client.get("/metrics")
    text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def metric_sum(client: TestClient[Any, Any], name: str) -> float:
    response = await client.get("/metrics")
    text = await response.text()
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def decode(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


def loader_format(image: pyvips.Image) -> str:
    """jpeg, png, webp, gif, heif (avif) from the loader libvips picked."""
    loader = str(image.get("vips-loader"))
    for name in ("jpeg", "png", "webp", "gif", "heif"):
        if loader.startswith(name):
            return name
    return loader


def mean_difference(a: pyvips.Image, b: pyvips.Image) -> float:
    """Mean absolute pixel difference (0-255) after resizing b to a's size, sRGB 3-band."""
    a3, b3 = _rgb(a), _rgb(b)
    if (b3.width, b3.height) != (a3.width, a3.height):
        b3 = b3.resize(a3.width / b3.width, vscale=a3.height / b3.height)
    return float((a3 - b3).abs().avg())


def _rgb(image: pyvips.Image) -> pyvips.Image:
    if image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    image = image.colourspace("srgb")
    return image[0:3] if image.bands > 3 else image


def counted(metrics: Metrics, tier: str, result: str) -> float:
    """edge_cache_requests_total{tier, result} as a scrape would read it now."""
    metrics.flush()
    value = metrics.registry.get_sample_value(
        "edge_cache_requests_total", {"tier": tier, "result": result}
    )
    assert value is not None
    return value
