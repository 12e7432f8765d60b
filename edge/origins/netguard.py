"""The SSRF guard: which addresses an origin connection may reach, checked at connect time.

Owns the address policy (a fixed table of refused IPv4 and IPv6 ranges, plus the IPv6
forms that wrap an IPv4 address) and ``GuardedConnector``, an aiohttp connector whose
socket factory checks the address each socket is about to connect to. Checking there,
not in a resolver, covers what a resolver never sees: IP literals in URLs and redirect
targets, and names whose DNS answer changes between look-ups (rebinding). Redirects are
followed through the same connector, so every hop is checked.

A refusal is an ``AddressRefusedError`` (an ``OSError``, so aiohttp treats it as a
failed connection attempt and never opens the socket). The connector makes sure it
survives as the ``os_error`` of the ``ClientConnectorError`` aiohttp raises, which the
HTTP origin translates into ``AddressRefused`` (401).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import aiohttp
from aiohttp import ClientRequest, ClientTimeout
from aiohttp.abc import AbstractResolver
from aiohttp.connector import AddrInfoType, Connection
from aiohttp.tracing import Trace
from yarl import URL

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class _Range:
    """A refused range; ``private`` ones are let through by EDGE_ALLOW_PRIVATE_ADDRESSES."""

    network: IPv4Network | IPv6Network
    reason: str
    private: bool


def _ranges(*rows: tuple[str, str, bool]) -> tuple[_Range, ...]:
    return tuple(_Range(_network(text), reason, private) for text, reason, private in rows)


def _network(text: str) -> IPv4Network | IPv6Network:
    return IPv6Network(text) if ":" in text else IPv4Network(text)


# Ranges an origin connection must not reach. Never-routable ranges (unspecified,
# multicast, broadcast, reserved, documentation) stay refused even when private
# addresses are allowed: no deployment has a reason to fetch from them.
_IPV4_REFUSED = _ranges(
    ("0.0.0.0/8", "unspecified", False),
    ("10.0.0.0/8", "private", True),
    ("100.64.0.0/10", "shared address space (CGNAT)", True),
    ("127.0.0.0/8", "loopback", True),
    ("169.254.0.0/16", "link-local", True),
    ("172.16.0.0/12", "private", True),
    ("192.0.0.0/24", "IETF protocol assignments", False),
    ("192.0.2.0/24", "documentation", False),
    ("192.168.0.0/16", "private", True),
    ("198.18.0.0/15", "benchmarking", True),
    ("198.51.100.0/24", "documentation", False),
    ("203.0.113.0/24", "documentation", False),
    ("224.0.0.0/4", "multicast", False),
    ("255.255.255.255/32", "broadcast", False),
    ("240.0.0.0/4", "reserved", False),
)
_IPV6_REFUSED = _ranges(
    ("::/128", "unspecified", False),
    ("::1/128", "loopback", True),
    ("100::/64", "discard-only", False),
    ("2001:db8::/32", "documentation", False),
    ("fc00::/7", "unique local", True),
    ("fe80::/10", "link-local", True),
    ("fec0::/10", "site-local", True),
    ("ff00::/8", "multicast", False),
)

# IPv6 forms whose last 32 bits are an IPv4 address the packet ends up at.
_LAST_32_BITS_FORMS = (
    (IPv6Network("::ffff:0:0/96"), "IPv4-mapped"),
    (IPv6Network("::ffff:0:0:0/96"), "IPv4-translated"),
    (IPv6Network("64:ff9b::/96"), "NAT64"),
    (IPv6Network("::/96"), "IPv4-compatible"),
)
_LOCAL_NAT64 = IPv6Network("64:ff9b:1::/48")
# Inside the local-use NAT64 prefix only the /96 layout (address in the last 32 bits)
# can be decoded without knowing the deployment; other layouts are refused outright.
_LOCAL_NAT64_MIDDLE_BITS = ((1 << 80) - 1) ^ ((1 << 32) - 1)


def parse_address(text: str) -> IPAddress:
    """An address from a socket address string, dropping an IPv6 zone (``%eth0``)."""
    return ip_address(text.partition("%")[0])


def refusal_reason(address: str | IPAddress, *, allow_private: bool = False) -> str | None:
    """Why connecting to ``address`` is refused, or None when it is allowed."""
    try:
        ip = parse_address(address) if isinstance(address, str) else address
    except ValueError:
        return "not an IP address"
    if isinstance(ip, IPv4Address):
        return _table_reason(ip, _IPV4_REFUSED, allow_private)
    own = _table_reason(ip, _IPV6_REFUSED, allow_private)
    if own is not None:
        return own
    return _embedded_reason(ip, allow_private)


def is_refused(address: str | IPAddress, *, allow_private: bool = False) -> bool:
    """True when the policy refuses ``address`` (see ``refusal_reason`` for why)."""
    return refusal_reason(address, allow_private=allow_private) is not None


def _table_reason(ip: IPAddress, table: tuple[_Range, ...], allow_private: bool) -> str | None:
    for entry in table:
        if ip in entry.network and not (entry.private and allow_private):
            return entry.reason
    return None


def _embedded_reason(ip: IPv6Address, allow_private: bool) -> str | None:
    """The reason an IPv6 address wrapping an IPv4 one is refused: that IPv4's reason."""
    embedded = embedded_ipv4(ip)
    if embedded is None:
        return None
    form, inner = embedded
    if inner is None:
        return f"{form} address that cannot be decoded"
    reason = _table_reason(inner, _IPV4_REFUSED, allow_private)
    return None if reason is None else f"{form} {reason} ({inner})"


def embedded_ipv4(ip: IPv6Address) -> tuple[str, IPv4Address | None] | None:
    """The IPv4 address an IPv6 form leads to, named by its form (None: no such form).

    Teredo yields the client address (its obfuscated last 32 bits), 6to4 the address
    after the 2002: prefix; a local-use NAT64 address outside the /96 layout yields
    ``(form, None)``: a wrapper whose target cannot be known.
    """
    if ip.teredo is not None:
        return "Teredo", ip.teredo[1]
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip in _LOCAL_NAT64:
        if int(ip) & _LOCAL_NAT64_MIDDLE_BITS:
            return "local-use NAT64", None
        return "local-use NAT64", IPv4Address(int(ip) & 0xFFFFFFFF)
    for network, form in _LAST_32_BITS_FORMS:
        # :: and ::1 sit inside the IPv4-compatible range but are IPv6's own addresses
        if ip in network and int(ip) > 1:
            return form, IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class AddressRefusedError(OSError):
    """The guard refused to open a socket to ``address``.

    The message is the same for every refusal on purpose: when every address of a name
    is refused, aiohappyeyeballs re-raises the first error only if all messages match,
    which keeps this type (and its address and reason) intact.
    """

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(errno.EACCES, "address refused by the origin address policy")
        self.address = address
        self.reason = reason


@dataclass(slots=True)
class _ConnectAttempt:
    """What one ``connect`` call lets through, and what it refused along the way."""

    trusted: bool
    refusals: list[AddressRefusedError] = field(default_factory=list)


# The connect attempt in progress in this task. aiohappyeyeballs runs its racing
# attempts in child tasks, which inherit this value, so the socket factory (which is
# only told the address) can tell which request it serves. A ContextVar holds no shared
# state: each task sees only its own attempt.
_ATTEMPT: ContextVar[_ConnectAttempt | None] = ContextVar("edge_connect_attempt", default=None)


class GuardedConnector(aiohttp.TCPConnector):
    """A TCP connector that refuses sockets to addresses the policy forbids.

    ``trusted_hosts`` are host names (as in URLs) whose connections are not checked:
    EDGE_ORIGIN's own host is configured by the operator and may well be private. A
    redirect to any other host is checked like a dynamic origin.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        trusted_hosts: Iterable[str] = (),
        limit: int = 64,
        resolver: AbstractResolver | None = None,
        ttl_dns_cache: int | None = 60,
    ) -> None:
        self._edge_allow_private = allow_private
        self._edge_trusted_hosts = frozenset(_normal_host(host) for host in trusted_hosts)
        super().__init__(
            limit=limit,
            resolver=resolver,
            ttl_dns_cache=ttl_dns_cache,
            socket_factory=self._open_socket,
        )

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: ClientTimeout,  # noqa: ASYNC109 - aiohttp's own signature
    ) -> Connection:
        trusted = _normal_host(req.url.raw_host) in self._edge_trusted_hosts
        attempt = _ConnectAttempt(trusted=trusted)
        token = _ATTEMPT.set(attempt)
        try:
            return await super().connect(req, traces, timeout)
        except aiohttp.ClientConnectorError as exc:
            # With several addresses, aiohappyeyeballs may merge the errors into a plain
            # OSError; any refusal on the way makes the whole attempt a refusal.
            if _lost_refusal(exc, attempt):
                raise aiohttp.ClientConnectorError(req.connection_key, attempt.refusals[0]) from exc
            raise
        finally:
            _ATTEMPT.reset(token)

    def _open_socket(self, addr_info: AddrInfoType) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        attempt = _ATTEMPT.get()
        if attempt is None or not attempt.trusted:
            address = str(sockaddr[0])
            reason = refusal_reason(address, allow_private=self._edge_allow_private)
            if reason is not None:
                refusal = AddressRefusedError(address, reason)
                if attempt is not None:
                    attempt.refusals.append(refusal)
                raise refusal
        return socket.socket(family=family, type=kind, proto=proto)


def _lost_refusal(exc: aiohttp.ClientConnectorError, attempt: _ConnectAttempt) -> bool:
    """True when addresses were refused but the error aiohttp raised no longer says so.

    Certificate and TLS errors (subclasses) are real answers from an allowed address and
    are kept as they are.
    """
    return (
        bool(attempt.refusals)
        and type(exc) is aiohttp.ClientConnectorError
        and not isinstance(exc.os_error, AddressRefusedError)
    )


def _normal_host(host: str | None) -> str:
    """A host name compared the way URLs spell it: lower case, no trailing dot."""
    return (host or "").lower().rstrip(".")


def host_of(url: str) -> str:
    """The host of ``url`` as the connector compares it (IDNA-encoded, lower case)."""
    return _normal_host(URL(url).raw_host)
