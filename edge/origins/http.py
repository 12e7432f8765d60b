"""Originals from an HTTP(S) base URL (``http(s)://host/prefix/``).

Owns the client session: a bounded connection pool, response decompression off (a gzip
bomb stays a byte count checked against EDGE_MAX_SOURCE_BYTES), bounded redirects, and a
connect timeout inside the request budget. Translates the origin's statuses and aiohttp's
exceptions into the EdgeError tree (DESIGN.md section 2); a connection the SSRF guard
(``netguard.GuardedConnector``) refused, on the first hop or a redirect, is
AddressRefused. Only headers edge builds itself are sent: a caller's Cookie or
Authorization never reaches the origin, and nothing the origin sends but the validators
and type is kept.
"""

from __future__ import annotations

from urllib.parse import quote

import aiohttp
from multidict import CIMultiDictProxy

from edge import __version__
from edge.errors import (
    AddressRefused,
    EdgeError,
    FetchTimeout,
    NotFound,
    OriginBadRequest,
    OriginFailed,
    OriginForbidden,
    OriginOverloaded,
    OriginTimeout,
    OriginUnauthorized,
)
from edge.metrics import Metrics
from edge.origins.base import Fetched, FetchOptions, too_large
from edge.origins.netguard import AddressRefusedError

MAX_REDIRECTS = 5
POOL_SIZE = 64
CHUNK = 256 * 1024


class HttpOrigin:
    """An HTTP(S) origin: ``base_url`` + percent-encoded key."""

    kind = "http"

    def __init__(
        self,
        base_url: str,
        metrics: Metrics,
        *,
        connector: aiohttp.BaseConnector | None = None,
        kind: str = "http",
    ) -> None:
        self._base = base_url if base_url.endswith("/") else base_url + "/"
        self._metrics = metrics
        self.kind = kind
        self._session = aiohttp.ClientSession(
            connector=connector or aiohttp.TCPConnector(limit=POOL_SIZE, ttl_dns_cache=60),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": f"edge/{__version__}", "Accept-Encoding": "identity"},
        )

    @property
    def identity(self) -> str:
        return self._base

    async def close(self) -> None:
        await self._session.close()

    async def fetch(self, key: str, options: FetchOptions) -> Fetched:
        url = self._base + quote(key, safe="/!$&'()*+,;=:@~")
        headers = {"X-Request-Id": options.request_id, **options.headers}
        if options.if_none_match:
            headers["If-None-Match"] = options.if_none_match
        if options.if_modified_since:
            headers["If-Modified-Since"] = options.if_modified_since
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=options.connect_timeout)
        # Counted once, when the fetch ends: the status only once the body is complete
        # (or refused by status), so a body cut short is an error and a fetch the budget
        # or the client abandoned is "cancelled", not a 200.
        code = "cancelled"
        try:
            async with self._session.get(
                url, headers=headers, timeout=timeout, max_redirects=MAX_REDIRECTS
            ) as response:
                status = str(response.status)
                if response.status == 304 and (options.if_none_match or options.if_modified_since):
                    code = status
                    return Fetched(
                        data=b"",
                        etag=response.headers.get("ETag") or options.if_none_match,
                        last_modified=response.headers.get("Last-Modified"),
                        not_modified=True,
                    )
                if response.status != 200:
                    code = status
                    _raise_for_status(response.status, response.headers, key)
                data = await self._read_body(response, options.max_bytes)
                code = status
                return Fetched(
                    data=data,
                    etag=response.headers.get("ETag"),
                    last_modified=response.headers.get("Last-Modified"),
                    content_type=response.headers.get("Content-Type"),
                )
        except EdgeError:
            if code == "cancelled":  # refused while reading the body (too large)
                code = "error"
            raise
        except (aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError) as exc:
            code = "timeout"
            raise FetchTimeout("the origin did not answer in time", detail=str(exc)) from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefusedError):
                code = "refused"
                raise _refused(exc.os_error) from exc
            code = "error"
            raise _unreachable(exc) from exc
        except aiohttp.TooManyRedirects as exc:
            code = "error"
            raise OriginFailed("the origin redirected too many times") from exc
        except (aiohttp.ClientError, OSError) as exc:
            code = "error"
            raise _unreachable(exc) from exc
        finally:
            self._count(code)

    async def _read_body(self, response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
        declared = response.content_length
        if declared is not None and declared > max_bytes:
            raise too_large(max_bytes)
        body = bytearray()
        async for chunk in response.content.iter_chunked(CHUNK):
            body += chunk
            if len(body) > max_bytes:
                raise too_large(max_bytes)
        self._metrics.origin_bytes.labels(kind=self.kind).inc(len(body))
        return bytes(body)

    def _count(self, code: str) -> None:
        self._metrics.origin_requests.labels(kind=self.kind, code=code).inc()


def _unreachable(exc: Exception) -> OriginFailed:
    return OriginFailed(
        "the origin could not be reached or broke off",
        detail=f"{type(exc).__name__}: {exc}",
    )


def _refused(refusal: AddressRefusedError) -> AddressRefused:
    """The SSRF guard refused a hop (the first request or a redirect)."""
    return AddressRefused(
        "the origin address is not allowed",
        detail=f"refused {refusal.address}: {refusal.reason}",
    )


def _raise_for_status(status: int, headers: CIMultiDictProxy[str], key: str) -> None:
    """Map an origin status onto the contract's failure classes (200 passes)."""
    if status == 200:
        return
    detail = f"origin answered {status} for key {key!r}"
    if status in (404, 410):
        raise NotFound("no such image", detail=detail)
    if status in (429, 503):
        raise OriginOverloaded(
            "the origin is overloaded",
            retry_after=_retry_after(headers.get("Retry-After")),
            detail=detail,
        )
    mapped: dict[int, type[EdgeError]] = {
        400: OriginBadRequest,
        401: OriginUnauthorized,
        403: OriginForbidden,
        504: OriginTimeout,
    }
    error = mapped.get(status, OriginFailed)
    raise error(f"the origin answered {status}", detail=detail)


def _retry_after(value: str | None) -> int:
    """Seconds from a Retry-After header (delta form only), defaulting to 1."""
    try:
        return int(value) if value is not None else 1
    except ValueError:
        return 1
