"""The raw ceiling: the W1 transform done by pyvips in-process, no HTTP, on all cores.

Two ways to do the same transform, each looping over the 64 originals:
  edge       edge.imaging's own probe -> plan -> transform (shrink-on-load as edge does it)
  thumbnail  plain pyvips ``thumbnail_buffer`` + the same JPEG encoder settings
Each runs in N worker processes (N = cores), or as N threads of one process to show
what the GIL and one shared libvips cost. Workers are spawned (never forked after
libvips started its threads) and count only operations finished inside a common
window, so start-up skew does not inflate or deflate the rate.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

#: seconds between submitting the workers and the start of the counted window
WARMUP = 2.0
MAX_OPS = 100_000


@dataclass(frozen=True)
class CeilingResult:
    variant: str
    mode: str
    workers: int
    ops: int
    seconds: float
    latencies: list[float]
    #: CPU seconds the workers used during the window
    cpu_seconds: float
    output_bytes: int
    output_size: tuple[int, int]

    @property
    def rps(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_op(self) -> float:
        return 1000 * self.cpu_seconds / self.ops if self.ops else float("nan")

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")


def _transformer(variant: str, query: str) -> Callable[[bytes], bytes]:
    """A function doing the W1 transform one way; configures libvips as edge does."""
    import pyvips

    from edge import imaging
    from edge.budget import KillSwitch
    from edge.params import ParamPolicy, parse_query
    from edge.settings import load_settings

    settings = load_settings({})
    imaging.configure(settings.allowed_input_formats)
    request = parse_query(parse_qsl(query), ParamPolicy.from_settings(settings))
    spec = request.spec
    limits = imaging.Limits(
        allowed_formats=settings.allowed_input_formats,
        max_source_pixels=settings.max_source_pixels,
        max_animation_frames=settings.max_animation_frames,
        max_output_dimension=settings.max_output_dimension,
        max_output_pixels=settings.max_output_pixels,
    )

    def edge_way(data: bytes) -> bytes:
        info = imaging.probe(data, limits)
        plan = imaging.plan(
            info,
            spec,
            accepted=frozenset(),
            default_quality=settings.default_quality,
            limits=limits,
        )
        return imaging.transform(data, info, plan, spec, KillSwitch()).body

    quality = spec.quality or settings.default_quality

    def thumbnail_way(data: bytes) -> bytes:
        image = pyvips.Image.thumbnail_buffer(data, spec.width, height=spec.height)
        body: bytes = image.jpegsave_buffer(Q=quality, optimize_coding=True, keep="none")
        return body

    return edge_way if variant == "edge" else thumbnail_way


def _loop(
    transform: Callable[[bytes], bytes],
    sources: Sequence[bytes],
    offset: int,
    start_at: float,
    seconds: float,
) -> tuple[int, list[float], bytes]:
    """Transform the sources in turn; count what finishes inside the window."""
    end_at = start_at + seconds
    latencies: list[float] = []
    index, last = offset, b""
    for _ in range(MAX_OPS):
        began = time.time()
        if began >= end_at:
            break
        last = transform(sources[index % len(sources)])
        index += 1
        finished = time.time()
        if began >= start_at and finished <= end_at:
            latencies.append(finished - began)
    return len(latencies), latencies, last


class _WindowClock(threading.Thread):
    """Reads the process's CPU time (every thread, libvips' own too) at the window's edges."""

    def __init__(self, start_at: float, end_at: float) -> None:
        super().__init__(daemon=True)
        self.start_at, self.end_at = start_at, end_at
        self.cpu = 0.0

    def run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.time()))
        begin = time.process_time()
        time.sleep(max(0.0, self.end_at - time.time()))
        self.cpu = time.process_time() - begin


def worker(
    variant: str,
    query: str,
    paths: Sequence[str],
    offset: int,
    threads: int,
    start_at: float,
    seconds: float,
) -> tuple[int, list[float], bytes, float]:
    """One worker process: ``threads`` threads looping over the sources.

    Returns the operations finished in the window, their latencies, one output and the
    CPU seconds the process used during the window.
    """
    transform = _transformer(variant, query)
    sources = [Path(path).read_bytes() for path in paths]
    transform(sources[0])
    clock = _WindowClock(start_at, start_at + seconds)
    clock.start()
    results: list[tuple[int, list[float], bytes]] = [(0, [], b"")] * threads

    def run(slot: int) -> None:
        results[slot] = _loop(transform, sources, offset + 17 * slot, start_at, seconds)

    pool = [threading.Thread(target=run, args=(slot,)) for slot in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    clock.join()
    return (
        sum(result[0] for result in results),
        [latency for result in results for latency in result[1]],
        results[0][2],
        clock.cpu,
    )


def measure(
    variant: str,
    mode: str,
    workers: int,
    query: str,
    paths: Sequence[Path],
    seconds: float,
) -> CeilingResult:
    """Run ``variant`` with ``workers`` processes (mode "processes") or threads."""
    processes = workers if mode == "processes" else 1
    threads = 1 if mode == "processes" else workers
    names = [str(path) for path in paths]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        start_at = time.time() + WARMUP + 0.5 * processes
        futures = [
            pool.submit(worker, variant, query, names, 11 * i, threads, start_at, seconds)
            for i in range(processes)
        ]
        results = [future.result(timeout=seconds + 120) for future in futures]
    body = results[0][2]
    return CeilingResult(
        variant=variant,
        mode=mode,
        workers=workers,
        ops=sum(result[0] for result in results),
        seconds=seconds,
        latencies=[latency for result in results for latency in result[1]],
        cpu_seconds=sum(result[3] for result in results),
        output_bytes=len(body),
        output_size=_size(body),
    )


def sequential_latency(
    variant: str, query: str, paths: Sequence[Path], seconds: float
) -> CeilingResult:
    """One transform at a time in one process: the floor of a single request's latency."""
    return measure(variant, "processes", 1, query, paths, seconds)


def _size(body: bytes) -> tuple[int, int]:
    import pyvips

    if not body:
        return 0, 0
    image: Any = pyvips.Image.new_from_buffer(body, "")
    return int(image.width), int(image.height)
