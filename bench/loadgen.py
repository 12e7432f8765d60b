"""A bounded HTTP load generator in its own process (aiohttp), printing one JSON line.

Modes:
  closed  N connections, each sending its next request when the last one answered
          (the fallback when wrk is not installed);
  open    a fixed arrival rate, whatever the responses do (open loop); latency is
          counted from each request's scheduled time, so a slow generator shows;
  burst   every listed path at once, for a number of rounds.

Every mode is bounded by a request count and by time, and talks to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

MAX_REQUESTS = 200_000
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    sent: int = 0

    def record(self, status: str, latency: float, size: int) -> None:
        self.statuses[status] += 1
        self.latencies.setdefault(status, []).append(latency)
        self.bytes += size


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50": percentile(values, 0.5) * 1000,
        "p90": percentile(values, 0.9) * 1000,
        "p99": percentile(values, 0.99) * 1000,
        "max": (max(values) if values else float("nan")) * 1000,
    }


async def fetch(
    client: aiohttp.ClientSession, url: str, tally: Tally, started: float, patience: float
) -> None:
    tally.sent += 1
    try:
        async with asyncio.timeout(patience):
            async with client.get(url) as response:
                body = await response.read()
                tally.record(str(response.status), time.perf_counter() - started, len(body))
    except (aiohttp.ClientError, TimeoutError, OSError) as error:
        tally.errors[type(error).__name__] += 1


async def closed(urls: list[str], connections: int, seconds: float, limit: int) -> Tally:
    tally = Tally()
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=connections)

    async with aiohttp.ClientSession(connector=connector) as client:

        async def worker(mine: list[str]) -> None:
            index = 0
            while time.perf_counter() < stop and tally.sent < limit:
                url = mine[index % len(mine)]
                index += 1
                await fetch(client, url, tally, time.perf_counter(), 30.0)

        # connection i takes the urls i, i+N, ...: no two ask for the same one at once
        shares = [urls[i::connections] or urls for i in range(connections)]
        await asyncio.gather(*(worker(share) for share in shares))
    return tally


async def open_loop(
    urls: list[str], rate: float, seconds: float, limit: int, patience: float
) -> Tally:
    tally = Tally()
    total = min(limit, int(rate * seconds))
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector) as client:
        origin = time.perf_counter()
        for index in range(total):
            scheduled = origin + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tally.lags.append(time.perf_counter() - scheduled)
            task = asyncio.create_task(
                fetch(client, urls[index % len(urls)], tally, scheduled, patience)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=patience + 5)
    return tally


async def burst(urls: list[str], rounds: int, patience: float) -> Tally:
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        for _ in range(rounds):
            started = time.perf_counter()
            await asyncio.gather(*(fetch(client, url, tally, started, patience) for url in urls))
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("closed", "open", "burst"))
    parser.add_argument("--base", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--paths", required=True, help="file of request paths, one a line")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rate", type=float, default=100.0, help="open: requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=MAX_REQUESTS)
    args = parser.parse_args(argv)
    if urlsplit(args.base).hostname not in LOOPBACK:
        parser.error("loopback targets only")
    with open(args.paths) as handle:
        urls = [args.base + line.strip() for line in handle if line.strip()]
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    limit = min(args.max_requests, MAX_REQUESTS)
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    wall_start = time.perf_counter()
    match args.mode:
        case "closed":
            tally = asyncio.run(closed(urls, args.connections, args.seconds, limit))
        case "open":
            tally = asyncio.run(open_loop(urls, args.rate, args.seconds, limit, args.timeout))
        case _:
            tally = asyncio.run(burst(urls, args.rounds, args.timeout))
    wall = time.perf_counter() - wall_start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    everything = [value for values in tally.latencies.values() for value in values]
    result: dict[str, Any] = {
        "mode": args.mode,
        "sent": tally.sent,
        "seconds": wall,
        "statuses": dict(tally.statuses),
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "bytes": tally.bytes,
        "latency_ms": {
            "all": summary(everything),
            **{status: summary(values) for status, values in tally.latencies.items()},
        },
        "lag_ms": summary(tally.lags),
        "cpu_seconds": cpu,
        "cpu_percent": 100 * cpu / wall if wall else 0.0,
        "target_rate": args.rate if args.mode == "open" else None,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
