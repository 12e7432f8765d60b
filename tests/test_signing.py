"""URL signatures: the signed message, key rotation, and every way a URL can be tampered."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edge.errors import BadSignature
from edge.signing import sign_path, signed_url, signing_keys, split_signature, verify

KEY = b"first-key"
ROTATION = (b"old-key", KEY, "nøkkel-3".encode())


def reference_signature(message: bytes, key: bytes) -> str:
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def target_of(url: str) -> tuple[str, str]:
    """(raw path, raw query) the way the server splits a request target."""
    path, _, query = url.partition("?")
    return path, query


def check(url: str, keys: tuple[bytes, ...] = (KEY,)) -> None:
    verify(*target_of(url), keys)


# --- the signature itself -----------------------------------------------------------------


def test_signature_is_unpadded_base64url_hmac_sha256() -> None:
    signature = sign_path("/photo.jpg?w=300", KEY)
    assert signature == reference_signature(b"/photo.jpg?w=300", KEY)
    assert len(signature) == 43
    assert set(signature) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_keys_are_the_utf8_bytes_of_the_setting_entries() -> None:
    assert signing_keys(["alpha", "", "nøkkel"]) == (b"alpha", "nøkkel".encode())


# --- valid signatures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "query_before", "query_after"),
    [
        ("/photo.jpg", "w=300&h=200", ""),
        ("/photo.jpg", "", "w=300&h=200"),
        ("/photo.jpg", "w=300", "h=200"),
        ("/photo.jpg", "", ""),
        ("/a%20b/caf%C3%A9.jpg", "fmt=jpeg%2Crgb&bgc=%23fff", ""),
        ("/a+b.jpg", "x=1+2&y=%2B", ""),
        ("/photo.jpg", "utm_source=mail&w=1", ""),
        ("/photo.jpg", "a=1&&b=2", "c=3&"),
    ],
)
def test_valid_signature_anywhere_in_the_query_passes(
    path: str, query_before: str, query_after: str
) -> None:
    unsigned = "&".join(part for part in (query_before, query_after) if part)
    message = f"{path}?{unsigned}" if unsigned else path
    signature = reference_signature(message.encode(), KEY)
    pieces = [part for part in (query_before, f"s={signature}", query_after) if part]
    check(f"{path}?{'&'.join(pieces)}")


@pytest.mark.parametrize("name", ["s", "sig", "S", "SIG", "Sig"])
def test_both_names_in_any_case_carry_the_signature(name: str) -> None:
    signature = sign_path("/photo.jpg?w=300", KEY)
    check(f"/photo.jpg?w=300&{name}={signature}")


def test_a_query_that_is_only_the_signature_signs_the_path_alone() -> None:
    signature = reference_signature(b"/photo.jpg", KEY)
    check(f"/photo.jpg?s={signature}")


@pytest.mark.parametrize("key", ROTATION)
def test_every_key_of_a_rotation_works(key: bytes) -> None:
    check(signed_url("/photo.jpg?w=300", key), ROTATION)


def test_a_key_outside_the_rotation_fails() -> None:
    with pytest.raises(BadSignature, match="invalid"):
        check(signed_url("/photo.jpg?w=300", b"retired-key"), ROTATION)


def test_undecodable_request_bytes_are_signed_as_received() -> None:
    # The server hands bytes that are not UTF-8 over as surrogate escapes.
    raw_path = "/caf\udce9.jpg"
    signature = reference_signature(b"/caf\xe9.jpg?w=1", KEY)
    verify(raw_path, f"w=1&s={signature}", [KEY])


# --- failures: all 403 --------------------------------------------------------------------

SIGNED = signed_url("/photo.jpg?w=300&h=200&fmt=jpeg%2Crgb", KEY)


def test_the_fixture_url_is_valid() -> None:
    check(SIGNED)


@pytest.mark.parametrize(
    ("tampered", "why"),
    [
        (SIGNED.replace("w=300", "w=301"), "value changed"),
        (SIGNED.replace("/photo.jpg", "/photo2.jpg"), "path changed"),
        (SIGNED.replace("h=200&", ""), "parameter removed"),
        (SIGNED + "&q=90", "parameter added"),
        (SIGNED + "&utm_source=x", "ignored parameter added"),
        (SIGNED.replace("w=300&h=200", "h=200&w=300"), "reordered"),
        (SIGNED.replace("%2C", ","), "decoded"),
        (SIGNED.replace("%2C", "%2c"), "re-encoded in lower case"),
        (SIGNED.replace("/photo.jpg", "/ph%6Fto.jpg"), "path re-encoded"),
        (SIGNED.replace("w=300", "W=300"), "name case changed"),
        (SIGNED.replace("w=300&", "w=300&&"), "empty pair inserted"),
        (SIGNED[:-1] + ("A" if SIGNED[-1] != "A" else "B"), "signature changed"),
        (SIGNED[:-1], "signature cut short"),
        (SIGNED.replace("?", "?x=1&", 1), "parameter added first"),
    ],
)
def test_tampered_urls_fail(tampered: str, why: str) -> None:
    assert tampered != SIGNED, why
    with pytest.raises(BadSignature) as caught:
        check(tampered)
    assert caught.value.status == 403


@pytest.mark.parametrize(
    "url",
    ["/photo.jpg", "/photo.jpg?w=300", "/photo.jpg?w=300&sx=1", "/photo.jpg?signature=abc"],
)
def test_missing_signature_fails(url: str) -> None:
    with pytest.raises(BadSignature, match="missing"):
        check(url)


@pytest.mark.parametrize("extra", ["s={sig}", "sig={sig}", "S={sig}", "s=", "sig=other"])
def test_duplicated_signatures_fail(extra: str) -> None:
    signature = target_of(SIGNED)[1].rpartition("s=")[2]
    with pytest.raises(BadSignature, match="more than once"):
        check(SIGNED + "&" + extra.format(sig=signature))


def test_empty_signature_fails() -> None:
    with pytest.raises(BadSignature, match="invalid"):
        check("/photo.jpg?w=1&s=")


def test_no_keys_means_nothing_verifies() -> None:
    with pytest.raises(BadSignature):
        check(SIGNED, ())


def test_percent_encoded_signature_name_is_read_as_the_server_reads_it() -> None:
    # %73 decodes to "s": it is cut out like any other spelling of the signature pair.
    signature = sign_path("/photo.jpg?w=1", KEY)
    check(f"/photo.jpg?w=1&%73={signature}")


# --- the message and signed_url -----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "unsigned", "signatures"),
    [
        ("", "", []),
        ("s=x", "", ["x"]),
        ("a=%20&&b=1+2&s=x", "a=%20&&b=1+2", ["x"]),
        ("s=x&a=1", "a=1", ["x"]),
        ("a=1&sig=y&b", "a=1&b", ["y"]),
        ("a=1&s=x&S=y", "a=1", ["x", "y"]),
        ("s", "", [""]),
        ("ss=1&s_=2", "ss=1&s_=2", []),
    ],
)
def test_split_signature_cuts_only_the_signature_pairs(
    query: str, unsigned: str, signatures: list[str]
) -> None:
    assert split_signature(query) == (unsigned, signatures)


@pytest.mark.parametrize(
    ("url", "signed_part"),
    [
        ("/photo.jpg?w=300", "/photo.jpg?w=300"),
        ("/photo.jpg", "/photo.jpg"),
        ("/photo.jpg?", "/photo.jpg"),
        ("https://img.example.com/photo.jpg?w=300", "/photo.jpg?w=300"),
        ("https://img.example.com:8443/a%2Bb.jpg?w=3", "/a%2Bb.jpg?w=3"),
        ("http://img.example.com", "/"),
        ("https://img.example.com?w=1", "/?w=1"),
        ("/photo.jpg?s=stale&w=300", "/photo.jpg?w=300"),
    ],
)
def test_signed_url_signs_the_target_as_requested(url: str, signed_part: str) -> None:
    result = signed_url(url, KEY)
    assert result.endswith("s=" + reference_signature(signed_part.encode(), KEY))
    check(request_target(result))


def request_target(url: str) -> str:
    """What a client puts on the request line for ``url``."""
    if "://" not in url:
        return url
    authority_and_target = url.partition("://")[2]
    return authority_and_target[authority_and_target.index("/") :]


def test_signed_url_keeps_the_fragment_last() -> None:
    result = signed_url("/photo.jpg?w=1#top", KEY)
    assert result.endswith("#top")
    check(result.partition("#")[0])


def test_signed_url_needs_a_path() -> None:
    with pytest.raises(ValueError, match="starting with /"):
        signed_url("photo.jpg?w=1", KEY)


SAFE_TEXT = st.text(alphabet="abcXYZ019-._~%+,;:=&!$'()*@/", min_size=0, max_size=40)


@example("://", "")  # a path holding "://" is still a path, not an absolute URL
@example("", "://")
@given(SAFE_TEXT, SAFE_TEXT)
def test_signed_url_round_trips(path: str, query: str) -> None:
    url = signed_url(f"/{path}?{query}", KEY)
    check(url)
