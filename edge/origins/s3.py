"""Originals from S3 or an S3-compatible store (``s3://bucket/prefix``).

Owns one aiobotocore S3 client per configured endpoint: SigV4, credentials from the
standard AWS chain, path-style addressing (MinIO, R2 and most S3-compatible stores need
it), a bounded connection pool, at most one retry, and a client-level connect timeout.
The request budget itself is the caller's: it cancels a fetch when the deadline passes.
Bucket overrides (``bucket=``) are further ``S3Origin`` objects sharing that client.

S3 failures are translated by their error Code and HTTP status, never by message text
(DESIGN.md section 2): missing keys are 404, AccessDenied is 403, throttling is 503,
our own credential or clock problems are 502, everything else unexpected is 502.
botocore is untyped; its objects stay inside this module.
"""

from __future__ import annotations

import contextlib
import email.utils
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from edge.errors import (
    EdgeError,
    FetchTimeout,
    NotFound,
    OriginBadRequest,
    OriginFailed,
    OriginForbidden,
    OriginMisconfigured,
    OriginOverloaded,
    OriginTimeout,
    OriginUnauthorized,
)
from edge.metrics import Metrics
from edge.origins.base import Fetched, FetchOptions, too_large

CHUNK = 256 * 1024
POOL_SIZE = 64
#: generous on purpose: a stalled body is cut by the caller's budget long before this
READ_TIMEOUT = 60.0

# Error codes that mean our side is wrong (keys, token, clock, region), whatever their
# HTTP status: the operator must act, so they are 502 and never look like a missing or
# forbidden object.
MISCONFIGURED_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",
    }
)
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound"})
FORBIDDEN_CODES = frozenset({"AccessDenied"})
OVERLOADED_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
)

# Failures below S3's own answers: the network, timeouts (TimeoutError is an OSError),
# credential look-ups and broken bodies. Anything else is a bug and surfaces as a 500.
_TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, OSError)
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where objects live: a bucket and a key prefix (empty, or ending in ``/``)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def from_url(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
        prefix = unquote(parts.path).lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return cls(parts.netloc, prefix)

    def object_key(self, key: str) -> str:
        return self.prefix + key


class S3Origin:
    """One bucket (and prefix) behind a shared S3 client.

    The origin created by ``open`` owns the client and closes it; origins made with
    ``for_bucket`` borrow it, and their ``close`` does nothing.
    """

    kind = "s3"

    def __init__(
        self,
        client: Any,
        location: S3Location,
        metrics: Metrics,
        *,
        endpoint_url: str | None = None,
        owned: contextlib.AsyncExitStack | None = None,
    ) -> None:
        self._client = client
        self._location = location
        self._metrics = metrics
        self._endpoint = _public_endpoint(endpoint_url)
        self._owned = owned

    @classmethod
    async def open(
        cls,
        url: str,
        metrics: Metrics,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout: float = 3.0,
    ) -> S3Origin:
        """Create the client for ``s3://bucket/prefix`` (resolving credentials once)."""
        location = S3Location.from_url(url)
        stack = contextlib.AsyncExitStack()
        creator = get_session().create_client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=_client_config(connect_timeout),
        )
        client = await stack.enter_async_context(creator)
        return cls(client, location, metrics, endpoint_url=endpoint_url, owned=stack)

    @property
    def bucket(self) -> str:
        return self._location.bucket

    @property
    def identity(self) -> str:
        where = f"s3+{self._endpoint}/" if self._endpoint else "s3://"
        return f"{where}{self._location.bucket}/{self._location.prefix}"

    def for_bucket(self, bucket: str) -> S3Origin:
        """The same prefix in another bucket, through this origin's client."""
        location = S3Location(bucket, self._location.prefix)
        return S3Origin(self._client, location, self._metrics, endpoint_url=self._endpoint)

    async def close(self) -> None:
        if self._owned is not None:
            owned, self._owned = self._owned, None
            await owned.aclose()

    async def fetch(self, key: str, options: FetchOptions) -> Fetched:
        # options.connect_timeout cannot be set per request on a botocore client: the
        # client's own connect timeout applies, and the caller's deadline bounds the rest.
        response = await self._get_object(key, options)
        if response.get("NotModified"):
            return Fetched(data=b"", etag=options.if_none_match, not_modified=True)
        async with response["Body"] as body:
            declared = response.get("ContentLength")
            if isinstance(declared, int) and declared > options.max_bytes:
                raise too_large(options.max_bytes)
            data = await self._read_body(body, options.max_bytes)
        return Fetched(
            data=data,
            etag=_text(response.get("ETag")),
            last_modified=_http_date(response.get("LastModified")),
            content_type=_text(response.get("ContentType")),
        )

    async def _get_object(self, key: str, options: FetchOptions) -> dict[str, Any]:
        """GetObject's response (headers parsed, body not read); counts the request.

        A conditional request the object still satisfies comes back as
        ``{"NotModified": True}`` (botocore raises a 304 as an error).
        """
        conditions: dict[str, Any] = {}
        if options.if_none_match:
            conditions["IfNoneMatch"] = options.if_none_match
        try:
            response = await self._client.get_object(
                Bucket=self._location.bucket, Key=self._location.object_key(key), **conditions
            )
        except ClientError as exc:
            code, status, retry_after = _error_fields(exc)
            self._count(str(status) if status else "error")
            if status == 304 and conditions:
                return {"NotModified": True}
            raise s3_error(code, status, key=key, retry_after=retry_after) from exc
        except _TRANSPORT_ERRORS as exc:
            self._count("timeout" if _is_timeout(exc) else "error")
            raise _transport_error(exc, "the S3 request failed") from exc
        self._count("200")
        return dict(response)

    async def _read_body(self, body: Any, max_bytes: int) -> bytes:
        """The object's bytes, read in chunks and cut off above ``max_bytes``."""
        data = bytearray()
        try:
            while chunk := await body.read(CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise too_large(max_bytes)
        except _TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, "the S3 body broke off") from exc
        self._metrics.origin_bytes.labels(kind=self.kind).inc(len(data))
        return bytes(data)

    def _count(self, code: str) -> None:
        self._metrics.origin_requests.labels(kind=self.kind, code=code).inc()


def s3_error(
    code: str, status: int | None, *, key: str, retry_after: str | None = None
) -> EdgeError:
    """The EdgeError for an S3 error response, from its error Code and HTTP status."""
    detail = f"S3 answered {status} {code} for key {key!r}"
    if code in MISCONFIGURED_CODES:
        return OriginMisconfigured("the S3 origin rejected edge's credentials", detail=detail)
    if code in NOT_FOUND_CODES or status in (404, 410):
        return NotFound("no such image", detail=detail)
    if code in FORBIDDEN_CODES or status == 403:
        return OriginForbidden("the S3 origin denied access", detail=detail)
    if code in OVERLOADED_CODES or status in (429, 503):
        return OriginOverloaded(
            "the S3 origin is overloaded", retry_after=_seconds(retry_after), detail=detail
        )
    by_status: dict[int | None, type[EdgeError]] = {
        400: OriginBadRequest,
        401: OriginUnauthorized,
        504: OriginTimeout,
    }
    error = by_status.get(status, OriginFailed)
    return error(f"the S3 origin answered {status}", detail=detail)


def translate_client_error(exc: ClientError, key: str) -> EdgeError:
    """``s3_error`` for a botocore ClientError (the form the client raises)."""
    code, status, retry_after = _error_fields(exc)
    return s3_error(code, status, key=key, retry_after=retry_after)


def _error_fields(exc: ClientError) -> tuple[str, int | None, str | None]:
    """Code, HTTP status and Retry-After of a ClientError, tolerating missing parts."""
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    metadata = response.get("ResponseMetadata", {})
    status = metadata.get("HTTPStatusCode")
    headers = metadata.get("HTTPHeaders", {})
    retry_after = headers.get("retry-after")
    return code, status if isinstance(status, int) else None, retry_after


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, TimeoutError))


def _transport_error(exc: BaseException, reason: str) -> EdgeError:
    """The EdgeError for a failure below S3's answers: network, timeouts, credentials."""
    detail = f"{type(exc).__name__}: {exc}"
    if _is_timeout(exc):
        return FetchTimeout("the S3 origin did not answer in time", detail=detail)
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return OriginMisconfigured("edge has no usable S3 credentials", detail=detail)
    return OriginFailed(reason, detail=detail)


def _client_config(connect_timeout: float) -> Any:
    return AioConfig(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        # one quick retry at most (botocore counts retries here, not attempts): the
        # request budget is short and a 503 is better passed on than waited out
        retries={"mode": "standard", "max_attempts": 1},
        connect_timeout=connect_timeout,
        read_timeout=READ_TIMEOUT,
        max_pool_connections=POOL_SIZE,
        # load the service model in a thread, not on the event loop
        warm_up_loader_caches=True,
    )


def _public_endpoint(endpoint_url: str | None) -> str | None:
    """The endpoint's scheme, host, port and path: never userinfo or a query."""
    if not endpoint_url:
        return None
    parts = urlsplit(endpoint_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _http_date(value: object) -> str | None:
    """Last-Modified as an HTTP date (botocore parses it into a datetime)."""
    if not isinstance(value, datetime):
        return None
    moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return email.utils.format_datetime(moment.astimezone(UTC), usegmt=True)


def _seconds(value: str | None) -> int:
    """Seconds from a Retry-After header (delta form), defaulting to 1."""
    try:
        return int(value) if value is not None else 1
    except ValueError:
        return 1
