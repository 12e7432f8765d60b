"""Real redis-server and memcached for tests, each on a free loopback port in a temp dir.

The distribution's packages may run their own servers on the default ports; tests never
touch those. A missing binary skips the test on a developer machine and fails it in CI
(where the packages are installed), so a broken CI image cannot pass by skipping.

Use the fixtures by importing them under their function names, e.g.
``from tests.services import redis_server_fixture  # noqa: F401``, and asking for
``redis_server`` / ``memcached_server`` in a test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

STARTUP_SECONDS = 10.0
PORT_ATTEMPTS = 3


class Service:
    """One running server process: where it listens, and ways to break it on purpose."""

    def __init__(self, scheme: str, process: subprocess.Popen[bytes], port: int) -> None:
        self.scheme = scheme
        self.process = process
        self.host = "127.0.0.1"
        self.port = port
        self._paused = False

    @property
    def url(self) -> str:
        suffix = "/0" if self.scheme == "redis" else ""
        return f"{self.scheme}://{self.host}:{self.port}{suffix}"

    def kill(self) -> None:
        """Kill the server outright (SIGKILL) and reap it: connections drop, ports close."""
        self.resume()
        self.process.kill()
        self.process.wait(timeout=STARTUP_SECONDS)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers.

        Returns once the kernel reports the process stopped: the signal is delivered
        asynchronously, and a request sent before that could still be answered."""
        self.process.send_signal(signal.SIGSTOP)
        self._paused = True
        stat = Path(f"/proc/{self.process.pid}/stat")
        give_up = time.monotonic() + STARTUP_SECONDS
        while stat.read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
            if time.monotonic() > give_up:
                raise RuntimeError("the server did not stop on SIGSTOP")
            time.sleep(0.001)

    def resume(self) -> None:
        if self._paused and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        """Stop the server for good; a throwaway server needs no graceful shutdown."""
        if self.process.poll() is None:
            self.kill()


def require_binary(name: str) -> str:
    """The path of ``name``; skip without it locally, fail without it in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install {name.removesuffix('-server')})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis(workdir: Path) -> Service:
    binary = require_binary("redis-server")

    def command(port: int) -> list[str]:
        return [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--protected-mode", "no",
        ]  # fmt: skip

    return _start("redis", command, b"PING\r\n", b"+PONG", workdir)


def start_memcached(workdir: Path, *, max_item_size: str = "1m") -> Service:
    binary = require_binary("memcached")
    as_root = ["-u", "root"] if os.geteuid() == 0 else []

    def command(port: int) -> list[str]:
        return [
            binary,
            "-p", str(port),
            "-U", "0",
            "-l", "127.0.0.1",
            "-m", "64",
            "-I", max_item_size,
            *as_root,
        ]  # fmt: skip

    return _start("memcached", command, b"version\r\n", b"VERSION", workdir)


def _start(
    scheme: str,
    command: Callable[[int], list[str]],
    probe: bytes,
    expected: bytes,
    workdir: Path,
) -> Service:
    for _ in range(PORT_ATTEMPTS):
        # another process may take the port between probing and binding: try a new one
        port = free_port()
        with (workdir / f"{scheme}-{port}.log").open("wb") as log:
            process = subprocess.Popen(
                command(port), stdout=log, stderr=subprocess.STDOUT, cwd=workdir
            )
        service = Service(scheme, process, port)
        if _wait_until_answering(service, probe, expected):
            return service
        service.stop()
    pytest.fail(f"{scheme} did not start; see the logs in {workdir}")


def _wait_until_answering(service: Service, probe: bytes, expected: bytes) -> bool:
    give_up = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < give_up and service.process.poll() is None:
        if _answers(service, probe, expected):
            return True
        time.sleep(0.01)  # polling for a condition with a bound, not hoping for timing
    return False


def _answers(service: Service, probe: bytes, expected: bytes) -> bool:
    try:
        with socket.create_connection((service.host, service.port), timeout=1.0) as conn:
            conn.sendall(probe)
            return conn.recv(64).startswith(expected)
    except OSError:
        return False


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[Service]:
    """A fresh, empty redis-server for one test."""
    service = start_redis(tmp_path)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(name="memcached_server")
def memcached_server_fixture(tmp_path: Path) -> Iterator[Service]:
    """A fresh, empty memcached (1 MiB item limit) for one test."""
    service = start_memcached(tmp_path)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(name="raw_redis")
async def raw_redis_fixture(redis_server: Service) -> AsyncIterator[redis.Redis]:
    """A plain client on the test's redis-server, to plant or inspect raw values."""
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    await client.aclose()
