"""A misbehaving HTTP origin on loopback, for tests.

The first path segment picks the behaviour; the rest is the object key under
``tests/conftest.SHARED_IMAGES`` (or an in-memory object put with ``put``):

    /ok/<key>                 200 with ETag and Last-Modified
    /status/<code>/<key>      that status (429/503 with Retry-After: 7)
    /stall/<seconds>/<key>    wait before sending headers
    /drip/<key>               headers at once, then one byte every 20 ms
    /reset/<key>              half the body, then the connection is dropped
    /lie/<key>                Content-Length larger than the body sent, then close
    /garbage/<key>            random bytes labelled image/jpeg
    /redirect/<n>/<key>       n redirects, then /ok/<key>
    /goto/<host:port>/<key>   a redirect to http://<host:port>/ok/<key> (another host)
    /hold/<key>               wait until ``release()`` is called, then as /ok/<key>

``events`` records what the origin saw (requests, and handlers cancelled because the
client went away) and ``headers`` each request's headers (lower-case names), so tests can
assert causes, not just timings.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import os
from collections import Counter
from pathlib import Path

from aiohttp import web

from tests.conftest import SHARED_IMAGES


class FakeOrigin:
    def __init__(self, root: Path = SHARED_IMAGES) -> None:
        self.root = root
        self.objects: dict[str, bytes] = {}
        self.events: Counter[str] = Counter()
        self.cancelled = asyncio.Event()
        self.headers: list[dict[str, str]] = []
        #: set while a /hold/ request is waiting; release() lets held requests go
        self.holding = asyncio.Event()
        self._gate = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = data

    def release(self) -> None:
        self._gate.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> FakeOrigin:
        app = web.Application()
        app.router.add_get("/{behaviour}/{rest:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _body(self, key: str) -> bytes | None:
        if key in self.objects:
            return self.objects[key]
        path = (self.root / key).resolve()
        if path.is_relative_to(self.root.resolve()) and path.is_file():
            return path.read_bytes()
        return None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        behaviour = request.match_info["behaviour"]
        self.events[f"request:{behaviour}"] += 1
        self.headers.append({name.lower(): value for name, value in request.headers.items()})
        try:
            return await self._behave(behaviour, request.match_info["rest"], request)
        except asyncio.CancelledError:
            self.events["cancelled"] += 1
            self.cancelled.set()
            raise

    async def _behave(self, behaviour: str, rest: str, request: web.Request) -> web.StreamResponse:
        if behaviour == "status":
            code, _, _ = rest.partition("/")
            headers = {"Retry-After": "7"} if code in ("429", "503") else {}
            return web.Response(status=int(code), text=f"status {code}", headers=headers)
        if behaviour == "stall":
            seconds, _, rest = rest.partition("/")
            await asyncio.sleep(float(seconds))
            behaviour = "ok"
        if behaviour == "hold":
            self.holding.set()
            await self._gate.wait()
            behaviour = "ok"
        if behaviour == "redirect":
            count, _, key = rest.partition("/")
            target = f"/redirect/{int(count) - 1}/{key}" if int(count) > 1 else f"/ok/{key}"
            raise web.HTTPFound(target)
        if behaviour == "goto":
            authority, _, key = rest.partition("/")
            raise web.HTTPFound(f"http://{authority}/ok/{key}")
        if behaviour == "garbage":
            return web.Response(body=os.urandom(4096), content_type="image/jpeg")
        body = self._body(rest)
        if body is None:
            return web.Response(status=404, text="no such object")
        if behaviour == "ok":
            validators = _validators(body)
            if request.headers.get("If-None-Match") == validators["ETag"]:
                self.events["not_modified"] += 1
                return web.Response(status=304, headers={"ETag": validators["ETag"]})
            return web.Response(body=body, headers=validators)
        return await self._stream(behaviour, body, request)

    async def _stream(
        self, behaviour: str, body: bytes, request: web.Request
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(body) * (2 if behaviour == "lie" else 1)
        await response.prepare(request)
        if behaviour == "drip":
            for index in range(len(body)):
                await response.write(body[index : index + 1])
                await asyncio.sleep(0.02)
        else:  # reset, lie: half (or all) the body, then drop the connection
            await response.write(body[: len(body) // 2] if behaviour == "reset" else body)
            assert request.transport is not None
            request.transport.close()
        return response


def _validators(body: bytes) -> dict[str, str]:
    return {
        "ETag": '"' + hashlib.sha256(body).hexdigest()[:16] + '"',
        "Last-Modified": email.utils.formatdate(1_700_000_000, usegmt=True),
        "Set-Cookie": "session=secret",
        "Content-Type": "application/octet-stream",
    }
