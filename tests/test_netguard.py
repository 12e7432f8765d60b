"""The SSRF guard: the address table, and refusals at connect time on real connections.

The live tests fetch from the fake origin on 127.0.0.1 and assert what the origin saw:
a refused hop never reaches it, which is the evidence the check ran before connecting.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from prometheus_client import CollectorRegistry

from edge.errors import AddressRefused, OriginFailed
from edge.metrics import Metrics
from edge.origins import FetchOptions, HttpOrigin, open_origin
from edge.origins.netguard import GuardedConnector, embedded_ipv4, is_refused, refusal_reason
from tests.fake_origin import FakeOrigin

PHOTO = "flowers-1920x1080.jpg"
OPTIONS = FetchOptions(max_bytes=50_000_000, connect_timeout=2.0)

# Teredo keeps the client address XOR-ed with all ones in the last 32 bits:
# 127.0.0.1 -> 80ff:fffe, 10.0.0.1 -> f5ff:fffe, 169.254.169.254 -> 5601:5601,
# 8.8.8.8 -> f7f7:f7f7 (server 65.54.227.120 = 4136:e378).
TEREDO = "2001:0:4136:e378:8000:63bf:"

REFUSED = [
    # IPv4
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("100.64.0.1", "CGNAT"),
    ("100.127.255.254", "CGNAT"),
    ("198.18.0.1", "benchmarking"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.1", "documentation"),
    ("192.0.0.8", "IETF"),
    # IPv6
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "unique local"),
    ("fd12:3456::1", "unique local"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("100::1", "discard"),
    # IPv6 forms wrapping a refused IPv4
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:7f00:1", "IPv4-mapped loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped private"),
    ("::ffff:169.254.169.254", "IPv4-mapped link-local"),
    ("::ffff:0.0.0.0", "IPv4-mapped unspecified"),
    ("::127.0.0.1", "IPv4-compatible loopback"),
    ("::10.0.0.1", "IPv4-compatible private"),
    ("::ffff:0:169.254.169.254", "IPv4-translated link-local"),
    ("2002:7f00:1::1", "6to4 loopback"),
    ("2002:a00:1::", "6to4 private"),
    ("2002:a9fe:a9fe::1", "6to4 link-local"),
    ("64:ff9b::127.0.0.1", "NAT64 loopback"),
    ("64:ff9b::10.0.0.1", "NAT64 private"),
    ("64:ff9b::169.254.169.254", "NAT64 link-local"),
    ("64:ff9b:1::169.254.169.254", "local-use NAT64 link-local"),
    ("64:ff9b:1::a00:1", "local-use NAT64 private"),
    ("64:ff9b:1:7f00:1::", "cannot be decoded"),
    (TEREDO + "80ff:fffe", "Teredo loopback"),
    (TEREDO + "f5ff:fffe", "Teredo private"),
    (TEREDO + "5601:5601", "Teredo link-local"),
    # not an address at all
    ("localhost", "not an IP address"),
]

ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "11.0.0.1",
    "100.63.255.255",
    "100.128.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "169.253.255.255",
    "192.167.255.255",
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "2002:808:808::1",
    "64:ff9b::8.8.8.8",
    "64:ff9b:1::8.8.8.8",
    TEREDO + "f7f7:f7f7",
]

# What EDGE_ALLOW_PRIVATE_ADDRESSES lets through, and what it never does.
PRIVATE_ONLY = [
    "127.0.0.1",
    "10.0.0.1",
    "169.254.169.254",
    "100.64.0.1",
    "::1",
    "fd00::1",
    "fe80::1",
    "::ffff:127.0.0.1",
    "2002:a9fe:a9fe::1",
    "64:ff9b::10.0.0.1",
    TEREDO + "80ff:fffe",
]
NEVER = ["0.0.0.0", "224.0.0.1", "255.255.255.255", "::", "ff02::1", "2001:db8::1"]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_refused_addresses(address: str, reason: str) -> None:
    found = refusal_reason(address)
    assert found is not None
    assert reason in found


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert not is_refused(address)


@pytest.mark.parametrize("address", PRIVATE_ONLY)
def test_private_addresses_allowed_when_configured(address: str) -> None:
    assert is_refused(address)
    assert not is_refused(address, allow_private=True)


@pytest.mark.parametrize("address", NEVER)
def test_never_routable_addresses_stay_refused(address: str) -> None:
    assert is_refused(address, allow_private=True)


def test_teredo_decodes_the_client_address() -> None:
    from ipaddress import IPv4Address, IPv6Address

    assert embedded_ipv4(IPv6Address(TEREDO + "80ff:fffe")) == ("Teredo", IPv4Address("127.0.0.1"))


class MapResolver(AbstractResolver):
    """A resolver answering from a fixed table, as a hostile or rebinding DNS would."""

    def __init__(self, table: Mapping[str, list[str]]) -> None:
        self._table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self._table[host]
        ]

    async def close(self) -> None:
        return None


@pytest.fixture
async def fake() -> AsyncIterator[FakeOrigin]:
    origin = await FakeOrigin().start()
    yield origin
    await origin.stop()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def fetch_via(
    base: str, metrics: Metrics, key: str, *, allow_private: bool = False, **connector: Any
) -> Any:
    origin = HttpOrigin(
        base, metrics, connector=GuardedConnector(allow_private=allow_private, **connector)
    )
    try:
        return await origin.fetch(key, OPTIONS)
    finally:
        await origin.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def refused_count(metrics: Metrics) -> float:
    return (
        metrics.registry.get_sample_value(
            "edge_origin_requests_total", {"kind": "http", "code": "refused"}
        )
        or 0.0
    )


async def test_ip_literal_is_refused_before_connecting(fake: FakeOrigin, metrics: Metrics) -> None:
    with pytest.raises(AddressRefused) as caught:
        await fetch_via(fake.url, metrics, f"ok/{PHOTO}")
    assert "127.0.0.1" in (caught.value.detail or "")
    assert fake.events["request:ok"] == 0
    assert refused_count(metrics) == 1


async def test_private_addresses_allowed_by_setting(fake: FakeOrigin, metrics: Metrics) -> None:
    fetched = await fetch_via(fake.url, metrics, f"ok/{PHOTO}", allow_private=True)
    assert fetched.data[:2] == b"\xff\xd8"
    assert fake.events["request:ok"] == 1


async def test_public_name_resolving_to_loopback_is_refused(
    fake: FakeOrigin, metrics: Metrics
) -> None:
    # two refused answers: aiohappyeyeballs merges their errors, the guard keeps the type
    resolver = MapResolver({"images.example.com": ["127.0.0.1", "::1"]})
    with pytest.raises(AddressRefused):
        await fetch_via(
            f"http://images.example.com:{fake.port}/", metrics, f"ok/{PHOTO}", resolver=resolver
        )
    assert fake.events["request:ok"] == 0


async def test_mapped_ipv6_answer_is_refused(fake: FakeOrigin, metrics: Metrics) -> None:
    resolver = MapResolver({"rebind.example.com": ["::ffff:127.0.0.1"]})
    with pytest.raises(AddressRefused) as caught:
        await fetch_via(
            f"http://rebind.example.com:{fake.port}/", metrics, f"ok/{PHOTO}", resolver=resolver
        )
    assert "IPv4-mapped loopback" in (caught.value.detail or "")


async def test_refusal_mixed_with_a_failed_address_is_still_a_refusal(metrics: Metrics) -> None:
    # 0.0.0.0 is refused even with private addresses allowed; 127.0.0.1 is allowed but
    # closed. aiohttp ends with the last address's ECONNREFUSED; the guard remembers.
    resolver = MapResolver({"mixed.example.com": ["0.0.0.0", "127.0.0.1"]})
    url = f"http://mixed.example.com:{closed_port()}/"
    with pytest.raises(AddressRefused) as caught:
        await fetch_via(url, metrics, "x", allow_private=True, resolver=resolver)
    assert "unspecified" in (caught.value.detail or "")


async def test_unrefused_connection_failure_stays_bad_gateway(metrics: Metrics) -> None:
    with pytest.raises(OriginFailed):
        await fetch_via(f"http://127.0.0.1:{closed_port()}/", metrics, "x", allow_private=True)
    assert refused_count(metrics) == 0


@pytest.fixture
async def configured(fake: FakeOrigin, metrics: Metrics) -> AsyncIterator[HttpOrigin]:
    """EDGE_ORIGIN pointing at the fake origin: its own host (127.0.0.1) is trusted."""
    origin = open_origin(fake.url, metrics)
    assert isinstance(origin, HttpOrigin)
    yield origin
    await origin.close()


async def test_configured_origin_host_is_trusted(configured: HttpOrigin, fake: FakeOrigin) -> None:
    fetched = await configured.fetch(f"redirect/2/{PHOTO}", OPTIONS)
    assert fetched.data[:2] == b"\xff\xd8"
    assert fake.events["request:redirect"] == 2


@pytest.mark.parametrize("target", ["localhost", "[::ffff:127.0.0.1]"])
async def test_redirect_leaving_the_origin_host_is_checked(
    configured: HttpOrigin, fake: FakeOrigin, target: str
) -> None:
    with pytest.raises(AddressRefused):
        await configured.fetch(f"goto/{target}:{fake.port}/{PHOTO}", OPTIONS)
    assert fake.events["request:goto"] == 1
    assert fake.events["request:ok"] == 0


async def test_redirect_to_private_host_allowed_by_setting(
    fake: FakeOrigin, metrics: Metrics
) -> None:
    origin = open_origin(fake.url, metrics, allow_private_addresses=True)
    try:
        fetched = await origin.fetch(f"goto/localhost:{fake.port}/{PHOTO}", OPTIONS)
    finally:
        await origin.close()
    assert fetched.data[:2] == b"\xff\xd8"
    assert fake.events["request:ok"] == 1


async def test_trusted_host_is_exempt_only_for_itself(fake: FakeOrigin, metrics: Metrics) -> None:
    resolver = MapResolver({"origin.internal": ["127.0.0.1"], "other.internal": ["127.0.0.1"]})
    connector = GuardedConnector(
        allow_private=False, trusted_hosts=["ORIGIN.internal."], resolver=resolver
    )
    session = aiohttp.ClientSession(connector=connector)
    try:
        async with session.get(f"http://origin.internal:{fake.port}/ok/{PHOTO}") as response:
            assert response.status == 200
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get(f"http://other.internal:{fake.port}/ok/{PHOTO}")
    finally:
        await session.close()
    assert fake.events["request:ok"] == 1
