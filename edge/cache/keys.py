"""Cache keys: a short readable prefix, then fixed-length digests of everything that matters.

A key looks like ``edge:v1:p1:<object digest>:<variant digest>``. Hashing keeps every key
under 100 characters however long the object key or canonical spec is (memcached
refuses keys over 250 bytes, and control characters or spaces anywhere). The object digest
covers the namespace, pipeline version, origin identity and object key, so every variant
of one object shares the prefix ``object_prefix`` returns: that is what a purge of one
object deletes by.
"""

from __future__ import annotations

import hashlib
import json
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_LABEL_LENGTH = 12
_DIGEST_LENGTH = 32


def cache_key(
    namespace: str,
    pipeline_version: str,
    origin_identity: str,
    object_key: str,
    canonical: str,
    output: str,
) -> str:
    """The key of one result.

    ``canonical`` is the transform's canonical form (DESIGN.md section 5: without s, sig,
    backendTimeout, defaultImage and ignored parameters); ``output`` names the req type
    and output format, e.g. ``img:webp`` or ``props:json``. ``origin_identity`` includes
    the bucket when one was given.
    """
    prefix = object_prefix(namespace, pipeline_version, origin_identity, object_key)
    return prefix + _digest(canonical, output)


def object_prefix(
    namespace: str, pipeline_version: str, origin_identity: str, object_key: str
) -> str:
    """The prefix every cached variant of one object shares (ends with ``:``)."""
    readable = f"edge:{_label(namespace)}:p{_label(pipeline_version)}"
    return f"{readable}:{_digest(namespace, pipeline_version, origin_identity, object_key)}:"


def lock_key(key: str) -> str:
    """Where the cross-process fill lock of ``key`` lives (never a result key)."""
    return f"{key}:fill"


def _digest(*parts: str) -> str:
    # JSON of the list is an unambiguous join: ("a:b", "c") and ("a", "b:c") differ
    joined = json.dumps(parts, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return hashlib.sha256(joined).hexdigest()[:_DIGEST_LENGTH]


def _label(text: str) -> str:
    # the readable part is a hint for operators only; the digest carries the full value
    return _UNSAFE.sub("_", text)[:_LABEL_LENGTH] or "_"
