"""imaging: probe, plan and transform against real libvips, judged by decoding the output.

Pixels are compared by mean absolute difference against references made with pyvips
itself (never byte equality): encoders are free to change their bytes.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
import zlib
from typing import Any

import pytest
import pyvips

from edge import imaging
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
from edge.imaging import Limits, Output, SourceInfo
from edge.params import CropRect, Fit, Flip, Gravity, OutputFormat, TransformSpec
from tests.conftest import REPO, SHARED_IMAGES

ALL_FORMATS = imaging.INPUT_FORMATS
LIMITS = Limits(
    allowed_formats=ALL_FORMATS,
    max_source_pixels=50_000_000,
    max_animation_frames=400,
    max_output_dimension=8192,
    max_output_pixels=40_000_000,
)
PHOTO = "photo-2725x2225.jpg"
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
YELLOW = (255, 255, 0)


@pytest.fixture(autouse=True, scope="module")
def _libvips() -> None:
    imaging.configure(ALL_FORMATS)


def sample(name: str) -> bytes:
    return (SHARED_IMAGES / name).read_bytes()


def run(
    data: bytes,
    spec: TransformSpec,
    *,
    accepted: frozenset[OutputFormat] = frozenset(),
    limits: Limits = LIMITS,
    kill: KillSwitch | None = None,
) -> Output:
    info = imaging.probe(data, limits)
    plan = imaging.plan(info, spec, accepted=accepted, default_quality=80, limits=limits)
    return imaging.transform(data, info, plan, spec, kill or KillSwitch())


def decode(body: bytes, *, animated: bool = False) -> Any:
    return pyvips.Image.new_from_buffer(body, "n=-1" if animated else "")


def mad(a: Any, b: Any) -> float:
    """Mean absolute difference of two same-sized images, on the 0-255 scale."""
    assert (a.width, a.height, a.bands) == (b.width, b.height, b.bands)
    return float((a.cast("float") - b.cast("float")).abs().avg())


def detail(image: Any) -> float:
    """How much fine detail an image has: what a slight blur takes away."""
    return float((image.cast("float") - image.gaussblur(1)).abs().avg())


def mean_colour(image: Any, left: int, top: int, width: int, height: int) -> list[float]:
    area = image.extract_area(left, top, width, height)
    return [float(area[band].avg()) for band in range(area.bands)]


def close_to(colour: list[float], expected: tuple[int, ...], tolerance: float = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected, strict=False))


def quadrants(width: int = 96, height: int = 64) -> Any:
    """An asymmetric test card: red, green / blue, yellow quadrants."""

    def block(colour: tuple[int, int, int]) -> Any:
        return pyvips.Image.black(width // 2, height // 2).new_from_image(list(colour))

    top = block(RED).join(block(GREEN), "horizontal")
    bottom = block(BLUE).join(block(YELLOW), "horizontal")
    return top.join(bottom, "vertical").copy(interpretation="srgb")


def quadrant_colours(image: Any) -> list[list[float]]:
    """Mean colour of the middle of each quadrant: top-left, top-right, bottom-left, -right."""
    w, h = image.width // 2, image.height // 2
    inset_w, inset_h = w // 4, h // 4
    return [
        mean_colour(image, x + inset_w, y + inset_h, w - 2 * inset_w, h - 2 * inset_h)[:3]
        for y in (0, h)
        for x in (0, w)
    ]


def assert_upright_card(image: Any) -> None:
    for colour, expected in zip(quadrant_colours(image), (RED, GREEN, BLUE, YELLOW), strict=True):
        assert close_to(colour, expected), quadrant_colours(image)


#: how to store the upright card so that EXIF orientation N shows it upright again
STORED_FOR_ORIENTATION = {
    1: lambda im: im,
    2: lambda im: im.fliphor(),
    3: lambda im: im.rot180(),
    4: lambda im: im.flipver(),
    5: lambda im: im.rot90().fliphor(),
    6: lambda im: im.rot270(),
    7: lambda im: im.rot90().flipver(),
    8: lambda im: im.rot90(),
}


def oriented_jpeg(orientation: int) -> bytes:
    stored = STORED_FOR_ORIENTATION[orientation](quadrants()).copy()
    stored.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    return bytes(stored.jpegsave_buffer(Q=95))


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a pixel flood)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def distinct_frames_gif(frames: int = 6, size: int = 48) -> bytes:
    """An animation whose every frame differs (encoders merge identical frames)."""
    pages = [
        pyvips.Image.black(size, size).new_from_image([i * 40, 255 - i * 40, 128])
        for i in range(frames)
    ]
    strip = pyvips.Image.arrayjoin(pages, across=1).copy(interpretation="srgb")
    strip.set_type(pyvips.GValue.gint_type, "page-height", size)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [70 + 10 * i for i in range(frames)])
    strip.set_type(pyvips.GValue.gint_type, "loop", 3)
    return bytes(strip.gifsave_buffer())


# --------------------------------------------------------------------------- sniff


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (PHOTO, "jpeg"),
        ("blackbug-alpha-2048x1536.png", "png"),
        ("gallery-1024x772.webp", "webp"),
        ("rotating-squares-animated.gif", "gif"),
        ("banner-4096x800.avif", "avif"),
    ],
)
def test_sniff_samples(name: str, expected: str) -> None:
    assert imaging.sniff(sample(name)) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "svg"),
        (b'\xef\xbb\xbf  <?xml version="1.0"?>\n<!-- x -->\n<svg width="1"/>', "svg"),
        (b'<?xml version="1.0"?><html></html>', None),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heif"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1avif", "avif"),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"hello", None),
        (b"", None),
    ],
)
def test_sniff_magic_bytes(data: bytes, expected: str | None) -> None:
    assert imaging.sniff(data) == expected


# --------------------------------------------------------------------------- probe


def test_probe_reads_the_header() -> None:
    info = imaging.probe(sample(PHOTO), LIMITS)
    assert info == SourceInfo(
        format="jpeg",
        width=2725,
        height=2225,
        pages=1,
        orientation=1,
        has_alpha=False,
        bytes=len(sample(PHOTO)),
        bands=3,
        sample_bytes=1,
    )


def test_probe_counts_frames_and_alpha() -> None:
    info = imaging.probe(sample("rotating-squares-animated.gif"), LIMITS)
    assert (info.format, info.width, info.height, info.pages) == ("gif", 80, 80, 30)
    assert info.animated
    assert imaging.probe(sample("blackbug-alpha-2048x1536.png"), LIMITS).has_alpha


def test_probe_upright_size_swaps_for_quarter_turns() -> None:
    info = imaging.probe(oriented_jpeg(6), LIMITS)
    assert (info.width, info.height, info.orientation) == (64, 96, 6)
    assert info.upright_size == (96, 64)


def test_probe_unknown_bytes_are_undecodable() -> None:
    with pytest.raises(UndecodableImage):
        imaging.probe(b"definitely not an image", LIMITS)


def test_probe_garbage_after_magic_is_undecodable() -> None:
    with pytest.raises(UndecodableImage) as caught:
        imaging.probe(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, LIMITS)
    assert isinstance(caught.value.__cause__, pyvips.Error)


def test_probe_disallowed_format_names_it() -> None:
    limits = Limits(
        allowed_formats=frozenset({"jpeg", "png"}),
        max_source_pixels=50_000_000,
        max_animation_frames=400,
        max_output_dimension=8192,
        max_output_pixels=40_000_000,
    )
    with pytest.raises(FormatNotAllowed, match="webp"):
        imaging.probe(sample("gallery-1024x772.webp"), limits)


def test_pixel_flood_is_refused_from_the_header_at_once() -> None:
    flood = png_header(65536, 65536)
    assert len(flood) < 200
    started = time.perf_counter()
    with pytest.raises(SourceTooLarge, match="pixels"):
        imaging.probe(flood, LIMITS)
    assert time.perf_counter() - started < 1.0


def test_too_many_frames_is_source_too_large() -> None:
    limits = Limits(ALL_FORMATS, 50_000_000, 10, 8192, 40_000_000)
    with pytest.raises(SourceTooLarge, match="frames"):
        imaging.probe(sample("rotating-squares-animated.gif"), limits)


def test_configure_blocks_loaders_outside_the_allowed_formats() -> None:
    # Defence in depth: even past our own format check, libvips refuses the loader.
    try:
        imaging.configure(frozenset({"jpeg"}))
        with pytest.raises(UndecodableImage):
            imaging.probe(sample("blackbug-alpha-2048x1536.png"), LIMITS)
        assert imaging.probe(sample(PHOTO), LIMITS).format == "jpeg"
    finally:
        imaging.configure(ALL_FORMATS)
    assert imaging.probe(sample("blackbug-alpha-2048x1536.png"), LIMITS).format == "png"


def test_configure_rejects_unknown_formats() -> None:
    with pytest.raises(ValueError, match="bmp"):
        imaging.configure(frozenset({"jpeg", "bmp"}))


# --------------------------------------------------------------------------- plan


def make_plan(info: SourceInfo, spec: TransformSpec, **kwargs: Any) -> imaging.Plan:
    options: dict[str, Any] = {"accepted": frozenset(), "default_quality": 80, "limits": LIMITS}
    options.update(kwargs)
    return imaging.plan(info, spec, **options)


PHOTO_INFO = SourceInfo("jpeg", 2725, 2225, 1, 1, False, 829183)


@pytest.mark.parametrize(
    ("fit", "expected"),
    [
        (Fit.INSIDE, (300, 245)),
        (Fit.COVER, (300, 400)),
        (Fit.CONTAIN, (300, 400)),
        (Fit.FILL, (300, 400)),
        (Fit.OUTSIDE, (490, 400)),
    ],
)
def test_fit_modes_give_exact_dimensions(fit: Fit, expected: tuple[int, int]) -> None:
    spec = TransformSpec(width=300, height=400, fit=fit)
    assert (make_plan(PHOTO_INFO, spec).width, make_plan(PHOTO_INFO, spec).height) == expected
    out = run(sample(PHOTO), spec)
    image = decode(out.body)
    assert (image.width, image.height) == (out.width, out.height) == expected
    assert out.format is OutputFormat.JPEG


@pytest.mark.parametrize(
    ("fit", "expected"),
    [
        (Fit.INSIDE, (80, 80)),
        (Fit.OUTSIDE, (80, 80)),
        (Fit.COVER, (80, 40)),
        (Fit.CONTAIN, (160, 80)),
        (Fit.FILL, (80, 40)),
    ],
)
def test_without_upscale_nothing_grows_and_boxes_shrink_in_proportion(
    fit: Fit, expected: tuple[int, int]
) -> None:
    small = SourceInfo("png", 80, 80, 1, 1, False, 1000)
    planned = make_plan(small, TransformSpec(width=400, height=200, fit=fit))
    assert (planned.width, planned.height) == expected


def test_upscale_enlarges() -> None:
    small = SourceInfo("png", 80, 80, 1, 1, False, 1000)
    planned = make_plan(small, TransformSpec(width=400, height=200, upscale=True))
    assert (planned.width, planned.height) == (200, 200)


def test_one_side_follows_the_ratio_and_dpr_multiplies() -> None:
    planned = make_plan(PHOTO_INFO, TransformSpec(width=360, dpr=2.0))
    assert (planned.width, planned.height) == (720, 588)


def test_rotate_quarter_turn_swaps_the_view() -> None:
    planned = make_plan(PHOTO_INFO, TransformSpec(width=300, rotate=90))
    assert (planned.width, planned.height) == (300, 367)
    assert planned.transposed


def test_crop_outside_the_upright_source_is_invalid() -> None:
    with pytest.raises(InvalidParameter) as caught:
        make_plan(PHOTO_INFO, TransformSpec(crop=CropRect(2000, 0, 800, 100)))
    assert caught.value.param == "crop"
    rotated = SourceInfo("jpeg", 64, 96, 1, 6, False, 1000)  # upright 96x64
    make_plan(rotated, TransformSpec(crop=CropRect(0, 0, 96, 64)))
    with pytest.raises(InvalidParameter):
        make_plan(rotated, TransformSpec(crop=CropRect(0, 0, 64, 96)))


def test_output_limits() -> None:
    with pytest.raises(OutputTooLarge):
        make_plan(PHOTO_INFO, TransformSpec(width=5000, dpr=2.0))
    with pytest.raises(OutputTooLarge):
        make_plan(SourceInfo("png", 10000, 100, 1, 1, False, 1000), TransformSpec())
    animation = SourceInfo("gif", 1000, 1000, 50, 1, True, 1000, bands=4)
    tight = Limits(ALL_FORMATS, 50_000_000, 400, 8192, 40_000_000)
    with pytest.raises(OutputTooLarge, match="frames"):
        make_plan(animation, TransformSpec(), limits=tight)
    assert make_plan(animation, TransformSpec(format=OutputFormat.PNG), limits=tight).frames == 1


@pytest.mark.parametrize(
    ("source", "pages", "alpha", "expected"),
    [
        ("jpeg", 1, False, OutputFormat.JPEG),
        ("png", 1, True, OutputFormat.PNG),
        ("webp", 1, False, OutputFormat.WEBP),
        ("avif", 1, False, OutputFormat.AVIF),
        ("gif", 5, True, OutputFormat.GIF),
        ("gif", 1, True, OutputFormat.PNG),
        ("heif", 1, False, OutputFormat.JPEG),
        ("tiff", 1, True, OutputFormat.PNG),
        ("svg", 1, True, OutputFormat.PNG),
    ],
)
def test_default_output_format(
    source: str, pages: int, alpha: bool, expected: OutputFormat
) -> None:
    info = SourceInfo(source, 100, 100, pages, 1, alpha, 1000)
    planned = make_plan(info, TransformSpec())
    assert planned.format is expected
    assert not planned.vary_accept


@pytest.mark.parametrize(
    ("accepted", "alpha", "expected"),
    [
        ({OutputFormat.AVIF, OutputFormat.WEBP}, False, OutputFormat.AVIF),
        ({OutputFormat.WEBP}, False, OutputFormat.WEBP),
        (set(), False, OutputFormat.JPEG),
        (set(), True, OutputFormat.PNG),
    ],
)
def test_auto_format(accepted: set[OutputFormat], alpha: bool, expected: OutputFormat) -> None:
    info = SourceInfo("jpeg", 100, 100, 1, 1, alpha, 1000)
    planned = make_plan(info, TransformSpec(auto_format=True), accepted=frozenset(accepted))
    assert planned.format is expected
    assert planned.vary_accept


def test_auto_format_keeps_animations_moving() -> None:
    info = SourceInfo("gif", 80, 80, 30, 1, True, 1000, bands=4)
    spec = TransformSpec(auto_format=True)
    assert make_plan(info, spec, accepted=frozenset(OutputFormat)).format is OutputFormat.WEBP
    assert make_plan(info, spec).format is OutputFormat.GIF


def test_explicit_format_wins_and_does_not_vary() -> None:
    spec = TransformSpec(format=OutputFormat.PNG, auto_format=True)
    planned = make_plan(PHOTO_INFO, spec, accepted=frozenset({OutputFormat.AVIF}))
    assert (planned.format, planned.vary_accept) == (OutputFormat.PNG, False)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (TransformSpec(format=OutputFormat.JPEG), 80),
        (TransformSpec(format=OutputFormat.WEBP), 80),
        (TransformSpec(format=OutputFormat.AVIF), 60),
        (TransformSpec(format=OutputFormat.PNG, quality=50), None),
        (TransformSpec(format=OutputFormat.GIF), None),
        (TransformSpec(format=OutputFormat.WEBP, lossless=True), None),
        (TransformSpec(format=OutputFormat.AVIF, quality=33), 33),
        (TransformSpec(format=OutputFormat.JPEG, quality=91), 91),
    ],
)
def test_quality(spec: TransformSpec, expected: int | None) -> None:
    assert make_plan(PHOTO_INFO, spec).quality == expected


@pytest.mark.parametrize(
    ("width", "shrink"),
    [(2725, 1), (1400, 1), (1362, 2), (720, 2), (681, 4), (340, 8), (100, 8)],
)
def test_jpeg_shrink_on_load_is_as_aggressive_as_it_can_be(width: int, shrink: int) -> None:
    assert make_plan(PHOTO_INFO, TransformSpec(width=width)).load_shrink == shrink


def test_memory_estimate_follows_shrink_on_load() -> None:
    small = make_plan(PHOTO_INFO, TransformSpec(width=300))
    full = make_plan(PHOTO_INFO, TransformSpec(width=2725))
    decoded_eighth = 340 * 278 * 3
    assert decoded_eighth < small.memory_estimate < full.memory_estimate
    assert full.memory_estimate > 2725 * 2225 * 3 + PHOTO_INFO.bytes


# --------------------------------------------------------------------------- transform


def test_benchmark_workload_matches_a_pyvips_thumbnail() -> None:
    data = sample(PHOTO)
    out = run(data, TransformSpec(width=720, height=588, quality=80, format=OutputFormat.JPEG))
    image = decode(out.body)
    assert (out.format, out.width, out.height, out.quality) == (OutputFormat.JPEG, 720, 588, 80)
    assert (image.width, image.height, image.bands) == (720, 588, 3)
    reference = pyvips.Image.thumbnail_buffer(data, 720, height=588)
    assert mad(image, reference) < 4.0


@pytest.mark.parametrize("fit", [Fit.COVER, Fit.FILL])
def test_cover_and_fill_resemble_a_forced_thumbnail(fit: Fit) -> None:
    data = sample("flowers-1920x1080.jpg")
    out = run(data, TransformSpec(width=400, height=300, fit=fit))
    size = "force" if fit is Fit.FILL else "both"
    reference = pyvips.Image.thumbnail_buffer(data, 400, height=300, size=size, crop="centre")
    if fit is Fit.FILL:
        reference = pyvips.Image.thumbnail_buffer(data, 400, height=300, size="force")
    assert mad(decode(out.body), reference) < 4.0


def test_contain_pads_with_white_for_jpeg_and_transparency_for_png() -> None:
    data = sample("flowers-1920x1080.jpg")
    jpeg = decode(run(data, TransformSpec(width=300, height=300, fit=Fit.CONTAIN)).body)
    assert (jpeg.width, jpeg.height, jpeg.bands) == (300, 300, 3)
    assert close_to(mean_colour(jpeg, 0, 0, 300, 40), (255, 255, 255), 3)
    spec = TransformSpec(width=300, height=300, fit=Fit.CONTAIN, format=OutputFormat.PNG)
    png = decode(run(data, spec).body)
    assert png.bands == 4
    assert png.extract_area(0, 0, 300, 40)[3].max() == 0
    assert png.extract_area(0, 150, 300, 1)[3].min() == 255


def test_contain_uses_the_background_colour() -> None:
    spec = TransformSpec(width=300, height=300, fit=Fit.CONTAIN, background=(0, 0, 255, 255))
    image = decode(run(sample("flowers-1920x1080.jpg"), spec).body)
    assert close_to(mean_colour(image, 0, 0, 300, 40), BLUE, 6)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(orientation: int) -> None:
    data = oriented_jpeg(orientation)
    whole = decode(run(data, TransformSpec()).body)
    assert (whole.width, whole.height) == (96, 64)
    assert_upright_card(whole)
    half = decode(run(data, TransformSpec(width=48)).body)
    assert (half.width, half.height) == (48, 32)
    assert_upright_card(half)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_crop_rect_is_in_upright_coordinates(orientation: int) -> None:
    data = oriented_jpeg(orientation)
    # the top-right quadrant of the upright card, and the bottom-left one
    green = decode(run(data, TransformSpec(crop=CropRect(56, 4, 36, 24))).body)
    assert (green.width, green.height) == (36, 24)
    assert close_to(mean_colour(green, 4, 4, 28, 16), GREEN)
    blue = decode(run(data, TransformSpec(crop=CropRect(4, 36, 36, 24), width=18)).body)
    assert (blue.width, blue.height) == (18, 12)
    assert close_to(mean_colour(blue, 3, 3, 12, 6), BLUE)


def test_crop_rect_with_shrink_on_load_matches_a_full_decode() -> None:
    data = sample(PHOTO)
    crop = CropRect(1000, 500, 1200, 1000)
    spec = TransformSpec(crop=crop, width=240, format=OutputFormat.PNG)
    assert make_plan(imaging.probe(data, LIMITS), spec).load_shrink == 4
    image = decode(run(data, spec).body)
    assert (image.width, image.height) == (240, 200)
    full = pyvips.Image.new_from_buffer(data, "")
    reference = full.extract_area(1000, 500, 1200, 1000).resize(0.2, kernel="lanczos3")
    assert mad(image, reference) < 4.0


def test_autorotate_off_keeps_the_stored_orientation() -> None:
    image = decode(run(oriented_jpeg(6), TransformSpec(autorotate=False)).body)
    assert (image.width, image.height) == (64, 96)


@pytest.mark.parametrize(
    ("spec", "size", "colours"),
    [
        (TransformSpec(rotate=90), (64, 96), None),
        (TransformSpec(rotate=180), (96, 64), (YELLOW, BLUE, GREEN, RED)),
        (TransformSpec(flip=Flip.H), (96, 64), (GREEN, RED, YELLOW, BLUE)),
        (TransformSpec(flip=Flip.V), (96, 64), (BLUE, YELLOW, RED, GREEN)),
        (TransformSpec(flip=Flip.HV), (96, 64), (YELLOW, BLUE, GREEN, RED)),
    ],
)
def test_rotate_and_flip(
    spec: TransformSpec,
    size: tuple[int, int],
    colours: tuple[tuple[int, int, int], ...] | None,
) -> None:
    card = bytes(quadrants().pngsave_buffer())
    image = decode(run(card, spec).body)
    assert (image.width, image.height) == size
    if colours is None:  # a quarter turn clockwise: blue top-left, red top-right
        colours = (BLUE, RED, YELLOW, GREEN)
    for got, expected in zip(quadrant_colours(image), colours, strict=True):
        assert close_to(got, expected), quadrant_colours(image)


@pytest.mark.parametrize("gravity", [Gravity.NORTH, Gravity.SOUTH])
def test_cover_gravity_anchors_the_crop(gravity: Gravity) -> None:
    card = bytes(quadrants().pngsave_buffer())
    spec = TransformSpec(width=96, height=20, fit=Fit.COVER, gravity=gravity)
    image = decode(run(card, spec).body)
    assert (image.width, image.height) == (96, 20)
    left = mean_colour(image, 8, 4, 30, 12)
    assert close_to(left, RED if gravity is Gravity.NORTH else BLUE)


@pytest.mark.parametrize("gravity", [Gravity.ENTROPY, Gravity.ATTENTION])
def test_smart_gravity_crops_to_the_box(gravity: Gravity) -> None:
    spec = TransformSpec(width=200, height=200, fit=Fit.COVER, gravity=gravity)
    image = decode(run(sample(PHOTO), spec).body)
    assert (image.width, image.height) == (200, 200)


#: Three threads of smart crops and rotations, the way the transform pool runs them.
#: Before the guard held the images it watches, pyvips freed an eval handler's handle with
#: its Python object while libvips could still signal it, and the process aborted within
#: a second.
_SMART_CROPS_IN_THREADS = """
import threading
from edge import imaging
from edge.budget import KillSwitch
from edge.params import Fit, Flip, Gravity, TransformSpec
from tests.test_imaging import LIMITS, sample

data = sample("flowers-1920x1080.jpg")
specs = [
    TransformSpec(width=200, height=200, fit=Fit.COVER, gravity=Gravity.ENTROPY),
    TransformSpec(width=200, height=200, fit=Fit.COVER, gravity=Gravity.ATTENTION),
    TransformSpec(width=200, rotate=90),
    TransformSpec(width=200, flip=Flip.V),
]

def transforms(offset):
    for i in range(40):
        spec = specs[(i + offset) % len(specs)]
        info = imaging.probe(data, LIMITS)
        plan = imaging.plan(info, spec, accepted=frozenset(), default_quality=80, limits=LIMITS)
        imaging.transform(data, info, plan, spec, KillSwitch())

threads = [threading.Thread(target=transforms, args=(offset,)) for offset in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("done")
"""


def test_smart_crops_in_several_threads_keep_the_process_alive() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _SMART_CROPS_IN_THREADS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Fatal Python error" not in done.stderr, done.stderr[:2000]
    assert (done.returncode, done.stdout.strip()) == (0, "done"), done.stderr[-2000:]


def test_cmyk_with_profile_becomes_srgb() -> None:
    data = sample("cmyk-with-profile.jpg")
    assert imaging.probe(data, LIMITS).bands == 4
    out = run(data, TransformSpec(width=250, format=OutputFormat.PNG))
    image = decode(out.body)
    assert (image.width, image.height, image.bands) == (250, 167, 3)
    assert image.interpretation == "srgb"
    assert not image.get_typeof("icc-profile-data")
    reference = pyvips.Image.thumbnail_buffer(data, 250, export_profile="srgb")
    assert mad(image, reference) < 4.0  # shrink-on-load against a full decode


def test_alpha_flattens_onto_the_background_for_jpeg() -> None:
    half_clear = quadrants(64, 64).bandjoin(
        (pyvips.Image.black(32, 64) + 255).join(pyvips.Image.black(32, 64), "horizontal")
    )
    data = bytes(half_clear.cast("uchar").pngsave_buffer())
    assert imaging.probe(data, LIMITS).has_alpha
    for background, expected in (((255, 0, 255, 255), (255, 0, 255)), (None, (255, 255, 255))):
        spec = TransformSpec(format=OutputFormat.JPEG, background=background)
        image = decode(run(data, spec).body)
        assert image.bands == 3
        assert close_to(mean_colour(image, 40, 8, 16, 48), expected, 4)
        assert close_to(mean_colour(image, 4, 4, 20, 20), RED)


def test_alpha_sample_to_jpeg_and_png() -> None:
    data = sample("blackbug-alpha-2048x1536.png")
    jpeg = decode(run(data, TransformSpec(width=256, format=OutputFormat.JPEG)).body)
    assert (jpeg.width, jpeg.height, jpeg.bands) == (256, 192, 3)
    png_out = run(data, TransformSpec(width=256))
    assert png_out.format is OutputFormat.PNG
    png = decode(png_out.body)
    assert png.bands == 4
    reference = pyvips.Image.thumbnail_buffer(data, 256)
    assert mad(png, reference) < 3.0


def test_sixteen_bit_and_grey_inputs_come_out_eight_bit() -> None:
    rgb16 = (quadrants().cast("ushort") * 257).copy(interpretation="rgb16")
    grey16 = (pyvips.Image.black(40, 30) + 30000).cast("ushort").copy(interpretation="grey16")
    for source in (rgb16, grey16):
        data = bytes(source.pngsave_buffer())
        image = decode(run(data, TransformSpec(width=20, format=OutputFormat.JPEG)).body)
        assert image.format == "uchar"
        assert image.width == 20
    grey = decode(run(bytes(grey16.pngsave_buffer()), TransformSpec()).body)
    assert grey.bands == 1
    assert abs(grey.avg() - 30000 / 257) < 2


def test_animated_gif_stays_animated_with_every_frame() -> None:
    data = distinct_frames_gif(frames=6, size=48)
    out = run(data, TransformSpec(width=24))
    assert (out.format, out.width, out.height) == (OutputFormat.GIF, 24, 24)
    image = decode(out.body, animated=True)
    assert image.get("n-pages") == 6
    assert image.get("page-height") == 24
    assert image.height == 6 * 24
    assert image.get("delay") == [70, 80, 90, 100, 110, 120]
    assert image.get("loop") == 3
    for frame in range(6):
        expected = (frame * 40, 255 - frame * 40, 128)
        assert close_to(mean_colour(image, 4, frame * 24 + 4, 16, 16), expected, 16)


def test_animated_gif_to_webp_keeps_the_animation() -> None:
    data = sample("rotating-squares-animated.gif")
    source = decode(data, animated=True)
    out = run(data, TransformSpec(width=40, height=40, fit=Fit.COVER, format=OutputFormat.WEBP))
    image = decode(out.body, animated=True)
    assert (image.width, image.get("page-height")) == (40, 40)
    # encoders merge identical consecutive frames, adding up their delays
    assert image.get("n-pages") > 1
    assert sum(image.get("delay")) == sum(source.get("delay"))


def test_animation_frames_are_cropped_and_rotated_one_by_one() -> None:
    spec = TransformSpec(crop=CropRect(0, 0, 48, 24), rotate=90, width=12)
    out = run(distinct_frames_gif(frames=5, size=48), spec)
    image = decode(out.body, animated=True)
    assert (out.width, out.height) == (12, 24)
    assert (image.get("n-pages"), image.get("page-height"), image.width) == (5, 24, 12)
    for frame in range(5):
        expected = (frame * 40, 255 - frame * 40, 128)
        assert close_to(mean_colour(image, 2, frame * 24 + 2, 8, 20), expected, 16)


def test_animation_to_a_still_format_keeps_the_first_frame() -> None:
    out = run(distinct_frames_gif(), TransformSpec(format=OutputFormat.PNG))
    image = decode(out.body)
    assert (image.width, image.height) == (48, 48)
    assert close_to(mean_colour(image, 4, 4, 40, 40), (0, 255, 128))


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("gallery-1024x772.webp", OutputFormat.AVIF),
        ("banner-4096x800.avif", OutputFormat.WEBP),
        ("flowers-1920x1080.jpg", OutputFormat.GIF),
        ("flowers-1920x1080.jpg", OutputFormat.PNG),
    ],
)
def test_formats_round_trip(name: str, fmt: OutputFormat) -> None:
    data = sample(name)
    out = run(data, TransformSpec(width=200, format=fmt))
    assert imaging.sniff(out.body) == fmt.value
    image = decode(out.body)
    assert (image.width, image.height) == (out.width, out.height)
    assert out.width == 200
    reference = pyvips.Image.thumbnail_buffer(data, 200)
    # lossy encoders on a small, detailed picture: still far from unrelated pixels (~60)
    tolerance = {OutputFormat.GIF: 12.0, OutputFormat.PNG: 2.0}.get(fmt, 8.0)
    assert mad(image[:3], reference[:3]) < tolerance


def test_svg_renders_at_the_size_asked() -> None:
    svg = (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="120" height="60">'
        b'<circle cx="30" cy="30" r="20" fill="#0f0"/></svg>'
    )
    info = imaging.probe(svg, LIMITS)
    assert (info.format, info.width, info.height, info.has_alpha) == ("svg", 120, 60, True)
    spec = TransformSpec(width=480, upscale=True)
    assert make_plan(info, spec).load_shrink == 0.25  # rendered large, not enlarged
    out = run(svg, spec)
    image = decode(out.body)
    assert (out.format, image.width, image.height, image.bands) == (OutputFormat.PNG, 480, 240, 4)
    assert close_to(mean_colour(image, 100, 100, 40, 40), (0, 255, 0, 255), 2)
    assert image.extract_area(300, 0, 180, 240)[3].max() == 0


def test_tiff_source() -> None:
    data = bytes(quadrants().tiffsave_buffer(compression="lzw"))
    assert imaging.sniff(data) == "tiff"
    out = run(data, TransformSpec(width=48))
    assert out.format is OutputFormat.JPEG
    assert_upright_card(decode(out.body))


def test_blur_and_sharpen_change_the_pixels() -> None:
    data = sample("flowers-1920x1080.jpg")
    plain = decode(run(data, TransformSpec(width=300, format=OutputFormat.PNG)).body)
    blurred = decode(run(data, TransformSpec(width=300, blur=4.0, format=OutputFormat.PNG)).body)
    sharpened = decode(
        run(data, TransformSpec(width=300, sharpen=1.5, format=OutputFormat.PNG)).body
    )
    assert (blurred.width, blurred.height) == (plain.width, plain.height)
    assert detail(blurred) < detail(plain) / 4
    assert detail(sharpened) > detail(plain)


def test_strip_drops_metadata_unless_told_to_keep_it() -> None:
    data = sample("cmyk-with-profile.jpg")
    stripped = decode(run(data, TransformSpec(width=100)).body)
    assert not stripped.get_typeof("exif-data")
    kept = decode(run(data, TransformSpec(width=100, strip=False)).body)
    assert kept.get_typeof("exif-data")


def test_progressive_and_lossless_reach_the_encoders() -> None:
    data = sample("flowers-1920x1080.jpg")
    progressive = run(data, TransformSpec(width=200, progressive=True))
    assert decode(progressive.body).get("interlaced") == 1
    spec = TransformSpec(width=64, format=OutputFormat.WEBP, lossless=True)
    lossless = run(data, spec)
    reference = decode(run(data, TransformSpec(width=64, format=OutputFormat.PNG)).body)
    assert lossless.quality is None
    assert mad(decode(lossless.body), reference) == 0


def test_truncated_original_is_undecodable() -> None:
    data = sample("truncated.jpg")
    info = imaging.probe(data, LIMITS)  # the header is intact
    spec = TransformSpec(width=300)
    plan = make_plan(info, spec)
    with pytest.raises(UndecodableImage) as caught:
        imaging.transform(data, info, plan, spec, KillSwitch())
    assert isinstance(caught.value.__cause__, pyvips.Error)


class WatchedKillSwitch(KillSwitch):
    """A KillSwitch that tells a waiting thread once the running pipeline polls it."""

    __slots__ = ("polled", "polls")

    def __init__(self, after_polls: int) -> None:
        super().__init__()
        self.polls = after_polls
        self.polled = threading.Event()

    def is_set(self) -> bool:
        self.polls -= 1
        if self.polls <= 0:
            self.polled.set()
        return super().is_set()


def kill_when_running(kill: WatchedKillSwitch, reason: str) -> threading.Thread:
    def killer() -> None:
        if kill.polled.wait(10):
            kill.kill(reason)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("reason", "expected"), [("timeout", TransformTimeout), ("client_closed", ClientClosed)]
)
def test_kill_switch_stops_a_running_transform(reason: str, expected: type[EdgeError]) -> None:
    data = sample(PHOTO)
    spec = TransformSpec(blur=40.0)
    info = imaging.probe(data, LIMITS)
    plan = make_plan(info, spec)
    started = time.perf_counter()
    imaging.transform(data, info, plan, spec, KillSwitch())
    unkilled = time.perf_counter() - started

    # the switch is thrown from another thread once libvips' progress signal has polled it
    kill = WatchedKillSwitch(after_polls=3)
    killer = kill_when_running(kill, reason)
    started = time.perf_counter()
    with pytest.raises(expected) as caught:
        imaging.transform(data, info, plan, spec, kill)
    killed_after = time.perf_counter() - started
    killer.join(5)
    assert kill.is_set()
    assert caught.value.label == "transform"
    assert killed_after < unkilled / 2


def test_a_switch_thrown_before_the_start_stops_at_once() -> None:
    kill = KillSwitch()
    kill.kill("timeout")
    with pytest.raises(TransformTimeout):
        run(sample(PHOTO), TransformSpec(width=100), kill=kill)


# --------------------------------------------------------------------------- extras


@pytest.mark.parametrize("fmt", [OutputFormat.PNG, OutputFormat.JPEG, OutputFormat.WEBP])
def test_error_image_has_the_size_and_format_asked(fmt: OutputFormat) -> None:
    quality = None if fmt is OutputFormat.PNG else 80
    body = imaging.render_error_image("Not Found", "no such object", 320, 200, fmt, quality)
    assert imaging.sniff(body) == fmt.value
    image = decode(body)
    assert (image.width, image.height) == (320, 200)
    assert image.min() < 120 < image.max()  # there is text on the grey


def test_error_image_too_small_for_text_is_plain() -> None:
    body = imaging.render_error_image("Gone", "x", 6, 6, OutputFormat.PNG, None)
    image = decode(body)
    assert (image.width, image.height) == (6, 6)
    assert image.min() == image.max()
