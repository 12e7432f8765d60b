"""EDGE_WORKERS and EDGE_METRICS_PORT: real ``python -m edge`` processes on loopback.

Which worker served what is read from the workers' own metric files (prometheus_client
writes one file per process into the directory the supervisor creates under TMPDIR), so
no test needs a header or log field that exists only for tests.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from edge import __version__
from edge.app import METRICS_FLUSH_INTERVAL, SERVICE, WORKER, create_app
from edge.settings import SettingsError, load_settings
from edge.workers import MULTIPROC_ENV, WorkerRole, share
from tests.conftest import REPO
from tests.helpers import metric

IMAGE = "/photo-1200x980.jpg?width=40"
READY = re.compile(r"^worker (\d+) ready \(pid (\d+)\)$")
WAIT = 60.0


# --- helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str) -> tuple[int, bytes]:
    """One request on a fresh connection (a new source port each time, so the kernel
    spreads them over the workers' sockets)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def samples(
    port: int, path: str = "/metrics"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(port, path)
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(value for (sample, _), value in found.items() if sample == name)


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll for evidence (a log line, a file, a count) until it shows or time runs out."""
    if not shows_within(check, timeout):
        pytest.fail(f"timed out waiting for {what}")


def shows_within(check: Callable[[], bool], seconds: float) -> bool:
    """Whether ``check`` comes true within ``seconds`` (polled every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Edge:
    """``python -m edge`` with its log in a file; stopped (and waited for) at teardown."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.tmp = tmp_path
        self.log = tmp_path / "edge.log"
        environ = {
            k: v for k, v in os.environ.items() if not k.startswith("EDGE_") and k != MULTIPROC_ENV
        }
        environ.update(
            EDGE_HOST="127.0.0.1",
            EDGE_PORT=str(free_port()),
            EDGE_LOG_FORMAT="json",
            EDGE_SHUTDOWN_GRACE="5",
            TMPDIR=str(tmp_path),
        )
        environ.update(env)
        self.port = int(environ["EDGE_PORT"])
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge"],
                env=environ,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def messages(self) -> list[str]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                record: Any = json.loads(line)
            except ValueError:
                continue  # a traceback's lines
            if isinstance(record, dict) and "message" in record:
                found.append(str(record["message"]))
        return found

    def ready_workers(self) -> dict[int, int]:
        """Worker index -> pid of its latest ready process, from the supervisor's log."""
        ready: dict[int, int] = {}
        for message in self.messages():
            if match := READY.match(message):
                ready[int(match[1])] = int(match[2])
        return ready

    def wait_for_log(self, pattern: str) -> None:
        wait_until(lambda: any(re.search(pattern, m) for m in self.messages()), pattern)

    def metrics_dir(self) -> Path:
        (found,) = self.tmp.glob("edge-metrics-*")
        return found

    def served_by(self, pid: int) -> float:
        """edge_requests_total counted by one worker process, from its own file."""
        source = self.metrics_dir() / f"counter_{pid}.db"
        if not source.exists():
            return 0.0
        own = self.tmp / f"pid-{pid}"
        own.mkdir(exist_ok=True)
        shutil.copy(source, own / source.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(own))
        return sum(
            sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name == "edge_requests_total"
        )

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=WAIT)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Edge]]:
    started: list[Edge] = []

    def start_edge(**env: str) -> Edge:
        edge = Edge(tmp_path, **env)
        started.append(edge)
        return edge

    yield start_edge
    for edge in started:
        edge.close()


def hammer_until(edge: Edge, done: Callable[[], bool], limit: int = 400) -> int:
    """Send image requests (each on a new connection), ten at a time, until ``done``;
    how many were sent. Between batches ``done`` gets a metrics flush's time to come
    true: a worker writes its counts to the shared files once a second."""
    sent = 0
    while not shows_within(done, METRICS_FLUSH_INTERVAL + 0.5):
        assert sent < limit, "the kernel never spread connections over both workers"
        for _ in range(10):
            status, _ = get(edge.port, IMAGE)
            assert status == 200
            sent += 1
    return sent


# --- several workers ----------------------------------------------------------------------


@pytest.mark.slow
def test_workers_share_the_port_aggregate_metrics_and_are_replaced(
    start: Callable[..., Edge],
) -> None:
    edge = start(EDGE_WORKERS="2", EDGE_MEMORY_LIMIT="1GiB", EDGE_MAX_CONCURRENCY="3")
    wait_until(lambda: len(edge.ready_workers()) == 2, "two workers ready")
    pids = edge.ready_workers()
    assert len(set(pids.values())) == 2

    # Both processes accept connections on the one port.
    sent = hammer_until(edge, lambda: all(edge.served_by(pid) > 0 for pid in pids.values()))
    wait_until(lambda: sum(edge.served_by(pid) for pid in pids.values()) == sent, "counts")

    # Whichever worker answers /metrics reports both.
    for _ in range(4):
        found = samples(edge.port)
        assert total(found, "edge_requests_total") == sent
        assert found[("edge_requests_total", (("code", "200"), ("outcome", "ok")))] == sent
        assert found[("edge_request_duration_seconds_count", (("outcome", "ok"),))] == sent
        assert found[("edge_inflight_requests", ())] == 0
        assert found[("edge_memory_limit_bytes", ())] == 1024**3  # the whole, not a share
        assert found[("edge_build_info", (("version", __version__),))] == 1
        rss = {labels: v for (name, labels), v in found.items() if "resident" in name}
        assert set(rss) == {(("worker", "0"),), (("worker", "1"),)}
        assert all(value > 10_000_000 for value in rss.values())
        assert not [name for name, _ in found if name.startswith("process_")]

    # A worker killed outright is replaced; totals never go backwards.
    killed = pids[0]
    os.kill(killed, signal.SIGKILL)
    began = time.monotonic()
    wait_until(lambda: edge.ready_workers()[0] != killed, "a replacement for worker 0")
    replaced_after = time.monotonic() - began
    print(f"worker 0 replaced {replaced_after:.2f} s after SIGKILL")
    replacement = edge.ready_workers()[0]
    assert not alive(killed)
    assert any(
        re.match(rf"worker 0 \(pid {killed}\) was killed by SIGKILL", m) for m in edge.messages()
    )
    assert not (edge.metrics_dir() / f"gauge_livesum_{killed}.db").exists()  # its gauges dropped
    assert edge.process.poll() is None

    sent += hammer_until(edge, lambda: edge.served_by(replacement) > 0)
    wait_until(lambda: total(samples(edge.port), "edge_requests_total") == sent, "the new total")
    found = samples(edge.port)
    assert edge.served_by(killed) + edge.served_by(replacement) + edge.served_by(pids[1]) == sent
    assert found[("edge_worker_resident_memory_bytes", (("worker", "0"),))] > 10_000_000
    assert found[("edge_inflight_requests", ())] == 0

    # SIGTERM: each worker drains, the supervisor exits 0 and leaves nothing behind.
    assert edge.stop() == 0
    messages = edge.messages()
    assert messages.count("shutting down: draining in-flight requests for up to 5.0s") == 2
    assert f"worker 0 (pid {replacement}) exited with status 0" in messages
    assert f"worker 1 (pid {pids[1]}) exited with status 0" in messages
    assert not alive(replacement)
    assert not alive(pids[1])
    assert not list(edge.tmp.glob("edge-metrics-*"))


@pytest.mark.slow
def test_metrics_port_with_workers_is_served_by_the_supervisor(
    start: Callable[..., Edge], tmp_path: Path
) -> None:
    metrics_port = free_port()
    # Left by a supervisor that was killed (no such pid), and one still in use (ours).
    stale, in_use = (
        tmp_path / "edge-metrics-999999999-x",
        tmp_path / f"edge-metrics-{os.getpid()}-y",
    )
    stale.mkdir()
    in_use.mkdir()
    edge = start(EDGE_WORKERS="2", EDGE_METRICS_PORT=str(metrics_port))
    wait_until(lambda: len(edge.ready_workers()) == 2, "two workers ready")
    assert not stale.exists()
    assert in_use.exists()
    for _ in range(12):
        assert get(edge.port, IMAGE)[0] == 200
        assert get(edge.port, "/metrics")[0] == 404
    wait_until(lambda: total(samples(metrics_port), "edge_requests_total") == 12, "12 counted")
    found = samples(metrics_port)
    assert found[("edge_requests_total", (("code", "200"), ("outcome", "ok")))] == 12
    assert not [name for name, _ in found if name.startswith("process_")]
    assert get(metrics_port, "/")[0] == 404
    assert edge.stop() == 0
    assert [p.name for p in tmp_path.glob("edge-metrics-*")] == [in_use.name]


def test_metrics_port_in_a_single_process(start: Callable[..., Edge]) -> None:
    metrics_port = free_port()
    edge = start(EDGE_METRICS_PORT=str(metrics_port))
    edge.wait_for_log(r"^edge listening on ")
    for _ in range(3):
        assert get(edge.port, IMAGE)[0] == 200
    assert get(edge.port, "/metrics")[0] == 404
    wait_until(lambda: total(samples(metrics_port), "edge_requests_total") == 3, "3 counted")
    found = samples(metrics_port)
    assert found[("process_resident_memory_bytes", ())] > 0
    assert found[("edge_worker_resident_memory_bytes", (("worker", "0"),))] > 0
    assert get(metrics_port, "/healthz")[0] == 404
    assert not list(edge.tmp.glob("edge-metrics-*"))  # no multi-process files
    assert edge.stop() == 0


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_service(start: Callable[..., Edge]) -> None:
    edge = start(EDGE_WORKERS="2", EDGE_ERROR_IMAGE="no-such-image.jpg")
    assert edge.process.wait(timeout=WAIT) == 1
    messages = edge.messages()
    failed = [m for m in messages if re.match(r"worker \d \(pid \d+\) could not start", m)]
    assert failed
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", " ".join(messages))]
    assert pids
    assert not [pid for pid in pids if alive(pid)]
    assert not list(edge.tmp.glob("edge-metrics-*"))


def test_a_taken_port_fails_at_once(start: Callable[..., Edge]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        edge = start(EDGE_WORKERS="2", EDGE_PORT=str(taken.getsockname()[1]))
        assert edge.process.wait(timeout=WAIT) == 1
    assert any("cannot listen on 127.0.0.1:" in m for m in edge.messages())
    assert not list(edge.tmp.glob("edge-metrics-*"))


def test_metrics_port_must_differ_from_the_port(start: Callable[..., Edge]) -> None:
    port = str(free_port())
    edge = start(EDGE_PORT=port, EDGE_METRICS_PORT=port)
    assert edge.process.wait(timeout=WAIT) == 2
    assert "EDGE_METRICS_PORT must differ from EDGE_PORT" in edge.log.read_text()


# --- in-process ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("concurrency", "index", "slots", "memory"),
    [("5", 0, 3, 500_000_001), ("5", 1, 2, 500_000_000), ("1", 1, 1, 500_000_000)],
)
async def test_a_worker_enforces_its_share_and_reports_the_whole(
    aiohttp_client: Any, concurrency: str, index: int, slots: int, memory: int
) -> None:
    settings = load_settings(
        {
            "EDGE_WORKERS": "2",
            "EDGE_MAX_CONCURRENCY": concurrency,
            "EDGE_MEMORY_LIMIT": "1000000001",
            "EDGE_CACHE": "none",
        }
    )
    app = create_app(settings, registry=CollectorRegistry())
    app[WORKER] = WorkerRole(index, 2, metrics_dir="unused")
    client = await aiohttp_client(app)
    admission = app[SERVICE].admission
    assert (admission.slots, admission.memory_limit) == (slots, memory)
    assert admission.queue_size == 4 * slots
    assert await metric(client, "edge_memory_limit_bytes") == 1_000_000_001
    assert await metric(client, "edge_worker_resident_memory_bytes", worker=str(index)) > 0


def test_shares_add_up_to_the_whole() -> None:
    for whole in range(40):
        for parts in range(1, 9):
            shares = [share(whole, parts, i) for i in range(parts)]
            assert sum(shares) == whole
            assert max(shares) - min(shares) <= 1


def test_worker_settings() -> None:
    assert (load_settings({}).workers, load_settings({}).metrics_port) == (1, None)
    parsed = load_settings({"EDGE_WORKERS": "4", "EDGE_METRICS_PORT": "9100"})
    assert (parsed.workers, parsed.metrics_port) == (4, 9100)
    with pytest.raises(SettingsError) as caught:
        load_settings({"EDGE_WORKERS": "0", "EDGE_METRICS_PORT": "0"})
    assert len(caught.value.problems) == 2
