"""Optional tracing: spans per stage under the caller's traceparent, passed to the origin;
nothing imported or changed when OTEL_* does not ask for it."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edge.app import create_app
from edge.tracing import Tracing, from_environ
from tests.fake_origin import FakeOrigin
from tests.helpers import EdgeTestServer, settings_from

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


async def test_a_span_per_stage_under_the_callers_trace(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    exporter = InMemorySpanExporter()
    app = create_app(
        settings_from({"EDGE_ORIGIN": origin.url}),
        registry=CollectorRegistry(),
        tracing=Tracing.with_exporter(exporter),
    )
    client = await aiohttp_client(EdgeTestServer(app))
    response = await client.get(
        "/ok/flowers-1920x1080.jpg?w=50", headers={"traceparent": TRACEPARENT}
    )
    assert response.status == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {"edge", "cache_get", "fetch", "queue", "transform"} <= set(spans)
    for span in spans.values():
        assert f"{span.context.trace_id:032x}" == TRACE_ID
    root = spans["edge"]
    assert f"{root.parent.span_id:016x}" == "00f067aa0ba902b7"
    # the origin was asked under the fetch span
    sent = origin.headers[-1]["traceparent"]
    assert sent.split("-")[1] == TRACE_ID
    assert sent.split("-")[2] == f"{spans['fetch'].context.span_id:016x}"
    # a cache hit is traced too: with tracing on, hits take the middleware's path
    exporter.clear()
    again = await client.get("/ok/flowers-1920x1080.jpg?w=50", headers={"traceparent": TRACEPARENT})
    assert again.headers["X-Edge-Cache"] == "hit"
    assert {span.name for span in exporter.get_finished_spans()} == {"edge", "cache_get"}


def test_tracing_is_off_without_otel_variables() -> None:
    assert from_environ({}) is None
    assert from_environ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is None
    assert from_environ({"OTEL_TRACES_EXPORTER": "console"}) is not None


async def test_without_the_extra_nothing_changes() -> None:
    """opentelemetry made unimportable: edge starts and serves, tracing stays off even
    when OTEL_* asks for it."""
    script = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if the extra were not installed\n"
        "import asyncio\n"
        "from aiohttp.test_utils import TestClient, TestServer\n"
        "from edge.app import create_app\n"
        "from edge.settings import load_settings\n"
        "from edge.tracing import from_environ\n"
        "tracing = from_environ({'OTEL_TRACES_EXPORTER': 'console'})\n"
        "async def main():\n"
        "    app = create_app(load_settings({}), tracing=tracing)\n"
        "    async with TestClient(TestServer(app)) as client:\n"
        "        response = await client.get('/photo-1200x980.jpg?w=10')\n"
        "        print(tracing, response.status)\n"
        "asyncio.run(main())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=env, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    assert stdout.decode().strip() == "None 200"
