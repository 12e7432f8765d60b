"""Log hygiene: a malformed request is one short line, not a traceback a client can repeat."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import BadStatusLine

from edge.logs import DropMalformedRequests, JsonFormatter, redact


def record_for(error: BaseException) -> logging.LogRecord:
    info = (type(error), error, None)
    return logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (), info
    )


def test_parser_errors_lose_their_traceback() -> None:
    record = record_for(BadStatusLine("GARBAGE"))
    assert DropMalformedRequests().filter(record)
    line = JsonFormatter().format(record)
    assert "Traceback" not in line
    assert "malformed request refused" in line
    assert record.levelname == "INFO"


def test_other_errors_keep_theirs() -> None:
    record = record_for(RuntimeError("a bug"))
    assert DropMalformedRequests().filter(record)
    line = JsonFormatter().format(record)
    assert "RuntimeError: a bug" in line
    assert record.levelname == "ERROR"


def test_signatures_are_redacted() -> None:
    assert redact("/a.jpg?w=1&s=abc&sig=def") == "/a.jpg?w=1&s=REDACTED&sig=REDACTED"
    assert redact("/a.jpg?is=1") == "/a.jpg?is=1"
