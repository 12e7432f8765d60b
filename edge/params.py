"""The request's query string, turned into a frozen, canonical description (pure).

Owns both parameter dialects (Imagizer and Scene7 names, DESIGN.md section 1), their
validation, the operator's parameter policies, and the canonical form used in cache keys
and ETags. Knows nothing of HTTP servers, storage or pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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
