"""Originals from a local folder (``file:///dir``), never reading outside it.

Keys were already rejected upstream when they hold dot segments, NUL or backslashes; this
backend still resolves every path (symlinks included) and refuses anything whose real
location is not under the root, so a symlink pointing out of the folder is a 404, not a
leak. Reads run in a thread so a slow disk never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import hashlib
import os
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from edge.errors import NotFound, OriginFailed
from edge.metrics import Metrics
from edge.origins.base import Fetched, FetchOptions, too_large

#: errors opening a key that mean there is no such image to serve: a name too long or a
#: symlink loop cannot name a file any more than a missing one does
_NOT_THERE = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EACCES,
        errno.EPERM,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)


class FileOrigin:
    """A folder of originals."""

    kind = "file"

    def __init__(self, root: Path, metrics: Metrics) -> None:
        self._root = root.resolve(strict=True)
        self._identity = self._root.as_uri()
        self._metrics = metrics

    @classmethod
    def from_url(cls, url: str, metrics: Metrics) -> FileOrigin:
        return cls(Path(unquote(urlsplit(url).path)), metrics)

    @property
    def identity(self) -> str:
        return self._identity

    async def fetch(self, key: str, options: FetchOptions) -> Fetched:
        try:
            fetched = await asyncio.to_thread(self._read, key, options)
        except NotFound:
            self._metrics.origin_requests.labels(kind=self.kind, code="404").inc()
            raise
        except OriginFailed:
            self._metrics.origin_requests.labels(kind=self.kind, code="error").inc()
            raise
        code = "304" if fetched.not_modified else "200"
        self._metrics.origin_requests.labels(kind=self.kind, code=code).inc()
        self._metrics.origin_bytes.labels(kind=self.kind).inc(len(fetched.data))
        return fetched

    async def close(self) -> None:
        return None

    def _read(self, key: str, options: FetchOptions) -> Fetched:
        path, max_bytes = self._inside_root(key), options.max_bytes
        try:
            with path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                if options.if_none_match is not None and options.if_none_match == _etag(stat):
                    return Fetched(
                        data=b"",
                        etag=_etag(stat),
                        last_modified=email.utils.formatdate(stat.st_mtime, usegmt=True),
                        not_modified=True,
                    )
                if stat.st_size > max_bytes:
                    raise too_large(max_bytes)
                data = handle.read(max_bytes + 1)
        except OSError as exc:
            if exc.errno in _NOT_THERE:
                raise NotFound("no such image", detail=f"key {key!r}") from exc
            raise OriginFailed(
                "the origin folder could not be read", detail=f"key {key!r}: {exc.strerror}"
            ) from exc
        if len(data) > max_bytes:
            raise too_large(max_bytes)
        return Fetched(
            data=data,
            etag=_etag(stat),
            last_modified=email.utils.formatdate(stat.st_mtime, usegmt=True),
        )

    def _inside_root(self, key: str) -> Path:
        """The real path of ``key``, or NotFound when it resolves outside the root.

        A key names one file one way: pathlib would also read ``a.jpg/``, ``a//b.jpg`` or
        an absolute path inside the root as a file, each an alias with its own cache
        entries (and the absolute one would confirm where the folder is).
        """
        if str(PurePosixPath(key)) != key or key.startswith("/"):
            raise NotFound("no such image", detail=f"key {key!r} is not a plain relative path")
        try:
            candidate = (self._root / key).resolve()
        except RuntimeError as exc:  # pathlib's word for a symlink loop (Python < 3.13)
            raise NotFound("no such image", detail=f"key {key!r} is a symlink loop") from exc
        if not candidate.is_relative_to(self._root) or candidate == self._root:
            raise NotFound("no such image", detail=f"key {key!r} is outside the origin folder")
        return candidate


def _etag(stat: os.stat_result) -> str:
    """A validator that changes when the file does (size, mtime and inode)."""
    token = f"{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}".encode()
    return '"' + hashlib.blake2b(token, digest_size=8).hexdigest() + '"'
