"""Command line: ``edge`` serves; ``edge sign URL`` signs; ``edge settings-table`` documents.

Settings are parsed once from the environment; every bad variable is reported together
and the process exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from edge import logs
from edge.settings import Settings, SettingsError, load_settings, reference_table
from edge.signing import signed_url

TABLE_BEGIN = "<!-- settings-table:begin -->"
TABLE_END = "<!-- settings-table:end -->"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the service (the default)")
    table = commands.add_parser("settings-table", help="print the EDGE_* reference table")
    table.add_argument("--write", metavar="README", help="replace the table inside this file")
    sign = commands.add_parser("sign", help="print URL signed with the first EDGE_SIGNING_KEYS key")
    sign.add_argument("url", help="an absolute URL or a path, already percent-encoded")
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
    serve(settings)
    return 0


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


def serve(settings: Settings) -> None:
    """Run the service in this process until SIGINT/SIGTERM, then drain and exit 0."""
    from edge.app import run_server

    logs.configure(settings.log_level, settings.log_format)
    _install_uvloop()
    asyncio.run(run_server(settings))


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
