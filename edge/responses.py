"""What edge answers with, apart from image bytes: error bodies, property bodies, validators.

Error bodies follow EDGE_ERROR_DETAIL (0 title; 1 + one-line reason and request id;
2 + operator detail; 3 + traceback for 500s) in the format the request asked for
(text, JSON, or Scene7-style XML). Properties (``req=props`` etc.) use the same three
formats. Pure functions: no I/O, no HTTP server types.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from edge import PIPELINE_VERSION
from edge.errors import EdgeError
from edge.params import ReqFormat

PropValue = str | int | float | bool

CONTENT_TYPES = {
    ReqFormat.TEXT: "text/plain; charset=utf-8",
    ReqFormat.JSON: "application/json",
    ReqFormat.XML: "application/xml; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes
    content_type: str


def error_fields(
    error: EdgeError, *, level: int, request_id: str, traceback: str | None = None
) -> dict[str, PropValue]:
    """The fields an error body shows at detail ``level`` (0-3)."""
    fields: dict[str, PropValue] = {"status": error.status, "title": error.title}
    if level >= 1:
        fields["reason"] = error.reason
        fields["request_id"] = request_id
    if level >= 2 and error.detail:
        fields["detail"] = error.detail
    if level >= 3 and traceback and error.status >= 500:
        fields["traceback"] = traceback
    return fields


def error_body(
    error: EdgeError,
    *,
    level: int,
    request_id: str,
    fmt: ReqFormat = ReqFormat.TEXT,
    traceback: str | None = None,
) -> Body:
    fields = error_fields(error, level=level, request_id=request_id, traceback=traceback)
    if fmt is ReqFormat.TEXT:
        return Body(_error_text(fields).encode(), CONTENT_TYPES[fmt])
    if fmt is ReqFormat.JSON:
        return Body(json.dumps({"error": fields}).encode(), CONTENT_TYPES[fmt])
    attributes = " ".join(f"{name}={quoteattr(str(value))}" for name, value in fields.items())
    return Body(
        f'<?xml version="1.0" encoding="UTF-8"?>\n<error {attributes}/>\n'.encode(),
        CONTENT_TYPES[fmt],
    )


def _error_text(fields: Mapping[str, PropValue]) -> str:
    lines = [f"{fields['status']} {fields['title']}"]
    if "reason" in fields:
        lines[0] += f": {fields['reason']}"
    lines.extend(
        f"{name}: {value}" for name, value in fields.items() if name in ("detail", "request_id")
    )
    if "traceback" in fields:
        lines.append(str(fields["traceback"]))
    return "\n".join(lines) + "\n"


def props_body(props: Mapping[str, PropValue], fmt: ReqFormat) -> Body:
    """Scene7-style property answer: ``name=value`` lines, a flat JSON object, or XML."""
    if fmt is ReqFormat.JSON:
        return Body(json.dumps(dict(props)).encode(), CONTENT_TYPES[fmt])
    if fmt is ReqFormat.XML:
        rows = "".join(
            f"  <property name={quoteattr(name)} value={quoteattr(_text(value))}/>\n"
            for name, value in props.items()
        )
        xml = f'<?xml version="1.0" encoding="UTF-8"?>\n<prop-group>\n{rows}</prop-group>\n'
        return Body(xml.encode(), CONTENT_TYPES[fmt])
    text = "".join(f"{name}={_text(value)}\n" for name, value in props.items())
    return Body(text.encode(), CONTENT_TYPES[fmt])


def _text(value: PropValue) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def is_header_text(value: str) -> bool:
    """Whether ``value`` can go out as an HTTP header value, and be stored, as it is."""
    return value.isascii() and value.isprintable()


def derived_etag(validator: str | None, canonical: str, output: str) -> str | None:
    """ETag of a transformed result: changes with the original, the spec and the pipeline."""
    if not validator:
        return None
    token = "\0".join((validator, canonical, output, PIPELINE_VERSION)).encode()
    return '"' + hashlib.blake2b(token, digest_size=12).hexdigest() + '"'


def etag_matches(if_none_match: str | None, etag: str | None) -> bool:
    """RFC 9110 weak comparison of If-None-Match against our ETag (``*`` matches)."""
    if not if_none_match or not etag:
        return False
    if if_none_match.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(
        candidate.strip().removeprefix("W/") == wanted for candidate in if_none_match.split(",")
    )


def surrogate_tag(origin_identity: str, key: str) -> str:
    """Surrogate-Key / Cache-Tag of every variant of one object, for CDN purges."""
    token = f"{origin_identity}\0{key}".encode("utf-8", "surrogatepass")
    return "e" + hashlib.blake2b(token, digest_size=8).hexdigest()
