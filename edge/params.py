"""The request's query string, turned into a frozen, canonical description (pure).

Owns the object key's decoding, both parameter dialects (Imagizer and Scene7 names,
DESIGN.md section 1) with one table of canonical name -> aliases -> parser, their
validation, the operator's parameter policies and presets (``preset=<name>`` / ``$name$``
expanded into their parameters), the canonical form used in cache keys and ETags, and
the reading of Accept and client-hint headers handed in as strings. Knows nothing of HTTP
servers, storage or pixels.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from types import MappingProxyType
from urllib.parse import unquote_to_bytes

from edge.errors import (
    BadKey,
    InvalidParameter,
    OutputTooLarge,
    ParameterNotAllowed,
    PresetsOnly,
)
from edge.settings import Rule, Settings, SettingsError


class Fit(StrEnum):
    INSIDE = "inside"
    COVER = "cover"
    CONTAIN = "contain"
    FILL = "fill"
    OUTSIDE = "outside"


class Gravity(StrEnum):
    CENTER = "center"
    NORTH = "north"
    SOUTH = "south"
    EAST = "east"
    WEST = "west"
    NORTHEAST = "northeast"
    NORTHWEST = "northwest"
    SOUTHEAST = "southeast"
    SOUTHWEST = "southwest"
    ENTROPY = "entropy"
    ATTENTION = "attention"


class OutputFormat(StrEnum):
    JPEG = "jpeg"
    PNG = "png"
    WEBP = "webp"
    AVIF = "avif"
    GIF = "gif"

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"


class Flip(StrEnum):
    H = "h"
    V = "v"
    HV = "hv"


class ReqType(StrEnum):
    IMG = "img"
    PROPS = "props"
    IMAGEPROPS = "imageprops"
    EXISTS = "exists"


class ReqFormat(StrEnum):
    TEXT = "text"
    JSON = "json"
    XML = "xml"


def lenient_req(pairs: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """The request type and body format ``req=`` names, read without validating, for
    answering a request whose query did not parse; ("img", "text") when there is none."""
    for name, value in pairs:
        if name.lower() == "req":
            kind, _, fmt = value.partition(",")
            return kind.strip().lower() or "img", fmt.rsplit(",", 1)[-1].strip().lower() or "text"
    return "img", "text"


@dataclass(frozen=True, slots=True)
class CropRect:
    """A Scene7 crop rectangle in source pixels (after EXIF rotation), cut before resizing."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class TransformSpec:
    """What to do to the pixels. Defaults are the contract's defaults."""

    width: int | None = None
    height: int | None = None
    dpr: float = 1.0
    fit: Fit = Fit.INSIDE
    gravity: Gravity = Gravity.CENTER
    crop: CropRect | None = None
    #: None: choose from the source (DESIGN.md section 1, "Output format when none is asked")
    format: OutputFormat | None = None
    #: format=auto (or EDGE_AUTO_FORMAT): negotiate from Accept
    auto_format: bool = False
    quality: int | None = None
    #: RGBA, 0-255 each; None: transparent where the output has alpha, else white
    background: tuple[int, int, int, int] | None = None
    blur: float | None = None
    #: a sigma; None: no sharpening
    sharpen: float | None = None
    rotate: int = 0
    flip: Flip | None = None
    upscale: bool = False
    autorotate: bool = True
    strip: bool = True
    lossless: bool = False
    progressive: bool = False


# =========================================================================================
# The object key
# =========================================================================================

_ENCODED_SLASH = re.compile("%2f", re.IGNORECASE)


def parse_key(raw_path: str) -> str:
    """The object key of a request path as received (percent-encoded, leading '/').

    Decodes exactly once as UTF-8 and keeps '+' literal; anything that could make one key
    mean another object (encoded slashes, dot segments, NUL, backslashes) is a BadKey.
    """
    # aiohttp's request.raw_path carries the query too; it is never part of the key.
    path = raw_path.partition("?")[0].removeprefix("/")
    if _ENCODED_SLASH.search(path):
        raise BadKey("the key contains an encoded slash (%2F)")
    # surrogateescape: the server hands undecodable request bytes over as surrogates.
    raw = unquote_to_bytes(path.encode("utf-8", "surrogateescape"))
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadKey("the key is not valid UTF-8 once percent-decoded") from None
    problem = _key_problem(key)
    if problem is not None:
        raise BadKey(f"the key {problem}")
    return key


def _key_problem(key: str) -> str | None:
    """Why a decoded key cannot name an object, or None when it can."""
    if not key:
        return "is empty"
    if "\x00" in key:
        return "contains NUL"
    if "\\" in key:
        return "contains a backslash"
    if any(segment in (".", "..") for segment in key.split("/")):
        return "has a '.' or '..' segment"
    return None


# =========================================================================================
# Policy and result
# =========================================================================================


@dataclass(frozen=True)
class ParamPolicy:
    """The operator's rules for query parameters, normalised to canonical names.

    Owns EDGE_IGNORED_PARAMS, EDGE_IMAGE_PARAMS_ALLOWED, EDGE_IMAGE_PARAM_VALIDATIONS,
    EDGE_AUTO_FORMAT, EDGE_MAX_OUTPUT_DIMENSION, the presets (EDGE_PRESETS,
    EDGE_PRESETS_FILE) and EDGE_ONLY_PRESETS as parse_query needs them. Aliases in the
    allowed list and in validation rules are resolved to canonical names; an unknown name,
    a rule that cannot apply or a preset that is not a valid request raises SettingsError
    naming the variable.
    """

    #: lower-case globs of parameter names to skip entirely
    ignored: tuple[str, ...] = ()
    #: lower-case canonical names callers may use; None: all
    allowed: frozenset[str] | None = None
    #: lower-case canonical name -> rule; "allowed" values in canonical form
    validations: Mapping[str, Rule] = field(default_factory=dict, hash=False)
    auto_format: bool = False
    max_output_dimension: int = 8192
    #: preset name -> its query pairs as the operator wrote them (names match any case)
    presets: Mapping[str, Sequence[tuple[str, str]]] = field(default_factory=dict, hash=False)
    #: EDGE_ONLY_PRESETS: transforms only through presets
    only_presets: bool = False
    #: lower-case preset name -> its parameters, resolved and checked once
    _expansions: Mapping[str, tuple[_Named, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        allowed = None if self.allowed is None else _canonical_names(self.allowed, problems)
        validations = _normalised_rules(self.validations, problems)
        expansions = _preset_expansions(self.presets, self.max_output_dimension, problems)
        if problems:
            raise SettingsError(problems)
        # Frozen: normalise in place once, before anyone can see the instance.
        object.__setattr__(self, "ignored", tuple(glob.lower() for glob in self.ignored))
        object.__setattr__(self, "allowed", allowed)
        object.__setattr__(self, "validations", MappingProxyType(validations))
        object.__setattr__(self, "_expansions", MappingProxyType(expansions))

    @classmethod
    def from_settings(cls, settings: Settings) -> ParamPolicy:
        return cls(
            ignored=settings.ignored_params,
            allowed=settings.image_params_allowed,
            validations=settings.image_param_validations,
            auto_format=settings.auto_format,
            max_output_dimension=settings.max_output_dimension,
            presets=settings.all_presets,
            only_presets=settings.only_presets,
        )

    def preset(self, name: str) -> tuple[_Named, ...] | None:
        """A preset's parameters (the name in any case), or None when there is no such preset."""
        return self._expansions.get(name.lower())

    def is_ignored(self, name: str) -> bool:
        lowered = name.lower()
        return any(fnmatch.fnmatchcase(lowered, glob) for glob in self.ignored)

    def is_allowed(self, param: str) -> bool:
        """Whether a canonical parameter may be used; the signature always may."""
        return self.allowed is None or param == "s" or param.lower() in self.allowed


def _canonical_names(names: Iterable[str], problems: list[str]) -> frozenset[str]:
    resolved = set()
    for name in names:
        if name.lower() == PRESET:
            continue  # always allowed: operators wrote every preset there is
        param = _PARAMS_BY_NAME.get(name.lower())
        if param is None:
            problems.append(f"EDGE_IMAGE_PARAMS_ALLOWED: unknown parameter {name!r}")
        else:
            resolved.add(param.key)
    return frozenset(resolved)


def _normalised_rules(rules: Mapping[str, Rule], problems: list[str]) -> dict[str, Rule]:
    """Rules keyed by canonical name, with allowed values in the parsers' canonical form."""
    where = "EDGE_IMAGE_PARAM_VALIDATIONS"
    normalised: dict[str, Rule] = {}
    for name, rule in rules.items():
        param = _PARAMS_BY_NAME.get(name.lower())
        if param is None:
            problems.append(f"{where}: unknown parameter {name!r}")
            continue
        if not param.numeric and (rule.min is not None or rule.max is not None):
            problems.append(f"{where}: {param.name} is not a number, min/max cannot apply")
            continue
        allowed = rule.allowed
        if allowed is not None:
            try:
                allowed = tuple(param.apply(value, _Draft()).text for value in allowed)
            except _Invalid as exc:
                problems.append(f"{where}: {param.name} allowed value: {exc}")
                continue
        normalised[param.key] = Rule(min=rule.min, max=rule.max, allowed=allowed)
    return normalised


#: parameters that do not change the pixels: a request with only these is an original
_NOT_TRANSFORMING = frozenset({"s", "backendTimeout", "origin", "bucket", "defaultImage"})


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """Everything the query string asks for, validated; the spec is what pixels need."""

    spec: TransformSpec = field(default_factory=TransformSpec)
    req: ReqType = ReqType.IMG
    req_format: ReqFormat = ReqFormat.TEXT
    #: seconds; may only shorten the configured budget
    backend_timeout: float | None = None
    #: normalised ``https://host[:port]`` or ``http://host[:port]`` (default ports dropped)
    origin: str | None = None
    bucket: str | None = None
    #: None: not given; "": default images disabled for this request
    default_image: str | None = None
    signature: str | None = None
    #: canonical names whose value the URL fixed (client hints fill only the others)
    given: frozenset[str] = frozenset()
    #: the preset the request named (lower case), if any; its parameters are in the spec
    preset: str | None = None

    @property
    def is_original(self) -> bool:
        """A plain request for the original bytes: nothing asked that changes pixels.

        Any parameter outside s, backendTimeout, origin, bucket and defaultImage counts,
        even one spelling out a default (``fit=inside``, ``req=img``); ``dpr=on`` alone
        does not, since it fixes nothing.
        """
        return self.req is ReqType.IMG and not (self.given - _NOT_TRANSFORMING)

    def canonical(self) -> str:
        """A deterministic text of what the response depends on, for cache keys and ETags.

        Names and values are canonical (aliases, case, order and defaults normalised);
        s, sig, backendTimeout, defaultImage, origin, bucket and ignored parameters are
        left out. A preset is expanded, so ``preset=thumb`` and the same parameters spelt
        out share one entry. An original request reads ``original`` so it never shares an
        entry with a re-encoded image whose spec happens to be all defaults.
        """
        parts = ["original"] if self.is_original else _spec_parts(self.spec)
        parts.append(f"req={self.req.value},{self.req_format.value}")
        return "&".join(parts)


def _spec_parts(spec: TransformSpec) -> list[str]:
    """``name=value`` for each field away from its default, in field order."""
    parts = []
    for spec_field in fields(TransformSpec):
        value = getattr(spec, spec_field.name)
        if value != spec_field.default:
            parts.append(f"{spec_field.name}={_canonical_value(value)}")
    return parts


def _canonical_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, int | float):
        return _number_text(value)
    if isinstance(value, CropRect):
        return f"{value.x},{value.y},{value.width},{value.height}"
    if isinstance(value, tuple):
        return "".join(f"{channel:02x}" for channel in value)
    raise TypeError(f"no canonical form for {value!r}")


def _number_text(value: float) -> str:
    """Shortest exact text of a number: 2.0 -> "2", 0.30 -> "0.3" (repr round-trips)."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


# =========================================================================================
# Parameter values: one parser per canonical parameter
# =========================================================================================


class _Invalid(ValueError):
    """A value does not have the expected form; the text says what form is expected."""


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What a parser reports back besides filling the draft: the value as rules see it."""

    #: the numeric value for min/max rules, when the parameter is a number
    number: float | None
    #: the canonical text of the value, for "allowed" rules
    text: str
    #: False when the value leaves the setting open (dpr=on: the client hint decides)
    pins: bool = True


@dataclass(frozen=True, slots=True)
class _CropMode:
    """An Imagizer crop value: the fit it means and, for some, the gravity."""

    fit: Fit
    gravity: Gravity | None = None


@dataclass(slots=True)
class _Draft:
    """Values as the URL gave them, before cross-parameter rules settle the spec."""

    width: int | None = None
    height: int | None = None
    dpr: float | None = None
    fit: Fit | None = None
    #: the Scene7 ``fit=...,1`` / ``,0`` upscale flag
    fit_upscale: bool | None = None
    crop_word: str | None = None
    crop_mode: _CropMode | None = None
    crop_rect: CropRect | None = None
    gravity: Gravity | None = None
    format: OutputFormat | None = None
    auto_format: bool = False
    quality: int | None = None
    background: tuple[int, int, int, int] | None = None
    blur: float | None = None
    sharpen: float | None = None
    rotate: int | None = None
    flip: Flip | None = None
    upscale: bool | None = None
    autorotate: bool | None = None
    strip: bool | None = None
    lossless: bool | None = None
    progressive: bool | None = None
    backend_timeout: float | None = None
    origin: str | None = None
    bucket: str | None = None
    default_image: str | None = None
    req: ReqType = ReqType.IMG
    req_format: ReqFormat = ReqFormat.TEXT
    signature: str | None = None


# --- shared value forms (ASCII digits only: int() and float() accept far more) -----------

_INTEGER = re.compile(r"[0-9]{1,9}")
_REAL = re.compile(r"[+-]?(?:[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})")


def _integer(text: str, form: str, low: int, high: int | None = None) -> int:
    if not _INTEGER.fullmatch(text):
        raise _Invalid(form)
    value = int(text)
    if value < low or (high is not None and value > high):
        raise _Invalid(form)
    return value


def _real(text: str, form: str, low: float, high: float) -> float:
    """A plain decimal (no exponent, nan or inf) within [low, high]."""
    if not _REAL.fullmatch(text):
        raise _Invalid(form)
    value = float(text)
    if not low <= value <= high:
        raise _Invalid(form)
    return value


_BOOLEANS: Mapping[str, bool] = MappingProxyType(
    {"1": True, "true": True, "0": False, "false": False}
)


def _boolean(text: str) -> bool:
    value = _BOOLEANS.get(text.lower())
    if value is None:
        raise _Invalid("0 or 1 (or true/false)")
    return value


def _flag(attribute: str) -> Callable[[str, _Draft], _Parsed]:
    """A parser for a 0/1 parameter stored under the draft attribute of the same name."""

    def parse(text: str, draft: _Draft) -> _Parsed:
        value = _boolean(text)
        setattr(draft, attribute, value)
        return _Parsed(int(value), "1" if value else "0")

    return parse


# --- size -------------------------------------------------------------------------------


def _parse_width(text: str, draft: _Draft) -> _Parsed:
    draft.width = _integer(text, "an integer >= 1 (pixels)", 1)
    return _Parsed(draft.width, str(draft.width))


def _parse_height(text: str, draft: _Draft) -> _Parsed:
    draft.height = _integer(text, "an integer >= 1 (pixels)", 1)
    return _Parsed(draft.height, str(draft.height))


_DPR_FORM = "a number from 1 to 5, or Scene7 on,<number> / on / off"


def _parse_dpr(text: str, draft: _Draft) -> _Parsed:
    lowered = text.lower()
    if lowered == "off":
        # Scene7: device pixel ratio handling off for this URL, so hints do not apply.
        draft.dpr = 1.0
        return _Parsed(1.0, "1")
    if lowered == "on":
        # Scene7: use the detected ratio, i.e. whatever Sec-CH-DPR says.
        return _Parsed(None, "on", pins=False)
    number = lowered.removeprefix("on,")
    draft.dpr = _real(number, _DPR_FORM, 1.0, 5.0)
    return _Parsed(draft.dpr, _number_text(draft.dpr))


# --- fit, crop, gravity -----------------------------------------------------------------

_FIT_VALUES: Mapping[str, Fit] = MappingProxyType(
    {
        **{fit.value: fit for fit in Fit},
        # Scene7 names
        "fit": Fit.CONTAIN,
        "constrain": Fit.INSIDE,
        "crop": Fit.COVER,
        "wrap": Fit.OUTSIDE,
        "stretch": Fit.FILL,
    }
)
_FIT_FORM = (
    "one of inside, cover, contain, fill, outside (or Scene7 fit, constrain, crop, wrap,"
    " stretch), optionally followed by ,1 or ,0 for upscale"
)


def _parse_fit(text: str, draft: _Draft) -> _Parsed:
    word, comma, upscale = text.lower().partition(",")
    if word in ("hfit", "vfit"):
        raise _Invalid(f"{word} is not supported; expected {_FIT_FORM}")
    fit = _FIT_VALUES.get(word)
    if fit is None or (comma and upscale not in ("0", "1")):
        raise _Invalid(_FIT_FORM)
    draft.fit = fit
    draft.fit_upscale = (upscale == "1") if comma else None
    return _Parsed(None, fit.value)


_CROP_MODES: Mapping[str, _CropMode] = MappingProxyType(
    {
        "fit": _CropMode(Fit.COVER),
        "pad": _CropMode(Fit.CONTAIN),
        "top": _CropMode(Fit.COVER, Gravity.NORTH),
        "bottom": _CropMode(Fit.COVER, Gravity.SOUTH),
        "face": _CropMode(Fit.COVER, Gravity.ATTENTION),
        "attention": _CropMode(Fit.COVER, Gravity.ATTENTION),
        "entropy": _CropMode(Fit.COVER, Gravity.ENTROPY),
    }
)
_CROP_FORM = (
    "one of fit, pad, top, bottom, face, attention, entropy, or a Scene7 rectangle"
    " x,y,w,h in source pixels (x, y >= 0; w, h >= 1)"
)


def _parse_crop(text: str, draft: _Draft) -> _Parsed:
    lowered = text.lower()
    mode = _CROP_MODES.get(lowered)
    if mode is not None:
        draft.crop_word, draft.crop_mode = lowered, mode
        return _Parsed(None, lowered)
    numbers = text.split(",")
    if len(numbers) != 4:
        raise _Invalid(_CROP_FORM)
    x, y = (_integer(n, _CROP_FORM, 0) for n in numbers[:2])
    width, height = (_integer(n, _CROP_FORM, 1) for n in numbers[2:])
    draft.crop_rect = CropRect(x, y, width, height)
    return _Parsed(None, f"{x},{y},{width},{height}")


_GRAVITIES: Mapping[str, Gravity] = MappingProxyType({g.value: g for g in Gravity})
#: Scene7 align snapped to the grid: (x, y) in {-1, 0, 1}, y = -1 is the top edge
_COMPASS: Mapping[tuple[int, int], Gravity] = MappingProxyType(
    {
        (-1, -1): Gravity.NORTHWEST,
        (0, -1): Gravity.NORTH,
        (1, -1): Gravity.NORTHEAST,
        (-1, 0): Gravity.WEST,
        (0, 0): Gravity.CENTER,
        (1, 0): Gravity.EAST,
        (-1, 1): Gravity.SOUTHWEST,
        (0, 1): Gravity.SOUTH,
        (1, 1): Gravity.SOUTHEAST,
    }
)
_GRAVITY_FORM = "one of " + ", ".join(_GRAVITIES) + ", or Scene7 x,y with reals from -1 to 1"


def _parse_gravity(text: str, draft: _Draft) -> _Parsed:
    if "," in text:
        gravity = _snap_alignment(text)
    else:
        found = _GRAVITIES.get(text.lower())
        if found is None:
            raise _Invalid(_GRAVITY_FORM)
        gravity = found
    draft.gravity = gravity
    return _Parsed(None, gravity.value)


def _snap_alignment(text: str) -> Gravity:
    """Scene7 ``align=x,y`` to the nearest of the nine compass points (ties go inward)."""
    coordinates = text.split(",")
    if len(coordinates) != 2:
        raise _Invalid(_GRAVITY_FORM)
    x, y = (_real(c, _GRAVITY_FORM, -1.0, 1.0) for c in coordinates)
    return _COMPASS[_snap(x), _snap(y)]


def _snap(coordinate: float) -> int:
    if coordinate > 0.5:
        return 1
    if coordinate < -0.5:
        return -1
    return 0


# --- output encoding --------------------------------------------------------------------

_FORMATS: Mapping[str, OutputFormat] = MappingProxyType(
    {**{f.value: f for f in OutputFormat}, "jpg": OutputFormat.JPEG}
)
#: a format token, Scene7's optional -alpha, then up to two Scene7 ,options (jpeg,rgb)
_FORMAT_SHAPE = re.compile(r"([a-z]+)(?:-alpha)?(?:,[a-z0-9]{1,16}){0,2}")
_FORMAT_FORM = "one of jpeg, jpg, png, webp, avif, gif, auto (Scene7 forms such as jpeg,rgb)"


def _parse_format(text: str, draft: _Draft) -> _Parsed:
    shape = _FORMAT_SHAPE.fullmatch(text.lower())
    token = shape.group(1) if shape else ""
    if token == "auto":
        draft.format, draft.auto_format = None, True
        return _Parsed(None, "auto")
    output = _FORMATS.get(token)
    if output is None:
        raise _Invalid(_FORMAT_FORM)
    draft.format, draft.auto_format = output, False
    return _Parsed(None, output.value)


_QUALITY_FORM = "an integer from 1 to 100 (Scene7 form: 80,1)"


def _parse_quality(text: str, draft: _Draft) -> _Parsed:
    number, comma, chroma = text.partition(",")
    if comma and chroma not in ("0", "1"):
        raise _Invalid(_QUALITY_FORM)
    draft.quality = _integer(number, _QUALITY_FORM, 1, 100)
    return _Parsed(draft.quality, str(draft.quality))


_HEX_COLOUR = re.compile(r"(?:#|0x)?([0-9a-f]{3,4}|[0-9a-f]{6}|[0-9a-f]{8})")
_COLOUR_FORM = "hex RGB or RGBA (3, 4, 6 or 8 digits), optionally after # or 0x"


def _parse_background(text: str, draft: _Draft) -> _Parsed:
    match = _HEX_COLOUR.fullmatch(text.lower())
    if match is None:
        raise _Invalid(_COLOUR_FORM)
    digits = match.group(1)
    if len(digits) <= 4:
        digits = "".join(digit * 2 for digit in digits)
    if len(digits) == 6:
        digits += "ff"
    red, green, blue, alpha = (int(digits[i : i + 2], 16) for i in range(0, 8, 2))
    draft.background = (red, green, blue, alpha)
    return _Parsed(None, digits)


# --- effects and orientation ------------------------------------------------------------


def _parse_blur(text: str, draft: _Draft) -> _Parsed:
    draft.blur = _real(text, "a sigma from 0.3 to 100", 0.3, 100.0)
    return _Parsed(draft.blur, _number_text(draft.blur))


def _parse_sharpen(text: str, draft: _Draft) -> _Parsed:
    sigma = _real(text, "0 (off), 1, or a sigma above 0 up to 10", 0.0, 10.0)
    draft.sharpen = sigma if sigma > 0 else None
    return _Parsed(sigma, _number_text(sigma))


def _parse_rotate(text: str, draft: _Draft) -> _Parsed:
    form = "one of 0, 90, 180, 270"
    draft.rotate = _integer(text, form, 0, 270)
    if draft.rotate % 90:
        raise _Invalid(form)
    return _Parsed(draft.rotate, str(draft.rotate))


_FLIPS: Mapping[str, Flip] = MappingProxyType({f.value: f for f in Flip})


def _parse_flip(text: str, draft: _Draft) -> _Parsed:
    draft.flip = _FLIPS.get(text.lower())
    if draft.flip is None:
        raise _Invalid("one of h, v, hv")
    return _Parsed(None, draft.flip.value)


# --- where the original comes from ------------------------------------------------------


def _parse_backend_timeout(text: str, draft: _Draft) -> _Parsed:
    seconds = _real(text, "a number of seconds above 0", 0.0, 1e9)
    if seconds <= 0:
        raise _Invalid("a number of seconds above 0")
    draft.backend_timeout = seconds
    return _Parsed(seconds, _number_text(seconds))


_ORIGIN_FORM = "host[:port] or http(s)://host[:port], without a path, user or query"
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DEFAULT_PORTS: Mapping[str, int] = MappingProxyType({"http": 80, "https": 443})


def _parse_origin(text: str, draft: _Draft) -> _Parsed:
    draft.origin = _normalised_origin(text)
    return _Parsed(None, draft.origin)


def _normalised_origin(text: str) -> str:
    """``scheme://host[:port]`` in lower case, default ports dropped; https if none given."""
    lowered = text.lower()
    scheme, separator, rest = lowered.partition("://")
    if not separator:
        scheme, rest = "https", lowered
    if scheme not in _DEFAULT_PORTS:
        raise _Invalid(_ORIGIN_FORM)
    host, port = _split_host_port(rest.removesuffix("/"))
    shown_port = "" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}"
    return f"{scheme}://{host}{shown_port}"


def _split_host_port(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        literal, bracket, after = authority[1:].partition("]")
        if not bracket:
            raise _Invalid(_ORIGIN_FORM)
        host = f"[{_ipv6(literal)}]"
    else:
        host, colon, port_text = authority.partition(":")
        after = colon + port_text
        _check_host_name(host)
    if not after:
        return host, None
    if not after.startswith(":"):
        raise _Invalid(_ORIGIN_FORM)
    return host, _integer(after[1:], _ORIGIN_FORM, 1, 65535)


def _ipv6(literal: str) -> str:
    try:
        return ipaddress.IPv6Address(literal).compressed
    except ValueError:
        raise _Invalid(_ORIGIN_FORM) from None


def _check_host_name(host: str) -> None:
    """A DNS name of letters, digits and hyphens, or a dotted-quad IPv4 address."""
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise _Invalid(_ORIGIN_FORM)
    # All-digit final labels are addresses to resolvers ("127.1"): only a plain IPv4 passes.
    if labels[-1].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _Invalid(_ORIGIN_FORM) from None


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_BUCKET_FORM = "an S3 bucket name (3-63 lower-case letters, digits, dots and hyphens)"


def _parse_bucket(text: str, draft: _Draft) -> _Parsed:
    looks_like_address = re.fullmatch(r"[0-9]+(?:\.[0-9]+){3}", text) is not None
    reserved = text.startswith(("xn--", "sthree-")) or text.endswith(("-s3alias", "--ol-s3"))
    if not _BUCKET.fullmatch(text) or ".." in text or looks_like_address or reserved:
        raise _Invalid(_BUCKET_FORM)
    draft.bucket = text
    return _Parsed(None, text)


def _parse_default_image(text: str, draft: _Draft) -> _Parsed:
    if text == "":
        draft.default_image = ""
        return _Parsed(None, "")
    # The key may be written as a URL path (/missing.jpg) or bare (missing.jpg).
    key = text.removeprefix("/")
    problem = _key_problem(key)
    if problem is not None:
        raise _Invalid(f"an object key, or empty to disable; this one {problem}")
    draft.default_image = key
    return _Parsed(None, key)


# --- request type and signature ---------------------------------------------------------

_REQ_TYPES: Mapping[str, ReqType] = MappingProxyType({r.value: r for r in ReqType})
_REQ_FORMATS: Mapping[str, ReqFormat] = MappingProxyType({r.value: r for r in ReqFormat})
_REQ_FORM = "one of img, props, imageprops, exists, optionally with ,text ,json or ,xml"


def _parse_req(text: str, draft: _Draft) -> _Parsed:
    kind, comma, body = text.lower().partition(",")
    req = _REQ_TYPES.get(kind)
    req_format = _REQ_FORMATS.get(body) if comma else ReqFormat.TEXT
    if req is None or req_format is None:
        raise _Invalid(_REQ_FORM)
    draft.req, draft.req_format = req, req_format
    return _Parsed(None, f"{req.value},{req_format.value}")


def _parse_signature(text: str, draft: _Draft) -> _Parsed:
    # Checked against the raw URL before parsing (signing.verify); only recorded here.
    draft.signature = text
    return _Parsed(None, text)


# =========================================================================================
# The table: canonical name -> aliases -> parser
# =========================================================================================


@dataclass(frozen=True, slots=True)
class _Param:
    """One canonical parameter: the names it answers to and how its value is read."""

    name: str
    aliases: tuple[str, ...]
    apply: Callable[[str, _Draft], _Parsed]
    #: whether min/max validation rules make sense for it
    numeric: bool = False

    @property
    def key(self) -> str:
        """The lower-case name used by the policy settings."""
        return self.name.lower()


PARAMS: tuple[_Param, ...] = (
    _Param("width", ("w", "wid"), _parse_width, numeric=True),
    _Param("height", ("h", "hei"), _parse_height, numeric=True),
    _Param("dpr", (), _parse_dpr, numeric=True),
    _Param("fit", (), _parse_fit),
    _Param("crop", (), _parse_crop),
    _Param("gravity", ("g", "align"), _parse_gravity),
    _Param("format", ("f", "fmt"), _parse_format),
    _Param("quality", ("q", "qlt"), _parse_quality, numeric=True),
    _Param("background", ("bg", "bgc", "pad_color"), _parse_background),
    _Param("blur", (), _parse_blur, numeric=True),
    _Param("sharpen", ("op_sharpen",), _parse_sharpen, numeric=True),
    _Param("rotate", (), _parse_rotate, numeric=True),
    _Param("flip", (), _parse_flip),
    _Param("upscale", (), _flag("upscale"), numeric=True),
    _Param("autorotate", (), _flag("autorotate"), numeric=True),
    _Param("strip", (), _flag("strip"), numeric=True),
    _Param("lossless", (), _flag("lossless"), numeric=True),
    _Param("progressive", (), _flag("progressive"), numeric=True),
    _Param("backendTimeout", (), _parse_backend_timeout, numeric=True),
    _Param("origin", (), _parse_origin),
    _Param("bucket", (), _parse_bucket),
    _Param("defaultImage", (), _parse_default_image),
    _Param("req", (), _parse_req),
    _Param("s", ("sig",), _parse_signature),
)

_PARAMS_BY_NAME: Mapping[str, _Param] = MappingProxyType(
    {name.lower(): param for param in PARAMS for name in (param.name, *param.aliases)}
)

#: longer values are refused before any parser sees them (S3 keys stop at 1024 bytes)
MAX_VALUE_CHARS = 1024
_SHOWN_CHARS = 40


def _shown(text: str) -> str:
    """A value or name quoted for an error message, cut short."""
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "..."
    return repr(text)


_PLAIN_NAME = re.compile(r"[\w$.\-\[\]]{1,40}", re.ASCII)


def _name_shown(name: str) -> str:
    """An unknown name as written when it is short and plain, else quoted and cut."""
    return name if _PLAIN_NAME.fullmatch(name) else _shown(name)


# =========================================================================================
# parse_query
# =========================================================================================


@dataclass(frozen=True, slots=True)
class _Named:
    """One query pair whose name is known: the parameter, the name as written, the value."""

    param: _Param
    written: str
    value: str
    #: written by the operator in a preset: exempt from the allowed list and the rules
    from_preset: bool = False


def parse_query(pairs: Sequence[tuple[str, str]], policy: ParamPolicy) -> ImageRequest:
    """Validate decoded query pairs into an ImageRequest (DESIGN.md section 1).

    Order of failures, whatever the order of the pairs: unknown or duplicated names and
    unknown presets (InvalidParameter), names outside EDGE_IMAGE_PARAMS_ALLOWED
    (ParameterNotAllowed), transforms outside presets under EDGE_ONLY_PRESETS
    (PresetsOnly), values (InvalidParameter, pair by pair), conflicts between parameters
    (InvalidParameter), then output dimensions (OutputTooLarge).

    A preset (``preset=<name>``, or Scene7's ``$name$`` as a bare word) expands to its
    parameters; explicit parameters beside it replace the preset's value of the same
    canonical parameter (see ``_beside_preset``). The preset's own parameters are the
    operator's: neither EDGE_IMAGE_PARAMS_ALLOWED nor EDGE_IMAGE_PARAM_VALIDATIONS
    applies to them, while both apply to the explicit ones.
    """
    explicit, reference = _resolve_names(pairs, policy)
    preset = None if reference is None else _expansion(reference, policy)
    for item in explicit:
        if not policy.is_allowed(item.param.name):
            raise ParameterNotAllowed(
                f"{item.param.name}: not allowed on this service",
                detail="EDGE_IMAGE_PARAMS_ALLOWED",
            )
    if policy.only_presets:
        _check_only_presets(explicit)
    named = explicit if preset is None else _beside_preset(preset, explicit)
    draft = _Draft()
    given: set[str] = set()
    for item in named:
        parsed = _parse_value(item, draft)
        if not item.from_preset:
            _check_rule(item.param, parsed, policy.validations.get(item.param.key))
        if parsed.pins:
            given.add(item.param.name)
    spec = _settle_spec(draft, auto_format=policy.auto_format)
    _check_output_size(spec, policy.max_output_dimension)
    return ImageRequest(
        spec=spec,
        req=draft.req,
        req_format=draft.req_format,
        backend_timeout=draft.backend_timeout,
        origin=draft.origin,
        bucket=draft.bucket,
        default_image=draft.default_image,
        signature=draft.signature,
        given=frozenset(given),
        preset=None if reference is None else reference.name.lower(),
    )


@dataclass(frozen=True, slots=True)
class _PresetReference:
    """A request's preset: the name as written (``preset`` or ``$thumb$``) and the preset."""

    written: str
    name: str


def _resolve_names(
    pairs: Sequence[tuple[str, str]], policy: ParamPolicy
) -> tuple[list[_Named], _PresetReference | None]:
    """The pairs that are not ignored, each with its parameter, and the preset named if any.

    Unknown names and a parameter (or preset) given twice are 400s.
    """
    named: list[_Named] = []
    seen: dict[str, str] = {}
    reference: _PresetReference | None = None
    for name, value in pairs:
        if policy.is_ignored(name):
            continue
        mentioned = _preset_reference(name, value)
        if mentioned is not None:
            if reference is not None:
                raise InvalidParameter(
                    PRESET,
                    f"given more than once (as {_shown(reference.written)} and {_shown(name)})",
                )
            reference = mentioned
            continue
        param = _PARAMS_BY_NAME.get(name.lower())
        if param is None:
            raise InvalidParameter(_name_shown(name), "unknown parameter")
        if param.name in seen:
            raise InvalidParameter(
                param.name,
                f"given more than once (as {_shown(seen[param.name])} and {_shown(name)})",
            )
        seen[param.name] = name
        named.append(_Named(param, name, value))
    return named, reference


# =========================================================================================
# Presets
# =========================================================================================

#: the parameter naming a preset; Scene7's bare ``$name$`` word names one too
PRESET = "preset"


def _preset_reference(name: str, value: str) -> _PresetReference | None:
    """``preset=<name>`` or a bare ``$name$`` word (no value), else None."""
    if name.lower() == PRESET:
        return _PresetReference(name, value)
    if value == "" and len(name) > 2 and name.startswith("$") and name.endswith("$"):
        return _PresetReference(name, name[1:-1])
    return None


def _expansion(reference: _PresetReference, policy: ParamPolicy) -> tuple[_Named, ...]:
    """The preset's parameters; an unknown one is a 400 naming what the client wrote
    (``preset``, or the ``$name$`` word itself)."""
    preset = policy.preset(reference.name)
    if preset is None:
        written = PRESET if reference.written.lower() == PRESET else reference.written
        raise InvalidParameter(_name_shown(written), f"unknown preset {_shown(reference.name)}")
    return preset


def _check_only_presets(explicit: Sequence[_Named]) -> None:
    """EDGE_ONLY_PRESETS: explicit parameters may only be those that change no pixels.

    s/sig, backendTimeout, origin, bucket and defaultImage (each under its own policy)
    are what an original request may carry too, so a request of only those is an
    original, and beside a preset they leave its variant alone. Anything else, req=
    included, is PresetsOnly (401), with or without a preset beside it.
    """
    for item in explicit:
        if item.param.name not in _NOT_TRANSFORMING:
            raise PresetsOnly(
                f"{item.param.name}: only presets are accepted on this service",
                detail="EDGE_ONLY_PRESETS",
            )


def _beside_preset(preset: Sequence[_Named], explicit: Sequence[_Named]) -> list[_Named]:
    """The preset's parameters overridden by the explicit ones, canonical name by name.

    Parameters that imply others are untangled so the explicit one wins instead of
    conflicting with what the preset implied: beside a preset crop mode (crop=top), an
    explicit fit or gravity replaces that part of the mode and keeps the other; an
    explicit crop mode drops the preset's fit (and its gravity when the mode sets one);
    an explicit upscale drops a preset fit's ``,0``/``,1`` suffix, and an explicit fit
    with a suffix drops the preset's upscale.
    """
    given = {item.param.name: item for item in explicit}
    kept = [kept for item in preset for kept in _preset_item_beside(item, given)]
    return kept + list(explicit)


def _preset_item_beside(item: _Named, given: Mapping[str, _Named]) -> list[_Named]:
    name = item.param.name
    if name in given:
        return []
    if name == "crop" and ("fit" in given or "gravity" in given):
        mode = _CROP_MODES.get(item.value.lower())
        if mode is not None:
            implied = []
            if "fit" not in given:
                implied.append(_implied("fit", mode.fit.value))
            if mode.gravity is not None and "gravity" not in given:
                implied.append(_implied("gravity", mode.gravity.value))
            return implied
    if name in ("fit", "gravity") and "crop" in given:
        mode = _CROP_MODES.get(given["crop"].value.lower())
        if mode is not None and (name == "fit" or mode.gravity is not None):
            return []
    if name == "fit" and "upscale" in given and "," in item.value:
        return [replace(item, value=item.value.partition(",")[0])]
    if name == "upscale" and "fit" in given and "," in given["fit"].value:
        return []
    return [item]


def _implied(name: str, value: str) -> _Named:
    """A parameter a preset implied (through crop=<mode>), stated on its own."""
    return _Named(_PARAMS_BY_NAME[name], PRESET, value, from_preset=True)


def preset_problem(
    pairs: Sequence[tuple[str, str]], max_output_dimension: int | None = None
) -> str | None:
    """Why these decoded query pairs cannot be a preset, or None when they can.

    A preset is checked as a request made of it alone would be: known names, each once,
    valid values, no conflicts, and (given the limit) an output within
    EDGE_MAX_OUTPUT_DIMENSION; it may not be empty, name another preset or carry a
    signature. For settings.py, which cannot import this module at its own import time.
    """
    try:
        items = _preset_items(pairs)
        draft = _Draft()
        for item in items:
            _parse_value(item, draft)
        spec = _settle_spec(draft, auto_format=False)
        if max_output_dimension is not None:
            _check_output_size(spec, max_output_dimension)
    except (InvalidParameter, OutputTooLarge) as exc:
        return exc.reason
    return None


def _preset_items(pairs: Sequence[tuple[str, str]]) -> tuple[_Named, ...]:
    if not pairs:
        raise InvalidParameter(PRESET, "a preset needs at least one parameter")
    items: list[_Named] = []
    seen: dict[str, str] = {}
    for name, value in pairs:
        if _preset_reference(name, value) is not None:
            raise InvalidParameter(_name_shown(name), "a preset cannot name another preset")
        param = _PARAMS_BY_NAME.get(name.lower())
        if param is None:
            raise InvalidParameter(_name_shown(name), "unknown parameter")
        if param.name == "s":
            raise InvalidParameter(param.name, "a preset cannot carry a signature")
        if param.name in seen:
            raise InvalidParameter(
                param.name,
                f"given more than once (as {_shown(seen[param.name])} and {_shown(name)})",
            )
        seen[param.name] = name
        items.append(_Named(param, name, value, from_preset=True))
    return tuple(items)


def _preset_expansions(
    presets: Mapping[str, Sequence[tuple[str, str]]],
    max_output_dimension: int,
    problems: list[str],
) -> dict[str, tuple[_Named, ...]]:
    """Each preset's parameters by lower-case name; what is wrong goes to ``problems``."""
    where = "EDGE_PRESETS/EDGE_PRESETS_FILE"
    expansions: dict[str, tuple[_Named, ...]] = {}
    for name, pairs in presets.items():
        key = name.lower()
        problem = preset_problem(pairs, max_output_dimension)
        if key in expansions:
            problem = "defined twice"
        if problem is not None:
            problems.append(f"{where}: preset {name!r}: {problem}")
            continue
        expansions[key] = _preset_items(pairs)
    return expansions


def _parse_value(item: _Named, draft: _Draft) -> _Parsed:
    as_written = "" if item.written == item.param.name else f" (as {_shown(item.written)})"
    if len(item.value) > MAX_VALUE_CHARS:
        raise InvalidParameter(
            item.param.name,
            f"value too long ({len(item.value)} characters, at most {MAX_VALUE_CHARS})"
            + as_written,
        )
    try:
        return item.param.apply(item.value, draft)
    except _Invalid as exc:
        raise InvalidParameter(
            item.param.name, f"expected {exc}, got {_shown(item.value)}{as_written}"
        ) from None


def _check_rule(param: _Param, parsed: _Parsed, rule: Rule | None) -> None:
    """Apply the operator's EDGE_IMAGE_PARAM_VALIDATIONS rule for this parameter."""
    if rule is None:
        return
    number = parsed.number
    detail = "EDGE_IMAGE_PARAM_VALIDATIONS"
    if number is not None and rule.min is not None and number < rule.min:
        raise InvalidParameter(
            param.name,
            f"{_number_text(number)} is below the minimum {_number_text(rule.min)}",
            detail=detail,
        )
    if number is not None and rule.max is not None and number > rule.max:
        raise InvalidParameter(
            param.name,
            f"{_number_text(number)} is above the maximum {_number_text(rule.max)}",
            detail=detail,
        )
    if rule.allowed is not None and parsed.text not in rule.allowed:
        raise InvalidParameter(
            param.name,
            f"{_shown(parsed.text)} is not one of the allowed values: " + ", ".join(rule.allowed),
            detail=detail,
        )


def _settle_spec(draft: _Draft, *, auto_format: bool) -> TransformSpec:
    """Resolve what parameters imply for each other (crop -> fit/gravity, fit -> upscale);
    ``auto_format`` is EDGE_AUTO_FORMAT."""
    fit, gravity = _settle_fit_and_gravity(draft)
    auto_format = draft.auto_format or (draft.format is None and auto_format)
    defaults = TransformSpec()
    return TransformSpec(
        width=draft.width,
        height=draft.height,
        dpr=draft.dpr if draft.dpr is not None else defaults.dpr,
        fit=fit,
        gravity=gravity,
        crop=draft.crop_rect,
        format=draft.format,
        auto_format=auto_format,
        quality=draft.quality,
        background=draft.background,
        blur=draft.blur,
        sharpen=draft.sharpen,
        rotate=draft.rotate if draft.rotate is not None else defaults.rotate,
        flip=draft.flip,
        upscale=_settle_upscale(draft, defaults.upscale),
        autorotate=_or_default(draft.autorotate, defaults.autorotate),
        strip=_or_default(draft.strip, defaults.strip),
        lossless=_or_default(draft.lossless, defaults.lossless),
        progressive=_or_default(draft.progressive, defaults.progressive),
    )


def _or_default(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _settle_fit_and_gravity(draft: _Draft) -> tuple[Fit, Gravity]:
    fit = draft.fit or Fit.INSIDE
    gravity = draft.gravity or Gravity.CENTER
    mode = draft.crop_mode
    if mode is None:
        return fit, gravity
    if draft.fit is not None and draft.fit is not mode.fit:
        raise InvalidParameter(
            "crop",
            f"crop={draft.crop_word} means fit={mode.fit.value},"
            f" which conflicts with fit={draft.fit.value}",
        )
    explicit = draft.gravity
    if mode.gravity is not None and explicit is not None and explicit is not mode.gravity:
        raise InvalidParameter(
            "crop",
            f"crop={draft.crop_word} means gravity={mode.gravity.value},"
            f" which conflicts with gravity={explicit.value}",
        )
    return mode.fit, mode.gravity or gravity


def _settle_upscale(draft: _Draft, default: bool) -> bool:
    from_fit, explicit = draft.fit_upscale, draft.upscale
    if from_fit is not None and explicit is not None and from_fit != explicit:
        raise InvalidParameter(
            "fit",
            f"the ,{int(from_fit)} suffix means upscale={int(from_fit)},"
            f" which conflicts with upscale={int(explicit)}",
        )
    for value in (explicit, from_fit):
        if value is not None:
            return value
    return default


def _check_output_size(spec: TransformSpec, max_dimension: int) -> None:
    for side, size in (("width", spec.width), ("height", spec.height)):
        if size is not None and size * spec.dpr > max_dimension:
            raise OutputTooLarge(
                f"{side} {size} x dpr {_number_text(spec.dpr)} is above the maximum output"
                f" dimension of {max_dimension} pixels",
                detail="EDGE_MAX_OUTPUT_DIMENSION",
            )


# =========================================================================================
# Content negotiation and client hints
# =========================================================================================

_IMAGE_SUBTYPES: Mapping[str, OutputFormat] = MappingProxyType(
    {**{f.value: f for f in OutputFormat}, "jpg": OutputFormat.JPEG}
)
#: a media-range's q: 0 to 1 with a few decimals (RFC 9110 allows three)
_QVALUE = re.compile(r"0(?:\.[0-9]{0,6})?|1(?:\.0{0,6})?")
_MAX_ACCEPT_CHARS = 4096
_MAX_ACCEPT_ITEMS = 64


def accepted_formats(accept: str | None) -> frozenset[OutputFormat]:
    """Image formats the Accept header names explicitly with q > 0.

    Wildcards (``*/*``, ``image/*``) name nothing. A type also listed with q=0 is
    refused. Malformed entries are skipped; a garbage header names nothing.
    """
    if not accept:
        return frozenset()
    named: set[OutputFormat] = set()
    refused: set[OutputFormat] = set()
    for item in accept[:_MAX_ACCEPT_CHARS].split(",")[:_MAX_ACCEPT_ITEMS]:
        media_range, *parameters = item.split(";")
        kind, _, subtype = media_range.strip().lower().partition("/")
        output = _IMAGE_SUBTYPES.get(subtype.strip()) if kind == "image" else None
        weight = _weight(parameters)
        if output is None or weight is None:
            continue
        (named if weight > 0 else refused).add(output)
    return frozenset(named - refused)


def _weight(parameters: Sequence[str]) -> float | None:
    """The q of a media range (1 when absent), or None when it is malformed."""
    for parameter in parameters:
        name, _, value = parameter.strip().partition("=")
        if name.strip().lower() == "q":
            text = value.strip()
            return float(text) if _QVALUE.fullmatch(text) else None
    return 1.0


_HINT_DPR = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,6})?")
_HINT_WIDTH = re.compile(r"[0-9]{1,6}")
#: Sec-CH-Width is rounded up to a multiple of this, so nearby widths share a variant
WIDTH_STEP = 50


def apply_client_hints(
    request: ImageRequest,
    dpr_hint: str | None,
    width_hint: str | None,
    max_dimension: int,
    max_pixels: int,
) -> tuple[ImageRequest, tuple[str, ...]]:
    """Fill dpr and width from Sec-CH-DPR / Sec-CH-Width where the URL left them open.

    Returns the request and the hint headers whose values shaped it (for Vary). The
    hinted width is device pixels: dpr is not applied to it (a dpr still applying to a
    URL height is folded into that height). A hinted dpr is clamped to 1-5 and lowered
    so no URL side exceeds max_dimension and a URL box (width and height) stays within
    max_pixels: a hint from the browser must not turn a URL that works into a 400.
    Originals, imageprops and exists ignore hints.
    """
    if request.is_original or request.req not in (ReqType.IMG, ReqType.PROPS):
        return request, ()
    spec = request.spec
    used: list[str] = []
    device_width = None if "width" in request.given else _parse_width_hint(width_hint)
    hinted_dpr = None if "dpr" in request.given else _parse_dpr_hint(dpr_hint)
    if hinted_dpr is not None:
        scaled_sides = (spec.height,) if device_width is not None else (spec.height, spec.width)
        dpr = _dpr_within(hinted_dpr, scaled_sides, max_dimension, max_pixels)
        spec = replace(spec, dpr=dpr)
        # With a device width and no height, dpr ends up scaling nothing.
        if device_width is None or spec.height is not None:
            used.append("Sec-CH-DPR")
    if device_width is not None:
        capped = min(math.ceil(device_width / WIDTH_STEP) * WIDTH_STEP, max_dimension)
        spec = _with_device_width(spec, capped)
        used.append("Sec-CH-Width")
    return replace(request, spec=spec), tuple(used)


def _parse_dpr_hint(text: str | None) -> float | None:
    if text is None or not _HINT_DPR.fullmatch(text.strip()):
        return None
    value = float(text)
    return min(max(value, 1.0), 5.0) if value > 0 else None


def _parse_width_hint(text: str | None) -> int | None:
    if text is None or not _HINT_WIDTH.fullmatch(text.strip()):
        return None
    value = int(text)
    return value if value > 0 else None


def _dpr_within(
    dpr: float, sides: Sequence[int | None], max_dimension: int, max_pixels: int
) -> float:
    """The hinted dpr, lowered so no side times it exceeds the output limit and a box of
    two sides stays within the pixel limit (never < 1)."""
    known = [side for side in sides if side is not None]
    for side in known:
        dpr = min(dpr, max_dimension / side)
    if len(known) == 2 and known[0] * known[1] * dpr * dpr > max_pixels:
        scale = math.sqrt(max_pixels / (known[0] * known[1]))
        # whole device pixels per side, so rounding the sides up cannot cross the limit
        dpr = min(math.floor(side * scale) / side for side in known)
    return max(dpr, 1.0)


def _with_device_width(spec: TransformSpec, width: int) -> TransformSpec:
    """Width in device pixels: fold any dpr into the URL height and drop it."""
    height = spec.height
    if height is not None and spec.dpr != 1.0:
        height = max(1, math.floor(height * spec.dpr + 0.5))
    return replace(spec, width=width, height=height, dpr=1.0)
