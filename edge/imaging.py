"""Everything that touches pixels: the only module that knows pyvips (libvips).

Owns the process-wide libvips set-up, recognising an original's format from its bytes,
the header-only probe that enforces the source limits before any decode, the plan (pure
arithmetic: output format, quality, sizes, shrink-on-load, memory estimate), and the
transform itself, which runs synchronously in a worker thread and can be killed through
a ``KillSwitch``. Every libvips failure leaves this module as an ``EdgeError``.

Pipeline of one transform (one libvips thread, streamed top to bottom where it can be):

    load with shrink-on-load -> Scene7 crop rect -> one lanczos3 resize -> sRGB
    -> EXIF orientation, rotate, flip -> cover crop / contain embed -> blur, sharpen
    -> flatten (JPEG) -> encode

Geometry is planned in the *view* frame (upright, cropped, rotated: what the client
sees) but the expensive steps run in the *stored* frame of the original, so rotation
happens on the small resized image rather than on the decoded original.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, cast
from xml.parsers import expat

import pyvips

from edge.budget import KillSwitch
from edge.errors import (
    ClientClosed,
    EdgeError,
    FormatNotAllowed,
    InvalidParameter,
    OutputTooLarge,
    SourceTooLarge,
    TransformTimeout,
    UndecodableImage,
)
from edge.params import CropRect, Fit, Flip, Gravity, OutputFormat, TransformSpec

#: pyvips ships no types; every libvips image in this module is one of these
VipsImage: TypeAlias = Any

#: part of every cache key and ETag: bump it when the pixels a spec produces change
PIPELINE_VERSION: Final = "1"

#: input formats and the libvips loader classes (this libvips build) that read them;
#: avif and heif share libheif's loader, told apart by our own sniffing first
LOADER_CLASSES: Final[dict[str, str]] = {
    "jpeg": "VipsForeignLoadJpeg",
    "png": "VipsForeignLoadPng",
    "webp": "VipsForeignLoadWebp",
    "gif": "VipsForeignLoadNsgif",
    "avif": "VipsForeignLoadHeif",
    "heif": "VipsForeignLoadHeif",
    "svg": "VipsForeignLoadSvg",
    "tiff": "VipsForeignLoadTiff",
}
INPUT_FORMATS: Final = frozenset(LOADER_CLASSES)

#: the libvips loader nickname each sniffed format must have been read by
_LOADER_NICKNAMES: Final[dict[str, str]] = {
    "jpeg": "jpegload",
    "png": "pngload",
    "webp": "webpload",
    "gif": "gifload",
    "avif": "heifload",
    "heif": "heifload",
    "svg": "svgload",
    "tiff": "tiffload",
}

# Encoder settings, measured on the benchmark photo resized to 720x588 (one thread):
# JPEG q80 optimised 5 ms / 68 KB; WebP q80: effort 4 50 ms / 47 KB, effort 2 24 ms /
# 49 KB; AVIF q60: effort 0 35 ms / 42 KB, effort 1 106 ms, effort 2 190 ms, libvips'
# default effort 4 1.5 s; PNG: compression 2 with adaptive filtering 30 ms / 673 KB
# against 57 ms / 647 KB for zlib's default level 6.
#: WebP effort (0-6): half the time of libwebp's default for 4% more bytes
WEBP_EFFORT: Final = 2
#: AVIF effort (0-9): the only level whose latency is in line with WebP's
AVIF_EFFORT: Final = 0
#: zlib level for PNG: deflate time dominates PNG encoding, and level 2 loses little
PNG_COMPRESSION: Final = 2
#: AVIF quality that looks like a given JPEG quality (q80 JPEG ~ q60 AVIF in mean
#: error on photos, at 60% of the bytes); WebP's scale is close to JPEG's and is used as is
AVIF_QUALITY_RATIO: Final = 0.75

#: unsharp-mask slopes for flat and jagged areas (the sigma comes from the request)
SHARPEN_FLAT: Final = 1.0
SHARPEN_JAGGED: Final = 2.0

#: formats that can carry animation in this libvips build (heifsave writes a multi-image
#: file, not an AVIF sequence, so AVIF gets the first frame)
ANIMATED_OUTPUTS: Final = frozenset({OutputFormat.GIF, OutputFormat.WEBP})
#: input formats whose extra pages are animation frames
_ANIMATED_INPUTS: Final = frozenset({"gif", "webp"})
_ALPHA_OUTPUTS: Final = frozenset(
    {OutputFormat.PNG, OutputFormat.WEBP, OutputFormat.AVIF, OutputFormat.GIF}
)
_JPEG_SHRINKS: Final = (8, 4, 2)
#: quality for an encoder given none (PNG, GIF and lossless ignore it)
_QUALITY_IF_UNSET: Final = 80

_WHITE: Final = (255, 255, 255, 255)
_TRANSPARENT: Final = (0, 0, 0, 0)
_SMART_GRAVITY: Final = frozenset({Gravity.ENTROPY, Gravity.ATTENTION})
#: where the kept part sits for each anchored gravity: (fraction across, fraction down)
_ANCHORS: Final[dict[Gravity, tuple[float, float]]] = {
    Gravity.CENTER: (0.5, 0.5),
    Gravity.NORTH: (0.5, 0.0),
    Gravity.SOUTH: (0.5, 1.0),
    Gravity.EAST: (1.0, 0.5),
    Gravity.WEST: (0.0, 0.5),
    Gravity.NORTHEAST: (1.0, 0.0),
    Gravity.NORTHWEST: (0.0, 0.0),
    Gravity.SOUTHEAST: (1.0, 1.0),
    Gravity.SOUTHWEST: (0.0, 1.0),
}
_BYTES_PER_SAMPLE: Final[dict[str, int]] = {
    "uchar": 1,
    "char": 1,
    "ushort": 2,
    "short": 2,
    "uint": 4,
    "int": 4,
    "float": 4,
    "double": 8,
    "complex": 8,
    "dpcomplex": 16,
}
_GREY_INTERPRETATIONS: Final = frozenset({"b-w", "grey16"})
_COLOUR_INTERPRETATIONS: Final = frozenset(
    {"b-w", "grey16", "srgb", "rgb", "rgb16", "scrgb", "cmyk", "lab", "labs", "lch", "cmc",
     "xyz", "yxy", "hsv"}
)  # fmt: skip


# --------------------------------------------------------------------------- set-up


def configure(allowed_formats: frozenset[str]) -> None:
    """Set libvips up for untrusted input; idempotent, call once per process at start.

    No operation cache (every request is new input, and cached operations would pin
    memory), one thread per pipeline (we run one transform per core), untrusted loaders
    blocked, and every loader blocked except those of ``allowed_formats``.
    """
    unknown = allowed_formats - INPUT_FORMATS
    if unknown:
        raise ValueError(f"no loader for input formats: {', '.join(sorted(unknown))}")
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)
    pyvips.concurrency_set(1)
    pyvips.block_untrusted_set(True)
    pyvips.operation_block_set("VipsForeignLoad", True)
    for loader in sorted({LOADER_CLASSES[name] for name in allowed_formats}):
        pyvips.operation_block_set(loader, False)


# --------------------------------------------------------------------------- sniffing

_HEIF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1",
     b"msf1"}
)  # fmt: skip
_AVIF_BRANDS: Final = frozenset({b"avif", b"avis"})
_XML_PREAMBLES: Final = (b"<?xml", b"<!--", b"<!doctype")
#: how far into a text file the <svg element is looked for
_SVG_WINDOW: Final = 4096


def sniff(data: bytes) -> str | None:
    """The input format named by the magic bytes of ``data``, or None if unknown."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[4:8] == b"ftyp":
        return _sniff_ftyp(data)
    if _looks_like_svg(data):
        return "svg"
    return None


def _sniff_ftyp(data: bytes) -> str | None:
    """avif or heif from an ISO-BMFF ``ftyp`` box: the major and compatible brands."""
    size = int.from_bytes(data[:4], "big")
    end = min(max(size, 16), len(data), 256)
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & _HEIF_BRANDS:
        return "heif"
    return None


def _looks_like_svg(data: bytes) -> bool:
    head = data[:_SVG_WINDOW].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if head.startswith(b"<svg"):
        return True
    return head.startswith(_XML_PREAMBLES) and b"<svg" in head


# --------------------------------------------------------------------------- probe


@dataclass(frozen=True, slots=True)
class Limits:
    """The operator's limits on sources and outputs (EDGE_MAX_* and allowed formats)."""

    allowed_formats: frozenset[str]
    max_source_pixels: int
    max_animation_frames: int
    max_output_dimension: int
    max_output_pixels: int


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the original's header says, before any pixel is decoded."""

    format: str
    #: as stored (before EXIF orientation); one page's size for multi-page formats
    width: int
    height: int
    pages: int
    #: EXIF orientation 1-8 (1: stored upright)
    orientation: int
    has_alpha: bool
    #: size of the original in bytes
    bytes: int
    bands: int = 3
    #: bytes per band of one decoded pixel (2 for 16-bit sources)
    sample_bytes: int = 1

    @property
    def upright_size(self) -> tuple[int, int]:
        """Width and height once EXIF orientation is applied (5-8 turn a quarter)."""
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height

    @property
    def upright_width(self) -> int:
        return self.upright_size[0]

    @property
    def upright_height(self) -> int:
        return self.upright_size[1]

    @property
    def animated(self) -> bool:
        return self.format in _ANIMATED_INPUTS and self.pages > 1


def probe(data: bytes, limits: Limits) -> SourceInfo:
    """Read the header of ``data`` and enforce the source limits; decodes no pixel.

    Raises UndecodableImage (unknown or unreadable), FormatNotAllowed, SourceTooLarge.
    """
    fmt = sniff(data)
    if fmt is None:
        raise UndecodableImage("not an image in a known format")
    if fmt not in limits.allowed_formats:
        raise FormatNotAllowed(f"input format {fmt} is not allowed")
    _check_structure(data, fmt, limits)
    try:
        # sequential access: libvips reads the header now and decodes only on demand
        header = pyvips.Image.new_from_buffer(data, "", access="sequential")
        info = _source_info(header, fmt, len(data))
    except pyvips.Error as error:
        raise UndecodableImage(
            f"the {fmt} header could not be read", detail=_libvips_message(error)
        ) from error
    _check_source_limits(info, limits)
    if fmt == "svg":
        _check_svg_references(data)
    return info


# Checks of the container, in Python, where the libraries behind libvips would be slow
# or lenient: each is linear in the file and stops early.

#: top-level chunks (WebP) or boxes (AVIF/HEIF) walked at most, beyond the frames allowed
_SPARE_CHUNKS: Final = 64


def _check_structure(data: bytes, fmt: str, limits: Limits) -> None:
    if fmt == "webp":
        _check_webp_frames(data, limits.max_animation_frames)
    elif fmt in ("avif", "heif"):
        _check_bmff_complete(data, fmt)


def _check_webp_frames(data: bytes, max_frames: int) -> None:
    """Count an animated WebP's frames before libwebp does.

    libwebp's demuxer finds each frame by walking the list from the first, so libvips'
    header read is quadratic in the frame count: a few MB of one-pixel frames held a
    thread for minutes. The RIFF chunks are walked here instead, stopping as soon as the
    frame limit (or a sane number of other chunks) is passed.
    """
    frames = chunks = 0
    pos = 12
    while pos + 8 <= len(data):
        if data[pos : pos + 4] == b"ANMF":
            frames += 1
            if frames > max_frames:
                raise SourceTooLarge(
                    f"the source has too many frames (more than {max_frames};"
                    f" the limit is {max_frames})"
                )
        chunks += 1
        if chunks > max_frames + _SPARE_CHUNKS:
            raise SourceTooLarge(f"the WebP has too many chunks (more than {chunks - 1})")
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + size + (size & 1)


def _check_bmff_complete(data: bytes, fmt: str) -> None:
    """Every top-level ISO-BMFF box must be whole.

    libheif decodes a grid image whose tiles lie past the end of a truncated file as
    grey, without an error: a cut-off AVIF would be served (and cached) as a picture.
    """
    pos = boxes = 0
    while pos < len(data):
        boxes += 1
        if boxes > _SPARE_CHUNKS:
            raise UndecodableImage(f"the {fmt} file has too many top-level boxes")
        if pos + 8 > len(data):
            raise UndecodableImage(f"the {fmt} file is truncated")
        size, header = int.from_bytes(data[pos : pos + 4], "big"), 8
        if size == 1:  # a 64-bit size follows the type
            if pos + 16 > len(data):
                raise UndecodableImage(f"the {fmt} file is truncated")
            size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        elif size == 0:  # the last box, to the end of the file
            return
        if size < header:
            raise UndecodableImage(f"the {fmt} file has a malformed box")
        if pos + size > len(data):
            raise UndecodableImage(
                f"the {fmt} file is truncated",
                detail=f"a box ends at {pos + size}, the file at {len(data)}",
            )
        pos += size


#: elements librsvg may render for one SVG, references expanded: a ``<use>`` (or any
#: ``href="#id"``) instantiates its target again, and nested references multiply
SVG_MAX_RENDERED_ELEMENTS: Final = 100_000
#: libxml2's own default nesting limit, which librsvg keeps
_SVG_MAX_DEPTH: Final = 256
_XLINK_HREF: Final = "http://www.w3.org/1999/xlink href"
_XML_ID: Final = "http://www.w3.org/XML/1998/namespace id"
_URL_REF: Final = re.compile(r"url\(\s*['\"]?#([^)'\"\s]+)")
#: targets of url(#...) that only lend their colours: referring to one costs one element
_PAINT_SERVERS: Final = frozenset({"linearGradient", "radialGradient"})


@dataclass(eq=False)
class _SvgNode:
    """An element with an id (or the document), without the id'd elements inside it."""

    tag: str
    elements: int = 0
    #: references made inside this node: target id -> how many times
    refs: Counter[str] = field(default_factory=Counter)
    children: list[_SvgNode] = field(default_factory=list)


def _check_svg_references(data: bytes) -> None:
    """Refuse an SVG whose references would make librsvg render too many elements.

    A few hundred bytes of nested ``<use>`` ask for billions of elements; librsvg stops
    at 500,000 references, but only after seconds of rendering that no kill switch can
    interrupt (it renders a tile in one call). Counted here from the XML alone.
    """
    root = _SvgNode("")
    ids: dict[str, list[_SvgNode]] = {}
    stack: list[_SvgNode | None] = []
    open_nodes = [root]

    def start(name: str, attrs: dict[str, str]) -> None:
        if len(stack) >= _SVG_MAX_DEPTH:
            raise UndecodableImage("the SVG is nested too deeply")
        tag = name.rpartition(" ")[2]
        ident = attrs.get("id") or attrs.get(_XML_ID)
        node = _SvgNode(tag) if ident else None
        if node is not None and ident is not None:
            ids.setdefault(ident, []).append(node)
            open_nodes[-1].children.append(node)
            open_nodes.append(node)
        stack.append(node)
        here = open_nodes[-1]
        here.elements += 1
        for attr, value in attrs.items():
            if attr in ("href", _XLINK_HREF) and value.startswith("#"):
                here.refs[value[1:].strip()] += 1
            elif "url(" in value:
                here.refs.update(_URL_REF.findall(value))

    def end(_name: str) -> None:
        if stack.pop() is not None:
            open_nodes.pop()

    parser = expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except expat.ExpatError as error:
        raise UndecodableImage("the SVG is not well-formed XML", detail=str(error)) from error
    rendered = _svg_rendered_elements(root, ids, SVG_MAX_RENDERED_ELEMENTS + 1)
    if rendered > SVG_MAX_RENDERED_ELEMENTS:
        raise SourceTooLarge(
            f"the SVG's references expand to more than {SVG_MAX_RENDERED_ELEMENTS} elements"
        )


def _svg_rendered_elements(root: _SvgNode, ids: dict[str, list[_SvgNode]], cap: int) -> int:
    """Elements of ``root`` with every reference expanded (at most ``cap``); depth-first
    without recursion, since chains of references can be long."""
    done: dict[int, int] = {}
    started: set[int] = set()

    def targets(node: _SvgNode) -> list[_SvgNode]:
        return [t for name in node.refs for t in ids.get(name, ())] + node.children

    def cost(node: _SvgNode) -> int:
        total = node.elements + sum(done[id(child)] for child in node.children)
        for name, count in node.refs.items():
            weights = [
                1 if target.tag in _PAINT_SERVERS else done[id(target)]
                for target in ids.get(name, ())
            ]
            total += count * max(weights, default=0)
        return min(total, cap)

    pending: list[tuple[_SvgNode, bool]] = [(root, False)]
    while pending:
        node, ready = pending.pop()
        if ready:
            done[id(node)] = cost(node)
            continue
        if id(node) in done:
            continue
        started.add(id(node))
        pending.append((node, True))
        for target in targets(node):
            if id(target) in started and id(target) not in done:
                raise UndecodableImage("the SVG refers to itself in a loop")
            if id(target) not in done:
                pending.append((target, False))
    return done[id(root)]


def _source_info(header: VipsImage, fmt: str, size: int) -> SourceInfo:
    loader = _field(header, "vips-loader", "")
    if not str(loader).startswith(_LOADER_NICKNAMES[fmt]):
        raise UndecodableImage(f"the data is not a readable {fmt} image", detail=str(loader))
    orientation = int(_field(header, "orientation", 1))
    return SourceInfo(
        format=fmt,
        width=int(header.width),
        height=int(header.height),
        pages=max(1, int(_field(header, "n-pages", 1))),
        orientation=orientation if 1 <= orientation <= 8 else 1,
        has_alpha=bool(header.hasalpha()),
        bytes=size,
        bands=int(header.bands),
        sample_bytes=_BYTES_PER_SAMPLE.get(str(header.format), 1),
    )


def _check_source_limits(info: SourceInfo, limits: Limits) -> None:
    pixels = info.width * info.height * info.pages
    if pixels > limits.max_source_pixels:
        raise SourceTooLarge(
            f"the source has too many pixels ({info.width}x{info.height}"
            f" x {info.pages} pages; the limit is {limits.max_source_pixels})"
        )
    if info.pages > limits.max_animation_frames:
        raise SourceTooLarge(
            f"the source has too many frames ({info.pages};"
            f" the limit is {limits.max_animation_frames})"
        )


def _field(image: VipsImage, name: str, default: Any) -> Any:
    return image.get(name) if image.get_typeof(name) else default


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything decided before decoding: what to make and what it will cost."""

    format: OutputFormat
    #: the format was negotiated from Accept: the response needs ``Vary: Accept``
    vary_accept: bool
    #: encoder quality; None for PNG, GIF and lossless output
    quality: int | None
    #: the output's size (one frame's, for animations)
    width: int
    height: int
    #: frames decoded and written: the source's pages when the animation is kept, else 1
    frames: int
    #: EXIF orientation applied (1 when autorotate is off)
    orientation: int
    #: the Scene7 crop as a rectangle of the stored source: (left, top, width, height)
    region: tuple[int, int, int, int] | None
    #: the size the region is resized to, in the view frame (before cover crop or
    #: contain padding)
    resize_width: int
    resize_height: int
    #: the resize runs in the stored frame, which is a quarter turn from the view
    transposed: bool
    #: how much smaller than the stored region the resize target is (min of both axes)
    shrink: float
    #: the factor asked of the loader: JPEG 1/2/4/8, WebP and SVG any; 1 elsewhere
    load_shrink: float
    #: bytes this transform may hold at its peak, for admission control
    memory_estimate: int

    @property
    def stored_resize(self) -> tuple[int, int]:
        """The resize target in the stored frame of the original."""
        if self.transposed:
            return self.resize_height, self.resize_width
        return self.resize_width, self.resize_height


@dataclass(frozen=True, slots=True)
class _Geometry:
    """Sizes in the view frame: the resize target and the final box."""

    resize: tuple[int, int]
    output: tuple[int, int]


def plan(
    info: SourceInfo,
    spec: TransformSpec,
    *,
    accepted: frozenset[OutputFormat],
    default_quality: int,
    limits: Limits,
) -> Plan:
    """Decide format, quality and sizes of the transform (pure arithmetic, no decode).

    ``accepted``: the formats the client's Accept names explicitly with q > 0.
    Raises InvalidParameter (crop outside the source) and OutputTooLarge.
    """
    fmt, negotiated = choose_format(info, spec, accepted)
    orientation = info.orientation if spec.autorotate else 1
    region = _stored_region(info, spec.crop, orientation)
    view = _view_size(region, orientation, spec.rotate)
    geometry = _geometry(spec, view, limits)
    frames = info.pages if info.animated and fmt in ANIMATED_OUTPUTS else 1
    _check_output_limits(geometry.output, frames, limits)
    transposed = (orientation >= 5) != (spec.rotate in (90, 270))
    stored_target = geometry.resize[::-1] if transposed else geometry.resize
    shrink = min(region[2] / stored_target[0], region[3] / stored_target[1])
    load_shrink = _load_shrink(info, region, stored_target, shrink, frames, limits)
    return Plan(
        format=fmt,
        vary_accept=negotiated,
        quality=_quality(fmt, spec, default_quality),
        width=geometry.output[0],
        height=geometry.output[1],
        frames=frames,
        orientation=orientation,
        region=region if spec.crop is not None else None,
        resize_width=geometry.resize[0],
        resize_height=geometry.resize[1],
        transposed=transposed,
        shrink=shrink,
        load_shrink=load_shrink,
        memory_estimate=_memory_estimate(info, fmt, geometry, frames, load_shrink),
    )


def choose_format(
    info: SourceInfo, spec: TransformSpec, accepted: frozenset[OutputFormat]
) -> tuple[OutputFormat, bool]:
    """The output format and whether it was negotiated from Accept (DESIGN.md 1)."""
    if spec.format is not None:
        return spec.format, False
    if spec.auto_format:
        return _negotiated_format(info, accepted), True
    return _source_default_format(info), False


def _negotiated_format(info: SourceInfo, accepted: frozenset[OutputFormat]) -> OutputFormat:
    # An animation would lose every frame but the first in AVIF, JPEG or PNG, so it
    # negotiates between the formats that keep it moving.
    if info.animated:
        return OutputFormat.WEBP if OutputFormat.WEBP in accepted else OutputFormat.GIF
    for preferred in (OutputFormat.AVIF, OutputFormat.WEBP):
        if preferred in accepted:
            return preferred
    return OutputFormat.PNG if info.has_alpha else OutputFormat.JPEG


def _source_default_format(info: SourceInfo) -> OutputFormat:
    if info.format == "gif":
        return OutputFormat.GIF if info.pages > 1 else OutputFormat.PNG
    if info.format in ("jpeg", "png", "webp", "avif"):
        return OutputFormat(info.format)
    return OutputFormat.PNG if info.has_alpha else OutputFormat.JPEG


def _quality(fmt: OutputFormat, spec: TransformSpec, default_quality: int) -> int | None:
    if fmt in (OutputFormat.PNG, OutputFormat.GIF):
        return None
    if spec.lossless and fmt in (OutputFormat.WEBP, OutputFormat.AVIF):
        return None
    if spec.quality is not None:
        return spec.quality
    return default_quality_for(fmt, default_quality)


def default_quality_for(fmt: OutputFormat, jpeg_quality: int) -> int:
    """The quality of ``fmt`` that looks like JPEG at ``jpeg_quality`` (the default)."""
    if fmt is OutputFormat.AVIF:
        return max(1, round(jpeg_quality * AVIF_QUALITY_RATIO))
    return jpeg_quality


def _stored_region(
    info: SourceInfo, crop: CropRect | None, orientation: int
) -> tuple[int, int, int, int]:
    """The part of the stored original to use: all of it, or the crop rect mapped back."""
    if crop is None:
        return 0, 0, info.width, info.height
    upright_w, upright_h = (
        (info.height, info.width) if orientation >= 5 else (info.width, info.height)
    )
    if (
        crop.x < 0
        or crop.y < 0
        or crop.width < 1
        or crop.height < 1
        or crop.x + crop.width > upright_w
        or crop.y + crop.height > upright_h
    ):
        raise InvalidParameter(
            "crop", f"the rectangle reaches outside the {upright_w}x{upright_h} source"
        )
    corners = (
        _upright_to_stored(crop.x, crop.y, orientation, info.width, info.height),
        _upright_to_stored(
            crop.x + crop.width, crop.y + crop.height, orientation, info.width, info.height
        ),
    )
    left, right = sorted(c[0] for c in corners)
    top, bottom = sorted(c[1] for c in corners)
    return left, top, right - left, bottom - top


def _upright_to_stored(
    u: int, v: int, orientation: int, width: int, height: int
) -> tuple[int, int]:
    """Where the point (u, v) of the upright image lies in the stored image (W x H)."""
    match orientation:
        case 2:  # mirrored
            return width - u, v
        case 3:  # upside down
            return width - u, height - v
        case 4:  # mirrored upside down
            return u, height - v
        case 5:  # transposed
            return v, u
        case 6:  # turned a quarter anticlockwise in storage
            return v, height - u
        case 7:  # transversed
            return width - v, height - u
        case 8:  # turned a quarter clockwise in storage
            return width - v, u
        case _:
            return u, v


def _view_size(region: tuple[int, int, int, int], orientation: int, rotate: int) -> tuple[int, int]:
    """The size of the region as the client sees it: upright, then rotated."""
    width, height = region[2], region[3]
    if (orientation >= 5) != (rotate in (90, 270)):
        return height, width
    return width, height


def _geometry(spec: TransformSpec, view: tuple[int, int], limits: Limits) -> _Geometry:
    width = _device_pixels(spec.width, spec.dpr, "width", limits)
    height = _device_pixels(spec.height, spec.dpr, "height", limits)
    if width is not None and height is not None:
        return _fit(spec.fit, view, (width, height), spec.upscale)
    if width is not None:
        return _one_side(view, width / view[0], spec.upscale)
    if height is not None:
        return _one_side(view, height / view[1], spec.upscale)
    return _Geometry(resize=view, output=view)


def _one_side(view: tuple[int, int], scale: float, upscale: bool) -> _Geometry:
    """Only one side given: every fit scales by it and the other side follows the ratio."""
    if not upscale:
        scale = min(scale, 1.0)
    size = (_scaled(view[0], scale), _scaled(view[1], scale))
    return _Geometry(resize=size, output=size)


def _device_pixels(value: int | None, dpr: float, name: str, limits: Limits) -> int | None:
    """A requested side in device pixels (dpr applied), checked against the limit."""
    if value is None:
        return None
    pixels = max(1, _round(value * dpr))
    if pixels > limits.max_output_dimension:
        raise OutputTooLarge(
            f"{name} x dpr is {pixels} px; the limit is {limits.max_output_dimension}"
        )
    return pixels


def _round(value: float) -> int:
    """Half up, as image sizes are usually rounded (Python's round() goes to even)."""
    return math.floor(value + 0.5)


def _fit(fit: Fit, view: tuple[int, int], box: tuple[int, int], upscale: bool) -> _Geometry:
    """Resize target and output for each fit; without upscale nothing is enlarged."""
    vw, vh = view
    bw, bh = box
    if fit in (Fit.INSIDE, Fit.OUTSIDE):
        pick = min if fit is Fit.INSIDE else max
        scale = pick(bw / vw, bh / vh)
        if not upscale:
            scale = min(scale, 1.0)
        size = (_scaled(vw, scale), _scaled(vh, scale))
        return _Geometry(resize=size, output=size)
    if fit is Fit.FILL:
        enlargement = max(bw / vw, bh / vh)
        if not upscale and enlargement > 1:
            box = _within(_shrunk_box(box, enlargement), view)
        return _Geometry(resize=box, output=box)
    if fit is Fit.COVER:
        scale = max(bw / vw, bh / vh)
        if not upscale and scale > 1:
            box, scale = _within(_shrunk_box(box, scale), view), 1.0
        resize = (max(box[0], _scaled(vw, scale)), max(box[1], _scaled(vh, scale)))
        return _Geometry(resize=resize, output=box)
    scale = min(bw / vw, bh / vh)  # contain
    if not upscale and scale > 1:
        box, scale = _shrunk_box(box, scale), 1.0
    resize = (min(box[0], _scaled(vw, scale)), min(box[1], _scaled(vh, scale)))
    return _Geometry(resize=resize, output=box)


def _scaled(length: int, scale: float) -> int:
    return max(1, _round(length * scale))


def _shrunk_box(box: tuple[int, int], factor: float) -> tuple[int, int]:
    """The box made ``factor`` times smaller, keeping its ratio."""
    return max(1, _round(box[0] / factor)), max(1, _round(box[1] / factor))


def _within(box: tuple[int, int], view: tuple[int, int]) -> tuple[int, int]:
    """The box, kept from exceeding the view by rounding."""
    return min(box[0], view[0]), min(box[1], view[1])


def _check_output_limits(output: tuple[int, int], frames: int, limits: Limits) -> None:
    width, height = output
    if max(width, height) > limits.max_output_dimension:
        raise OutputTooLarge(
            f"the output would be {width}x{height}; the limit is"
            f" {limits.max_output_dimension} px per side"
        )
    if width * height * frames > limits.max_output_pixels:
        raise OutputTooLarge(
            f"the output would be {width}x{height} x {frames} frames; the limit is"
            f" {limits.max_output_pixels} pixels"
        )


def _load_shrink(
    info: SourceInfo,
    region: tuple[int, int, int, int],
    target: tuple[int, int],
    shrink: float,
    frames: int,
    limits: Limits,
) -> float:
    """The factor the loader is asked to shrink by while decoding (stored frame)."""
    if info.format == "jpeg":
        return float(_jpeg_shrink(info, region, target))
    if info.format == "webp" and frames == 1 and shrink > 1:
        return shrink
    if info.format == "svg":
        # vectors render at the size needed, larger too, but never past the pixel limit
        floor = math.sqrt(info.width * info.height / limits.max_source_pixels)
        return max(shrink, floor)
    return 1.0


def _jpeg_shrink(
    info: SourceInfo, region: tuple[int, int, int, int], target: tuple[int, int]
) -> int:
    """The largest DCT scaling (8, 4, 2) that still leaves the region at least target size.

    As aggressive as sharp's fastShrinkOnLoad: the lanczos3 resize after it does the
    rest, however little. libjpeg rounds scaled sizes down, so the check uses that.
    """
    for factor in _JPEG_SHRINKS:
        loaded_w, loaded_h = info.width // factor, info.height // factor
        if loaded_w < 1 or loaded_h < 1:
            continue
        if (
            region[2] * loaded_w / info.width >= target[0]
            and region[3] * loaded_h / info.height >= target[1]
        ):
            return factor
    return 1


def _memory_estimate(
    info: SourceInfo, fmt: OutputFormat, geometry: _Geometry, frames: int, load_shrink: float
) -> int:
    """Decoded source after shrink-on-load, the resized and output images, and the bytes."""
    decoded = math.ceil(info.width / load_shrink) * math.ceil(info.height / load_shrink)
    decoded_bytes = decoded * info.bands * info.sample_bytes * frames
    out_bands = 4 if fmt in _ALPHA_OUTPUTS else 3
    resized = geometry.resize[0] * geometry.resize[1] * out_bands * frames
    output = geometry.output[0] * geometry.output[1] * out_bands * frames
    return decoded_bytes + resized + output + info.bytes


# --------------------------------------------------------------------------- transform


@dataclass(frozen=True, slots=True)
class Output:
    """An encoded image and what it is."""

    body: bytes
    format: OutputFormat
    width: int
    height: int
    quality: int | None


class _Guard:
    """Ties one transform's libvips evaluations to its KillSwitch, and names failures.

    libvips emits ``eval`` from the pipeline as it computes; the handler kills the image
    once the switch is set, and the pending libvips call then fails. Which EdgeError a
    failure becomes depends on whether the switch was set.

    pyvips ties a signal handler's callback handle to the Python object that connected
    it, not to the libvips image, which lives on as long as a later image in the
    pipeline uses it. So the guard holds every image it watches until ``release``: a
    handle freed while its image could still signal makes the next ``eval`` read freed
    memory, and the interpreter aborts (with transforms in several threads, that memory
    is soon reused).
    """

    def __init__(self, kill: KillSwitch) -> None:
        self._kill = kill
        self._watched: list[VipsImage] = []

    def watch(self, image: VipsImage) -> VipsImage:
        image.set_progress(True)
        image.signal_connect("eval", self._on_eval)
        self._watched.append(image)
        return image

    def release(self) -> None:
        """Let the watched images go: the transform has finished with libvips."""
        self._watched.clear()  # the handlers refer to the guard: a cycle, broken here

    def _on_eval(self, image: VipsImage, _progress: Any) -> None:
        if self._kill.is_set():
            image.set_kill(True)

    def check(self) -> None:
        if self._kill.is_set():
            raise self.killed()

    def killed(self) -> EdgeError:
        if self._kill.reason == "timeout":
            return TransformTimeout("the time budget ran out during the transform")
        return ClientClosed("the client went away during the transform", label="transform")

    def translate(self, error: pyvips.Error) -> EdgeError:
        if self._kill.is_set():
            return self.killed()
        return UndecodableImage("the image could not be decoded", detail=_libvips_message(error))

    def materialise(self, image: VipsImage) -> VipsImage:
        """Compute ``image`` into memory: what follows needs random access to it."""
        return self.watch(image).copy_memory()


def transform(
    data: bytes, info: SourceInfo, plan: Plan, spec: TransformSpec, kill: KillSwitch
) -> Output:
    """Run the planned transform of ``data`` (blocking; call from a worker thread).

    Raises UndecodableImage for a corrupt or truncated original, and TransformTimeout or
    ClientClosed (stage transform) when ``kill`` is set while it runs.
    """
    guard = _Guard(kill)
    guard.check()
    try:
        image = _load(data, info, plan)
        if plan.region is not None:
            image = _per_frame(image, plan, lambda frame: _cut_region(frame, info, plan))
        image = _to_srgb(_resize(image, plan))
        if _needs_random_access(plan, spec):
            image = guard.materialise(image)
        if _changes_view(plan, spec):
            image = _per_frame(image, plan, lambda frame: _view(frame, plan, spec, guard))
        image = _finish(image, plan, spec)
        body = _encode(guard.watch(image), plan.format, plan.quality, spec)
        width, height = int(image.width), int(image.height) // plan.frames
    except pyvips.Error as error:
        raise guard.translate(error) from error
    finally:
        guard.release()
    return Output(body=body, format=plan.format, width=width, height=height, quality=plan.quality)


def _load(data: bytes, info: SourceInfo, plan: Plan) -> VipsImage:
    # fail_on goes in the option string: it is where every loader honours it
    options = ["fail_on=error"]
    if plan.frames > 1:
        options.append("n=-1")
    if info.format == "jpeg" and plan.load_shrink > 1:
        options.append(f"shrink={int(plan.load_shrink)}")
    elif info.format in ("webp", "svg") and plan.load_shrink != 1:
        options.append(f"scale={1 / plan.load_shrink!r}")
    elif info.format in ("heif", "avif") and _heif_thumbnail_fits(data, info, plan):
        options.append("thumbnail=true")
    image = pyvips.Image.new_from_buffer(data, ",".join(options), access="sequential")
    if plan.frames == 1:
        return _as_still(image)
    if _field(image, "page-height", 0) * plan.frames != image.height:
        raise UndecodableImage("the animation's frames do not match its header")
    return image


def _heif_thumbnail_fits(data: bytes, info: SourceInfo, plan: Plan) -> bool:
    """Whether the HEIF's embedded thumbnail is big enough to stand in for the image."""
    if plan.shrink <= 1:
        return False
    thumbnail = pyvips.Image.new_from_buffer(data, "thumbnail=true", access="sequential")
    if thumbnail.width >= info.width:
        return False
    *_, width, height = _loaded_region(plan, info, thumbnail.width, thumbnail.height)
    target_w, target_h = plan.stored_resize
    return width >= target_w and height >= target_h


def _per_frame(image: VipsImage, plan: Plan, step: Callable[[VipsImage], VipsImage]) -> VipsImage:
    """Apply ``step`` to each frame of an animation (the image itself when still).

    Only cheap steps go through here: pyvips spends about a millisecond building each
    operation, so resizing hundreds of frames one by one would cost more than the pixels.
    """
    if plan.frames == 1:
        return step(image)
    page_height = image.height // plan.frames
    frames = [image.crop(0, i * page_height, image.width, page_height) for i in range(plan.frames)]
    stepped = [step(frame) for frame in frames]
    # arrayjoin keeps the first frame's metadata: delays and loop count survive
    return _with_page_height(pyvips.Image.arrayjoin(stepped, across=1), stepped[0].height)


def _with_page_height(image: VipsImage, page_height: int) -> VipsImage:
    image = image.copy()
    image.set_type(pyvips.GValue.gint_type, "page-height", page_height)
    return image


def _as_still(image: VipsImage) -> VipsImage:
    """A single frame: a page height left by the loader could split it after resizing."""
    if not image.get_typeof("page-height"):
        return image
    image = image.copy()
    image.remove("page-height")
    return image


def _changes_view(plan: Plan, spec: TransformSpec) -> bool:
    return (
        plan.orientation != 1
        or spec.rotate != 0
        or spec.flip is not None
        or (plan.resize_width, plan.resize_height) != (plan.width, plan.height)
        or spec.blur is not None
        or spec.sharpen is not None
    )


def _view(frame: VipsImage, plan: Plan, spec: TransformSpec, guard: _Guard) -> VipsImage:
    """One resized frame into the view frame, cut or padded to the box, with effects."""
    return _effects(_fit_box(_orient(frame, plan, spec), plan, spec, guard), spec)


def _loaded_region(
    plan: Plan, info: SourceInfo, loaded_w: int, loaded_h: int
) -> tuple[int, int, int, int]:
    """The plan's stored region in the pixels of the loaded (shrunk) image, rounded out."""
    left, top, width, height = plan.region or (0, 0, info.width, info.height)
    sx, sy = loaded_w / info.width, loaded_h / info.height
    x0, y0 = math.floor(left * sx), math.floor(top * sy)
    x1 = min(loaded_w, max(x0 + 1, math.ceil((left + width) * sx)))
    y1 = min(loaded_h, max(y0 + 1, math.ceil((top + height) * sy)))
    return x0, y0, x1 - x0, y1 - y0


def _cut_region(frame: VipsImage, info: SourceInfo, plan: Plan) -> VipsImage:
    if plan.region is None:
        return frame
    return frame.extract_area(*_loaded_region(plan, info, frame.width, frame.height))


def _resize(image: VipsImage, plan: Plan) -> VipsImage:
    """One lanczos3 resize to the exact stored-frame target (alpha premultiplied).

    An animation is resized as one strip of frames: each frame's height scales exactly
    to the target, and the lanczos taps that reach across a frame edge weigh little.
    """
    target_w, target_h = plan.stored_resize
    page_height = image.height // plan.frames
    if (image.width, page_height) == (target_w, target_h):
        return image
    hscale, vscale = target_w / image.width, target_h / page_height
    if not image.hasalpha():
        resized = image.resize(hscale, vscale=vscale, kernel="lanczos3")
    else:
        # premultiplied, so transparent pixels lend no colour to their neighbours
        band_format = image.format
        resized = image.premultiply().resize(hscale, vscale=vscale, kernel="lanczos3")
        resized = resized.unpremultiply().cast(band_format)
    if plan.frames > 1:
        return _with_page_height(resized, target_h)
    return resized


def _to_srgb(frame: VipsImage) -> VipsImage:
    """8-bit sRGB (or 8-bit grey), from CMYK, 16-bit, other spaces or an ICC profile."""
    interpretation = str(frame.interpretation)
    if interpretation not in _COLOUR_INTERPRETATIONS:
        # a loader that could not say: guess from the band count
        interpretation = "b-w" if frame.bands < 3 else "srgb"
        frame = frame.copy(interpretation=interpretation)
    target = "b-w" if interpretation in _GREY_INTERPRETATIONS else "srgb"
    if frame.get_typeof("icc-profile-data"):
        converted = _icc_to_srgb(frame)
        # the result is plain sRGB: a profile left attached would describe the input
        return _without_profile(converted if converted is not None else frame, target)
    if interpretation == target and frame.format == "uchar":
        return frame
    return frame.colourspace(target)


def _icc_to_srgb(frame: VipsImage) -> VipsImage | None:
    """The frame through its embedded profile into sRGB; None if the profile is unusable."""
    try:
        # relative colorimetric (libvips' default): in-gamut colours stay exact
        return frame.icc_transform("srgb", embedded=True, intent="relative")
    except pyvips.Error:
        # a broken profile is ignored, as browsers do
        return None


def _without_profile(frame: VipsImage, target: str) -> VipsImage:
    if str(frame.interpretation) != target or frame.format != "uchar":
        frame = frame.colourspace(target)
    frame = frame.copy()
    frame.remove("icc-profile-data")
    return frame


def _needs_random_access(plan: Plan, spec: TransformSpec) -> bool:
    """Rotations, vertical flips and smart crops read the image out of order."""
    return (
        plan.orientation != 1
        or spec.rotate != 0
        or spec.flip in (Flip.V, Flip.HV)
        or _smart_crop(plan, spec)
    )


def _smart_crop(plan: Plan, spec: TransformSpec) -> bool:
    # an animation cropped frame by frame would jitter: it keeps its centre instead
    return spec.fit is Fit.COVER and spec.gravity in _SMART_GRAVITY and plan.frames == 1


def _orient(frame: VipsImage, plan: Plan, spec: TransformSpec) -> VipsImage:
    """EXIF orientation, then the rotate parameter, then flips: into the view frame."""
    if plan.orientation != 1:
        frame = frame.autorot()
    if spec.rotate:
        frame = frame.rot(f"d{spec.rotate}")
    if spec.flip in (Flip.H, Flip.HV):
        frame = frame.fliphor()
    if spec.flip in (Flip.V, Flip.HV):
        frame = frame.flipver()
    return frame


def _fit_box(frame: VipsImage, plan: Plan, spec: TransformSpec, guard: _Guard) -> VipsImage:
    """Cut (cover) or pad (contain) the resized frame to the output box."""
    if (frame.width, frame.height) == (plan.width, plan.height):
        return frame
    if spec.fit is Fit.CONTAIN:
        return _pad(frame, plan, spec)
    if _smart_crop(plan, spec):
        guard.watch(frame)
        return frame.smartcrop(plan.width, plan.height, interesting=spec.gravity.value)
    left, top = _anchored_offset(frame, plan, spec.gravity)
    return frame.extract_area(left, top, plan.width, plan.height)


def _anchored_offset(frame: VipsImage, plan: Plan, gravity: Gravity) -> tuple[int, int]:
    across, down = _ANCHORS.get(gravity, (0.5, 0.5))
    return (
        _round((frame.width - plan.width) * across),
        _round((frame.height - plan.height) * down),
    )


def _pad(frame: VipsImage, plan: Plan, spec: TransformSpec) -> VipsImage:
    has_alpha_output = plan.format in _ALPHA_OUTPUTS
    default = _TRANSPARENT if has_alpha_output else _WHITE
    background = spec.background or default
    frame = _as_srgb(frame)
    if has_alpha_output and background[3] < 255 and not frame.hasalpha():
        frame = frame.bandjoin_const([255])
    ink = list(background[: frame.bands])
    left, top = _anchored_offset(frame, plan, spec.gravity)
    return frame.embed(-left, -top, plan.width, plan.height, extend="background", background=ink)


def _as_srgb(frame: VipsImage) -> VipsImage:
    """Grey frames become sRGB, so that a coloured background can be drawn on them."""
    return frame.colourspace("srgb") if frame.bands < 3 else frame


def _effects(frame: VipsImage, spec: TransformSpec) -> VipsImage:
    if spec.blur is not None:
        frame = frame.gaussblur(spec.blur)
    if spec.sharpen is not None:
        # libvips' defaults leave flat areas alone (m1=0), which on resized photos is
        # nearly everything; these slopes sharpen flat areas gently and edges more
        frame = frame.sharpen(sigma=spec.sharpen, m1=SHARPEN_FLAT, m2=SHARPEN_JAGGED)
    return frame


def _finish(image: VipsImage, plan: Plan, spec: TransformSpec) -> VipsImage:
    """JPEG has no alpha: flatten onto the background (white unless one is given)."""
    if plan.format is not OutputFormat.JPEG or not image.hasalpha():
        return image
    background = spec.background or _WHITE
    if image.bands < 3 and len(set(background[:3])) > 1:
        image = image.colourspace("srgb")
    ink = list(background[: image.bands - 1])
    return image.flatten(background=ink)


def _encode(image: VipsImage, fmt: OutputFormat, quality: int | None, spec: TransformSpec) -> bytes:
    """Encode with our settings; ``spec`` gives lossless, progressive and strip."""
    keep = "none" if spec.strip else "all"
    if quality is None:
        quality = _QUALITY_IF_UNSET
    match fmt:
        case OutputFormat.JPEG:
            body = image.jpegsave_buffer(
                Q=quality, optimize_coding=True, interlace=spec.progressive, keep=keep
            )
        case OutputFormat.PNG:
            body = image.pngsave_buffer(
                compression=PNG_COMPRESSION, filter="all", interlace=spec.progressive, keep=keep
            )
        case OutputFormat.WEBP:
            body = image.webpsave_buffer(
                Q=quality, lossless=spec.lossless, effort=WEBP_EFFORT, keep=keep
            )
        case OutputFormat.AVIF:
            body = image.heifsave_buffer(
                compression="av1",
                Q=quality,
                lossless=spec.lossless,
                effort=AVIF_EFFORT,
                keep=keep,
            )
        case OutputFormat.GIF:
            body = image.gifsave_buffer(keep=keep)
    return cast(bytes, body)


def _libvips_message(error: pyvips.Error) -> str:
    """libvips' own words, one line, for operators (ErrorDetail >= 2)."""
    detail = (error.detail or error.message or "").strip()
    return " ".join(detail.split())[:300]


# --------------------------------------------------------------------------- extras

#: error images: dark grey text on light grey
_ERROR_BACKGROUND: Final = 238
_ERROR_INK: Final = 51
#: the largest error image drawn (1024x1024). Any failed request can ask for one, so its
#: size is the attacker's to choose: 8192x8192 as AVIF took 20 s and 1 GB, and 1920x1280
#: (AVIF or GIF) 1.5 s; this many pixels take half a second at worst. Larger requests get
#: the plain error.
ERROR_IMAGE_MAX_PIXELS: Final = 1024 * 1024


def render_error_image(
    title: str,
    message: str,
    width: int,
    height: int,
    fmt: OutputFormat,
    quality: int | None,
    *,
    max_pixels: int = ERROR_IMAGE_MAX_PIXELS,
) -> bytes:
    """A light-grey ``width`` x ``height`` image saying ``title`` and ``message``.

    The text is sized to fit (libvips picks the resolution); a box too small for any
    text is left plain. Raises EdgeError if libvips cannot make it, or if it would have
    more than ``max_pixels``.
    """
    if width * height > max_pixels:
        raise EdgeError(
            "the error image would be too large",
            detail=f"{width}x{height}; at most {max_pixels} pixels are drawn",
        )
    try:
        canvas = _error_canvas(title, message, width, height)
        return _encode(canvas, fmt, quality, TransformSpec())
    except pyvips.Error as error:
        raise EdgeError(
            "the error image could not be rendered", detail=_libvips_message(error)
        ) from error


def _error_canvas(title: str, message: str, width: int, height: int) -> VipsImage:
    margin = max(1, min(width, height) // 10)
    inner_w, inner_h = width - 2 * margin, height - 2 * margin
    blank = pyvips.Image.black(width, height).new_from_image(_ERROR_BACKGROUND)
    blank = blank.cast("uchar").copy(interpretation="b-w")
    if inner_w < 8 or inner_h < 8:
        return blank
    markup = f"<b>{html.escape(title, quote=False)}</b>\n{html.escape(message, quote=False)}"
    mask = pyvips.Image.text(markup, width=inner_w, height=inner_h, align="centre", font="sans")
    # the mask is coverage 0-255: blend ink onto the background by it
    text = mask.linear((_ERROR_INK - _ERROR_BACKGROUND) / 255, _ERROR_BACKGROUND).cast("uchar")
    left, top = (width - text.width) // 2, (height - text.height) // 2
    return blank.insert(text.copy(interpretation="b-w"), left, top)
