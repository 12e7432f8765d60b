"""Configuration: every EDGE_* variable declared once, parsed once, reported together.

Each declaration names the variable, its default (as the operator would write it), the
parser that turns text into a value, and a one-line doc. ``load_settings(environ)``
parses a passed-in mapping (never ``os.environ`` behind the caller's back) into a frozen
``Settings`` and raises ``SettingsError`` listing every bad variable at once. The README's
reference table is generated from the same declarations (``reference_table``).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

SAMPLES_DIR = Path(__file__).parent / "samples"

INPUT_FORMATS = ("jpeg", "png", "webp", "gif", "avif", "svg", "tiff", "heif")
VALIDATABLE = ("min", "max", "allowed")


class SettingsError(ValueError):
    """One or more variables are invalid; ``problems`` names each with its expected form."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = problems


# --- parsers: text -> value, ValueError(expected form) on bad input ----------------------


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(_range_form("an integer", low, high)) from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(_range_form("an integer", low, high))
        return value

    return parse


def number(low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(_range_form("a number", low, high)) from None
        if not math.isfinite(value) or (low is not None and value < low):
            raise ValueError(_range_form("a number", low, high))
        if high is not None and value > high:
            raise ValueError(_range_form("a number", low, high))
        return value

    return parse


def _range_form(kind: str, low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{kind} from {low:g} to {high:g}"
    if low is not None:
        return f"{kind} >= {low:g}"
    return kind


def optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Empty text means "not set" (None); anything else goes to ``parse``."""

    def parse_optional(text: str) -> Any:
        return None if text.strip() == "" else parse(text)

    return parse_optional


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def word_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in options:
            raise ValueError("one of " + ", ".join(options))
        return lowered

    return parse


def input_formats(text: str) -> frozenset[str]:
    names = {name.lower() for name in word_list(text)}
    names = {"jpeg" if name == "jpg" else name for name in names}
    unknown = names - set(INPUT_FORMATS)
    if unknown or not names:
        raise ValueError("a comma list of " + ", ".join(INPUT_FORMATS))
    return frozenset(names)


def origin_url(text: str) -> str:
    """``file:///dir``, ``http(s)://host/prefix/`` or ``s3://bucket/prefix``."""
    form = "file:///absolute/dir, http(s)://host[:port]/prefix/ or s3://bucket[/prefix]"
    parts = urlsplit(text.strip())
    if parts.scheme == "file" and parts.path.startswith("/") and not parts.netloc:
        return text.strip()
    if parts.scheme in ("http", "https") and parts.hostname:
        return text.strip()
    if parts.scheme == "s3" and parts.netloc:
        return text.strip()
    raise ValueError(form)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def byte_size(text: str) -> int:
    """``268435456``, ``256MiB``, ``1.5G``: a byte count."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("a byte count such as 268435456, 512MiB or 2G")
    amount, unit = float(match.group(1)), (match.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    power = "bkmgt".find(unit[:1]) if unit else 0
    return int(amount * (base ** max(power, 0)))


@dataclass(frozen=True, slots=True)
class MemoryLimit:
    """Either an absolute byte count or a percentage of the memory available."""

    bytes: int | None = None
    percent: float | None = None


def memory_limit(text: str) -> MemoryLimit:
    stripped = text.strip()
    if stripped.endswith("%"):
        percent = number(1, 100)(stripped[:-1])
        return MemoryLimit(percent=percent)
    try:
        return MemoryLimit(bytes=byte_size(stripped))
    except ValueError:
        raise ValueError("a byte count (e.g. 4GiB) or a percentage such as 75%") from None


def globs(text: str) -> tuple[str, ...]:
    return tuple(pattern.lower() for pattern in word_list(text))


@dataclass(frozen=True, slots=True)
class Rule:
    """One EDGE_IMAGE_PARAM_VALIDATIONS entry: bounds and/or allowed values."""

    min: float | None = None
    max: float | None = None
    allowed: tuple[str, ...] | None = None


def param_validations(text: str) -> dict[str, Rule]:
    form = 'JSON such as {"width":{"max":2000},"format":{"allowed":["jpeg","webp"]}}'
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(form) from None
    if not isinstance(raw, dict):
        raise ValueError(form)
    rules: dict[str, Rule] = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or not spec or set(spec) - set(VALIDATABLE):
            raise ValueError(form)
        bounds = {k: spec.get(k) for k in ("min", "max")}
        if any(v is not None and not isinstance(v, int | float) for v in bounds.values()):
            raise ValueError(form)
        allowed = spec.get("allowed")
        if allowed is not None and (
            not isinstance(allowed, list) or not all(isinstance(a, str | int) for a in allowed)
        ):
            raise ValueError(form)
        rules[str(name).lower()] = Rule(
            min=bounds["min"],
            max=bounds["max"],
            allowed=None if allowed is None else tuple(str(a).lower() for a in allowed),
        )
    return rules


def cache_tiers(text: str) -> tuple[str, ...]:
    form = "none, or a comma list of memory, redis://host:port/db, memcached://host:port"
    tiers = word_list(text)
    if tiers == ("none",):
        return ()
    if not tiers:
        raise ValueError(form)
    for tier in tiers:
        scheme = urlsplit(tier).scheme
        if tier != "memory" and not (scheme in ("redis", "memcached") and urlsplit(tier).hostname):
            raise ValueError(form)
    return tiers


def cors_origins(text: str) -> tuple[str, ...]:
    return word_list(text)


# --- presets (EDGE_PRESETS, EDGE_PRESETS_FILE) ---------------------------------------------

#: a preset's query pairs, decoded as a request's query is (``+`` is a space)
PresetPairs = tuple[tuple[str, str], ...]
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PRESETS_FORM = "name=query presets separated by ';' (thumb=width=200&height=200;hero=width=1600)"
_PRESETS_FILE_FORM = (
    "a readable UTF-8 file of name=query lines (blank lines and # comments ignored)"
)


def presets(text: str) -> dict[str, PresetPairs]:
    """EDGE_PRESETS: ``name=query`` definitions separated by ``;``."""
    definitions = [(f"preset {i}", part) for i, part in enumerate(text.split(";"), 1)]
    return _preset_table(definitions, _PRESETS_FORM)


def presets_file(text: str) -> dict[str, PresetPairs]:
    """EDGE_PRESETS_FILE: a file of ``name=query`` lines."""
    path = text.strip()
    if not path:
        return {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{_PRESETS_FILE_FORM}; cannot read it: {_why(exc)}") from None
    definitions = [
        (f"line {number}", line)
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return _preset_table(definitions, _PRESETS_FILE_FORM)


def _preset_table(definitions: list[tuple[str, str]], form: str) -> dict[str, PresetPairs]:
    """Preset name (lower case: names match case-insensitively) -> checked query pairs."""
    # Lazy: edge.params imports this module; it checks each preset as a request would.
    from edge.params import preset_problem

    table: dict[str, PresetPairs] = {}
    problems: list[str] = []
    for where, definition in definitions:
        if not definition.strip():
            continue
        name, equals, query = definition.strip().partition("=")
        name = name.strip()
        if not equals or not PRESET_NAME.fullmatch(name):
            shown = definition.strip()[:60]
            problems.append(
                f"{where}: {shown!r} is not name=query (a name is letters, digits, '_', '.', '-')"
            )
            continue
        if name.lower() in table:
            problems.append(f"preset {name!r} is defined twice")
            continue
        pairs = tuple(parse_qsl(query.strip(), keep_blank_values=True))
        problem = preset_problem(pairs)
        if problem is not None:
            problems.append(f"preset {name!r}: {problem}")
            continue
        table[name.lower()] = pairs
    if problems:
        raise ValueError(f"{form}; " + "; ".join(problems))
    return table


# --- origins by key prefix (EDGE_ORIGINS_FILE) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """An origin's circuit breaker: opens after ``failures`` in a row, probes after ``cooldown``."""

    failures: int = 5
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class OriginConfig:
    """One EDGE_ORIGINS_FILE entry, validated."""

    #: short name: the metrics label and the error detail (never a URL)
    name: str
    #: keys starting with it go to this origin, which is asked for the rest of the key
    prefix: str
    #: as EDGE_ORIGIN: file, http(s) or s3
    url: str
    #: seconds; None: only the request budget applies
    timeout: float | None = None
    #: static headers sent with every request to an http(s) origin
    headers: tuple[tuple[str, str], ...] = ()
    #: s3 origins only; None: EDGE_S3_ENDPOINT_URL / EDGE_S3_REGION
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    breaker: BreakerConfig = BreakerConfig()


_ORIGINS_FORM = (
    "a YAML or JSON list of {name, prefix, url, timeout?, headers?, s3_endpoint_url?,"
    " s3_region?, breaker?: {failures, cooldown}}"
)
_ORIGIN_KEYS = frozenset(f.name for f in fields(OriginConfig))
_ORIGIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
#: headers edge sets itself or that would change how the body is framed or encoded
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "accept-encoding", "te"}
)


def origins_file(text: str) -> tuple[OriginConfig, ...]:
    """EDGE_ORIGINS_FILE: read, parse (``.json`` as JSON, anything else as YAML), check."""
    path = text.strip()
    if not path:
        return ()
    try:
        content = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{_ORIGINS_FORM}; cannot read it: {_why(exc)}") from None
    entries = _structured(path, content)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{_ORIGINS_FORM}; the file does not hold a non-empty list")
    origins: list[OriginConfig] = []
    problems: list[str] = []
    for index, entry in enumerate(entries, 1):
        named = entry.get("name") if isinstance(entry, dict) else None
        where = f"entry {index}" + (f" ({named!r})" if isinstance(named, str) else "")
        try:
            origins.append(_origin_entry(entry))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    for attribute in ("name", "prefix"):
        seen: set[str] = set()
        for origin in origins:
            value = getattr(origin, attribute)
            if value in seen:
                problems.append(f"{attribute} {value!r} is used by more than one entry")
            seen.add(value)
    if problems:
        raise ValueError(f"{_ORIGINS_FORM}; " + "; ".join(problems))
    return tuple(origins)


def _structured(path: str, content: str) -> Any:
    if path.lower().endswith(".json"):
        try:
            return json.loads(content)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{_ORIGINS_FORM}; not valid JSON: {exc}") from None
    import yaml  # type: ignore[import-untyped]  # lazy: only needed with this file

    try:
        return yaml.safe_load(content)
    except yaml.YAMLError as exc:
        shown = " ".join(str(exc).split())
        raise ValueError(f"{_ORIGINS_FORM}; not valid YAML: {shown}") from None


def _origin_entry(entry: object) -> OriginConfig:
    if not isinstance(entry, dict):
        raise ValueError("not an object with name, prefix and url")
    unknown = sorted(str(key) for key in entry if key not in _ORIGIN_KEYS)
    if unknown:
        raise ValueError(
            f"unknown field {', '.join(unknown)} (known: {', '.join(sorted(_ORIGIN_KEYS))})"
        )
    for required in ("name", "prefix", "url"):
        if required not in entry:
            raise ValueError(f"{required} is missing")
    name = entry["name"]
    if not isinstance(name, str) or not _ORIGIN_NAME.fullmatch(name):
        raise ValueError("name: 1-64 letters, digits, '_', '.' or '-'")
    url = _entry_text(entry, "url")
    try:
        url = origin_url(url)
    except ValueError as exc:
        raise ValueError(f"url: expected {exc}") from None
    kind = urlsplit(url).scheme
    s3_endpoint_url = _entry_optional_text(entry, "s3_endpoint_url")
    s3_region = _entry_optional_text(entry, "s3_region")
    if kind != "s3" and (s3_endpoint_url is not None or s3_region is not None):
        raise ValueError("s3_endpoint_url and s3_region apply only to s3:// urls")
    if s3_endpoint_url is not None:
        parts = urlsplit(s3_endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("s3_endpoint_url: expected http(s)://host[:port]")
    if s3_region is not None and not re.fullmatch(r"[a-z0-9-]{1,32}", s3_region):
        raise ValueError("s3_region: expected a region name such as eu-west-1")
    headers = _entry_headers(entry.get("headers"))
    if headers and kind not in ("http", "https"):
        raise ValueError("headers apply only to http(s) urls")
    return OriginConfig(
        name=name,
        prefix=_entry_prefix(entry["prefix"]),
        url=url,
        timeout=_entry_seconds(entry.get("timeout"), "timeout"),
        headers=headers,
        s3_endpoint_url=s3_endpoint_url,
        s3_region=s3_region,
        breaker=_entry_breaker(entry.get("breaker")),
    )


def _entry_text(entry: dict[Any, Any], key: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key}: expected a non-empty string")
    return value.strip()


def _entry_optional_text(entry: dict[Any, Any], key: str) -> str | None:
    return None if entry.get(key) is None else _entry_text(entry, key)


def _entry_prefix(value: object) -> str:
    form = "prefix: expected a key prefix such as 'products/' (no leading '/', '.' or '..' segment)"
    if not isinstance(value, str) or not value or value.startswith("/"):
        raise ValueError(form)
    if "\x00" in value or "\\" in value or any(s in (".", "..") for s in value.split("/")):
        raise ValueError(form)
    return value


def _entry_seconds(value: object, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: expected a number of seconds")
    if not math.isfinite(value) or not 0 < value <= 3600:
        raise ValueError(f"{key}: expected a number of seconds above 0, at most 3600")
    return float(value)


def _entry_headers(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValueError("headers: expected an object of header name -> value")
    headers: list[tuple[str, str]] = []
    for name, text in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"headers: {str(name)[:40]!r} is not a header name")
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"headers: {name} is set by edge itself")
        if isinstance(text, bool) or not isinstance(text, str | int | float):
            raise ValueError(f"headers: {name}: expected a text value")
        shown = str(text)
        if any(char in shown for char in "\r\n\x00"):
            raise ValueError(f"headers: {name}: the value holds a line break or NUL")
        headers.append((name, shown))
    return tuple(headers)


def _entry_breaker(value: object) -> BreakerConfig:
    if value is None:
        return BreakerConfig()
    if not isinstance(value, dict) or set(value) - {"failures", "cooldown"}:
        raise ValueError("breaker: expected {failures: 5, cooldown: 30}")
    defaults = BreakerConfig()
    failures = value.get("failures", defaults.failures)
    if isinstance(failures, bool) or not isinstance(failures, int) or not 1 <= failures <= 1000:
        raise ValueError("breaker: failures: expected an integer from 1 to 1000")
    cooldown = _entry_seconds(value.get("cooldown", defaults.cooldown), "breaker: cooldown")
    if cooldown is None:
        raise ValueError("breaker: cooldown: expected a number of seconds")
    return BreakerConfig(failures=failures, cooldown=cooldown)


def _why(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


# --- declarations -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One EDGE_* variable: its default as text, its parser and a one-line doc."""

    name: str
    default: str
    parse: Callable[[str], Any]
    doc: str
    #: how the default reads in the reference table when it is computed at start
    shown_default: str | None = None

    @property
    def field(self) -> str:
        return self.name.removeprefix("EDGE_").lower()


VARS: tuple[EnvVar, ...] = (
    EnvVar("EDGE_HOST", "0.0.0.0", str, "listen address"),
    EnvVar("EDGE_PORT", "8080", integer(0, 65535), "listen port"),
    EnvVar(
        "EDGE_WORKERS",
        "1",
        integer(1, 256),
        "processes sharing the port (SO_REUSEPORT); metrics aggregate across them; "
        "a dead worker is replaced",
    ),
    EnvVar(
        "EDGE_METRICS_PORT",
        "",
        optional(integer(1, 65535)),
        "serve /metrics on its own port instead (the main port then answers 404 there)",
        shown_default="(main port)",
    ),
    EnvVar(
        "EDGE_ORIGIN",
        "",
        optional(origin_url),
        "`file:///dir`, `http(s)://host/prefix/` or `s3://bucket/prefix`",
        shown_default="bundled sample folder",
    ),
    EnvVar(
        "EDGE_S3_ENDPOINT_URL",
        "",
        optional(origin_url),
        "S3-compatible endpoint (MinIO, R2, GCS interop); credentials from the AWS chain",
        shown_default="AWS",
    ),
    EnvVar("EDGE_S3_REGION", "", optional(str), "S3 region", shown_default="AWS default"),
    EnvVar(
        "EDGE_ORIGINS_FILE",
        "",
        origins_file,
        "YAML/JSON list of origins by key prefix (longest wins, stripped), each with its own"
        " url, timeout, headers, S3 endpoint/region and circuit breaker; EDGE_ORIGIN is the"
        " fallback",
        shown_default="(none)",
    ),
    EnvVar(
        "EDGE_ALLOW_DYNAMIC_ORIGIN",
        "false",
        boolean,
        "allow `origin=` to fetch from a host in EDGE_HOSTS_ALLOWED",
    ),
    EnvVar(
        "EDGE_HOSTS_ALLOWED",
        "",
        lambda text: tuple(host.lower() for host in word_list(text)),
        "comma list of host names or IPs, `*.example.com` wildcards, `*` for any",
        shown_default="(empty: no host)",
    ),
    EnvVar(
        "EDGE_BUCKETS_ALLOWED",
        "",
        word_list,
        "comma list of buckets `bucket=` may name",
        shown_default="(none)",
    ),
    EnvVar(
        "EDGE_ALLOW_PRIVATE_ADDRESSES",
        "false",
        boolean,
        "let dynamic origins and redirects reach loopback/private/link-local addresses",
    ),
    EnvVar(
        "EDGE_SIGNING_KEYS",
        "",
        lambda text: tuple(key.encode() for key in word_list(text)),
        "comma list of URL signing keys (rotation); when set every request needs `s`",
        shown_default="(none)",
    ),
    EnvVar(
        "EDGE_BACKEND_TIMEOUT",
        "10",
        number(0.05, 3600),
        "seconds: the per-request budget for fetch + queue + transform",
    ),
    EnvVar(
        "EDGE_BACKEND_CONNECT_TIMEOUT",
        "3",
        number(0.01, 600),
        "seconds to connect to an origin, within the budget",
    ),
    EnvVar(
        "EDGE_MAX_SOURCE_BYTES",
        "52428800",
        byte_size,
        "larger originals are 400 (checked while streaming)",
    ),
    EnvVar(
        "EDGE_MAX_SOURCE_PIXELS",
        "50000000",
        integer(1),
        "width x height x pages from the header, checked before decoding",
    ),
    EnvVar("EDGE_MAX_ANIMATION_FRAMES", "100", integer(1), "frames of an animated source"),
    EnvVar("EDGE_MAX_OUTPUT_DIMENSION", "8192", integer(1), "pixels per side, after dpr"),
    EnvVar(
        "EDGE_MAX_OUTPUT_PIXELS", "40000000", integer(1), "width x height x frames of the output"
    ),
    EnvVar(
        "EDGE_ALLOWED_INPUT_FORMATS",
        "jpeg,png,webp,gif,avif",
        input_formats,
        "input formats decoded; svg, tiff, heif only when listed",
    ),
    EnvVar("EDGE_DEFAULT_QUALITY", "80", integer(1, 100), "JPEG quality when none is asked"),
    EnvVar("EDGE_AUTO_FORMAT", "false", boolean, "negotiate the format from Accept by default"),
    EnvVar(
        "EDGE_ALLOW_ORIGINAL_IMAGE_REQUEST",
        "true",
        boolean,
        "serve the original bytes for a request with no parameters",
    ),
    EnvVar(
        "EDGE_IMAGE_PARAMS_ALLOWED",
        "",
        optional(lambda text: frozenset(p.lower() for p in word_list(text))),
        "comma list of canonical parameter names callers may use; others are 401",
        shown_default="(all)",
    ),
    EnvVar(
        "EDGE_IGNORED_PARAMS",
        "utm_*,fbclid,gclid",
        globs,
        "globs of parameters ignored (not validated, not in the cache key)",
    ),
    EnvVar(
        "EDGE_IMAGE_PARAM_VALIDATIONS",
        "",
        param_validations,
        'JSON min/max/allowed per canonical parameter, e.g. `{"width":{"max":2000}}`',
        shown_default="(none)",
    ),
    EnvVar(
        "EDGE_PRESETS",
        "",
        presets,
        "named parameter sets for `preset=<name>` or `$name$`:"
        " `thumb=width=200&height=200&fit=cover;hero=width=1600`",
        shown_default="(none)",
    ),
    EnvVar(
        "EDGE_PRESETS_FILE",
        "",
        presets_file,
        "a file of `name=query` preset lines (blank lines and `#` comments ignored)",
        shown_default="(none)",
    ),
    EnvVar(
        "EDGE_ONLY_PRESETS",
        "false",
        boolean,
        "accept only preset requests (and original requests, if allowed); anything else 401",
    ),
    EnvVar(
        "EDGE_MAX_CONCURRENCY",
        "",
        optional(integer(1, 1024)),
        "transforms running at once, for the whole service (split across workers)",
        shown_default="CPUs available",
    ),
    EnvVar(
        "EDGE_QUEUE_SIZE",
        "",
        optional(integer(0, 100000)),
        "transforms waiting for a slot, per worker; beyond it 503 at once; 0 = no waiting",
        shown_default="4 x concurrency",
    ),
    EnvVar(
        "EDGE_MEMORY_LIMIT",
        "75%",
        memory_limit,
        "bytes or `NN%` of the memory available (cgroup-aware), for the whole service",
    ),
    EnvVar(
        "EDGE_CACHE",
        "memory",
        cache_tiers,
        "cache tiers: `memory`, `redis://host:port/db`, `memcached://host:port`, or `none`",
    ),
    EnvVar(
        "EDGE_CACHE_MEMORY_BYTES",
        "268435456",
        byte_size,
        "bound of the in-process cache tier, per worker",
    ),
    EnvVar("EDGE_CACHE_TTL", "86400", integer(1), "seconds a cached result is fresh"),
    EnvVar(
        "EDGE_CACHE_STALE_TTL",
        "86400",
        integer(0),
        "further seconds a stale result may be served when the origin fails",
    ),
    EnvVar("EDGE_CACHE_NAMESPACE", "v1", str, "part of every cache key; change it to drop all"),
    EnvVar("EDGE_HTTP_MAX_AGE", "86400", integer(0), "Cache-Control max-age on successes"),
    EnvVar(
        "EDGE_ERROR_MAX_AGE",
        "60",
        integer(0),
        "max-age on 404s and parameter 400s (0 = no-store)",
    ),
    EnvVar(
        "EDGE_CORS_ORIGINS",
        "",
        cors_origins,
        "comma list of origins or `*` for Access-Control-Allow-Origin",
        shown_default="(none)",
    ),
    EnvVar("EDGE_ERROR_DETAIL", "1", integer(0, 3), "error body detail, 0-3"),
    EnvVar(
        "EDGE_ERROR_IMAGE",
        "",
        optional(str),
        "`generated` (render the message) or an origin key: an image sent (200) instead of errors",
        shown_default="(off)",
    ),
    EnvVar(
        "EDGE_DEFAULT_IMAGE",
        "",
        optional(str),
        "origin key of the image substituted for missing ones",
        shown_default="(off)",
    ),
    EnvVar(
        "EDGE_ADMIN_TOKEN",
        "",
        optional(str),
        "bearer token for the `/_edge/...` operator endpoints (unset: they are off)",
        shown_default="(none: operator endpoints off)",
    ),
    EnvVar("EDGE_LOG_LEVEL", "info", choice("debug", "info", "warning", "error"), "log level"),
    EnvVar("EDGE_LOG_FORMAT", "json", choice("json", "text"), "log line format"),
    EnvVar(
        "EDGE_SHUTDOWN_GRACE",
        "20",
        number(0, 3600),
        "seconds to drain in-flight requests on SIGTERM",
    ),
)

_BY_FIELD = {var.field: var for var in VARS}


@dataclass(frozen=True)
class Settings:
    """The parsed configuration. Build it with ``load_settings``; tests may ``replace`` it."""

    host: str
    port: int
    origin: str | None
    s3_endpoint_url: str | None
    s3_region: str | None
    allow_dynamic_origin: bool
    hosts_allowed: tuple[str, ...]
    buckets_allowed: tuple[str, ...]
    allow_private_addresses: bool
    signing_keys: tuple[bytes, ...]
    backend_timeout: float
    backend_connect_timeout: float
    max_source_bytes: int
    max_source_pixels: int
    max_animation_frames: int
    max_output_dimension: int
    max_output_pixels: int
    allowed_input_formats: frozenset[str]
    default_quality: int
    auto_format: bool
    allow_original_image_request: bool
    image_params_allowed: frozenset[str] | None
    ignored_params: tuple[str, ...]
    image_param_validations: dict[str, Rule] = field(hash=False)
    max_concurrency: int | None = None
    queue_size: int | None = None
    memory_limit: MemoryLimit = MemoryLimit(percent=75)
    cache: tuple[str, ...] = ("memory",)
    cache_memory_bytes: int = 268435456
    cache_ttl: int = 86400
    cache_stale_ttl: int = 86400
    cache_namespace: str = "v1"
    http_max_age: int = 86400
    error_max_age: int = 60
    cors_origins: tuple[str, ...] = ()
    error_detail: int = 1
    error_image: str | None = None
    admin_token: str | None = None
    default_image: str | None = None
    log_level: str = "info"
    log_format: str = "json"
    shutdown_grace: float = 20.0
    #: preset name (lower case) -> query pairs; EDGE_PRESETS and EDGE_PRESETS_FILE
    presets: dict[str, PresetPairs] = field(default_factory=dict, hash=False)
    presets_file: dict[str, PresetPairs] = field(default_factory=dict, hash=False)
    only_presets: bool = False
    origins_file: tuple[OriginConfig, ...] = ()
    workers: int = 1
    metrics_port: int | None = None

    @property
    def origin_url(self) -> str:
        """EDGE_ORIGIN, or the bundled sample folder when it is not set."""
        return self.origin or SAMPLES_DIR.resolve().as_uri()

    def is_ignored(self, name: str) -> bool:
        lowered = name.lower()
        return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in self.ignored_params)

    @property
    def all_presets(self) -> dict[str, PresetPairs]:
        """Every preset, from EDGE_PRESETS_FILE and EDGE_PRESETS (a name is in one only)."""
        return {**self.presets_file, **self.presets}

    def __post_init__(self) -> None:
        problems = _preset_problems(self)
        if problems:
            raise SettingsError(problems)


def _preset_problems(settings: Settings) -> list[str]:
    """What is wrong with the presets given the other variables (names, output limits)."""
    problems: list[str] = []
    both = sorted(set(settings.presets) & set(settings.presets_file))
    if both:
        problems.append(
            f"EDGE_PRESETS and EDGE_PRESETS_FILE both define {', '.join(both)}: define each once"
        )
    if settings.only_presets and not settings.all_presets:
        problems.append("EDGE_ONLY_PRESETS=true: no presets (EDGE_PRESETS or EDGE_PRESETS_FILE)")
    if not settings.all_presets:
        return problems
    from edge.params import preset_problem  # lazy: edge.params imports this module

    for name, table in (
        ("EDGE_PRESETS", settings.presets),
        ("EDGE_PRESETS_FILE", settings.presets_file),
    ):
        for preset, pairs in table.items():
            problem = preset_problem(pairs, settings.max_output_dimension)
            if problem is not None:
                problems.append(f"{name}: preset {preset!r}: {problem}")
    return problems


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse every declared variable from ``environ``; raise one error naming all bad ones."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for var in VARS:
        text = environ.get(var.name, var.default)
        try:
            values[var.field] = var.parse(text)
        except ValueError as exc:
            problems.append(f"{var.name}={text!r}: expected {exc}")
    unknown = sorted(name for name in environ if name.startswith("EDGE_") and name not in _NAMES)
    problems.extend(f"{name}: unknown variable" for name in unknown)
    if problems:
        raise SettingsError(problems)
    return Settings(**values)


_NAMES = frozenset(var.name for var in VARS)


def defaults() -> Settings:
    """The settings of an empty environment (what ``make run`` serves with)."""
    return load_settings({})


def reference_table() -> str:
    """The README's configuration table, generated from the declarations."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for var in VARS:
        shown = var.shown_default if var.shown_default is not None else f"`{var.default}`"
        lines.append(f"| `{var.name}` | {shown} | {var.doc} |")
    return "\n".join(lines) + "\n"


def check_declarations() -> None:
    """Every Settings field is declared exactly once (guards against drift)."""
    declared = set(_BY_FIELD)
    wanted = {f.name for f in fields(Settings)}
    if declared != wanted:
        raise AssertionError(f"declared {sorted(declared ^ wanted)} mismatch")
