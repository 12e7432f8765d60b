"""Log hygiene: a malformed request is one short line, not a traceback a client can repeat."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from aiohttp.http_exceptions import BadStatusLine

from edge import logs
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


def test_a_signature_is_redacted_however_its_name_is_spelled() -> None:
    # whatever the signature check reads as a signature never reaches a log in clear
    for name in ("%73", "S", "SiG", "%53%49%47", "s"):
        logged = redact(f"/a.jpg?w=1&{name}=SECRET&q=80")
        assert "SECRET" not in logged, name
        assert logged.endswith("&q=80")


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root, vips = logging.getLogger(), logging.getLogger("pyvips")
    saved = (root.handlers[:], root.level, vips.level, logging.logThreads)
    yield
    root.handlers[:], _, _, logging.logThreads = saved
    root.setLevel(saved[1])
    vips.setLevel(saved[2])


@pytest.mark.usefixtures("restored_logging")
@pytest.mark.parametrize(("level", "warnings_shown"), [("info", False), ("debug", True)])
def test_libvips_warnings_show_only_when_debugging(level: str, warnings_shown: bool) -> None:
    # a killed transform makes libvips warn once per tile in flight: noise beside the
    # access line, which already says 499 or 504
    logs.configure(level, "json")
    vips = logging.getLogger("pyvips")
    assert vips.isEnabledFor(logging.WARNING) is warnings_shown
    assert vips.isEnabledFor(logging.ERROR)
    assert not vips.isEnabledFor(logging.INFO)
