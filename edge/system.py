"""What the machine gives this process: CPUs, memory (cgroup-aware), RSS, and malloc_trim.

Containers lie through /proc/cpuinfo and /proc/meminfo; the cgroup files are the truth
about quota. Everything here degrades to a sane answer when a file is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def available_cpus() -> int:
    """min(CPU affinity, cgroup cpu.max quota), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, int(quota + 0.999)))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    text = _read(_CGROUP / "cpu.max")  # cgroup v2: "max 100000" or "200000 100000"
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota_v1 = _read(_CGROUP / "cpu" / "cpu.cfs_quota_us")
    period_v1 = _read(_CGROUP / "cpu" / "cpu.cfs_period_us")
    if quota_v1 and period_v1 and int(quota_v1) > 0:
        return int(quota_v1) / int(period_v1)
    return None


def available_memory() -> int:
    """Physical memory, or the cgroup memory limit when that is lower."""
    total = _meminfo_total()
    for path in (_CGROUP / "memory.max", _CGROUP / "memory" / "memory.limit_in_bytes"):
        text = _read(path)
        if text and text != "max" and text.isdigit():
            total = min(total, int(text))
    return total


def _meminfo_total() -> int:
    text = _read(Path("/proc/meminfo")) or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), 0 if unknown."""
    text = _read(Path(f"/proc/{pid or 'self'}/statm"))
    if not text:
        return 0
    return int(text.split()[1]) * _PAGE


def open_descriptors() -> int:
    """File descriptors this process holds (0 where /proc is not available)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def thread_count() -> int:
    """OS threads of this process (Python's count keeps foreign threads forever)."""
    for line in (_read(Path("/proc/self/status")) or "").splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def lower_thread_priority(steps: int) -> bool:
    """Make the calling thread ``steps`` nice levels less urgent than it is (Linux only,
    where nice is per thread and threads it starts inherit it); whether it was done.

    Lowering is always allowed, even unprivileged; raising it back is not.
    """
    if not sys.platform.startswith("linux"):
        return False  # elsewhere PRIO_PROCESS names the whole process, not a thread
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + steps)
    except OSError:
        return False
    return True


#: glibc's mallopt parameter number for the arena cap
_M_ARENA_MAX = -8


def cap_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does), unless the environment set it.

    libvips frees large buffers from many threads; glibc keeps them in up to 8 arenas per
    core, so RSS under load creeps far above what is live. Must run before threads
    start. A no-op (False) without glibc, or under jemalloc's preload.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    return bool(mallopt and mallopt(_M_ARENA_MAX, arenas))


class Trimmer:
    """glibc's malloc_trim, when this libc has it: hands freed arenas back to the kernel.

    libvips allocates and frees large tiles from many threads; glibc keeps the freed
    memory in per-thread arenas, so RSS creeps unless it is trimmed now and then.
    """

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        self._trim = getattr(libc, "malloc_trim", None)

    def trim(self) -> bool:
        if self._trim is None:
            return False
        return bool(self._trim(0))


class TrimPolicy:
    """When to call malloc_trim, from one RSS sample a second.

    glibc keeps what a burst of transforms freed; it is handed back as soon as the
    process is idle again with RSS well above the floor its last idle trim left, and
    every ``every`` samples under steady load too (malloc_trim is safe while other
    threads allocate; waiting for an idle moment let RSS creep). Only idle trims move
    the floor: one taken mid-burst, with originals and tiles still live, would set it so
    high that the burst's garbage never looks like growth.
    """

    def __init__(
        self, floor: int, *, every: int = 30, growth: float = 1.1, slack: int = 16 << 20
    ) -> None:
        self.floor, self._every, self._growth, self._slack = floor, every, growth, slack
        self._samples = 0

    def due(self, rss: int, *, idle: bool) -> bool:
        """Whether to trim now; call once per sample."""
        self._samples += 1
        if idle and rss > self.floor * self._growth + self._slack:
            return True
        return self._samples % self._every == 0

    def trimmed(self, rss_after: int, *, idle: bool) -> None:
        """Record a trim's result: while idle it is the new floor."""
        if idle:
            self.floor = rss_after
