"""Origins through HTTP: one image from a folder, an HTTP origin and an S3 bucket gives one
output; bucket and dynamic-origin policy; nothing outside the folder is ever read."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from edge.app import STATE
from edge.responses import is_header_text
from tests.conftest import SHARED_IMAGES
from tests.fake_origin import FakeOrigin
from tests.helpers import decode, mean_difference, metric, start_edge
from tests.test_origin_s3 import REGION, Moto, moto_fixture, reader_fixture  # noqa: F401

PHOTO = "flowers-1920x1080.jpg"
QUERY = "?w=240&h=240&fit=cover&fmt=png"


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


def s3_env(moto_url: str, **more: str) -> dict[str, str]:
    return {
        "EDGE_ORIGIN": "s3://images/prod",
        "EDGE_S3_ENDPOINT_URL": moto_url,
        "EDGE_S3_REGION": REGION,
        **more,
    }


async def test_folder_http_and_s3_give_the_same_image(
    aiohttp_client: Any, origin: FakeOrigin, reader: Moto, tmp_path: Path
) -> None:
    (tmp_path / PHOTO).write_bytes((SHARED_IMAGES / PHOTO).read_bytes())
    folder = await start_edge(aiohttp_client, {"EDGE_ORIGIN": tmp_path.as_uri()})
    http = await start_edge(aiohttp_client, {"EDGE_ORIGIN": origin.url + "ok/"})
    s3 = await start_edge(aiohttp_client, s3_env(reader.url))
    images = []
    for client in (folder, http, s3):
        response = await client.get(f"/{PHOTO}{QUERY}")
        assert response.status == 200, await response.text()
        images.append(decode(await response.read()))
    assert {(i.width, i.height) for i in images} == {(240, 240)}
    assert mean_difference(images[0], images[1]) < 0.5
    assert mean_difference(images[0], images[2]) < 0.5
    assert await metric(s3, "edge_origin_requests_total", kind="s3", code="200") == 1


@pytest.mark.parametrize(
    ("env", "path", "status"),
    [
        ({}, f"/missing.jpg{QUERY}", 404),
        ({}, f"/{PHOTO}{QUERY}&bucket=other", 401),
        ({"EDGE_BUCKETS_ALLOWED": "other"}, f"/{PHOTO}{QUERY}&bucket=other", 200),
        ({"EDGE_BUCKETS_ALLOWED": "private"}, f"/{PHOTO}{QUERY}&bucket=private", 403),
        ({}, f"/{PHOTO}{QUERY}&origin=example.com", 401),
    ],
)
async def test_s3_statuses_through_http(
    aiohttp_client: Any, reader: Moto, env: dict[str, str], path: str, status: int
) -> None:
    client = await start_edge(aiohttp_client, s3_env(reader.url, **env))
    response = await client.get(path)
    assert response.status == status, await response.text()


async def test_dynamic_origin_needs_the_switch_and_an_allowed_host(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    target = f"/ok/{PHOTO}?w=50&origin=http://127.0.0.1:{origin.port}"
    off = await start_edge(aiohttp_client, {"EDGE_HOSTS_ALLOWED": "127.0.0.1"})
    assert (await off.get(target)).status == 401
    on = {"EDGE_ALLOW_DYNAMIC_ORIGIN": "true"}
    other_host = await start_edge(aiohttp_client, {**on, "EDGE_HOSTS_ALLOWED": "*.example.com"})
    assert (await other_host.get(target)).status == 401
    # allowed host, but loopback is refused by the address guard unless private is allowed
    guarded = await start_edge(aiohttp_client, {**on, "EDGE_HOSTS_ALLOWED": "127.0.0.1"})
    refused = await guarded.get(target)
    assert refused.status == 401
    assert origin.events["request:ok"] == 0
    trusting = await start_edge(
        aiohttp_client,
        {**on, "EDGE_HOSTS_ALLOWED": "127.0.0.1", "EDGE_ALLOW_PRIVATE_ADDRESSES": "true"},
    )
    assert (await trusting.get(target)).status == 200
    assert origin.events["request:ok"] == 1


async def test_symlinks_out_of_the_folder_are_not_followed(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes((SHARED_IMAGES / PHOTO).read_bytes())
    (root / "inside.jpg").write_bytes((SHARED_IMAGES / PHOTO).read_bytes())
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    os.symlink(outside, root / "dir")
    os.symlink(root / "inside.jpg", root / "alias.jpg")  # a link that stays inside is fine
    client = await start_edge(aiohttp_client, {"EDGE_ORIGIN": root.as_uri()})
    assert (await client.get("/link.jpg?w=10")).status == 404
    assert (await client.get("/dir/secret.jpg?w=10")).status == 404
    assert (await client.get("/link.jpg")).status == 404
    assert (await client.get("/alias.jpg?w=10")).status == 200
    assert (await client.get("/inside.jpg?w=10")).status == 200


async def test_keys_no_file_can_have_are_404_not_500(aiohttp_client: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(root / "loop-b.jpg", root / "loop-a.jpg")
    os.symlink(root / "loop-a.jpg", root / "loop-b.jpg")
    client = await start_edge(aiohttp_client, {"EDGE_ORIGIN": root.as_uri()})
    long_name = "k" * 252 + ".jpg"  # over the 255 bytes a file name may have
    long_path = "/".join(["d" * 210] * 20) + ".jpg"  # over the 4096 bytes of a path
    for key in (long_name, long_path, "loop-a.jpg"):
        for query in ("?w=100", ""):
            response = await client.get(f"/{key}{query}")
            assert response.status == 404, (key[:20], query, await response.text())
        response = await client.get(f"/{key}?req=exists")
        assert (response.status, await response.text()) == (200, "catalogRecord.exists=0\n")
    assert await metric(client, "edge_requests_total", outcome="internal_error") == 0


async def test_a_file_is_named_one_way_only(aiohttp_client: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "photo.jpg").write_bytes((SHARED_IMAGES / PHOTO).read_bytes())
    client = await start_edge(aiohttp_client, {"EDGE_ORIGIN": root.as_uri()})
    assert (await client.get("/d/photo.jpg?w=10")).status == 200
    for alias in ("/d/photo.jpg/", "/d//photo.jpg", "/d/photo.jpg//"):
        for query in ("?w=10", ""):
            response = await client.get(alias + query)
            assert response.status == 404, (alias, query)
    # an absolute path inside the folder, sent as is (a client library would read it as
    # a network-path reference)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        target = ("/" + str(root / "d" / "photo.jpg")).encode()
        writer.write(b"GET " + target + b"?w=10 HTTP/1.1\r\nHost: x\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert status_line.split()[1] == b"404"


async def test_an_unreadable_original_is_a_502_naming_the_origin(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "photo.jpg").write_bytes((SHARED_IMAGES / PHOTO).read_bytes())
    client = await start_edge(aiohttp_client, {"EDGE_ORIGIN": root.as_uri()})
    real_open = Path.open

    def failing_disk(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path.name == "photo.jpg":
            raise OSError(5, "Input/output error")  # EIO: the disk, not the key
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing_disk)
    response = await client.get("/photo.jpg?w=100")
    assert response.status == 502
    assert "origin" in (await response.text()).lower()
    assert await metric(client, "edge_origin_requests_total", kind="file", code="error") == 1


async def test_s3_entries_are_revalidated_with_if_none_match(
    aiohttp_client: Any, reader: Moto
) -> None:
    now = [1_800_000_000.0]
    client = await start_edge(
        aiohttp_client, s3_env(reader.url, EDGE_CACHE_TTL="60"), cache_clock=lambda: now[0]
    )
    assert (await client.get(f"/{PHOTO}?w=20")).status == 200
    background = client.server.app[STATE].background
    if background:
        await asyncio.wait(background, timeout=5)
    now[0] += 61
    renewed = await client.get(f"/{PHOTO}?w=20")
    assert renewed.status == 200
    assert renewed.headers["X-Edge-Cache"] == "hit"
    assert await metric(client, "edge_origin_requests_total", kind="s3", code="304") == 1


class RawOrigin:
    """An HTTP origin that sends its header bytes as given, past any client-side checks."""

    def __init__(self, body: bytes, header: bytes) -> None:
        self.body, self.header = body, header
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
            + self.header
            + b"\r\nContent-Length: "
            + str(len(self.body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + self.body
        )
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize(
    "header",
    [b'ETag: "a\xffb"', b'ETag: "a\x01b"', b"Last-Modified: \x01x", b"Last-Modified: \xe9\xe9"],
)
async def test_origin_validators_that_are_not_header_text_are_dropped(
    aiohttp_client: Any, header: bytes
) -> None:
    origin = RawOrigin((SHARED_IMAGES / PHOTO).read_bytes(), header)
    client = await start_edge(aiohttp_client, {"EDGE_ORIGIN": await origin.start()})
    try:
        first = await client.get(f"/{PHOTO}?w=100")
        assert first.status == 200, await first.text()
        assert all(is_header_text(value) for value in first.headers.values())
        again = await client.get(f"/{PHOTO}?w=100")
        assert (again.status, again.headers["X-Edge-Cache"]) == (200, "hit")  # it was stored
        original = await client.get(f"/{PHOTO}")
        assert original.status == 200
        assert decode(await original.read()).width == 1920
        assert await metric(client, "edge_requests_total", outcome="internal_error") == 0
    finally:
        await origin.stop()
