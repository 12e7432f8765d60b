"""URL signatures (pure): HMAC-SHA256 over the raw path and query, minus the signature.

Owns the signed message and its check (DESIGN.md section 1, parameter ``s``): the
message is the request's raw path, then ``?`` and the raw query with the ``s``/``sig``
pair cut out, bytes untouched (nothing is decoded, re-encoded or reordered); with an
empty query left, the message is the path alone. The signature is the unpadded
base64url HMAC-SHA256 of that message. Several keys may be valid at once (rotation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from urllib.parse import unquote_plus

from edge.errors import BadSignature

#: the names parse_query reads as the signature, compared as it compares names
SIGNATURE_NAMES = frozenset({"s", "sig"})


def signing_keys(entries: Iterable[str]) -> tuple[bytes, ...]:
    """EDGE_SIGNING_KEYS entries as HMAC keys: their UTF-8 bytes, empty entries dropped."""
    return tuple(entry.encode("utf-8") for entry in entries if entry)


def sign_path(path_and_query: str, key: bytes) -> str:
    """The signature of a signed message (raw path, ``?``, raw query without ``s``)."""
    # surrogateescape: request bytes the server could not decode go back out unchanged.
    message = path_and_query.encode("utf-8", "surrogateescape")
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def split_signature(raw_query: str) -> tuple[str, list[str]]:
    """The raw query without its signature pairs, and the raw values of those pairs.

    Pairs are the ``&``-separated pieces of the text; a piece is a signature pair when
    its name decodes (as the server decodes query names) to ``s`` or ``sig`` in any case,
    so whatever parse_query takes for the signature is what is cut out here.
    """
    kept: list[str] = []
    signatures: list[str] = []
    for piece in raw_query.split("&"):
        name, _, value = piece.partition("=")
        if is_signature_name(name):
            signatures.append(value)
        else:
            kept.append(piece)
    return "&".join(kept), signatures


def is_signature_name(raw_name: str) -> bool:
    """Whether a raw query name decodes, as the server decodes names, to ``s`` or ``sig``."""
    return unquote_plus(raw_name).lower() in SIGNATURE_NAMES


def signed_message(raw_path: str, unsigned_query: str) -> str:
    return f"{raw_path}?{unsigned_query}" if unsigned_query else raw_path


def verify(raw_path: str, raw_query: str, keys: Sequence[bytes]) -> None:
    """Raise BadSignature unless the query carries one valid signature for any key.

    ``raw_path`` and ``raw_query`` are the request target exactly as received, split at
    its first ``?`` (aiohttp: ``request.raw_path``; the parsed URL may be normalised).
    """
    unsigned_query, signatures = split_signature(raw_query)
    if not signatures:
        raise BadSignature("missing signature (s=)")
    if len(signatures) > 1:
        raise BadSignature("the signature is given more than once")
    message = signed_message(raw_path, unsigned_query)
    given = signatures[0].encode("utf-8", "surrogateescape")
    # Every key is tried so the time taken does not say which one matched.
    matches = [hmac.compare_digest(sign_path(message, key).encode("ascii"), given) for key in keys]
    if not any(matches):
        raise BadSignature("invalid signature")


def signed_url(url: str, key: bytes) -> str:
    """``url`` with ``s=<signature>`` appended (any old s/sig removed); for ``edge sign``.

    Takes an absolute URL (``https://host/key?query``) or a path (``/key?query``) as it
    will be requested: its text is signed as is, so it must already be percent-encoded.
    """
    without_fragment, hash_mark, fragment = url.partition("#")
    prefix, target = _split_target(without_fragment)
    raw_path, _, raw_query = target.partition("?")
    unsigned_query, _ = split_signature(raw_query)
    signature = sign_path(signed_message(raw_path, unsigned_query), key)
    query = f"{unsigned_query}&s={signature}" if unsigned_query else f"s={signature}"
    return f"{prefix}{raw_path}?{query}{hash_mark}{fragment}"


def _split_target(url: str) -> tuple[str, str]:
    """``("https://host", "/key?query")`` for an absolute URL, ``("", url)`` for a path."""
    if url.startswith("/"):  # a path, even one holding "://" further on
        return "", url
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ValueError("expected an absolute http(s) URL or a path starting with /")
    starts = [index for index in (rest.find("/"), rest.find("?")) if index >= 0]
    if not starts:
        return url, "/"
    cut = min(starts)
    target = rest[cut:]
    # The server always sees a path: "https://host?x" is requested as "/?x".
    if target.startswith("?"):
        target = "/" + target
    return f"{scheme}://{rest[:cut]}", target
