"""Where originals come from: one Origin protocol, a backend per storage kind.

Only this package talks to storage. ``open_origin`` turns an EDGE_ORIGIN URL into the
backend that serves it.
"""

from __future__ import annotations

from edge.metrics import Metrics
from edge.origins.base import Fetched, FetchOptions, Origin
from edge.origins.file import FileOrigin
from edge.origins.http import HttpOrigin

__all__ = ["FetchOptions", "Fetched", "FileOrigin", "HttpOrigin", "Origin", "open_origin"]


def open_origin(url: str, metrics: Metrics) -> Origin:
    """The backend for an EDGE_ORIGIN URL (validated by settings); call inside a loop."""
    if url.startswith("file:"):
        return FileOrigin.from_url(url, metrics)
    if url.startswith(("http:", "https:")):
        return HttpOrigin(url, metrics)
    raise ValueError(f"no origin backend for {url!r}")
