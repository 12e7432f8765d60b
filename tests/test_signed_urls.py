"""Signed URLs end to end: 403 before anything else, key rotation, the `edge sign` CLI."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest
from yarl import URL

from edge.signing import signed_url
from tests.helpers import decode, metric, start_edge


@pytest.fixture
async def signed(aiohttp_client: Any) -> Any:
    return await start_edge(aiohttp_client, {"EDGE_SIGNING_KEYS": "old-key,new-key"})


def get(client: Any, target: str) -> Any:
    return client.get(URL(target, encoded=True))


@pytest.mark.parametrize("key", [b"old-key", b"new-key"])
async def test_a_url_signed_with_any_current_key_is_served(signed: Any, key: bytes) -> None:
    response = await get(signed, signed_url("/photo-1200x980.jpg?w=100&fmt=png", key))
    assert response.status == 200
    assert decode(await response.read()).width == 100


@pytest.mark.parametrize(
    "target",
    [
        "/photo-1200x980.jpg?w=100",  # unsigned
        signed_url("/photo-1200x980.jpg?w=100", b"retired-key"),
        signed_url("/photo-1200x980.jpg?w=100", b"new-key").replace("w=100", "w=900"),
        signed_url("/photo-1200x980.jpg?w=100", b"new-key").replace("w=100", "w=10%30"),
        signed_url("/photo-1200x980.jpg?w=100", b"new-key") + "&w=100",
        signed_url("/photo-1200x980.jpg?w=100&h=50", b"new-key").replace(
            "w=100&h=50", "h=50&w=100"
        ),
        signed_url("/photo-1200x980.jpg?w=100", b"new-key").replace("photo", "Photo"),
    ],
)
async def test_anything_else_is_403(signed: Any, target: str) -> None:
    response = await get(signed, target)
    assert response.status == 403
    assert await metric(signed, "edge_requests_total", code="403", outcome="forbidden") == 1


async def test_signature_is_checked_before_parameters(signed: Any) -> None:
    response = await get(signed, "/photo-1200x980.jpg?width=banana&bogus=1")
    assert response.status == 403


async def test_signed_bad_parameters_are_still_400(signed: Any) -> None:
    response = await get(signed, signed_url("/photo-1200x980.jpg?width=banana", b"old-key"))
    assert response.status == 400


async def test_reserved_paths_need_no_signature(signed: Any) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await signed.get(path)).status == 200


async def test_the_cli_signs_what_the_server_accepts(signed: Any) -> None:
    env = {**os.environ, "EDGE_SIGNING_KEYS": "new-key"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge",
        "sign",
        "/photo-1200x980.jpg?w=64&fmt=webp",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    response = await get(signed, stdout.decode().strip())
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/webp"
