"""Command line: ``edge`` serves; ``edge sign URL`` signs; ``edge settings-table`` documents.

Settings are parsed once from the environment; every bad variable is reported together
and the process exits with status 2, without a traceback. With EDGE_WORKERS > 1 ``edge``
supervises that many ``edge worker`` processes (see ``edge.workers``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from edge import logs, system, tracing
from edge.settings import Settings, SettingsError, load_settings, reference_table
from edge.signing import signed_url
from edge.workers import MULTIPROC_ENV, WorkerRole, die_with_supervisor, supervise

#: glibc malloc arenas when MALLOC_ARENA_MAX is not set (the container preloads jemalloc)
MALLOC_ARENAS = 2
TABLE_BEGIN = "<!-- settings-table:begin -->"
TABLE_END = "<!-- settings-table:end -->"


def main(argv: Sequence[str] | None = None) -> int:
    # Before pyvips loads and any thread starts: see system.cap_malloc_arenas.
    system.cap_malloc_arenas(MALLOC_ARENAS)
    parser = argparse.ArgumentParser(prog="edge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the service (the default)")
    table = commands.add_parser("settings-table", help="print the EDGE_* reference table")
    table.add_argument("--write", metavar="README", help="replace the table inside this file")
    sign = commands.add_parser("sign", help="print URL signed with the first EDGE_SIGNING_KEYS key")
    sign.add_argument("url", help="an absolute URL or a path, already percent-encoded")
    worker = commands.add_parser(
        "worker", help="one worker process (started by `edge serve` when EDGE_WORKERS > 1)"
    )
    worker.add_argument("--index", type=int, required=True, help="0 .. EDGE_WORKERS-1")
    worker.add_argument("--ready-fd", type=int, help="written to once listening")
    worker.add_argument("--supervisor", type=int, required=True, help="the supervisor's pid")
    args = parser.parse_args(argv)
    if args.command == "settings-table":
        return _settings_table(args.write)
    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 2
    if args.command == "sign":
        return _sign(args.url, settings)
    if settings.metrics_port is not None and settings.metrics_port == settings.port:
        print("edge: EDGE_METRICS_PORT must differ from EDGE_PORT", file=sys.stderr)
        return 2
    if args.command == "worker":
        return _worker(settings, args.index, args.ready_fd, args.supervisor)
    return serve(settings)


def _sign(url: str, settings: Settings) -> int:
    if not settings.signing_keys:
        print("edge: set EDGE_SIGNING_KEYS to sign URLs", file=sys.stderr)
        return 2
    try:
        print(signed_url(url, settings.signing_keys[0]))
    except ValueError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return 2
    return 0


def serve(settings: Settings) -> int:
    """Run the service until SIGINT/SIGTERM, then drain; the exit status.

    EDGE_WORKERS=1: in this process. More: this process supervises that many workers."""
    logs.configure(settings.log_level, settings.log_format)
    if settings.workers > 1:
        return supervise(settings, os.environ)
    from edge.app import run_server

    _install_uvloop()
    asyncio.run(run_server(settings, tracing=tracing.from_environ(os.environ)))
    return 0


def _worker(settings: Settings, index: int, ready_fd: int | None, supervisor: int) -> int:
    metrics_dir = os.environ.get(MULTIPROC_ENV)
    if not metrics_dir or not 0 <= index < settings.workers:
        print(
            "edge: `edge worker` is started by `edge serve` with EDGE_WORKERS > 1", file=sys.stderr
        )
        return 2
    die_with_supervisor(supervisor)
    from edge.app import run_server

    logs.configure(settings.log_level, settings.log_format)
    _install_uvloop()
    role = WorkerRole(index, settings.workers, metrics_dir, ready_fd)
    asyncio.run(run_server(settings, worker=role, tracing=tracing.from_environ(os.environ)))
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: the stdlib loop works, a little slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _settings_table(readme: str | None) -> int:
    table = reference_table()
    if readme is None:
        sys.stdout.write(table)
        return 0
    path = Path(readme)
    text = path.read_text()
    pattern = re.compile(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        print(f"edge: {readme} has no {TABLE_BEGIN} ... {TABLE_END} block", file=sys.stderr)
        return 1
    path.write_text(pattern.sub(lambda _: f"{TABLE_BEGIN}\n{table}{TABLE_END}", text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
