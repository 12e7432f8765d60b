"""Logging set-up and the access-log line (one JSON object per request, 499s included)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from edge.signing import is_signature_name

ACCESS = logging.getLogger("edge.access")


class JsonFormatter(logging.Formatter):
    """Application log records as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):
            return json.dumps(record.msg, separators=(",", ":"))
        line: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):
            return " ".join(f"{k}={v}" for k, v in record.msg.items())
        return super().format(record)


class DropMalformedRequests(logging.Filter):
    """aiohttp logs every unparsable request with a traceback at ERROR: a client could
    flood the log. The parser has already answered 400; one line without it is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = "malformed request refused: %s", (error.message,)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(DropMalformedRequests())
    # LogRecords would otherwise register every libvips thread that logs a warning as a
    # Python _DummyThread, never removed; no line here prints thread names anyway.
    logging.logThreads = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pyvips relays libvips chatter (operation traces) at INFO, and its warnings are per
    # image: "error in tile" lines for every transform a 499 or 504 stops, notes on odd
    # but decodable files. The access line already gives each request's outcome, so
    # libvips warnings are shown only at debug level, and its errors always.
    debugging = root.level <= logging.DEBUG
    logging.getLogger("pyvips").setLevel(logging.WARNING if debugging else logging.ERROR)


def redact(path_qs: str) -> str:
    """The request target with the value of every pair the signature check would read as
    a signature (``s``/``sig`` in any case or percent-encoding) replaced, for logs."""
    path, mark, query = path_qs.partition("?")
    if not mark:
        return path_qs
    pieces = []
    for piece in query.split("&"):
        name, equals, _ = piece.partition("=")
        pieces.append(f"{name}=REDACTED" if equals and is_signature_name(name) else piece)
    return f"{path}?{'&'.join(pieces)}"


def access_line(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {"time": _iso(time.time()), "log": "access", **fields}


def _iso(timestamp: float) -> str:
    millis = int((timestamp % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{millis:03d}Z"
