"""The proof: a real Prometheus scrapes a real edge, and every query we ship returns series.

The test starts the fake origin (tests/fake_origin.py, plus a gate that releases a batch
of fetches at once), ``python -m edge`` against it with one transform slot and no queue,
and the distribution's Prometheus scraping edge every second with the recording and
alerting rules loaded. It drives traffic that ends in every outcome it can provoke (ok,
not_found, bad_request, bad_gateway, timeout, client_closed, overloaded), waits until
Prometheus has scraped the final counters, and then evaluates through the HTTP API:

- every dashboard query, with $job / $instance / $__rate_interval filled in;
- every recording rule's expression, and the series the rule engine recorded;
- every alert expression, once as written (it must parse) and once with each comparison
  turned into ``bool`` (it must return series: a misspelt metric, a label that does not
  exist or an ``on()`` that matches nothing gives none).

Any invalid query or empty answer fails the test, listing all of them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_origin import FakeOrigin
from tests.test_deploy_contract import DEPLOY, GRAFANA, missing

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_BINARY = "/usr/bin/prometheus"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = GRAFANA / "dashboards" / "edge.json"
SOURCE = "photo-2725x2225.jpg"  # in shared/images, the fake origin's root
JOB = "edge"
RATE_INTERVAL = "1m"
STARTUP_SECONDS = 30.0
#: the outcomes the traffic below provokes; each must reach Prometheus
PROVOKED = (
    "ok",
    "not_found",
    "bad_request",
    "bad_gateway",
    "timeout",
    "client_closed",
    "overloaded",
)
#: requests released together at the gate to overrun one slot with no queue
BATCH = 4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


# --- the origin: the project's fake origin plus a gate --------------------------------------


class GatedOrigin(FakeOrigin):
    """``/gate/<n>/<key>`` holds each request until ``BATCH`` have arrived (or a bound
    passes), then answers them all at once, so their transforms ask for a slot together."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = 0
        self.released = asyncio.Event()

    def open_gate(self) -> None:
        self.arrived = 0
        self.released = asyncio.Event()

    async def _behave(self, behaviour: str, rest: str, request: web.Request) -> web.StreamResponse:
        if behaviour != "gate":
            return await super()._behave(behaviour, rest, request)
        self.arrived += 1
        if self.arrived >= BATCH:
            self.released.set()
        # the edge may bound its origin connections: after a while, answer what arrived
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.released.wait(), timeout=5.0)
        _, _, key = rest.partition("/")
        return await super()._behave("ok", key, request)


# --- processes -------------------------------------------------------------------------------


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_http(session: aiohttp.ClientSession, url: str, server: Running, what: str) -> None:
    """Poll ``url`` until it answers 200; fail with the log if the process exits or stalls."""
    give_up = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < give_up:
        if server.process.poll() is not None:
            code = server.process.returncode
            pytest.fail(f"{what} exited with {code}:\n{_tail(server.log)}")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.1)  # polling a condition, with a bound
    pytest.fail(f"{what} did not answer {url} within {STARTUP_SECONDS}s:\n{_tail(server.log)}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tail(log: Path, lines: int = 40) -> str:
    if not log.exists():
        return "(no output)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
async def origin() -> AsyncIterator[GatedOrigin]:
    fake = GatedOrigin()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@dataclass
class Running:
    """A server process this test started: its port and its combined output."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path


def _start(command: list[str], env: dict[str, str], port: int, log: Path, cwd: Path) -> Running:
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    return Running(process, port, log)


@pytest.fixture
def edge(tmp_path: Path, origin: GatedOrigin) -> Iterator[Running]:
    """``python -m edge`` on a free loopback port: one slot, no queue, the gated origin."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(
        EDGE_HOST="127.0.0.1",
        EDGE_PORT=str(port),
        EDGE_ORIGIN=origin.url,
        EDGE_MAX_CONCURRENCY="1",
        EDGE_QUEUE_SIZE="0",
        EDGE_CACHE="memory",
        EDGE_SHUTDOWN_GRACE="2",
    )
    running = _start([sys.executable, "-m", "edge"], env, port, tmp_path / "edge.log", REPO)
    try:
        yield running
    finally:
        _stop(running.process)


def _prometheus_config(tmp_path: Path, edge_port: int) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULE_FILES],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{edge_port}"]}]}
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def prometheus(tmp_path: Path, edge: Running) -> Iterator[Running]:
    if not os.access(PROMETHEUS_BINARY, os.X_OK):
        missing(f"{PROMETHEUS_BINARY} (Debian package prometheus)")
    port = free_port()
    command = [
        PROMETHEUS_BINARY,
        f"--config.file={_prometheus_config(tmp_path, edge.port)}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    running = _start(command, dict(os.environ), port, tmp_path / "prometheus.log", tmp_path)
    try:
        yield running
    finally:
        _stop(running.process)


# --- PromQL ----------------------------------------------------------------------------------

_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def with_bool_comparisons(expr: str) -> str:
    """``a > 0.05 and b == 0`` -> ``a > bool 0.05 and b == bool 0``: every series, 0 or 1.

    Comparisons inside label matchers and strings are left alone.
    """
    out: list[str] = []
    depth, quote, index = 0, "", 0
    while index < len(expr):
        char = expr[index]
        if quote:
            out.append(char)
            if char == "\\":
                out.append(expr[index + 1])
                index += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
            out.append(char)
        elif char == "{":
            depth += 1
            out.append(char)
        elif char == "}":
            depth -= 1
            out.append(char)
        elif depth == 0 and (match := _COMPARISON.match(expr, index)):
            out.append(match.group(0))
            index = match.end()
            if not re.match(r"\s*bool\b", expr[index:]):
                out.append(" bool")
            continue
        else:
            out.append(char)
        index += 1
    return "".join(out)


def test_with_bool_comparisons_leaves_matchers_alone() -> None:
    assert (
        with_bool_comparisons('a{x!="1", y=~"2"} > 0.05 and on (job) b >= bool 1 or up == 0')
        == 'a{x!="1", y=~"2"} > bool 0.05 and on (job) b >= bool 1 or up == bool 0'
    )


def dashboard_queries(instance: str) -> list[tuple[str, str]]:
    """(where, query) for every dashboard target and template variable, variables filled."""
    board = json.loads(DASHBOARD.read_text())
    # as Grafana does for a regex matcher: regex-escaped, then escaped for a PromQL string
    escaped = re.escape(instance).replace("\\", "\\\\")
    values = {"job": JOB, "instance": escaped, "__rate_interval": RATE_INTERVAL}

    def fill(text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], text)

    queries = []
    panels = [p for top in board["panels"] for p in [top, *top.get("panels", [])]]
    for panel in panels:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", fill(target["expr"])))
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert inner, query
        queries.append((f"variable ${var['name']}", fill(inner.group(1))))
    return queries


def rule_queries() -> tuple[list[tuple[str, str]], list[str]]:
    """(where, query) for every rule expression, and the names of the recorded series."""
    queries, recorded = [], []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    recorded.append(rule["record"])
                    queries.append((f"recording rule {rule['record']}", rule["expr"]))
                else:
                    where = f"alert {rule['alert']}"
                    queries.append((f"{where} (as written)", rule["expr"]))
                    queries.append((f"{where} (bool)", with_bool_comparisons(rule["expr"])))
    return queries, recorded


class PromAPI:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.http = session
        self.base = f"http://127.0.0.1:{port}/api/v1"

    async def get(self, path: str, **params: str) -> Any:
        async with self.http.get(f"{self.base}/{path}", params=params) as response:
            body = await response.json()
        if body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str) -> float:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else float("nan")

    async def until(self, expr: str, check: Any, what: str, seconds: float = 30.0) -> None:
        give_up = time.monotonic() + seconds
        last: Any = None
        while time.monotonic() < give_up:
            last = await self.query(expr)
            if check(last):
                return
            await asyncio.sleep(0.25)  # polling a condition, with a bound
        pytest.fail(f"{what}: {expr} gave {last} for {seconds}s")


# --- traffic ---------------------------------------------------------------------------------


async def edge_counters(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """edge_requests_total by outcome, and the reason/stage counters, from edge itself."""
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "edge_requests_total":
                outcome = sample.labels["outcome"]
                counts[outcome] = counts.get(outcome, 0.0) + sample.value
            elif sample.name in (
                "edge_load_shed_total",
                "edge_backend_timeouts_total",
                "edge_client_disconnects_total",
            ):
                counts[sample.name] = counts.get(sample.name, 0.0) + sample.value
    return counts


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        await response.read()
        return response.status


async def _disconnect_while_stalled(port: int, origin: GatedOrigin, path: str) -> None:
    """Ask for ``path`` (the origin stalls), hang up once the origin has the request."""
    before = origin.events["request:stall"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
    await writer.drain()
    give_up = time.monotonic() + 10
    while origin.events["request:stall"] <= before:
        assert time.monotonic() < give_up, "the origin never saw the stalled request"
        await asyncio.sleep(0.02)  # polling a condition, with a bound
    writer.transport.abort()
    del reader


async def drive_every_outcome(
    session: aiohttp.ClientSession, port: int, origin: GatedOrigin
) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    expected = {
        f"/ok/{SOURCE}?width=100": 200,  # miss
        f"/ok/{SOURCE}?width=120&format=webp": 200,
        f"/ok/missing-{SOURCE}?width=100": 404,
        f"/ok/{SOURCE}?width=banana": 400,
        f"/status/500/{SOURCE}?width=100": 502,
        f"/stall/30/{SOURCE}?width=100&backendTimeout=0.5": 504,
    }
    for path, status in expected.items():
        assert await _status(session, base + path) == status, path
    assert await _status(session, f"{base}/ok/{SOURCE}?width=100") == 200  # a cache hit

    await _disconnect_while_stalled(port, origin, f"/stall/30/{SOURCE}?width=90")

    # BATCH heavy transforms reach admission together: one slot, no queue -> 503s
    statuses: list[int] = []
    for attempt in range(3):
        origin.open_gate()
        batch = [
            _status(session, f"{base}/gate/{attempt}-{n}/{SOURCE}?width=2400&blur=20")
            for n in range(BATCH)
        ]
        statuses = list(await asyncio.gather(*batch))
        if 503 in statuses:
            break
    assert 503 in statuses, f"one slot and no queue never shed: {statuses}"
    assert set(statuses) <= {200, 503}, statuses

    give_up = time.monotonic() + 15
    while True:
        counts = await edge_counters(session, base)
        if all(counts.get(outcome, 0) > 0 for outcome in PROVOKED):
            break
        assert time.monotonic() < give_up, f"edge did not count every outcome: {counts}"
        await asyncio.sleep(0.1)  # the 499 is counted when edge notices the hang-up
    return counts


# --- the test --------------------------------------------------------------------------------


async def test_every_shipped_query_returns_series(
    origin: GatedOrigin, edge: Running, prometheus: Running
) -> None:
    instance = f"127.0.0.1:{edge.port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await _wait_http(session, f"http://{instance}/healthz", edge, "python -m edge")
        await _wait_http(
            session, f"http://127.0.0.1:{prometheus.port}/-/ready", prometheus, "prometheus"
        )
        prom = PromAPI(session, prometheus.port)
        # a first scrape before any traffic: counters start from their zeros
        await prom.until(f'up{{job="{JOB}"}} == 1', lambda r: len(r) == 1, "edge is never scraped")

        counts = await drive_every_outcome(session, edge.port, origin)
        # the invariants of DESIGN.md section 2, as edge counted them
        assert counts["edge_load_shed_total"] == counts["overloaded"]
        assert counts["edge_backend_timeouts_total"] == counts["timeout"]
        assert counts["edge_client_disconnects_total"] == counts["client_closed"]

        # Prometheus has the final counters (a scrape after the traffic) ...
        for outcome in PROVOKED:
            await prom.until(
                f'sum(edge_requests_total{{job="{JOB}", outcome="{outcome}"}})',
                lambda r, o=outcome: bool(r) and float(r[0]["value"][1]) >= counts[o],
                f"Prometheus never scraped the final {outcome} count",
            )
        # ... from at least two scrapes, so every rate() has its two samples ...
        await prom.until(
            f'count_over_time(up{{job="{JOB}"}}[5m])',
            lambda r: bool(r) and float(r[0]["value"][1]) >= 3,
            "too few scrapes",
        )
        # ... and the rule engine has recorded every series since
        queries, recorded = rule_queries()
        for name in recorded:
            await prom.until(name, bool, f"the rule engine never recorded {name}")

        problems = []
        for where, expr in [*dashboard_queries(instance), *queries]:
            try:
                result = await prom.query(expr)
            except ValueError as exc:
                problems.append(f"{where}: invalid: {exc}\n    {expr}")
                continue
            if not result and not where.endswith("(as written)"):
                problems.append(f"{where}: no series\n    {expr}")
        rules = await prom.get("rules")
        for group in rules["groups"]:
            for rule in group["rules"]:
                if rule.get("health") != "ok":
                    problems.append(f"rule {rule['name']}: {rule.get('lastError')}")
        assert not problems, "\n".join(problems)
        assert len(queries) >= 2 * len(recorded)
