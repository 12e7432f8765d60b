"""The stored envelope: exact round trips, and nothing but CorruptEntry from garbage."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.cache.envelope import MAGIC, VERSION, CorruptEntry, Entry, decode, encode

printable_ascii = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
header_text = st.text(printable_ascii, min_size=1, max_size=40)

entries = st.builds(
    Entry,
    body=st.binary(max_size=2048),
    content_type=header_text,
    etag=st.none() | header_text,
    last_modified=st.none() | header_text,
    created=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    status=st.sampled_from([200, 400, 404]),
    vary=st.none() | header_text,
    error=st.none() | st.sampled_from(["not_found", "bad_request"]),
    origin_etag=st.none() | header_text,
)

PHOTO = Entry(
    body=b"\xff\xd8\xff\xe0 jpeg bytes",
    content_type="image/jpeg",
    etag='"a1b2"',
    last_modified="Wed, 21 Oct 2015 07:28:00 GMT",
    created=1_700_000_000.25,
    vary="Accept",
    origin_etag='"origin-1"',
)


def envelope(metadata: object, body: bytes = b"") -> bytes:
    """A well-framed envelope around arbitrary metadata, to probe field validation."""
    raw = json.dumps(metadata).encode()
    return struct.pack(">4sBII", MAGIC, VERSION, len(raw), len(body)) + raw + body


def assert_decodes_or_refuses(raw: bytes) -> None:
    """``decode`` either yields a well-formed entry or raises CorruptEntry, nothing else."""
    try:
        entry = decode(raw)
    except CorruptEntry:
        return
    assert decode(encode(entry)) == entry


def test_a_result_round_trips_exactly() -> None:
    assert decode(encode(PHOTO)) == PHOTO


def test_a_negative_entry_round_trips() -> None:
    missing = Entry(b"Not Found", "text/plain", None, None, 1.0, status=404, error="not_found")
    assert decode(encode(missing)) == missing


def test_the_body_is_stored_raw_after_the_metadata() -> None:
    raw = encode(PHOTO)
    assert raw.startswith(MAGIC)
    assert raw.endswith(PHOTO.body)


@given(entries)
def test_every_storable_entry_round_trips(entry: Entry) -> None:
    assert decode(encode(entry)) == entry


@given(st.binary(max_size=512))
def test_random_bytes_raise_nothing_but_corrupt_entry(raw: bytes) -> None:
    assert_decodes_or_refuses(raw)


@given(st.binary(max_size=256))
def test_random_bytes_behind_a_valid_header_are_rejected(tail: bytes) -> None:
    raw = struct.pack(">4sBII", MAGIC, VERSION, len(tail), 0) + tail
    try:
        entry = decode(raw)
    except CorruptEntry:
        return
    # the only way through is a tail that happens to be valid metadata
    assert isinstance(json.loads(tail), dict)
    assert entry.body == b""


@given(entries, st.data())
def test_truncated_or_padded_envelopes_are_rejected(entry: Entry, data: st.DataObject) -> None:
    raw = encode(entry)
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    with pytest.raises(CorruptEntry):
        decode(raw[:cut])
    with pytest.raises(CorruptEntry):
        decode(raw + data.draw(st.binary(min_size=1, max_size=8)))


@given(entries, st.data())
def test_flipped_bytes_raise_nothing_but_corrupt_entry(entry: Entry, data: st.DataObject) -> None:
    raw = bytearray(encode(entry))
    position = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    raw[position] ^= data.draw(st.integers(min_value=1, max_value=255))
    assert_decodes_or_refuses(bytes(raw))


def test_a_pickle_is_never_unpickled() -> None:
    with pytest.raises(CorruptEntry, match="magic"):
        decode(pickle.dumps(PHOTO))


def test_an_unknown_version_is_rejected() -> None:
    raw = bytearray(encode(PHOTO))
    raw[len(MAGIC)] = VERSION + 1
    with pytest.raises(CorruptEntry, match="version"):
        decode(bytes(raw))


def test_a_value_of_the_wrong_type_is_rejected() -> None:
    with pytest.raises(CorruptEntry):
        decode("EDGC")  # type: ignore[arg-type]


GOOD_FIELDS = {"content_type": "image/png", "created": 1.0, "status": 200}


@pytest.mark.parametrize(
    "metadata",
    [
        [1, 2, 3],
        {**GOOD_FIELDS, "content_type": ""},
        {**GOOD_FIELDS, "content_type": 7},
        {**GOOD_FIELDS, "content_type": "image/png\r\nSet-Cookie: a=b"},
        {**GOOD_FIELDS, "etag": "caf\u00e9"},
        {**GOOD_FIELDS, "vary": ["Accept"]},
        {**GOOD_FIELDS, "created": "yesterday"},
        {**GOOD_FIELDS, "created": True},
        {**GOOD_FIELDS, "created": 10**400},
        {**GOOD_FIELDS, "status": 99},
        {**GOOD_FIELDS, "status": 200.0},
        {**GOOD_FIELDS, "status": False},
        {"created": 1.0, "status": 200},
    ],
)
def test_metadata_of_the_wrong_shape_is_rejected(metadata: object) -> None:
    with pytest.raises(CorruptEntry):
        decode(envelope(metadata))


def test_deeply_nested_metadata_is_rejected_not_a_recursion_error() -> None:
    nested = b"[" * 8000 + b"]" * 8000  # within the size cap: json must refuse it
    raw = struct.pack(">4sBII", MAGIC, VERSION, len(nested), 0) + nested
    with pytest.raises(CorruptEntry):
        decode(raw)


def test_fields_a_newer_release_adds_are_ignored() -> None:
    entry = decode(envelope({**GOOD_FIELDS, "added_later": {"x": 1}}, b"png"))
    assert entry == Entry(b"png", "image/png", None, None, 1.0)


def test_an_entry_no_reader_would_accept_is_refused_at_write_time() -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        encode(Entry(b"", "image/png", "\u00e9tag", None, 1.0))
    with pytest.raises(ValueError, match="HTTP status"):
        encode(Entry(b"", "image/png", None, None, 1.0, status=1000))
