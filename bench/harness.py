"""Shared plumbing for the benchmark: scratch images, servers, load generators, meters.

Everything here talks to loopback only, and every load it drives is bounded in time
(and, for the Python generators, in requests too).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED_IMAGES = REPO.parent / "shared" / "images"
SCRATCH = BENCH / ".scratch"
ORIGIN = SCRATCH / "origin"
SAMPLE = SHARED_IMAGES / "photo-2725x2225.jpg"
LUA_SCRIPT = BENCH / "cycle.lua"
LOADGEN = BENCH / "loadgen.py"
HOST = "127.0.0.1"

#: where edge is imported from: None for the work tree, else a folder holding an
#: ``edge`` package (see run.py --edge-ref); set once at start
EDGE_SOURCE: Path | None = None

W1_KEYS = 64
W2_COPIES = 8
W5_KEYS = 64
#: the large original of W5: the sample photo enlarged by this factor (~6000x4900)
W5_SCALE = 2.2


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Originals:
    """Keys (paths under ORIGIN) of every workload's originals."""

    w1: list[str]
    w2: dict[str, list[str]]
    w5: list[str]


def _vips() -> Any:
    import pyvips

    return pyvips


def _link_or_copy(source: Path, target: Path, *, copy: bool) -> None:
    if target.exists():
        return
    if not copy:
        with contextlib.suppress(OSError):
            os.link(source, target)
            return
    shutil.copyfile(source, target)


def prepare_originals(log: Any = print) -> Originals:
    """Make (once) the origin folder every server in the run reads from."""
    if not SAMPLE.is_file():
        raise SystemExit(f"bench: the sample photo is missing: {SAMPLE}")
    w1_dir, w2_dir, w5_dir = ORIGIN / "w1", ORIGIN / "w2", ORIGIN / "w5"
    for folder in (w1_dir, w2_dir, w5_dir):
        folder.mkdir(parents=True, exist_ok=True)
    # W1: real copies under distinct keys, as an object store would hold them
    w1 = []
    for index in range(W1_KEYS):
        name = f"photo-{index:02d}.jpg"
        _link_or_copy(SAMPLE, w1_dir / name, copy=True)
        w1.append(f"w1/{name}")
    pyvips = _vips()
    w2: dict[str, list[str]] = {}
    for fmt in ("png", "webp", "avif"):
        master = w2_dir / f"photo-master.{fmt}"
        if not master.exists():
            log(f"  making the {fmt} original from {SAMPLE.name} ...")
            image = pyvips.Image.new_from_file(str(SAMPLE))
            temporary = master.with_suffix(".tmp." + fmt)
            match fmt:
                case "png":
                    image.pngsave(str(temporary), compression=6)
                case "webp":
                    image.webpsave(str(temporary), Q=90)
                case "avif":
                    image.heifsave(str(temporary), Q=80, compression="av1", effort=2)
            temporary.rename(master)
        keys = []
        for index in range(W2_COPIES):
            name = f"photo-{index:02d}.{fmt}"
            _link_or_copy(master, w2_dir / name, copy=False)
            keys.append(f"w2/{name}")
        w2[fmt] = keys
    large = w5_dir / "large-master.jpg"
    if not large.exists():
        log(f"  making the large original ({W5_SCALE}x {SAMPLE.name}) ...")
        image = pyvips.Image.new_from_file(str(SAMPLE)).resize(W5_SCALE, kernel="lanczos3")
        temporary = large.with_suffix(".tmp.jpg")
        image.jpegsave(str(temporary), Q=90)
        temporary.rename(large)
    w5 = []
    for index in range(W5_KEYS):
        name = f"large-{index:02d}.jpg"
        _link_or_copy(large, w5_dir / name, copy=False)
        w5.append(f"w5/{name}")
    return Originals(w1=w1, w2=w2, w5=w5)


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from an encoded image's header, or None."""
    try:
        image = _vips().Image.new_from_buffer(data, "")
    except Exception:
        return None
    return int(image.width), int(image.height)


# --------------------------------------------------------------------------- CPU meters


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, own cpu ticks, reaped children's cpu ticks) of a process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    own = int(fields[11]) + int(fields[12])
    children = int(fields[13]) + int(fields[14])
    return ppid, own, children


def _tree_ticks(root: int) -> int:
    """CPU ticks of ``root`` and its live descendants, reaped ones included."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            _, own, reaped = table[pid]
            total += own + reaped
        stack.extend(kids.get(pid, []))
    return total


def _machine_busy_ticks() -> int:
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(value) for value in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]) - idle


class OthersMeter:
    """How busy the machine was with processes outside this benchmark, in % of it.

    Shared machines drift; a measurement taken while something else used the CPUs is
    flagged with this figure rather than silently trusted.
    """

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._busy = _machine_busy_ticks()
        self._ours = _tree_ticks(os.getpid())

    def percent(self) -> float:
        elapsed = time.monotonic() - self._start
        hz = os.sysconf("SC_CLK_TCK")
        busy = _machine_busy_ticks() - self._busy
        ours = _tree_ticks(os.getpid()) - self._ours
        if elapsed <= 0:
            return 0.0
        return max(0.0, 100.0 * (busy - ours) / hz / elapsed / cores())


def process_cpu_seconds(pid: int) -> float:
    stat = _proc_stat(pid)
    if stat is None:
        return 0.0
    return stat[1] / os.sysconf("SC_CLK_TCK")


def wait_idle(pids: Sequence[int], limit: float = 90.0, busy: float = 0.1) -> float:
    """Wait until the processes use under ``busy`` of a core (work left over from a
    load run finishes), at most ``limit`` seconds; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = sum(process_cpu_seconds(pid) for pid in pids)
        time.sleep(0.3)
        if sum(process_cpu_seconds(pid) for pid in pids) - before < busy * 0.3:
            break
    return time.monotonic() - started


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def rss_bytes(pid: int) -> int:
    """VmRSS of a process from /proc/<pid>/status, 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), rss_bytes(self.pid)))
            self._stop.wait(self.interval)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


# --------------------------------------------------------------------------- servers


def http_get(
    url: str, timeout: float = 30.0, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


@dataclass
class Server:
    """A server process on loopback, stopped on exit of its context."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    health_path: str = "/healthz"
    start_timeout: float = 30.0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.log_path = SCRATCH / f"{self.name}.log"
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.argv,
            # the caller's own EDGE_* settings never leak into a measurement
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("EDGE_")},
                **self.env,
            },
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            # its own process group (stopped as one), but the bench's session: with the
            # kernel's per-session autogroups a server in a new session would be a rival
            # scheduling group to the load generator, and starve it of the CPU it needs to
            # send on time; in one group, nice levels rank threads as in a container
            process_group=0,
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start: {self.log_tail()}")
            try:
                status, _, _ = http_get(self.base + self.health_path, timeout=2)
                if status < 500:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {self.start_timeout}s")

    def stop(self) -> None:
        """Stop the whole process group: a peer's forked workers can outlive their
        parent while they finish a render, and would slow the next measurement down."""
        if self.process is None:
            return
        group = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def all_pids(self) -> list[int]:
        """The server process and its descendants (forked workers)."""
        pids = [self.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _proc_stat(int(entry.name))
                if stat is not None and stat[0] in pids:
                    pids.append(int(entry.name))
        return pids

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def edge_server(name: str, env: Mapping[str, str]) -> Server:
    """edge itself, as `python -m edge`, on a free loopback port."""
    port = free_port()
    source: dict[str, str] = {}
    if EDGE_SOURCE is not None:
        source["PYTHONPATH"] = str(EDGE_SOURCE)
    base_env = {
        **source,
        "EDGE_HOST": HOST,
        "EDGE_PORT": str(port),
        "EDGE_LOG_LEVEL": "warning",
        "EDGE_CACHE": "none",
        "EDGE_ORIGIN": ORIGIN.as_uri(),
        "EDGE_SHUTDOWN_GRACE": "1",
    }
    return Server(
        name=name,
        argv=[sys.executable, "-m", "edge"],
        port=port,
        env={**base_env, **env},
        # `python -m` puts the working directory first on sys.path
        cwd=EDGE_SOURCE or REPO,
    )


def export_edge(ref: str) -> Path:
    """The ``edge`` package as committed at ``ref``, unpacked once into the scratch dir."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = SCRATCH / f"edge-{commit[:12]}"
    if not (target / "edge" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, "edge"],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
    return target


def scrape_metrics(base: str) -> dict[str, float]:
    """edge's /metrics as {"name{labels}": value}."""
    status, _, body = http_get(base + "/metrics")
    if status != 200:
        return {}
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


def metric(values: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(found.get(k) == v for k, v in labels.items()):
            total += value
    return total


# --------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    """What one closed-loop load run measured."""

    tool: str
    requests: int
    seconds: float
    non_2xx: int
    errors: int
    bytes: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        """Successful (2xx) responses per second: a 503 is not throughput."""
        return (self.requests - self.non_2xx) / self.seconds if self.seconds else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def closed_loop(
    base: str,
    paths: Sequence[str],
    *,
    connections: int,
    seconds: float,
    force_python: bool = False,
) -> LoadResult:
    """``connections`` clients each sending the next path as soon as the last answered."""
    paths_file = SCRATCH / f"paths-{os.getpid()}-{time.monotonic_ns()}.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    try:
        if have_wrk() and not force_python:
            return _wrk(base, paths_file, connections, seconds)
        return _python_closed(base, paths_file, connections, seconds)
    finally:
        paths_file.unlink(missing_ok=True)


def _wrk(base: str, paths_file: Path, connections: int, seconds: float) -> LoadResult:
    threads = max(1, min(connections, cores()))
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(LUA_SCRIPT),
        base,
        "--",
        str(paths_file),
        str(threads),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            data = json.loads(line.removeprefix("BENCHJSON "))
            return LoadResult(
                tool="wrk",
                requests=int(data["requests"]),
                seconds=data["duration_us"] / 1e6,
                non_2xx=int(data["status"]),
                errors=int(data["connect"] + data["read"] + data["write"] + data["timeout"]),
                bytes=int(data["bytes"]),
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
            )
    raise RuntimeError(f"wrk printed no summary: {done.stdout[-500:]} {done.stderr[-500:]}")


def run_loadgen(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run bench/loadgen.py in its own process and return its JSON summary."""
    done = subprocess.run(
        [sys.executable, str(LOADGEN), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed: {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _python_closed(base: str, paths_file: Path, connections: int, seconds: float) -> LoadResult:
    data = run_loadgen(
        [
            "closed",
            "--base",
            base,
            "--paths",
            str(paths_file),
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
        ],
        timeout=seconds + 120,
    )
    statuses: dict[str, int] = data["statuses"]
    ok = sum(count for status, count in statuses.items() if status.startswith("2"))
    return LoadResult(
        tool="python",
        requests=int(data["sent"]) - int(data["errors"]),
        seconds=float(data["seconds"]),
        non_2xx=int(data["sent"]) - int(data["errors"]) - ok,
        errors=int(data["errors"]),
        bytes=int(data["bytes"]),
        p50_ms=float(data["latency_ms"]["all"]["p50"]),
        p99_ms=float(data["latency_ms"]["all"]["p99"]),
    )


@contextlib.contextmanager
def timed(label: str, log: Any = print) -> Iterator[None]:
    start = time.monotonic()
    yield
    log(f"  {label}: {time.monotonic() - start:.1f}s")
