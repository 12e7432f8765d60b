"""EDGE_WORKERS: several worker processes sharing one port, kept alive by a supervisor.

With EDGE_WORKERS=1 (the default) there is no supervisor: ``edge`` serves in its own
process, and a crash takes that process down; the orchestrator's restart policy
(Kubernetes, systemd, compose ``restart:``) brings it back.

With EDGE_WORKERS=N > 1 the ``edge`` process becomes a supervisor that serves no
requests itself:

- It reserves EDGE_HOST:EDGE_PORT with a bound but never listening SO_REUSEPORT socket:
  a port already taken fails at once, EDGE_PORT=0 picks one port for every worker, and
  no other program can take the port while a worker is being replaced.
- It creates a fresh, empty prometheus_client multi-process directory in the temporary
  directory (TMPDIR) and removes it on exit (see ``edge.metrics``); one left behind by
  a supervisor that was killed is removed at the next start.
- It starts N fresh interpreters (``python -m edge worker``; never a fork, so libvips'
  threads and an event loop are never copied half-alive). Each binds the same address
  with SO_REUSEPORT and the kernel spreads new connections over them (Linux). Worker
  ``i`` gets its share of EDGE_MAX_CONCURRENCY and EDGE_MEMORY_LIMIT (the shares add up
  to the whole; at least one transform slot each) and has its own queue and memory
  cache tier.
- A worker that dies is replaced: at once if it had been up for ``STABLE_AFTER``
  seconds, else after a back-off doubling from ``FIRST_BACKOFF`` to ``MAX_BACKOFF``.
  Each death is logged with its exit status. Its live gauges are dropped; its counters
  and histograms stay, so totals never go backwards. Connections the kernel had already
  queued on the dead worker's socket are reset; new ones go to the others.
- A worker that cannot start at all the first time (for example a missing
  EDGE_ERROR_IMAGE) stops the whole service with status 1: restarting cannot fix it.
- SIGTERM or SIGINT is forwarded to every worker as SIGTERM; each drains like a single
  process does (readyz 503, EDGE_SHUTDOWN_GRACE). The supervisor exits 0 when every
  worker exited cleanly, else 1; a worker still running ``KILL_MARGIN`` seconds after
  twice the grace (requests, then after-response work) is killed.
- EDGE_METRICS_PORT is served by the supervisor itself, so scrapes never wait behind
  image work and keep working while workers are replaced. Without it, ``/metrics`` on
  the main port is answered by whichever worker gets the connection, aggregated.
- Workers ask Linux to SIGTERM them when the supervisor dies, so even a SIGKILLed
  supervisor leaves no orphan holding the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from edge.settings import Settings

log = logging.getLogger("edge.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_PREFIX = "edge-metrics-"
READY = b"R"
STABLE_AFTER = 10.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
KILL_MARGIN = 10.0
_PR_SET_PDEATHSIG = 1


def share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split in ``parts`` near-equal integers summing to it."""
    return total // parts + (1 if index < total % parts else 0)


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process knows about its place among its siblings."""

    index: int
    count: int
    metrics_dir: str
    ready_fd: int | None = None

    def share(self, total: int) -> int:
        """This worker's part of a whole-service amount."""
        return share(total, self.count, self.index)

    def announce_ready(self) -> None:
        """Tell the supervisor this worker is listening (once, then the pipe is closed)."""
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, READY)
            finally:
                os.close(self.ready_fd)


def die_with_supervisor(supervisor_pid: int) -> None:
    """Get SIGTERM when the supervisor dies (Linux); exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:
        raise SystemExit("edge worker: the supervisor has already gone")


def supervise(settings: Settings, environ: Mapping[str, str]) -> int:
    """Run EDGE_WORKERS worker processes until SIGTERM/SIGINT; the exit status."""
    return asyncio.run(Supervisor(settings, environ).run())


class BootFailure(Exception):
    """A worker exited before it ever listened, during the first start."""


class Supervisor:
    """Starts, watches, replaces and stops the worker processes."""

    def __init__(self, settings: Settings, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.environ = dict(environ)
        self.metrics_dir = ""
        self.port = settings.port
        self._running: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self._killer: asyncio.Task[None] | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop, signum)
        try:
            return await self._run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def _run(self) -> int:
        settings = self.settings
        if settings.max_concurrency is not None and settings.max_concurrency < settings.workers:
            log.warning(
                "EDGE_MAX_CONCURRENCY=%d is below EDGE_WORKERS=%d: each worker still runs "
                "one transform at a time",
                settings.max_concurrency,
                settings.workers,
            )
        try:
            reservation = _reserve(settings.host, settings.port)
        except OSError as exc:
            return _refuse(f"cannot listen on {settings.host}:{settings.port}: {exc}")
        self.port = reservation.getsockname()[1]
        self.metrics_dir = _fresh_metrics_dir()
        metrics_server: _MetricsServer | None = None
        try:
            if settings.metrics_port is not None:
                try:
                    metrics_server = _MetricsServer.start(
                        settings.host, settings.metrics_port, self.metrics_dir
                    )
                except OSError as exc:
                    return _refuse(f"cannot serve metrics on port {settings.metrics_port}: {exc}")
            return await self._supervise()
        finally:
            if metrics_server is not None:
                await asyncio.to_thread(metrics_server.stop)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            reservation.close()

    async def _supervise(self) -> int:
        log.info(
            "edge supervisor (pid %d) starting %d workers on %s:%s",
            os.getpid(),
            self.settings.workers,
            self.settings.host,
            self.port,
        )
        keepers = [asyncio.create_task(self._keep(i)) for i in range(self.settings.workers)]
        clean = True
        for finished in asyncio.as_completed(keepers):
            try:
                clean = await finished and clean
            except BootFailure:
                clean = False
                self._stop(None)
        if self._killer is not None:
            self._killer.cancel()
        log.info("edge supervisor: every worker has exited%s", "" if clean else " (not cleanly)")
        return 0 if clean else 1

    async def _keep(self, index: int) -> bool:
        """Keep worker ``index`` running until the service stops; True if it ended cleanly."""
        loop = asyncio.get_running_loop()
        first, failures = True, 0
        while not self._stopping.is_set():
            started = loop.time()
            try:
                process, ready = await self._start(index)
            except OSError:
                log.exception("worker %d could not be started", index)
                if first:
                    raise BootFailure from None
                failures += 1
                await self._pause(_backoff(failures))
                continue
            if await ready:
                log.info("worker %d ready (pid %d)", index, process.pid)
            code = await process.wait()
            del self._running[index]
            mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            lived = loop.time() - started
            if self._stopping.is_set():
                stopped = code == 0 or -code in (signal.SIGTERM, signal.SIGINT)
                log.info("worker %d (pid %d) %s", index, process.pid, _status(code))
                return stopped
            if first and not ready.result():
                log.error(
                    "worker %d (pid %d) could not start: %s", index, process.pid, _status(code)
                )
                raise BootFailure
            first = False
            failures = 0 if lived >= STABLE_AFTER else failures + 1
            delay = _backoff(failures)
            log.error(
                "worker %d (pid %d) %s after %.1f s; starting a replacement in %.1f s",
                index,
                process.pid,
                _status(code),
                lived,
                delay,
            )
            await self._pause(delay)
        return True

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` before a restart, or less if the service is stopping."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _start(self, index: int) -> tuple[asyncio.subprocess.Process, asyncio.Future[bool]]:
        read_fd, write_fd = os.pipe()
        env = {**self.environ, "EDGE_PORT": str(self.port), MULTIPROC_ENV: self.metrics_dir}
        argv = [sys.executable, "-m", "edge", "worker", "--index", str(index)]
        argv += ["--ready-fd", str(write_fd), "--supervisor", str(os.getpid())]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._running[index] = process
        if self._stopping.is_set():  # the stop came while this worker was being started
            process.send_signal(signal.SIGTERM)
        return process, asyncio.ensure_future(_read_ready(read_fd))

    def _stop(self, signum: int | None) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        reason = signal.Signals(signum).name if signum is not None else "a worker failed to start"
        log.info(
            "%s: stopping %d workers (each drains for up to %ss)",
            reason,
            len(self._running),
            self.settings.shutdown_grace,
        )
        for process in self._running.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        self._killer = asyncio.create_task(self._kill_late())

    async def _kill_late(self) -> None:
        # A worker may take the grace twice: for requests, then for after-response work.
        await asyncio.sleep(2 * self.settings.shutdown_grace + KILL_MARGIN)
        for index, process in self._running.items():
            if process.returncode is None:
                log.error("worker %d (pid %d) did not stop in time: killing it", index, process.pid)
                process.kill()


async def _read_ready(fd: int) -> bool:
    """True once the worker writes READY; False if it exits first (end of file)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        return await reader.read(1) == READY
    finally:
        transport.close()


def _backoff(failures: int) -> float:
    """Seconds before the next start after ``failures`` short-lived workers in a row."""
    return 0.0 if failures == 0 else min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (failures - 1))


def _fresh_metrics_dir() -> str:
    """A new, empty directory for this supervisor's metric files.

    Directories left by supervisors that were killed (SIGKILL, OOM) are removed first:
    those whose pid is gone, or is this process's own (a restarted container)."""
    for old in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        owner = old.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        if owner.isdigit() and (int(owner) == os.getpid() or not _alive(int(owner))):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _refuse(problem: str) -> int:
    log.error("edge supervisor: %s", problem)
    return 1


def _status(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _reserve(host: str, port: int) -> socket.socket:
    """Bind (never listen) host:port with SO_REUSEPORT, as the workers will."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("EDGE_WORKERS > 1 needs SO_REUSEPORT, which this platform lacks")
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as asyncio binds its listeners
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class _MetricsServer(ThreadingHTTPServer):
    """EDGE_METRICS_PORT in the supervisor: GET/HEAD /metrics, every worker aggregated."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: int, path: str) -> None:
        self.address_family = family
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=path)  # type: ignore[no-untyped-call]
        super().__init__(address, _MetricsHandler)

    @classmethod
    def start(cls, host: str, port: int, path: str) -> _MetricsServer:
        family, _, _, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server = cls((str(address[0]), int(address[1])), family, path)
        threading.Thread(target=server.serve_forever, name="edge-metrics", daemon=True).start()
        log.info("metrics on %s:%s/metrics", host, port)
        return server

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _MetricsHandler(BaseHTTPRequestHandler):
    server: _MetricsServer

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        if urlsplit(self.path).path != "/metrics":
            body, status, kind = b"not found\n", 404, "text/plain; charset=utf-8"
        else:
            body, status, kind = generate_latest(self.server.registry), 200, CONTENT_TYPE_LATEST
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not access-logged (neither are they on the main port)."""
