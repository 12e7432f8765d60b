"""Soak test: edge in front of a misbehaving origin, under a bounded mixed load, watched
for drift in memory, descriptors, threads and asyncio tasks.

    .venv/bin/python bench/soak.py --duration 660 --concurrency 8 --interval 10

It starts its own origin (an aiohttp app in this process) and edge (``python -m edge``
in a subprocess), both on loopback free ports. The origin serves copies of the sample
images in ../shared/images and misbehaves on purpose: 404s, 500s, stalls past edge's
budget (before the headers and mid-body), connections reset mid-body, garbage bytes and
a truncated JPEG. The load mixes cache hits (a small hot set), misses (many copies x
widths x formats, so the 32 MiB memory tier keeps evicting), revisits of earlier misses,
parameter errors, missing keys, origin failures, timeouts and client disconnects
(requests abandoned after a random short delay).

Every --interval seconds it reads edge's ``/_edge/stats``, the process's own
``/proc/<pid>`` (RSS, threads, descriptors: a cross-check) and the outcome counters of
``/metrics``, and prints one row. At the end it fits a least-squares line to RSS,
descriptors, threads and tasks after the warm-up (the larger of 20% of the run and
60 s) and reports the drift per hour, the requests by outcome and the throughput.

The run is bounded by --duration and --max-requests, talks to 127.0.0.1 only, stops
every process it started, and exits non-zero only when it could not run (edge did not
start, or died during the run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
IMAGES = REPO.parent / "shared" / "images"
HOST = "127.0.0.1"
MiB = 1024 * 1024

#: originals served by the origin under /ok/<copy>/<name> (and the misbehaving kinds)
SOURCES = (
    "photo-2725x2225.jpg",
    "flowers-1920x1080.jpg",
    "gallery-1024x772.webp",
    "blackbug-alpha-2048x1536.png",
    "cmyk-with-profile.jpg",
    "banner-4096x800.avif",
    "rotating-squares-animated.gif",
)
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".webp": "image/webp",
    ".png": "image/png",
    ".avif": "image/avif",
    ".gif": "image/gif",
}
#: distinct keys per original: copies x widths x formats make the miss space
COPIES = 400
#: the hot set: a few URLs every load worker keeps asking for
HOT = tuple(
    f"/ok/0/{name}?width={width}&format={fmt}"
    for name in ("photo-2725x2225.jpg", "flowers-1920x1080.jpg", "gallery-1024x772.webp")
    for width, fmt in ((320, "jpeg"), (640, "webp"), (150, "png"))
)
BAD_QUERIES = (
    "width=abc",
    "width=0",
    "colour=red",
    "width=100&w=200",
    "format=bmp",
    "quality=500",
    "rotate=45",
    "fit=hfit",
    "dpr=9",
    "width=9000",
    "crop=fit&fit=fill",
)
#: request classes and their share of the load (weights, not necessarily summing to 1)
MIX = {
    "hit": 30.0,
    "miss": 22.0,
    "revisit": 8.0,
    "original": 2.0,
    "props": 2.0,
    "bad_param": 8.0,
    "missing": 6.0,
    "origin_500": 4.0,
    "garbage": 3.0,
    "truncated": 2.0,
    "reset": 3.0,
    "stall": 1.5,
    "drip": 0.5,
    "disconnect": 8.0,
}
OUTCOMES = (
    "ok",
    "not_modified",
    "bad_request",
    "not_found",
    "client_closed",
    "bad_gateway",
    "timeout",
    "overloaded",
    "unauthorized",
    "forbidden",
    "internal_error",
)
SHORT = {
    "ok": "ok",
    "bad_request": "400",
    "not_found": "404",
    "client_closed": "499",
    "bad_gateway": "502",
    "timeout": "504",
    "overloaded": "503",
    "internal_error": "500",
}
WATCHED = ("rss_mib", "open_fds", "threads", "asyncio_tasks")
#: latencies kept per request class (the first ones; enough for p50/p99)
LATENCIES_KEPT = 200_000


# --------------------------------------------------------------------------- origin


class MisbehavingOrigin:
    """An HTTP origin at /<kind>/<copy>/<name>; ``kind`` chooses how it behaves."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.images = {name: (IMAGES / name).read_bytes() for name in SOURCES}
        self.truncated = (IMAGES / "truncated.jpg").read_bytes()
        self.started = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
        self.seen: Counter[str] = Counter()
        #: stalled answers abandoned by edge (it closed the connection): cancellation works
        self.abandoned: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{kind}/{copy}/{name}", self.serve)
        return app

    async def serve(self, request: web.Request) -> web.StreamResponse:
        kind, name = request.match_info["kind"], request.match_info["name"]
        self.seen[kind] += 1
        data = self.images.get(name)
        if data is None or kind == "missing":
            return web.Response(status=404, text="no such object\n")
        content_type = CONTENT_TYPES[Path(name).suffix]
        try:
            return await self._answer(request, kind, data, content_type)
        except asyncio.CancelledError:
            self.abandoned[kind] += 1
            raise

    async def _answer(
        self, request: web.Request, kind: str, data: bytes, content_type: str
    ) -> web.StreamResponse:
        headers = {"Content-Type": content_type, "Last-Modified": self.started}
        if kind == "ok":
            etag = f'"{request.match_info["copy"]}-{len(data)}"'
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers={"ETag": etag})
            return web.Response(body=data, headers={**headers, "ETag": etag})
        if kind == "error":
            return web.Response(status=500, text="origin exploded\n")
        if kind == "garbage":
            noise = os.urandom(8192)
            if request.match_info["copy"].endswith(("1", "3", "5", "7", "9")):
                noise = b"\xff\xd8\xff\xe0" + noise  # a JPEG signature, then nonsense
            return web.Response(body=noise, headers=headers)
        if kind == "truncated":
            return web.Response(
                body=self.truncated, headers={**headers, "Content-Type": "image/jpeg"}
            )
        if kind == "stall":  # no headers until well past edge's budget
            await asyncio.sleep(self.stall)
            return web.Response(body=data, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 3])
        if kind == "drip":  # headers and a third of the body, then nothing for a while
            await asyncio.sleep(self.stall)
            await response.write(data[len(data) // 3 :])
            return response
        await asyncio.sleep(0.02)  # let the first third reach edge, then reset
        _reset(request)
        return response


def _reset(request: web.Request) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0) in the middle of the body."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# --------------------------------------------------------------------------- load


@dataclass
class ClassTally:
    statuses: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


@dataclass
class Load:
    """What the load generator sent and saw, per request class."""

    rng: random.Random
    tallies: dict[str, ClassTally] = field(default_factory=dict)
    #: earlier miss URLs, revisited later (a hit if still cached, a miss once evicted)
    history: list[str] = field(default_factory=list)
    sent: int = 0
    transport_errors: Counter[str] = field(default_factory=Counter)
    #: set when the run ends early: workers finish their request and leave
    stopping: bool = False

    def tally(self, name: str) -> ClassTally:
        return self.tallies.setdefault(name, ClassTally())

    def choose(self) -> tuple[str, str, float | None]:
        """(class, path?query, abandon-after seconds or None) for the next request."""
        rng = self.rng
        name = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        copy = rng.randrange(COPIES)
        if name == "hit":
            return name, rng.choice(HOT), None
        if name == "miss":
            url = self._miss_url()
            if len(self.history) < 5000:
                self.history.append(url)
            else:
                self.history[rng.randrange(len(self.history))] = url
            return name, url, None
        if name == "revisit":
            return name, rng.choice(self.history) if self.history else rng.choice(HOT), None
        if name == "original":
            return name, f"/ok/{copy}/{rng.choice(SOURCES[:3])}", None
        if name == "props":
            return name, f"/ok/{copy}/{rng.choice(SOURCES)}?req=imageprops,json", None
        if name == "bad_param":
            return name, f"/ok/{copy}/photo-2725x2225.jpg?{rng.choice(BAD_QUERIES)}", None
        if name == "missing":
            return name, f"/missing/{copy}/nothing-{rng.randrange(10**6)}.jpg?width=200", None
        if name == "disconnect":
            target = (
                self._miss_url()
                if rng.random() < 0.8
                else f"/stall/{copy}/photo-2725x2225.jpg?width=300"
            )
            return name, target, rng.uniform(0.005, 0.3)
        kind = {"origin_500": "error"}.get(name, name)
        source = "photo-2725x2225.jpg" if name in ("reset", "drip") else rng.choice(SOURCES[:3])
        return name, f"/{kind}/{copy}/{source}?width={rng.randrange(64, 800)}", None

    def _miss_url(self) -> str:
        rng = self.rng
        name = rng.choice(SOURCES)
        fmt = rng.choices(("jpeg", "webp", "png", "avif"), weights=(5, 4, 2, 1))[0]
        width = rng.randrange(32, 400 if fmt == "avif" else 1200)
        return f"/ok/{rng.randrange(COPIES)}/{name}?width={width}&format={fmt}"


async def load_worker(
    http: aiohttp.ClientSession, base: str, load: Load, stop_at: float, max_requests: int
) -> None:
    while time.monotonic() < stop_at and load.sent < max_requests and not load.stopping:
        name, target, abandon = load.choose()
        load.sent += 1
        tally = load.tally(name)
        started = time.monotonic()
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
        window = asyncio.timeout(abandon)
        try:
            async with window:
                status, cache = await _get(http, base + target)
        except TimeoutError:
            tally.statuses["abandoned" if window.expired() else "client_timeout"] += 1
            continue
        except aiohttp.ClientError as exc:
            load.transport_errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
            tally.statuses["transport_error"] += 1
            if isinstance(exc, aiohttp.ClientConnectorError):
                await asyncio.sleep(0.1)  # edge is not listening: do not spin
            continue
        tally.statuses[str(status)] += 1
        if cache:
            tally.cache[cache] += 1
        if len(tally.latencies) < LATENCIES_KEPT:
            tally.latencies.append(time.monotonic() - started)


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as response:
        await response.read()
        return response.status, response.headers.get("X-Edge-Cache", "")


# --------------------------------------------------------------------------- sampling


@dataclass
class Sample:
    t: float
    stats: dict[str, int] | None
    proc: dict[str, int]
    counters: dict[str, float]
    healthz_ms: float | None

    def value(self, metric: str) -> float | None:
        if self.stats is None:
            return None
        if metric == "rss_mib":
            return self.stats["rss_bytes"] / MiB
        return float(self.stats[metric])


_SERIES = re.compile(r"^(edge_[a-z_]+_total)\{([^}]*)\}\s+(\S+)$")


def parse_counters(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every edge_*_total series of a /metrics page."""
    counters: dict[str, float] = {}
    for line in text.splitlines():
        match = _SERIES.match(line)
        if match:
            counters[f"{match.group(1)}{{{match.group(2)}}}"] = float(match.group(3))
    return counters


def label_sum(counters: dict[str, float], name: str, label: str) -> Counter[str]:
    """Sum of a counter family by one label's value."""
    out: Counter[str] = Counter()
    pattern = re.compile(rf'{label}="([^"]*)"')
    for series, value in counters.items():
        if series.startswith(name + "{"):
            match = pattern.search(series)
            out[match.group(1) if match else ""] += int(value)
    return out


def proc_view(pid: int) -> dict[str, int]:
    """RSS, threads and descriptors of ``pid`` straight from /proc (a cross-check)."""
    view = {"rss_bytes": 0, "threads": 0, "open_fds": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                view["rss_bytes"] = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                view["threads"] = int(line.split()[1])
        view["open_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return view


class Sampler:
    def __init__(self, http: aiohttp.ClientSession, base: str, token: str, pid: int) -> None:
        self.http, self.base, self.pid = http, base, pid
        self.auth = {"Authorization": f"Bearer {token}"}
        self.stats_calls = 0
        #: the edge_requests_total series each /_edge/stats call lands in (learnt at start)
        self.stats_series = 'edge_requests_total{code="200",outcome="ok"}'
        self.learnt = False

    def learn_stats_series(self, first: Sample) -> None:
        """Edge counts operator answers too: find out under which code and outcome, and
        from then on leave the sampler's own requests out of every sample's counters."""
        for series, value in first.counters.items():
            if series.startswith("edge_requests_total{") and value >= 1:
                self.stats_series = series  # the only counted request it has seen so far
        first.counters = without_sampler(first.counters, self.stats_series, self.stats_calls)
        self.learnt = True

    async def sample(self, t: float) -> Sample:
        stats: dict[str, int] | None = None
        counters: dict[str, float] = {}
        healthz: float | None = None
        timeout = aiohttp.ClientTimeout(total=10)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            started = time.monotonic()
            async with self.http.get(self.base + "/healthz", timeout=timeout) as response:
                await response.read()
                healthz = (time.monotonic() - started) * 1000
        proc = proc_view(self.pid)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            self.stats_calls += 1
            async with self.http.get(
                self.base + "/_edge/stats", headers=self.auth, timeout=timeout
            ) as response:
                if response.status == 200:
                    stats = await response.json()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.http.get(self.base + "/metrics", timeout=timeout) as response:
                counters = parse_counters(await response.text())
        if self.learnt:
            counters = without_sampler(counters, self.stats_series, self.stats_calls)
        return Sample(t, stats, proc, counters, healthz)


HEADER = (
    f"{'t_s':>6} {'req/s':>6} "
    + " ".join(f"{SHORT[o]:>4}" for o in SHORT)
    + f" | {'rss':>6} {'/proc':>6} {'thr':>4} {'/proc':>5} {'fds':>4} {'/proc':>5}"
    f" {'tasks':>5} {'bg':>3} {'xf':>3} {'q':>3} {'resMiB':>6} {'hz_ms':>6}"
)


def without_sampler(counters: dict[str, float], series: str, calls: int) -> dict[str, float]:
    """``counters`` less the sampler's own /_edge/stats requests."""
    adjusted = dict(counters)
    if series in adjusted:
        adjusted[series] -= calls
    return adjusted


def row(sample: Sample, previous: Sample | None) -> str:
    outcomes = label_sum(sample.counters, "edge_requests_total", "outcome")
    before = (
        label_sum(previous.counters, "edge_requests_total", "outcome") if previous else Counter()
    )
    span = sample.t - previous.t if previous else 0.0
    total = sum(outcomes.values()) - sum(before.values())
    rate = f"{total / span:6.1f}" if span > 0 else f"{'-':>6}"
    deltas = " ".join(f"{outcomes[o] - before[o]:>4}" for o in SHORT)
    if not sample.counters or (previous is not None and not previous.counters):
        rate, deltas = f"{'-':>6}", " ".join(f"{'-':>4}" for _ in SHORT)  # /metrics failed
    s, p = sample.stats, sample.proc

    def num(value: float | None, fmt: str, width: int) -> str:
        return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"

    return (
        f"{sample.t:6.0f} {rate} {deltas} | "
        f"{num(s['rss_bytes'] / MiB if s else None, '.1f', 6)} {p['rss_bytes'] / MiB:6.1f} "
        f"{num(s['threads'] if s else None, 'd', 4)} {p['threads']:5d} "
        f"{num(s['open_fds'] if s else None, 'd', 4)} {p['open_fds']:5d} "
        f"{num(s['asyncio_tasks'] if s else None, 'd', 5)} "
        f"{num(s['background_tasks'] if s else None, 'd', 3)} "
        f"{num(s['transforms_in_progress'] if s else None, 'd', 3)} "
        f"{num(s['queue_depth'] if s else None, 'd', 3)} "
        f"{num(s['memory_reserved_bytes'] / MiB if s else None, '.1f', 6)} "
        f"{num(sample.healthz_ms, '.1f', 6)}"
    )


# --------------------------------------------------------------------------- analysis


@dataclass
class Fit:
    n: int
    mean: float
    slope: float  # per second
    stderr: float  # of the slope, per second
    first: float  # mean of the first quarter of the window
    last: float  # mean of the last quarter

    @property
    def per_hour(self) -> float:
        return self.slope * 3600

    @property
    def suspicious(self) -> bool:
        """A slope clearly above zero (> 2 standard errors) that is not negligible."""
        return self.slope > 2 * self.stderr and self.per_hour > 0.02 * max(self.mean, 1.0)


def least_squares(points: Sequence[tuple[float, float]]) -> Fit | None:
    n = len(points)
    if n < 3:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    residual = sum((y - (my + slope * (x - mx))) ** 2 for x, y in points)
    stderr = math.sqrt(residual / (n - 2) / sxx)
    quarter = max(1, n // 4)
    ys = [y for _, y in points]
    return Fit(n, my, slope, stderr, sum(ys[:quarter]) / quarter, sum(ys[-quarter:]) / quarter)


def warm_up(duration: float) -> float:
    """Seconds skipped before fitting: the larger of 20% of the run and 60 s (capped)."""
    return min(max(0.2 * duration, 60.0), 0.5 * duration)


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def edge_environment(
    args: argparse.Namespace, port: int, origin: str, token: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(
        EDGE_HOST=HOST,
        EDGE_PORT=str(port),
        EDGE_ORIGIN=origin,
        EDGE_LOG_LEVEL="warning",
        EDGE_ADMIN_TOKEN=token,
        EDGE_BACKEND_TIMEOUT=str(args.budget),
        EDGE_CACHE="memory",
        EDGE_CACHE_MEMORY_BYTES=args.cache_bytes,
        EDGE_SHUTDOWN_GRACE="5",
    )
    return env


async def wait_healthy(
    http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes]
) -> bool:
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(base + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return True
        await asyncio.sleep(0.2)
    return False


def stop_edge(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


# --------------------------------------------------------------------------- the run


@dataclass
class Edge:
    """The edge process this run started, and where it listens."""

    proc: subprocess.Popen[bytes]
    base: str
    token: str
    origin_port: int
    log_file: Any


def start_edge(args: argparse.Namespace, log_file: Any) -> Edge:
    origin_port, edge_port = free_port(), free_port()
    token = secrets.token_urlsafe(24)
    env = edge_environment(args, edge_port, f"http://{HOST}:{origin_port}/", token)
    proc = subprocess.Popen(
        [args.python, "-m", "edge"],
        cwd=REPO,
        env=env,
        stdout=log_file,
        stderr=log_file,
        start_new_session=True,
    )
    return Edge(proc, f"http://{HOST}:{edge_port}", token, origin_port, log_file)


async def soak(args: argparse.Namespace, edge: Edge) -> tuple[int, dict[str, Any] | None]:
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # the origin's resets are on purpose
    origin = MisbehavingOrigin(stall=args.budget * 2.5)
    runner = web.AppRunner(origin.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, edge.origin_port).start()
        return await _drive(args, origin, edge.proc, edge.base, edge.token, edge.log_file)
    finally:
        await runner.cleanup()


async def _drive(
    args: argparse.Namespace,
    origin: MisbehavingOrigin,
    proc: subprocess.Popen[bytes],
    base: str,
    token: str,
    log_file: Any,
) -> tuple[int, dict[str, Any] | None]:
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=connector) as control:
        if not await wait_healthy(control, base, proc):
            print("edge did not become healthy; its log:", file=sys.stderr)
            _print_log(log_file, sys.stderr, limit=40)
            return 1, None
        sampler = Sampler(control, base, token, proc.pid)
        idle_before = await sampler.sample(0.0)
        if idle_before.stats is None:
            print("GET /_edge/stats failed: is EDGE_ADMIN_TOKEN supported?", file=sys.stderr)
            return 1, None
        sampler.learn_stats_series(idle_before)
        _print_config(args, proc.pid)
        load = Load(random.Random(args.seed))
        timeout = aiohttp.ClientTimeout(total=args.budget * 4 + 10)
        load_connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
        async with aiohttp.ClientSession(connector=load_connector, timeout=timeout) as client:
            started = time.monotonic()
            stop_at = started + args.duration
            workers = [
                asyncio.create_task(load_worker(client, base, load, stop_at, args.max_requests))
                for _ in range(args.concurrency)
            ]
            samples = await _watch(args, sampler, proc, started, workers)
            load.stopping = True
            for task in workers:
                task.cancel()
            done, pending = await asyncio.wait(workers, timeout=args.budget * 4 + 15)
            elapsed = time.monotonic() - started
        crashed = [t.exception() for t in done if not t.cancelled() and t.exception()]
        if pending:
            crashed.append(RuntimeError(f"{len(pending)} load workers did not stop"))
        last = samples[-1]
        if proc.poll() is not None or (last.healthz_ms is None and last.stats is None):
            print(
                f"\nedge died or stopped answering at t={last.t:.0f} s "
                f"(exit status {proc.poll()}); the run is void. Its log:"
            )
            _print_log(log_file, sys.stdout, limit=40)
            return 1, None
        idle_after = await _settle(args, sampler, started, samples[-1])
        report = _report(args, samples, idle_before, idle_after, load, origin, sampler, elapsed)
        _print_log_summary(log_file)
        if crashed:
            print(f"load workers failed: {crashed[:3]}")
    return 0, report


async def _watch(
    args: argparse.Namespace,
    sampler: Sampler,
    proc: subprocess.Popen[bytes],
    started: float,
    workers: list[asyncio.Task[None]],
) -> list[Sample]:
    print(HEADER, flush=True)
    samples: list[Sample] = []
    previous: Sample | None = None
    next_at = started
    while True:
        sample = await sampler.sample(time.monotonic() - started)
        samples.append(sample)
        print(row(sample, previous), flush=True)
        previous = sample
        if proc.poll() is not None or (sample.healthz_ms is None and sample.stats is None):
            return samples  # edge died or stopped answering: _drive reports it
        if all(task.done() for task in workers):
            return samples
        next_at += args.interval
        pause = next_at - time.monotonic()
        done, _ = await asyncio.wait(workers, timeout=max(0.0, pause))
        if len(done) == len(workers):
            sample = await sampler.sample(time.monotonic() - started)
            samples.append(sample)
            print(row(sample, previous), flush=True)
            return samples


async def _settle(
    args: argparse.Namespace, sampler: Sampler, started: float, previous: Sample
) -> Sample:
    """Edge with no load: stalled origin answers end within the budget, and edge trims
    malloc arenas on an idle tick (every 30 s); the last of these samples is 'idle after'."""
    print(f"-- load stopped; {args.settle:g} s without load --", flush=True)
    settle_until = time.monotonic() + args.settle
    sample = previous
    while True:
        await asyncio.sleep(max(0.0, min(5.0, settle_until - time.monotonic())))
        sample, previous = await sampler.sample(time.monotonic() - started), sample
        print(row(sample, previous), flush=True)
        if time.monotonic() >= settle_until:
            return sample


def _print_config(args: argparse.Namespace, pid: int) -> None:
    mix = ", ".join(f"{name} {weight:g}" for name, weight in MIX.items())
    print(
        f"edge pid {pid}; duration {args.duration:g} s, concurrency {args.concurrency}, "
        f"sample every {args.interval:g} s, budget {args.budget:g} s, "
        f"memory tier {args.cache_bytes}, seed {args.seed}\nmix (weights): {mix}\n"
        "columns: outcomes per interval from edge_requests_total; rss in MiB and threads/fds "
        "from /_edge/stats with /proc/<pid> beside; tasks = asyncio tasks, bg = background "
        "tasks, xf = transforms in progress, q = queue depth, hz_ms = /healthz latency\n",
        flush=True,
    )


def _report(
    args: argparse.Namespace,
    samples: list[Sample],
    idle_before: Sample,
    idle_after: Sample,
    load: Load,
    origin: MisbehavingOrigin,
    sampler: Sampler,
    elapsed: float,
) -> dict[str, Any]:
    skip = warm_up(args.duration)
    print(
        f"\n== drift after warm-up (samples under load with t >= {skip:.0f} s; "
        "least-squares slope) =="
    )
    print(
        f"{'metric':<14} {'n':>3} {'mean':>9} {'first1/4':>9} {'last1/4':>9} "
        f"{'slope/h':>10} {'+-2se/h':>9} {'%mean/h':>8}  verdict"
    )
    fits: dict[str, Any] = {}
    for metric in (*WATCHED, "proc_rss_mib", "proc_fds", "proc_threads"):
        points = [
            (s.t, v)
            for s in samples
            if skip <= s.t < args.duration - 1 and (v := _value(s, metric)) is not None
        ]
        fit = least_squares(points)
        if fit is None:
            print(f"{metric:<14} not enough samples")
            continue
        share = 100 * fit.per_hour / fit.mean if fit.mean else 0.0
        verdict = "RISING" if fit.suspicious else "flat"
        print(
            f"{metric:<14} {fit.n:>3} {fit.mean:>9.1f} {fit.first:>9.1f} {fit.last:>9.1f} "
            f"{fit.per_hour:>+10.2f} {2 * fit.stderr * 3600:>9.2f} {share:>+7.1f}%  {verdict}"
        )
        fits[metric] = {
            "n": fit.n,
            "mean": fit.mean,
            "per_hour": fit.per_hour,
            "two_se_per_hour": 2 * fit.stderr * 3600,
            "first_quarter": fit.first,
            "last_quarter": fit.last,
            "verdict": verdict,
        }
    probes = [s.healthz_ms for s in samples if s.healthz_ms is not None]
    print(
        f"/healthz latency under load (event-loop responsiveness): p50 "
        f"{percentile(probes, 0.5):.1f} ms, max {max(probes, default=float('nan')):.1f} ms, "
        f"{len(samples) - len(probes)} probes failed"
    )
    print(f"\n== idle before the load vs idle after it ({args.settle:g} s after the load) ==")
    idle: dict[str, Any] = {}
    for key in (
        "rss_bytes",
        "open_fds",
        "threads",
        "asyncio_tasks",
        "background_tasks",
        "transforms_in_progress",
        "queue_depth",
        "memory_reserved_bytes",
    ):
        before = (idle_before.stats or {}).get(key)
        after = (idle_after.stats or {}).get(key)
        scale = MiB if key.endswith("bytes") else 1
        shown = [f"{v / scale:.1f}" if v is not None else "-" for v in (before, after)]
        print(f"{key:<24} {shown[0]:>10} -> {shown[1]:>10}")
        idle[key] = [before, after]

    first, last = idle_before.counters, idle_after.counters
    outcomes = label_sum(last, "edge_requests_total", "outcome")
    outcomes.subtract(label_sum(first, "edge_requests_total", "outcome"))
    total = sum(outcomes.values())
    print(f"\n== requests by outcome (edge_requests_total, {elapsed:.0f} s of load) ==")
    for outcome in OUTCOMES:
        if outcomes[outcome]:
            print(f"{outcome:<16} {outcomes[outcome]:>9} {100 * outcomes[outcome] / total:6.1f}%")
    print(f"{'total':<16} {total:>9}   {total / elapsed:.1f} req/s")
    codes = label_sum(last, "edge_requests_total", "code")
    codes.subtract(label_sum(first, "edge_requests_total", "code"))
    print(
        f"(the sampler's {sampler.stats_calls} GET /_edge/stats are left out; edge counted "
        f"them as {sampler.stats_series})"
    )
    print("by status: " + ", ".join(f"{c} {n}" for c, n in sorted(codes.items()) if n))
    families = {}
    for family, label in (
        ("edge_client_disconnects_total", "stage"),
        ("edge_backend_timeouts_total", "stage"),
        ("edge_load_shed_total", "reason"),
        ("edge_cache_requests_total", "result"),
        ("edge_origin_requests_total", "code"),
    ):
        delta = label_sum(last, family, label)
        delta.subtract(label_sum(first, family, label))
        families[family] = {k: v for k, v in delta.items() if v}
        print(f"{family}: " + ", ".join(f"{k} {v}" for k, v in sorted(families[family].items())))

    completed = sum(sum(t.statuses.values()) for t in load.tallies.values())
    print(f"\n== the load generator's view ({load.sent} sent, {completed / elapsed:.1f}/s) ==")
    classes: dict[str, Any] = {}
    for name in MIX:
        tally = load.tally(name)
        lat = tally.latencies
        statuses = ", ".join(f"{s} {n}" for s, n in tally.statuses.most_common())
        cache = ", ".join(f"{s} {n}" for s, n in tally.cache.most_common())
        print(
            f"{name:<11} p50 {percentile(lat, 0.5) * 1000:7.1f} ms  p99 "
            f"{percentile(lat, 0.99) * 1000:7.1f} ms  {statuses}"
            + (f"  [cache: {cache}]" if cache else "")
        )
        classes[name] = {
            "statuses": dict(tally.statuses),
            "cache": dict(tally.cache),
            "p50_ms": percentile(lat, 0.5) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000,
        }
    if load.transport_errors:
        print(
            "client transport errors: "
            + ", ".join(f"{k} {v}" for k, v in load.transport_errors.items())
        )
    print(
        "origin saw: "
        + ", ".join(f"{k} {v}" for k, v in sorted(origin.seen.items()))
        + "; answers abandoned by edge mid-way: "
        + (", ".join(f"{k} {v}" for k, v in sorted(origin.abandoned.items())) or "none")
    )
    return {
        "config": {k: v for k, v in vars(args).items() if k != "python"},
        "elapsed_s": elapsed,
        "warm_up_s": skip,
        "samples": [
            {
                "t": s.t,
                "stats": s.stats,
                "proc": s.proc,
                "healthz_ms": s.healthz_ms,
                "outcomes": dict(label_sum(s.counters, "edge_requests_total", "outcome")),
            }
            for s in samples
        ],
        "fits": fits,
        "idle": idle,
        "outcomes": {k: v for k, v in outcomes.items() if v},
        "throughput_rps": total / elapsed,
        "families": families,
        "classes": classes,
        "origin_seen": dict(origin.seen),
        "origin_abandoned": dict(origin.abandoned),
    }


def _value(sample: Sample, metric: str) -> float | None:
    if metric == "proc_rss_mib":
        return sample.proc["rss_bytes"] / MiB
    if metric == "proc_fds":
        return float(sample.proc["open_fds"])
    if metric == "proc_threads":
        return float(sample.proc["threads"])
    return sample.value(metric)


def _read_log(log_file: Any) -> list[str]:
    log_file.flush()
    log_file.seek(0)
    data: bytes = log_file.read()
    return data.decode(errors="replace").splitlines()


def _print_log(log_file: Any, stream: Any, *, limit: int) -> None:
    for line in _read_log(log_file)[-limit:]:
        print(line, file=stream)


def _print_log_summary(log_file: Any) -> None:
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    for line in _read_log(log_file):
        try:
            record = json.loads(line)
        except ValueError:
            levels["(not json)"] += 1
            continue
        level = str(record.get("level", "?"))
        levels[level] += 1
        text = " / ".join(str(record.get("message", "")).split("\n"))
        messages[f"{level}: {text[:110]}"] += 1
    print(
        "\nedge's log (level warning and above): "
        + (", ".join(f"{k} {v}" for k, v in levels.items()) or "empty")
    )
    for message, count in messages.most_common(8):
        print(f"  {count:>6} x {message}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=8, help="load connections")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--max-requests", type=int, default=1_000_000, help="stop after this many requests"
    )
    parser.add_argument("--budget", type=float, default=2.0, help="EDGE_BACKEND_TIMEOUT, s")
    parser.add_argument("--cache-bytes", default="32MiB", help="EDGE_CACHE_MEMORY_BYTES")
    parser.add_argument(
        "--settle", type=float, default=40.0, help="seconds sampled without load at the end"
    )
    parser.add_argument("--seed", type=int, default=1, help="load generator seed")
    parser.add_argument("--python", default=default_python(), help="interpreter that runs edge")
    parser.add_argument("--json", metavar="PATH", help="also write samples and summary here")
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # rows show up as they are taken
    if args.duration <= 0 or args.concurrency < 1 or args.interval <= 0:
        parser.error("--duration, --concurrency and --interval must be positive")
    if not IMAGES.is_dir():
        print(f"soak: sample images not found at {IMAGES}", file=sys.stderr)
        return 1
    with tempfile.TemporaryFile() as log_file:
        edge = start_edge(args, log_file)
        try:
            code, report = asyncio.run(soak(args, edge))
        finally:
            print(f"\nedge exited with status {stop_edge(edge.proc)} after SIGTERM")
    if report is not None and args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"samples and summary written to {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
