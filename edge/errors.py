"""Every way a request can fail, as one exception class per failure.

Each class carries what the rest of the service needs to answer and count it: the HTTP
status, the outcome label (DESIGN.md section 2), a public title, and, for the classes
that have one, the stage or reason label of its counter. Library exceptions are
translated into these at the boundary where they arise (origins/, imaging.py) with
``raise ... from``; nothing ever matches on message text.

    EdgeError (500 internal_error)
    ├── BadRequest (400 bad_request)
    │   ├── InvalidParameter        unknown / invalid / duplicated parameter   [cacheable]
    │   ├── OutputTooLarge          output over dimension or pixel limits      [cacheable]
    │   ├── BadKey                  empty, NUL, backslash, dot segment, %2F, bad UTF-8
    │   ├── UndecodableImage        malformed or truncated original
    │   ├── SourceTooLarge          over byte, pixel or frame limits
    │   ├── FormatNotAllowed        input format outside EDGE_ALLOWED_INPUT_FORMATS
    │   └── OriginBadRequest        the origin answered 400
    ├── Unauthorized (401 unauthorized)
    │   ├── DynamicOriginDisabled, HostNotAllowed, AddressRefused, BucketNotAllowed
    │   ├── ParameterNotAllowed, OriginalRequestsDisabled, PresetsOnly
    │   └── OriginUnauthorized      the origin answered 401
    ├── Forbidden (403 forbidden)
    │   ├── BadSignature
    │   └── OriginForbidden         the origin answered 403
    ├── NotFound (404 not_found)                                               [cacheable]
    ├── ClientClosed (499 client_closed)      label: stage
    ├── BadGateway (502 bad_gateway)
    │   ├── OriginFailed            5xx, other 4xx, refused, reset, truncated, DNS
    │   └── OriginMisconfigured     our credentials or clock are wrong at the origin
    ├── Overloaded (503 overloaded)          label: reason, always Retry-After
    │   ├── QueueFull, QueueTimeout, MemoryShed
    │   └── OriginOverloaded        the origin answered 429/503; circuit open
    └── Timeout (504 timeout)                label: stage
        ├── FetchTimeout, TransformTimeout
        └── OriginTimeout           the origin answered 504
"""

from __future__ import annotations

from typing import ClassVar


class EdgeError(Exception):
    """Base of every failure edge answers for; unexpected exceptions become this."""

    status: ClassVar[int] = 500
    outcome: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal Server Error"
    #: the stage or reason label of this failure's own counter, if it has one
    default_label: ClassVar[str | None] = None
    #: 404s and parameter 400s: cached briefly (EDGE_ERROR_MAX_AGE) and negatively cached
    cacheable: ClassVar[bool] = False

    def __init__(
        self,
        reason: str,
        *,
        detail: str | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(reason)
        #: one public line (ErrorDetail >= 1); never a credential or an internal host
        self.reason = reason
        #: more for operators (ErrorDetail >= 2): key, limits, the origin's answer
        self.detail = detail
        self.label = label if label is not None else self.default_label


class BadRequest(EdgeError):
    status = 400
    outcome = "bad_request"
    title = "Bad Request"


class InvalidParameter(BadRequest):
    """A parameter is unknown, invalid, duplicated, or outside a configured rule."""

    cacheable = True

    def __init__(self, param: str, reason: str, *, detail: str | None = None) -> None:
        super().__init__(f"{param}: {reason}", detail=detail)
        self.param = param


class OutputTooLarge(BadRequest):
    cacheable = True


class BadKey(BadRequest):
    pass


class UndecodableImage(BadRequest):
    pass


class SourceTooLarge(BadRequest):
    pass


class FormatNotAllowed(BadRequest):
    pass


class OriginBadRequest(BadRequest):
    pass


class Unauthorized(EdgeError):
    status = 401
    outcome = "unauthorized"
    title = "Unauthorized"


class DynamicOriginDisabled(Unauthorized):
    pass


class HostNotAllowed(Unauthorized):
    pass


class AddressRefused(Unauthorized):
    pass


class BucketNotAllowed(Unauthorized):
    pass


class ParameterNotAllowed(Unauthorized):
    pass


class OriginalRequestsDisabled(Unauthorized):
    pass


class PresetsOnly(Unauthorized):
    pass


class OriginUnauthorized(Unauthorized):
    pass


class Forbidden(EdgeError):
    status = 403
    outcome = "forbidden"
    title = "Forbidden"


class BadSignature(Forbidden):
    pass


class OriginForbidden(Forbidden):
    pass


class NotFound(EdgeError):
    status = 404
    outcome = "not_found"
    title = "Not Found"
    cacheable = True


class ClientClosed(EdgeError):
    """The client went away; label is the stage: queue, fetch, transform or send."""

    status = 499
    outcome = "client_closed"
    title = "Client Closed Request"


class BadGateway(EdgeError):
    status = 502
    outcome = "bad_gateway"
    title = "Bad Gateway"


class OriginFailed(BadGateway):
    pass


class OriginMisconfigured(BadGateway):
    pass


class Overloaded(EdgeError):
    """Shed by us or by the origin; label is the reason of edge_load_shed_total."""

    status = 503
    outcome = "overloaded"
    title = "Service Unavailable"

    def __init__(
        self,
        reason: str,
        *,
        retry_after: int = 1,
        detail: str | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(reason, detail=detail, label=label)
        self.retry_after = max(1, min(int(retry_after), 30))


class QueueFull(Overloaded):
    default_label = "queue_full"


class QueueTimeout(Overloaded):
    default_label = "queue_timeout"


class MemoryShed(Overloaded):
    default_label = "memory"


class OriginOverloaded(Overloaded):
    default_label = "origin"


class Timeout(EdgeError):
    """The budget ran out; label is the stage of edge_backend_timeouts_total."""

    status = 504
    outcome = "timeout"
    title = "Gateway Timeout"


class FetchTimeout(Timeout):
    default_label = "fetch"


class TransformTimeout(Timeout):
    default_label = "transform"


class OriginTimeout(Timeout):
    default_label = "origin"


#: every outcome with its status, in the order of DESIGN.md section 2
OUTCOMES: dict[str, int] = {
    "ok": 200,
    "not_modified": 304,
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "client_closed": 499,
    "internal_error": 500,
    "bad_gateway": 502,
    "overloaded": 503,
    "timeout": 504,
}
