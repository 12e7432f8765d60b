"""Logging set-up and the access-log line (one JSON object per request, 499s included)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

ACCESS = logging.getLogger("edge.access")
_SIGNATURE = re.compile(r"(?i)((?:^|[?&])(?:s|sig)=)[^&]*")


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


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pyvips relays libvips chatter (operation traces) at INFO: only its warnings matter.
    logging.getLogger("pyvips").setLevel(max(logging.WARNING, root.level))


def redact(path_qs: str) -> str:
    """The request target with any signature value replaced, for logs."""
    return _SIGNATURE.sub(r"\1REDACTED", path_qs)


def access_line(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {"time": _iso(time.time()), "log": "access", **fields}


def _iso(timestamp: float) -> str:
    millis = int((timestamp % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{millis:03d}Z"
