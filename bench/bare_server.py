"""The W3 yardstick: a bare aiohttp handler sending fixed bytes with edge's headers.

No middleware, no metrics, no logging: what aiohttp (on uvloop, as edge runs) can do
when a response is already in memory. It sends the headers edge sent for the same URL
(``--headers``, a JSON object), with a fresh X-Request-Id each time, so both servers
write the same response bytes. Loopback only.

    python bench/bare_server.py --port PORT --body FILE [--headers FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from aiohttp import web

#: headers aiohttp writes itself, or that differ per response
NOT_COPIED = frozenset({"date", "server", "content-length", "x-request-id", "connection"})


def make_app(body: bytes, headers: dict[str, str] | None = None) -> web.Application:
    """``headers``: what to send besides a fresh X-Request-Id (default: edge-like ones)."""
    fixed = {
        name: value for name, value in (headers or {}).items() if name.lower() not in NOT_COPIED
    } or {
        "Content-Type": "image/jpeg",
        "Cache-Control": "public, max-age=86400",
        "ETag": '"0123456789abcdef01234567"',
        "Last-Modified": "Mon, 02 Jan 2006 15:04:05 GMT",
        "Accept-Ranges": "none",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "X-Edge-Cache": "hit",
    }

    async def image(request: web.Request) -> web.Response:
        headers = {**fixed, "X-Request-Id": os.urandom(16).hex()}
        return web.Response(body=body, headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/{key:.*}", image)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", required=True)
    parser.add_argument("--headers", help="JSON object of the headers to send")
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    headers = json.loads(Path(args.headers).read_text()) if args.headers else None
    app = make_app(Path(args.body).read_bytes(), headers)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
