"""Which origin serves a request: by key prefix, the configured one, a bucket override, or
a dynamic host.

``Origins`` owns every origin the service talks to: the origins by key prefix
(EDGE_ORIGINS_FILE, each with its own timeout, headers and circuit breaker), the default
(EDGE_ORIGIN, for keys under no prefix), the S3 bucket overrides ``bucket=`` may name
(EDGE_BUCKETS_ALLOWED), and a bounded set of dynamic HTTP origins ``origin=`` may name
(EDGE_ALLOW_DYNAMIC_ORIGIN, EDGE_HOSTS_ALLOWED), each behind the SSRF guard. Host and
bucket policy is decided here, before any connection; the address policy is enforced
later, at connect time, by the guard. Every origin handed out has its own secret-free
``identity`` for cache keys.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit

from edge.errors import (
    BadKey,
    BucketNotAllowed,
    DynamicOriginDisabled,
    HostNotAllowed,
    InvalidParameter,
)
from edge.metrics import Metrics
from edge.origins.base import Origin
from edge.origins.breaker import BreakerState, CircuitBreaker, Clock, NamedOrigin
from edge.origins.file import FileOrigin
from edge.origins.http import POOL_SIZE, HttpOrigin
from edge.origins.netguard import GuardedConnector, host_of
from edge.origins.s3 import S3Origin
from edge.settings import OriginConfig, Settings

#: dynamic origins kept open at once; the least recently used one is closed beyond this
DYNAMIC_ORIGINS_KEPT = 64
#: connections per dynamic origin (64 of them could otherwise hold 4096 sockets)
DYNAMIC_POOL_SIZE = 8
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_ORIGIN_FORM = "host[:port] or http(s)://host[:port]"


def open_origin(url: str, metrics: Metrics, *, allow_private_addresses: bool = False) -> Origin:
    """The backend for a file or http(s) EDGE_ORIGIN URL; call inside a running loop.

    An HTTP origin's own host is trusted (the operator chose it, private or not); every
    other host a redirect leads to passes the SSRF guard. S3 origins need an awaited
    client: use ``open_configured_origin``.
    """
    if url.startswith("file:"):
        return FileOrigin.from_url(url, metrics)
    if url.startswith(("http:", "https:")):
        connector = GuardedConnector(
            allow_private=allow_private_addresses, trusted_hosts=[host_of(url)], limit=POOL_SIZE
        )
        return HttpOrigin(url, metrics, connector=connector)
    raise ValueError(f"no synchronous origin backend for {url!r}")


async def open_configured_origin(settings: Settings, metrics: Metrics) -> Origin:
    """The backend for EDGE_ORIGIN (any kind) with the settings' S3 and address options."""
    url = settings.origin_url
    if url.startswith("s3:"):
        return await S3Origin.open(
            url,
            metrics,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            connect_timeout=settings.backend_connect_timeout,
        )
    return open_origin(url, metrics, allow_private_addresses=settings.allow_private_addresses)


async def open_named_origin(
    config: OriginConfig, settings: Settings, metrics: Metrics, clock: Clock = time.monotonic
) -> NamedOrigin:
    """The backend for one EDGE_ORIGINS_FILE entry, behind its timeout, headers and breaker.

    An S3 entry without its own endpoint or region uses EDGE_S3_ENDPOINT_URL and
    EDGE_S3_REGION. The breaker drives edge_origin_circuit_open{origin=<name>}.
    """
    if config.url.startswith("s3:"):
        inner: Origin = await S3Origin.open(
            config.url,
            metrics,
            endpoint_url=config.s3_endpoint_url or settings.s3_endpoint_url,
            region=config.s3_region or settings.s3_region,
            connect_timeout=settings.backend_connect_timeout,
        )
    else:
        inner = open_origin(
            config.url, metrics, allow_private_addresses=settings.allow_private_addresses
        )
    gauge = metrics.origin_circuit_open.labels(origin=config.name)
    gauge.set(0)
    breaker = CircuitBreaker(
        config.name,
        failures=config.breaker.failures,
        cooldown=config.breaker.cooldown,
        clock=clock,
        on_change=lambda is_open: gauge.set(1 if is_open else 0),
    )
    return NamedOrigin(
        config.name,
        config.prefix,
        inner,
        breaker,
        timeout=config.timeout,
        headers=dict(config.headers),
    )


@dataclass(frozen=True, slots=True)
class DynamicTarget:
    """A dynamic origin as ``origin=`` names it: scheme, canonical host, port."""

    scheme: str
    #: lower case, IDNA-encoded, no trailing dot; an IP literal in its canonical form
    host: str
    port: int

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"


def parse_origin_param(text: str) -> DynamicTarget:
    """``host[:port]`` (https) or ``http(s)://host[:port]``; anything else is a 400."""
    spelled = text.strip() if "://" in text else f"https://{text.strip()}"
    try:
        parts = urlsplit(spelled)
        port = parts.port
    except ValueError as exc:
        raise InvalidParameter("origin", f"expected {_ORIGIN_FORM}") from exc
    scheme = parts.scheme.lower()
    extras = parts.username or parts.password or parts.query or parts.fragment
    if scheme not in DEFAULT_PORTS or not parts.hostname or extras or parts.path not in ("", "/"):
        raise InvalidParameter("origin", f"expected {_ORIGIN_FORM}")
    return DynamicTarget(scheme, canonical_host(parts.hostname), port or DEFAULT_PORTS[scheme])


def canonical_host(host: str) -> str:
    """A host as policy compares it: IP literals normalised, names lower-case IDNA."""
    bare = host.strip("[]").rstrip(".").lower()
    try:
        return str(ip_address(bare))
    except ValueError:
        pass
    try:
        name = bare.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise InvalidParameter("origin", "the host is not a valid name") from exc
    if not _HOST_NAME.match(name):
        raise InvalidParameter("origin", "the host is not a valid name")
    if _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
        # 2130706433, 127.1, 0x7f.1, 017.0.0.1: other spellings of an IPv4 address,
        # read differently by different resolvers; only the canonical form is accepted
        raise InvalidParameter("origin", "the host is not a canonical IP address")
    return name


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """Whether a canonical host matches EDGE_HOSTS_ALLOWED.

    A pattern is an exact name or IP, ``*.example.com`` (its subdomains, not the name
    itself), or ``*`` (any host). IP literals only ever match exactly or ``*``.
    """
    is_ip = _is_ip(host)
    for pattern in patterns:
        if pattern == "*":
            return True
        if pattern.startswith("*."):
            suffix = "." + _pattern_host(pattern[2:])
            if not is_ip and host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif _pattern_host(pattern) == host:
            return True
    return False


def _pattern_host(pattern: str) -> str:
    try:
        return canonical_host(pattern)
    except InvalidParameter:
        return pattern  # an odd pattern matches nothing canonical, never everything


def _is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


class Origins:
    """The origins a request may be served from, and their lifetimes.

    ``route`` and ``select`` decide policy synchronously; call them inside the running
    loop (dynamic origins open their client session there). ``close`` closes everything
    it opened, including the default origin and the origins by prefix.
    """

    def __init__(
        self,
        default: Origin,
        settings: Settings,
        metrics: Metrics,
        named: Sequence[NamedOrigin] = (),
    ) -> None:
        self._default = default
        self._settings = settings
        self._metrics = metrics
        #: longest prefix first, so the first match is the longest
        self._named = tuple(sorted(named, key=lambda origin: len(origin.prefix), reverse=True))
        self._buckets: dict[str, S3Origin] = {}
        self._named_buckets: dict[tuple[str, str], NamedOrigin] = {}
        self._dynamic: OrderedDict[str, HttpOrigin] = OrderedDict()
        self._retiring: dict[HttpOrigin, asyncio.Task[None]] = {}
        for origin in self._named:
            is_open = origin.breaker.state is not BreakerState.CLOSED
            metrics.origin_circuit_open.labels(origin=origin.name).set(1 if is_open else 0)

    @classmethod
    async def from_settings(
        cls,
        settings: Settings,
        metrics: Metrics,
        default: Origin | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> Origins:
        """Open EDGE_ORIGIN (unless ``default`` is given) and every EDGE_ORIGINS_FILE entry;
        ``clock`` drives the circuit breakers (tests pass their own)."""
        origin = default if default is not None else await open_configured_origin(settings, metrics)
        named: list[NamedOrigin] = []
        try:
            for config in settings.origins_file:
                named.append(await open_named_origin(config, settings, metrics, clock))
        except BaseException:
            for opened in named:
                await opened.close()
            if default is None:
                await origin.close()
            raise
        return cls(origin, settings, metrics, named)

    @property
    def default(self) -> Origin:
        return self._default

    @property
    def named(self) -> tuple[NamedOrigin, ...]:
        """The origins by key prefix, longest prefix first."""
        return self._named

    def route(
        self, key: str, origin_param: str | None, bucket_param: str | None
    ) -> tuple[Origin, str]:
        """The origin for a request and the key to fetch from it.

        ``origin=`` names its host outright: the key goes there whole. Otherwise the
        EDGE_ORIGINS_FILE entry with the longest prefix of the key serves it, asked for
        the key without that prefix (``bucket=`` then swaps the bucket of that entry's
        S3 origin); a key under no prefix goes to EDGE_ORIGIN as ``select`` decides.
        Raises what ``select`` raises, and BadKey when nothing is left of the key once
        the prefix is stripped.
        """
        if origin_param is None:
            for named in self._named:
                if key.startswith(named.prefix):
                    rest = key[len(named.prefix) :]
                    if not rest:
                        raise BadKey(
                            "the key names only an origin's prefix",
                            detail=f"origin {named.name!r}, prefix {named.prefix!r}",
                        )
                    return self._named_bucket(named, bucket_param), rest
        return self.select(origin_param, bucket_param), key

    def select(self, origin_param: str | None, bucket_param: str | None) -> Origin:
        """The origin for a request's ``origin=`` and ``bucket=`` (None: not given).

        Raises DynamicOriginDisabled, HostNotAllowed or BucketNotAllowed (401), or
        InvalidParameter (400) for an ``origin=`` that is not a host.
        """
        if origin_param is not None:
            target = self._allowed_target(origin_param)
            if bucket_param is not None:
                raise BucketNotAllowed("bucket= applies to the s3 origin, not to origin=")
            return self._dynamic_origin(target)
        if bucket_param is not None:
            return self._bucket_origin(bucket_param)
        return self._default

    async def close(self) -> None:
        for named in self._named:
            await named.close()  # bucket overrides borrow its client: nothing more to close
        self._named_buckets.clear()
        dynamic = list(self._dynamic.values())
        self._dynamic.clear()
        for origin, task in list(self._retiring.items()):
            task.cancel()
            dynamic.append(origin)
        self._retiring.clear()
        for origin in dynamic:
            await origin.close()
        await self._default.close()

    def _allowed_target(self, origin_param: str) -> DynamicTarget:
        if not self._settings.allow_dynamic_origin:
            raise DynamicOriginDisabled("origin= is not enabled on this service")
        target = parse_origin_param(origin_param)
        if not host_allowed(target.host, self._settings.hosts_allowed):
            raise HostNotAllowed(
                "the origin host is not allowed",
                detail=f"host {target.host!r} is not in EDGE_HOSTS_ALLOWED",
            )
        return target

    def _dynamic_origin(self, target: DynamicTarget) -> HttpOrigin:
        base = target.base_url
        origin = self._dynamic.get(base)
        if origin is not None:
            self._dynamic.move_to_end(base)
            return origin
        connector = GuardedConnector(
            allow_private=self._settings.allow_private_addresses, limit=DYNAMIC_POOL_SIZE
        )
        origin = HttpOrigin(base, self._metrics, connector=connector)
        self._dynamic[base] = origin
        while len(self._dynamic) > DYNAMIC_ORIGINS_KEPT:
            _, evicted = self._dynamic.popitem(last=False)
            self._retire(evicted)
        return origin

    def _retire(self, origin: HttpOrigin) -> None:
        """Close an evicted origin once fetches already holding it must have ended.

        A request that selected it may still be fetching; every fetch ends within its
        budget, and a coalesced one within the budget of a later waiter, hence twice the
        budget before the session closes.
        """
        grace = 2 * self._settings.backend_timeout + 1

        async def close_later() -> None:
            await asyncio.sleep(grace)
            self._retiring.pop(origin, None)
            await origin.close()

        self._retiring[origin] = asyncio.get_running_loop().create_task(close_later())

    def _bucket_origin(self, bucket: str) -> S3Origin:
        default = self._default
        if not isinstance(default, S3Origin):
            raise BucketNotAllowed("bucket= applies only to s3 origins")
        self._check_bucket(bucket)
        if bucket == default.bucket:
            return default
        origin = self._buckets.get(bucket)
        if origin is None:
            origin = self._buckets[bucket] = default.for_bucket(bucket)
        return origin

    def _named_bucket(self, named: NamedOrigin, bucket: str | None) -> NamedOrigin:
        """An origin by prefix, or its ``bucket=`` override (same client and breaker)."""
        if bucket is None:
            return named
        inner = named.inner
        if not isinstance(inner, S3Origin):
            raise BucketNotAllowed("bucket= applies only to s3 origins")
        self._check_bucket(bucket)
        if bucket == inner.bucket:
            return named
        override = self._named_buckets.get((named.name, bucket))
        if override is None:
            override = named.sharing(inner.for_bucket(bucket))
            self._named_buckets[named.name, bucket] = override
        return override

    def _check_bucket(self, bucket: str) -> None:
        if bucket not in self._settings.buckets_allowed:
            raise BucketNotAllowed(
                "the bucket is not allowed",
                detail=f"bucket {bucket!r} is not in EDGE_BUCKETS_ALLOWED",
            )
