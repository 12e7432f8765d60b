"""Tallied metrics: the per-request counters reach their series at every scrape, once a
second, and when the service stops; the in-flight gauge is read at the same moments."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import edge.app
from edge.app import create_app
from edge.metrics import Metrics
from tests.fake_origin import FakeOrigin
from tests.helpers import EdgeTestServer, settings_from

URL = "/ok/flowers-1920x1080.jpg?width=120&format=jpeg"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_counts_wait_for_the_flush_and_the_gauge_reads_its_source() -> None:
    metrics = Metrics(CollectorRegistry())
    in_flight = [3]
    metrics.read_in_flight(lambda: in_flight[0])
    metrics.count_request(200, "ok", 0.01)
    metrics.count_request(200, "ok", 0.02)
    metrics.count_sent("webp", 1000)
    registry = metrics.registry
    labels = {"code": "200", "outcome": "ok"}
    assert sample(registry, "edge_requests_total", **labels) == 0
    # the duration histogram is observed at once: only counters are tallied
    assert sample(registry, "edge_request_duration_seconds_count", outcome="ok") == 2
    metrics.flush()
    assert sample(registry, "edge_requests_total", **labels) == 2
    assert sample(registry, "edge_response_bytes_total", format="webp") == 1000
    assert sample(registry, "edge_inflight_requests") == 3
    in_flight[0] = 0
    metrics.flush()  # nothing new: counts stay, the gauge follows its source
    assert sample(registry, "edge_requests_total", **labels) == 2
    assert sample(registry, "edge_inflight_requests") == 0


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


async def serve(aiohttp_client: Any, origin: FakeOrigin, registry: CollectorRegistry) -> Any:
    app = create_app(settings_from({"EDGE_ORIGIN": origin.url}), registry=registry)
    return await aiohttp_client(EdgeTestServer(app))


async def test_counts_reach_the_registry_without_a_scrape(
    aiohttp_client: Any, origin: FakeOrigin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What another worker's scrape reads from the shared files: published periodically."""
    monkeypatch.setattr(edge.app, "METRICS_FLUSH_INTERVAL", 0.05)
    registry = CollectorRegistry()
    client = await serve(aiohttp_client, origin, registry)
    assert (await client.get(URL)).status == 200
    await asyncio.sleep(0.3)
    assert sample(registry, "edge_requests_total", code="200", outcome="ok") == 1
    assert sample(registry, "edge_cache_requests_total", tier="memory", result="miss") == 1


async def test_stopping_the_service_publishes_what_is_left(
    aiohttp_client: Any, origin: FakeOrigin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge.app, "METRICS_FLUSH_INTERVAL", 3600.0)
    registry = CollectorRegistry()
    client = await serve(aiohttp_client, origin, registry)
    assert (await client.get(URL)).status == 200
    assert sample(registry, "edge_requests_total", code="200", outcome="ok") == 0
    await client.close()
    assert sample(registry, "edge_requests_total", code="200", outcome="ok") == 1
