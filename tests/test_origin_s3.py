"""The S3 origin against moto's S3 server (with IAM authentication on) and the fake origin.

moto runs as its own process on a free loopback port, seeded once per module: three
buckets and a ``reader`` user allowed to GetObject in two of them. Authentication is
switched on after seeding, so AccessDenied, InvalidAccessKeyId and SignatureDoesNotMatch
are real answers. Failures moto cannot produce (a body cut short, a 503, a stall) come
from the fake HTTP origin standing in as an S3 endpoint.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry

from edge.errors import (
    BucketNotAllowed,
    EdgeError,
    NotFound,
    OriginBadRequest,
    OriginFailed,
    OriginForbidden,
    OriginMisconfigured,
    OriginOverloaded,
    OriginTimeout,
    OriginUnauthorized,
    SourceTooLarge,
)
from edge.metrics import Metrics
from edge.origins import FetchOptions, Origins, S3Origin
from edge.origins.s3 import S3Location, s3_error, translate_client_error
from edge.settings import load_settings
from tests.conftest import SHARED_IMAGES
from tests.fake_origin import FakeOrigin

STARTUP_SECONDS = 20.0
REGION = "us-east-1"
PHOTO = "flowers-1920x1080.jpg"
OTHER = "gallery-1024x772.webp"
OPTIONS = FetchOptions(max_bytes=50_000_000)


@dataclass(frozen=True)
class Moto:
    url: str
    access_key: str
    secret_key: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _require_moto() -> None:
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("boto3") is None:
        message = "moto[server] is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _wait_until_up(process: subprocess.Popen[bytes], url: str) -> bool:
    give_up = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < give_up and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1.0):
                return True
        except OSError:
            time.sleep(0.05)  # polling for a condition with a bound, not hoping for timing
    return False


def _seed(url: str) -> tuple[str, str]:
    """Buckets, objects and the reader user; returns the reader's access key pair."""
    import boto3  # type: ignore[import-untyped]

    admin = {
        "endpoint_url": url,
        "region_name": REGION,
        "aws_access_key_id": "AKIAADMINEXAMPLE",
        "aws_secret_access_key": "admin-secret",
    }
    s3 = boto3.client("s3", **admin)
    for bucket, name in (("images", PHOTO), ("other", OTHER), ("private", PHOTO)):
        s3.create_bucket(Bucket=bucket)
        s3.put_object(
            Bucket=bucket,
            Key=f"prod/{PHOTO}",
            Body=(SHARED_IMAGES / name).read_bytes(),
            ContentType="image/jpeg",
        )
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="reader")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": ["arn:aws:s3:::images/*", "arn:aws:s3:::other/*"],
            }
        ],
    }
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    return str(key["AccessKeyId"]), str(key["SecretAccessKey"])


def _enable_authentication(url: str) -> None:
    request = urllib.request.Request(
        f"{url}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=5.0) as response:
        assert response.status == 200


@pytest.fixture(scope="module", name="moto")
def moto_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    _require_moto()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        if not _wait_until_up(process, url):
            pytest.fail(f"moto did not start; see {log_path}")
        access_key, secret_key = _seed(url)
        _enable_authentication(url)
        yield Moto(url, access_key, secret_key)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _use_credentials(monkeypatch: pytest.MonkeyPatch, tmp: Path, key: str, secret: str) -> None:
    """The standard AWS chain sees only these keys: no files, profiles, proxies or IMDS."""
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture(name="reader")
def reader_fixture(moto: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Moto:
    _use_credentials(monkeypatch, tmp_path, moto.access_key, moto.secret_key)
    return moto


@pytest.fixture
async def images(reader: Moto, metrics: Metrics) -> AsyncIterator[S3Origin]:
    origin = await S3Origin.open(
        "s3://images/prod", metrics, endpoint_url=reader.url, region=REGION
    )
    yield origin
    await origin.close()


def count(metrics: Metrics, code: str) -> float:
    value = metrics.registry.get_sample_value(
        "edge_origin_requests_total", {"kind": "s3", "code": code}
    )
    return value or 0.0


def bytes_read(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("edge_origin_bytes_total", {"kind": "s3"}) or 0.0


async def test_fetch_returns_the_object_and_its_validators(
    images: S3Origin, metrics: Metrics
) -> None:
    expected = (SHARED_IMAGES / PHOTO).read_bytes()
    fetched = await images.fetch(PHOTO, OPTIONS)
    assert fetched.data == expected
    assert fetched.etag == '"' + hashlib.md5(expected).hexdigest() + '"'
    assert fetched.last_modified is not None
    modified = email.utils.parsedate_to_datetime(fetched.last_modified)
    assert abs(datetime.now(UTC) - modified) < timedelta(hours=1)
    assert fetched.last_modified.endswith(" GMT")
    assert fetched.content_type == "image/jpeg"
    assert count(metrics, "200") == 1
    assert bytes_read(metrics) == len(expected)


async def test_missing_key_is_not_found(images: S3Origin, metrics: Metrics) -> None:
    with pytest.raises(NotFound):
        await images.fetch("no-such-image.jpg", OPTIONS)
    assert count(metrics, "404") == 1


async def test_access_denied_is_forbidden(images: S3Origin, metrics: Metrics) -> None:
    with pytest.raises(OriginForbidden) as caught:
        await images.for_bucket("private").fetch(PHOTO, OPTIONS)
    assert isinstance(caught.value.__cause__, ClientError)
    assert count(metrics, "403") == 1


@pytest.mark.parametrize("wrong", ["access key", "secret"])
async def test_wrong_credentials_are_our_misconfiguration(
    moto: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, metrics: Metrics, wrong: str
) -> None:
    if wrong == "access key":
        _use_credentials(monkeypatch, tmp_path, "AKIAUNKNOWNEXAMPLE", moto.secret_key)
    else:
        _use_credentials(monkeypatch, tmp_path, moto.access_key, "not-the-secret")
    origin = await S3Origin.open("s3://images/prod", metrics, endpoint_url=moto.url, region=REGION)
    try:
        with pytest.raises(OriginMisconfigured) as caught:
            await origin.fetch(PHOTO, OPTIONS)
    finally:
        await origin.close()
    assert caught.value.status == 502
    code = "InvalidAccessKeyId" if wrong == "access key" else "SignatureDoesNotMatch"
    assert code in (caught.value.detail or "")


async def test_object_over_the_cap_is_too_large(images: S3Origin, metrics: Metrics) -> None:
    size = (SHARED_IMAGES / PHOTO).stat().st_size
    with pytest.raises(SourceTooLarge):
        await images.fetch(PHOTO, FetchOptions(max_bytes=size - 1))
    assert bytes_read(metrics) == 0
    # the connection was dropped, not left half-read: the next fetch works
    fetched = await images.fetch(PHOTO, FetchOptions(max_bytes=size))
    assert len(fetched.data) == size


async def test_bucket_override_shares_the_client(images: S3Origin) -> None:
    other = images.for_bucket("other")
    fetched = await other.fetch(PHOTO, OPTIONS)
    assert fetched.data == (SHARED_IMAGES / OTHER).read_bytes()
    assert other.identity != images.identity
    await other.close()  # borrowed client: closing the override leaves it open
    assert (await images.fetch(PHOTO, OPTIONS)).data[:2] == b"\xff\xd8"


async def test_router_selects_allowed_buckets(reader: Moto, metrics: Metrics) -> None:
    settings = load_settings(
        {
            "EDGE_ORIGIN": "s3://images/prod",
            "EDGE_S3_ENDPOINT_URL": reader.url,
            "EDGE_S3_REGION": REGION,
            "EDGE_BUCKETS_ALLOWED": "other",
        }
    )
    origins = await Origins.from_settings(settings, metrics)
    try:
        assert isinstance(origins.default, S3Origin)
        other = origins.select(None, "other")
        assert other is origins.select(None, "other")
        assert other.identity != origins.default.identity
        fetched = await other.fetch(PHOTO, OPTIONS)
        assert fetched.data == (SHARED_IMAGES / OTHER).read_bytes()
        with pytest.raises(BucketNotAllowed):
            origins.select(None, "private")
    finally:
        await origins.close()


def test_identity_names_endpoint_bucket_and_prefix_without_secrets(metrics: Metrics) -> None:
    origin = S3Origin(
        None,
        S3Location("images", "prod/"),
        metrics,
        endpoint_url="http://user:secret@127.0.0.1:9000/?token=x",
    )
    assert origin.identity == "s3+http://127.0.0.1:9000/images/prod/"
    assert "secret" not in origin.identity
    assert S3Origin(None, S3Location("images"), metrics).identity == "s3://images/"


# Failures moto cannot produce: the fake HTTP origin plays an S3 endpoint. With path
# addressing, s3://<behaviour>/ and key <rest> reach /<behaviour>/<rest> on it.


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[FakeOrigin]:
    _use_credentials(monkeypatch, tmp_path, "AKIAFAKEEXAMPLE", "fake-secret")
    origin = await FakeOrigin().start()
    yield origin
    await origin.stop()


async def open_on_fake(fake: FakeOrigin, behaviour: str, metrics: Metrics) -> S3Origin:
    return await S3Origin.open(
        f"s3://{behaviour}/", metrics, endpoint_url=fake.url, region=REGION, connect_timeout=2.0
    )


async def test_body_cut_short_is_bad_gateway(fake: FakeOrigin, metrics: Metrics) -> None:
    origin = await open_on_fake(fake, "lie", metrics)
    try:
        with pytest.raises(OriginFailed):
            await origin.fetch(PHOTO, OPTIONS)
    finally:
        await origin.close()
    assert count(metrics, "200") == 1
    assert count(metrics, "error") == 0  # one request, counted once


async def test_declared_length_is_checked_before_the_body(
    fake: FakeOrigin, metrics: Metrics
) -> None:
    # drip sends one byte every 20 ms: reading 1001 bytes would take 20 s
    origin = await open_on_fake(fake, "drip", metrics)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(SourceTooLarge):
                await origin.fetch(PHOTO, FetchOptions(max_bytes=1000))
            await fake.cancelled.wait()  # the connection was dropped, not drained
    finally:
        await origin.close()
    assert bytes_read(metrics) == 0


async def test_origin_503_is_overloaded_with_its_retry_after(
    fake: FakeOrigin, metrics: Metrics
) -> None:
    origin = await open_on_fake(fake, "status", metrics)
    try:
        with pytest.raises(OriginOverloaded) as caught:
            await origin.fetch(f"503/{PHOTO}", OPTIONS)
    finally:
        await origin.close()
    assert caught.value.retry_after == 7
    assert fake.events["request:status"] == 2  # one retry, no more
    assert count(metrics, "503") == 1


async def test_cancelled_fetch_closes_the_connection(fake: FakeOrigin, metrics: Metrics) -> None:
    origin = await open_on_fake(fake, "stall", metrics)
    try:
        fetch = asyncio.ensure_future(origin.fetch(f"30/{PHOTO}", OPTIONS))
        await asyncio.wait_for(_until(lambda: fake.events["request:stall"] == 1), 10)
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
        await asyncio.wait_for(fake.cancelled.wait(), 10)
    finally:
        await origin.close()
    assert fake.events["cancelled"] == 1


async def test_unreachable_endpoint_is_bad_gateway(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, metrics: Metrics
) -> None:
    _use_credentials(monkeypatch, tmp_path, "AKIAFAKEEXAMPLE", "fake-secret")
    origin = await S3Origin.open(
        "s3://images/", metrics, endpoint_url=f"http://127.0.0.1:{_free_port()}", region=REGION
    )
    try:
        with pytest.raises(OriginFailed):
            await origin.fetch(PHOTO, OPTIONS)
    finally:
        await origin.close()
    assert count(metrics, "error") == 1


async def _until(condition: Any) -> None:
    # the fake origin counts what it sees without signalling it: poll, bounded by the caller
    while not condition():  # noqa: ASYNC110
        await asyncio.sleep(0.01)


# The mapping itself, for codes no test server sends.

MAPPING = [
    ("NoSuchKey", 404, NotFound),
    ("NoSuchBucket", 404, NotFound),
    ("", 410, NotFound),
    ("AccessDenied", 403, OriginForbidden),
    ("AllAccessDisabled", 403, OriginForbidden),
    ("InvalidAccessKeyId", 403, OriginMisconfigured),
    ("SignatureDoesNotMatch", 403, OriginMisconfigured),
    ("RequestTimeTooSkewed", 403, OriginMisconfigured),
    ("ExpiredToken", 400, OriginMisconfigured),
    ("AuthorizationHeaderMalformed", 400, OriginMisconfigured),
    ("SlowDown", 503, OriginOverloaded),
    ("ServiceUnavailable", 503, OriginOverloaded),
    ("TooManyRequests", 429, OriginOverloaded),
    ("GatewayTimeout", 504, OriginTimeout),
    ("InvalidArgument", 400, OriginBadRequest),
    ("Unauthorized", 401, OriginUnauthorized),
    ("InternalError", 500, OriginFailed),
    ("NotImplemented", 501, OriginFailed),
    ("MethodNotAllowed", 405, OriginFailed),
    ("", None, OriginFailed),
]


@pytest.mark.parametrize(("code", "status", "expected"), MAPPING)
def test_error_mapping(code: str, status: int | None, expected: type[EdgeError]) -> None:
    error = s3_error(code, status, key="k")
    assert type(error) is expected


def client_error(code: str, status: int, headers: dict[str, str] | None = None) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": "whatever the text says"},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}},
    }
    return ClientError(response, "GetObject")


def test_client_error_translation_uses_code_and_status() -> None:
    overloaded = translate_client_error(client_error("SlowDown", 503), "k")
    assert isinstance(overloaded, OriginOverloaded)
    assert overloaded.retry_after == 1
    told = translate_client_error(client_error("SlowDown", 503, {"retry-after": "90"}), "k")
    assert isinstance(told, OriginOverloaded)
    assert told.retry_after == 30  # capped by the contract
    skewed = translate_client_error(client_error("RequestTimeTooSkewed", 403), "k")
    assert skewed.status == 502
