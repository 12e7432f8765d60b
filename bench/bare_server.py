"""The W3 yardstick: a bare aiohttp handler sending fixed bytes with edge-like headers.

No middleware, no metrics, no logging: what aiohttp (on uvloop, as edge runs) can do
when a response is already in memory. Loopback only.

    python bench/bare_server.py --port PORT --body FILE --content-type image/jpeg
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from pathlib import Path

from aiohttp import web


def make_app(body: bytes, content_type: str) -> web.Application:
    fixed = {
        "Content-Type": content_type,
        "Cache-Control": "public, max-age=86400",
        "ETag": '"0123456789abcdef01234567"',
        "Last-Modified": "Mon, 02 Jan 2006 15:04:05 GMT",
        "Accept-Ranges": "none",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "X-Edge-Cache": "hit",
    }

    async def image(request: web.Request) -> web.Response:
        headers = {**fixed, "X-Request-Id": uuid.uuid4().hex}
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
    parser.add_argument("--content-type", default="image/jpeg")
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    app = make_app(Path(args.body).read_bytes(), args.content_type)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
