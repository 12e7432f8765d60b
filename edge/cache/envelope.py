"""The stored form of a cached result: a small binary envelope, never pickle.

Layout (big-endian)::

    magic "EDGC" | version u8 | metadata length u32 | body length u32 | metadata | body

The metadata is a UTF-8 JSON object holding everything the response needs besides the
body. Both lengths are checked against the total, so a truncated or padded value is
rejected rather than served. ``decode`` treats its input as hostile (a shared cache can be
written by anyone who can reach it): any malformation raises ``CorruptEntry`` and nothing
else, and text fields with control characters are refused so a poisoned cache cannot
inject response headers.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from typing import Any

from edge.responses import is_header_text

MAGIC = b"EDGC"
VERSION = 1
_HEADER = struct.Struct(">4sBII")
#: metadata is a handful of short strings; anything larger is garbage, not a result
MAX_METADATA_BYTES = 16 * 1024
_OPTIONAL_TEXT = ("etag", "last_modified", "vary", "error", "origin_etag")


class CorruptEntry(Exception):
    """A stored value is not a valid envelope (garbage, truncated, or from elsewhere)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached response: the body and the headers needed to serve it again."""

    body: bytes
    content_type: str
    etag: str | None
    last_modified: str | None
    #: unix time the result was produced; freshness and staleness are measured from it
    created: float
    #: 200, or 404/400 for short negative entries (body: a short text)
    status: int = 200
    #: the Vary header the response carried (format negotiation, client hints)
    vary: str | None = None
    #: outcome of the failure this entry stands for (negative entries, default or error
    #: images served with 200), so a hit is counted as that outcome; None for successes
    error: str | None = None
    #: the origin's own ETag, for revalidating with If-None-Match once the entry is stale
    origin_etag: str | None = None


def encode(entry: Entry) -> bytes:
    """The envelope bytes of ``entry``; ``ValueError`` if ``decode`` would refuse it."""
    check_storable(entry)
    metadata = json.dumps(_metadata_of(entry), separators=(",", ":")).encode()
    header = _HEADER.pack(MAGIC, VERSION, len(metadata), len(entry.body))
    return b"".join((header, metadata, entry.body))


def decode(raw: bytes) -> Entry:
    """The entry stored in ``raw``; raises ``CorruptEntry`` (only) if it is not one."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise CorruptEntry(f"expected bytes, got {type(raw).__name__}")
    view = memoryview(raw)
    metadata_length, body_length = _read_header(view)
    metadata_end = _HEADER.size + metadata_length
    fields = _parse_metadata(view[_HEADER.size : metadata_end])
    body = bytes(view[metadata_end : metadata_end + body_length])
    return _entry_from(fields, body)


def _metadata_of(entry: Entry) -> dict[str, Any]:
    optional = {name: getattr(entry, name) for name in _OPTIONAL_TEXT}
    return {
        "content_type": entry.content_type,
        "created": entry.created,
        "status": entry.status,
        # absent means None: keeps the envelope small for the common success entry
        **{name: value for name, value in optional.items() if value is not None},
    }


def entry_size(entry: Entry) -> int:
    """What an entry held in memory weighs: the object, its body and its texts, as the
    interpreter counts them (a flood of tiny negative entries is mostly overhead)."""
    if not isinstance(entry, Entry):
        raise TypeError(f"the memory tier holds entries, not {type(entry).__name__}")
    texts = (entry.content_type, *(getattr(entry, name) for name in _OPTIONAL_TEXT))
    parts = (entry, entry.body, *(text for text in texts if text is not None))
    return sum(sys.getsizeof(part) for part in parts)


def check_storable(entry: Entry) -> None:
    """``ValueError`` for an entry every reader would count as corrupt forever."""
    texts = {"content_type": entry.content_type} | {n: getattr(entry, n) for n in _OPTIONAL_TEXT}
    for name, value in texts.items():
        if value is not None and not is_header_text(value):
            raise ValueError(f"{name} must be printable ASCII: {value!r}")
    if not entry.content_type:
        raise ValueError("content_type must not be empty")
    if not 100 <= entry.status <= 599 or not math.isfinite(entry.created):
        raise ValueError("status must be an HTTP status and created a finite time")


def _read_header(view: memoryview) -> tuple[int, int]:
    if len(view) < _HEADER.size:
        raise CorruptEntry("shorter than the envelope header")
    magic, version, metadata_length, body_length = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntry("bad magic")
    if version != VERSION:
        raise CorruptEntry(f"unknown envelope version {version}")
    if metadata_length > MAX_METADATA_BYTES:
        raise CorruptEntry("metadata too large")
    if _HEADER.size + metadata_length + body_length != len(view):
        raise CorruptEntry("lengths do not match the value's size (truncated or padded)")
    return metadata_length, body_length


def _parse_metadata(raw: memoryview) -> dict[str, Any]:
    try:
        fields = json.loads(bytes(raw).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptEntry("metadata is not UTF-8 JSON") from exc
    if not isinstance(fields, dict):
        raise CorruptEntry("metadata is not an object")
    return fields


def _entry_from(fields: dict[str, Any], body: bytes) -> Entry:
    # unknown fields are ignored so an older release can read a newer one's entries
    # during a rolling restart
    return Entry(
        body=body,
        content_type=_content_type(fields),
        created=_created(fields.get("created")),
        status=_status(fields.get("status")),
        **{name: _optional_text(fields, name) for name in _OPTIONAL_TEXT},
    )


def _text(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    # header values are printable ASCII; anything else came from a foreign or hostile writer
    if not isinstance(value, str) or not is_header_text(value):
        raise CorruptEntry(f"{name} is not printable ASCII text")
    return value


def _content_type(fields: dict[str, Any]) -> str:
    value = _text(fields, "content_type")
    if not value:
        raise CorruptEntry("content_type is empty")
    return value


def _optional_text(fields: dict[str, Any], name: str) -> str | None:
    if fields.get(name) is None:
        return None
    return _text(fields, name)


def _created(value: object) -> float:
    # bool is an int subclass; True is not a timestamp
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CorruptEntry("created is not a number")
    try:
        created = float(value)
    except OverflowError as exc:
        raise CorruptEntry("created is out of range") from exc
    if not math.isfinite(created):
        raise CorruptEntry("created is not finite")
    return created


def _status(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise CorruptEntry("status is not an HTTP status")
    return value
