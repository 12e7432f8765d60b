"""Where originals come from: one Origin protocol, a backend per storage kind.

Only this package talks to storage. ``open_origin`` turns a file or HTTP(S) EDGE_ORIGIN
URL into its backend; ``open_configured_origin`` opens any kind, S3 included, from the
settings; ``Origins`` owns the default origin, the origins by key prefix
(EDGE_ORIGINS_FILE) and the ``origin=`` and ``bucket=`` overrides a request may select
(all in router.py); ``Origins.route`` picks one for a key. Each origin by prefix is a
``NamedOrigin`` with its own timeout, headers and ``CircuitBreaker`` (breaker.py).
"""

from __future__ import annotations

from edge.origins.base import Fetched, FetchOptions, Origin
from edge.origins.breaker import BreakerState, CircuitBreaker, NamedOrigin
from edge.origins.file import FileOrigin
from edge.origins.http import HttpOrigin
from edge.origins.router import (
    Origins,
    open_configured_origin,
    open_named_origin,
    open_origin,
)
from edge.origins.s3 import S3Origin

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "FetchOptions",
    "Fetched",
    "FileOrigin",
    "HttpOrigin",
    "NamedOrigin",
    "Origin",
    "Origins",
    "S3Origin",
    "open_configured_origin",
    "open_named_origin",
    "open_origin",
]
