"""What every origin backend promises: fetch one object's bytes, or raise an EdgeError.

Backends translate their own failures (OS errors, HTTP statuses, S3 error codes) into the
EdgeError tree where they arise. The caller owns the time budget: it cancels a fetch when
the deadline passes, so backends must be cancellation-safe and never swallow
``CancelledError``. Each backend counts its own requests and bytes in the metrics it is
given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from edge.errors import SourceTooLarge
from edge.responses import is_header_text


@dataclass(frozen=True, slots=True)
class Fetched:
    """An original's bytes and the validators the response and cache need.

    The texts come from the origin's headers and go out in edge's own responses and
    cache entries, so a value that is not printable ASCII (a control character, a byte
    the origin sent outside UTF-8) is dropped here, as if the origin had not sent it.
    """

    data: bytes
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = None
    #: the origin answered a conditional fetch with "not modified" (``data`` is empty)
    not_modified: bool = False

    def __post_init__(self) -> None:
        for name in ("etag", "last_modified", "content_type"):
            value = getattr(self, name)
            if value is not None and not is_header_text(value):
                object.__setattr__(self, name, None)


@dataclass(frozen=True, slots=True)
class FetchOptions:
    """Per-request limits and context passed to a backend."""

    max_bytes: int
    request_id: str = "-"
    #: seconds to connect, already clipped to the request's remaining budget
    connect_timeout: float = 3.0
    #: extra headers for the origin request (trace context); never Cookie or Authorization
    headers: dict[str, str] = field(default_factory=dict)
    #: revalidation of a cached result: the origin validators it was made from
    if_none_match: str | None = None
    if_modified_since: str | None = None


class Origin(Protocol):
    """A place originals come from."""

    #: metrics label: file, http or s3
    kind: str

    @property
    def identity(self) -> str:
        """A stable, secret-free name of where objects come from, for cache keys."""
        ...

    async def fetch(self, key: str, options: FetchOptions) -> Fetched:
        """Return the object's bytes; raise an EdgeError subclass on any failure."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


def too_large(max_bytes: int) -> SourceTooLarge:
    """The error for an original over EDGE_MAX_SOURCE_BYTES (shared by every backend)."""
    return SourceTooLarge(
        "the original is larger than the configured maximum",
        detail=f"limit EDGE_MAX_SOURCE_BYTES={max_bytes}",
    )
