"""Hostile originals served through edge over HTTP: a clear 4xx, fast, without a big
allocation, never a 500, and edge keeps serving afterwards.

Every file is made here, by writing bytes (patched headers, hand-built GIF/WebP/EXIF/ISO
boxes) or by having pyvips encode a small honest image first. Causal evidence beside the
time bound: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) grows by
little, and for floods refused from the header no transform ever ran
(``edge_stage_duration_seconds_count{stage="transform"}`` stays 0).
"""

from __future__ import annotations

import base64
import functools
import math
import re
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pyvips
from pyvips import vips_lib

from edge import imaging
from edge.errors import EdgeError, SourceTooLarge, UndecodableImage
from edge.params import OutputFormat
from tests.conftest import SHARED_IMAGES
from tests.fake_origin import FakeOrigin
from tests.helpers import decode, metric, start_edge

#: a hostile original refused from its header is answered within this (typically in a
#: few milliseconds)
TIME_BOUND = 2.0
#: one that has to be partly decoded first may take the machine's time (wall clock, on a
#: loaded machine) but little of the process's CPU
DECODE_BOUND = 5.0
CPU_BOUND = 1.0
#: peak RSS may grow by this much while one is handled (a flood would need gigabytes)
RSS_BOUND = 48 * 1024 * 1024
DEFAULT_FORMATS = "jpeg,png,webp,gif,avif"
SAMPLE = "flowers-1920x1080.jpg"

# --------------------------------------------------------------------------- crafting


def honest(fmt: str, width: int = 16, height: int = 16, **options: Any) -> bytes:
    """A small, valid image encoded by libvips (``fmt`` names the saver: jpeg, png, ...)."""
    image = pyvips.Image.black(width, height, bands=3).linear(1, [200, 40, 40]).cast("uchar")
    image = image.copy(interpretation="srgb")
    data: bytes = getattr(image, f"{fmt}save_buffer")(**options)
    return data


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose SOF0 says ``width`` x ``height``."""
    data = bytearray(honest("jpeg"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset, length) of each chunk."""
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length = struct.unpack_from(">I", data, pos)[0]
        chunks.append((data[pos + 4 : pos + 8], pos, length))
        pos += 12 + length
    return chunks


def png_claiming(width: int, height: int, *, fix_crc: bool = True) -> bytes:
    """A 16x16 PNG whose IHDR says ``width`` x ``height`` (CRC recomputed, or left stale)."""
    data = bytearray(honest("png"))
    struct.pack_into(">II", data, 16, width, height)
    if fix_crc:
        struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def png_with_bad_crc(chunk_type: bytes) -> bytes:
    data = bytearray(honest("png", 64, 64))
    for kind, pos, length in png_chunks(bytes(data)):
        if kind == chunk_type:
            data[pos + 8 + length] ^= 0xFF
    return bytes(data)


def png_with_chunk(chunk_type: bytes, payload: bytes, *, good_crc: bool = True) -> bytes:
    """A 64x64 PNG with one more chunk right after IHDR."""
    base = honest("png", 64, 64)
    crc = zlib.crc32(chunk_type + payload) ^ (0 if good_crc else 0xFFFFFFFF)
    chunk = struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", crc)
    return base[:33] + chunk + base[33:]


def avif_claiming(width: int, height: int) -> bytes:
    """A 16x16 AVIF whose 'ispe' (image spatial extents) box says ``width`` x ``height``."""
    data = bytearray(honest("heif", compression="av1", effort=0))
    ispe = data.index(b"ispe")
    struct.pack_into(">II", data, ispe + 8, width, height)
    return bytes(data)


def avif_images(count: int) -> bytes:
    """An AVIF holding ``count`` 16x16 images (libheif caps the items it will read)."""
    image = pyvips.Image.black(16, 16 * count, bands=3).linear(1, 90).cast("uchar")
    image = image.copy(interpretation="srgb")
    image.set_type(pyvips.GValue.gint_type, "page-height", 16)
    data: bytes = image.heifsave_buffer(compression="av1", effort=0)
    return data


def gif(frames: int, screen: tuple[int, int] = (1, 1), frame: tuple[int, int] = (1, 1)) -> bytes:
    """An animated GIF of ``frames`` frames, each one pixel of LZW data in a frame box."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0))
    out += b"\x00\x00\x00\xff\xff\xff"  # two-colour global table
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    for _ in range(frames):
        out += b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # 100 ms
        out += b"\x2c" + struct.pack("<HHHH", 0, 0, *frame) + b"\x00"
        out += b"\x02\x02\x44\x01\x00"  # clear, index 0, end
    return bytes(out + b"\x3b")


def riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        size = struct.unpack_from("<I", data, pos + 4)[0]
        end = pos + 8 + size + (size & 1)
        chunks.append((data[pos : pos + 4], data[pos:end]))
        pos = end
    return chunks


def webp_frames(frames: int) -> bytes:
    """An animated WebP of ``frames`` one-pixel frames (two distinct ANMF chunks repeated)."""
    column = pyvips.Image.xyz(1, 2)[1] * 200
    image = column.bandjoin([column, column]).cast("uchar").copy(interpretation="srgb")
    image.set_type(pyvips.GValue.gint_type, "page-height", 1)
    image.set_type(pyvips.GValue.array_int_type, "delay", [50, 50])
    chunks = riff_chunks(image.webpsave_buffer(lossless=True, effort=0))
    frames_of_two = [chunk for kind, chunk in chunks if kind == b"ANMF"]
    rest = [chunk for kind, chunk in chunks if kind != b"ANMF"]
    body = b"WEBP" + b"".join(rest) + b"".join(frames_of_two[i % 2] for i in range(frames))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tiff_ifd(
    entries: list[tuple[int, int, int, bytes]], next_ifd: int = 0, extra: bytes = b""
) -> bytes:
    """Little-endian TIFF with one IFD at 8: entries of (tag, type, count, 4 value bytes)."""
    body = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        body += struct.pack("<HHI", tag, kind, count) + value
    return body + struct.pack("<I", next_ifd) + extra


def jpeg_with_exif(tiff: bytes) -> bytes:
    """A 64x48 JPEG carrying ``tiff`` as its EXIF (APP1) segment."""
    base = honest("jpeg", 64, 48)
    segment = b"Exif\x00\x00" + tiff
    return base[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + base[2:]


def orientation(value: int) -> bytes:
    return tiff_ifd([(0x0112, 3, 1, struct.pack("<HH", value, 0))])


def resolution(numerator: int, denominator: int) -> bytes:
    offset = 8 + 2 + 2 * 12 + 4
    entries = [(0x011A, 5, 1, struct.pack("<I", offset)), (0x0128, 3, 1, struct.pack("<HH", 2, 0))]
    return tiff_ifd(entries, extra=struct.pack("<II", numerator, denominator))


def svg(body: str, *, width: int = 100, height: int = 100, prolog: str = "") -> bytes:
    return (
        f'{prolog}<svg xmlns="http://www.w3.org/2000/svg" '
        f'xmlns:xlink="http://www.w3.org/1999/xlink" width="{width}" height="{height}">'
        f'<rect width="{width}" height="{height}" fill="white"/>{body}</svg>'
    ).encode()


def use_bomb(fan: int, depth: int) -> bytes:
    """Nested <use>: ``fan`` ** ``depth`` rectangles from a few hundred bytes."""
    groups = '<g id="l0"><rect width="1" height="1"/></g>'
    for level in range(1, depth + 1):
        groups += f'<g id="l{level}">' + f'<use href="#l{level - 1}"/>' * fan + "</g>"
    return svg(f'<defs>{groups}</defs><use href="#l{depth}"/>')


def billion_laughs() -> bytes:
    entities = '<!ENTITY l0 "lollollollollollollollollollol">' + "".join(
        f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10)
    )
    return svg(
        "<text y='50'>&l9;</text>", prolog=f'<?xml version="1.0"?><!DOCTYPE svg [{entities}]>'
    )


def heif_brand_only() -> bytes:
    """An ISO-BMFF file branded HEIC (HEVC): the ftyp box and an empty meta box."""
    ftyp = struct.pack(">I", 24) + b"ftypheic" + struct.pack(">I", 0) + b"mif1heic"
    return ftyp + struct.pack(">I", 12) + b"meta" + b"\x00" * 4


def vips_native() -> bytes:
    """libvips' own .v format (an untrusted loader), through a temporary file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "image.v"
        pyvips.Image.black(4, 4).write_to_file(str(path))
        return path.read_bytes()


# --------------------------------------------------------------------------- measuring


def peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) * 1024


def reset_peak_rss() -> int:
    """Make the peak RSS the current RSS again (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
    return peak_rss()


@dataclass
class Answer:
    status: int
    text: str
    seconds: float
    #: CPU seconds the whole process (every thread) spent meanwhile
    cpu: float
    peak_growth: int
    headers: Any


@pytest.fixture
async def origin() -> Any:
    fake = await FakeOrigin().start()
    yield fake
    await fake.stop()


async def edge_for(aiohttp_client: Any, origin: FakeOrigin, formats: str = DEFAULT_FORMATS) -> Any:
    client = await start_edge(
        aiohttp_client,
        {
            "EDGE_ORIGIN": origin.url,
            "EDGE_CACHE": "none",
            "EDGE_ALLOWED_INPUT_FORMATS": formats,
            "EDGE_ERROR_DETAIL": "2",
        },
    )
    # warm up: threads, libvips and the origin client exist before anything is measured
    assert (await client.get(f"/ok/{SAMPLE}?width=50")).status == 200
    return client


@pytest.fixture
async def edge(aiohttp_client: Any, origin: FakeOrigin) -> Any:
    return await edge_for(aiohttp_client, origin)


async def serve(
    client: Any, origin: FakeOrigin, name: str, data: bytes, query: str = "width=100"
) -> Answer:
    """Put ``data`` at the origin and ask edge for it; time and peak RSS growth measured."""
    origin.put(name, data)
    baseline = reset_peak_rss()
    started, cpu = time.monotonic(), time.process_time()
    path = f"/ok/{name}" + (f"?{query}" if query else "")
    response = await client.get(path)
    body = await response.read()
    seconds = time.monotonic() - started
    text = body.decode(errors="replace") if response.status != 200 else ""
    cpu = time.process_time() - cpu
    answer = Answer(response.status, text, seconds, cpu, peak_rss() - baseline, response.headers)
    reason = " ".join(text.splitlines()[:1])
    print(
        f"[hostile] {name} ?{query}: {answer.status} in {seconds * 1000:.1f} ms"
        f" (CPU {cpu * 1000:.0f} ms),"
        f" peak RSS +{answer.peak_growth // 1024} KiB {reason}"
    )
    return answer


async def still_serving(client: Any) -> None:
    started = time.monotonic()
    response = await client.get(f"/ok/{SAMPLE}?width=64")
    assert response.status == 200
    assert decode(await response.read()).width == 64
    assert time.monotonic() - started < DECODE_BOUND
    assert await metric(client, "edge_requests_total", code="500", outcome="internal_error") == 0
    assert await metric(client, "edge_memory_reserved_bytes") == 0


def assert_quick(answer: Answer, *, decoded: bool = False) -> None:
    assert answer.seconds < (DECODE_BOUND if decoded else TIME_BOUND)
    assert answer.cpu < CPU_BOUND
    assert answer.peak_growth < RSS_BOUND


def assert_refused(
    answer: Answer, *fragments: str, cache_control: str = "no-store", decoded: bool = False
) -> None:
    assert answer.status == 400, answer.text
    assert_quick(answer, decoded=decoded)
    # a bad original is no parameter error: never cached as if it were the client's fault
    assert answer.headers["Cache-Control"] == cache_control
    for fragment in fragments:
        assert fragment in answer.text


# --------------------------------------------------------------------------- floods

FLOODS: dict[str, tuple[Callable[[], bytes], str]] = {
    "jpeg-sof-20000x14000": (lambda: jpeg_claiming(20000, 14000), "20000x14000"),
    "png-ihdr-64250-crc-fixed": (lambda: png_claiming(64250, 64250), "64250x64250"),
    "png-ihdr-64250-crc-stale": (lambda: png_claiming(64250, 64250, fix_crc=False), "64250x64250"),
    "png-ihdr-65536": (lambda: png_claiming(65536, 65536), "65536x65536"),
    "avif-ispe-17000": (lambda: avif_claiming(17000, 17000), "17000x17000"),
    "avif-ispe-100000": (lambda: avif_claiming(100000, 100000), "100000x100000"),
    "avif-200-images": (lambda: avif_images(200), "header could not be read"),
    "gif-frame-65535-in-1x1-screen": (lambda: gif(1, (1, 1), (65535, 65535)), "65535x65535"),
    "gif-20000-frames": (lambda: gif(20000), "too many frames"),
    "webp-20000-frames": (lambda: webp_frames(20000), "too many frames"),
    # 4.8 MB: libwebp's demuxer would spend minutes counting these (quadratic)
    "webp-100000-frames": (lambda: webp_frames(100000), "too many frames"),
    "svg-100000x100000": (lambda: svg("", width=100000, height=100000), "too many pixels"),
}


@pytest.mark.parametrize("case", sorted(FLOODS))
async def test_pixel_and_frame_floods_are_refused_from_the_header(
    aiohttp_client: Any, origin: FakeOrigin, case: str
) -> None:
    make, fragment = FLOODS[case]
    client = await edge_for(aiohttp_client, origin, DEFAULT_FORMATS + ",svg")
    answer = await serve(client, origin, case, make())
    assert_refused(answer, fragment, "Bad Request")
    # refused before admission: no transform but the warm-up's ever ran
    assert await metric(client, "edge_stage_duration_seconds_count", stage="transform") == 1
    await still_serving(client)


async def test_a_gif_screen_larger_than_its_frames_is_not_a_flood(
    edge: Any, origin: FakeOrigin
) -> None:
    answer = await serve(edge, origin, "gif-screen-65535", gif(1, (65535, 65535)))
    # libnsgif sizes the image by its frames, not by the logical screen it claims
    assert answer.status in (200, 400)
    assert_quick(answer)
    await still_serving(edge)


async def test_a_lying_jpeg_within_the_pixel_limit_costs_only_its_shrunk_decode(
    edge: Any, origin: FakeOrigin
) -> None:
    # 700 bytes claiming 7000x7000: libjpeg pads the missing data with grey, which libvips
    # accepts at fail_on=error; shrink-on-load (1/8) keeps the decode to 875x875
    answer = await serve(edge, origin, "jpeg-sof-7000", jpeg_claiming(7000, 7000))
    assert answer.status == 200
    assert_quick(answer, decoded=True)
    # the full-size output would be 49 Mpx, over the output limit
    answer = await serve(edge, origin, "jpeg-sof-7000", jpeg_claiming(7000, 7000), "format=png")
    assert_refused(answer, "40000000", cache_control="public, max-age=60")


async def test_animation_frame_limit_is_exact(edge: Any, origin: FakeOrigin) -> None:
    assert (await serve(edge, origin, "webp-100", webp_frames(100), "width=1")).status == 200
    assert_refused(await serve(edge, origin, "webp-101", webp_frames(101)), "too many frames")
    assert (await serve(edge, origin, "gif-100", gif(100), "width=1")).status == 200
    assert_refused(await serve(edge, origin, "gif-101", gif(101)), "too many frames")


# --------------------------------------------------------------------------- damage

SAMPLES = {
    "jpeg": SHARED_IMAGES / "flowers-1920x1080.jpg",
    "png": SHARED_IMAGES / "blackbug-alpha-2048x1536.png",
    "gif": SHARED_IMAGES / "rotating-squares-animated.gif",
    "webp": SHARED_IMAGES / "gallery-1024x772.webp",
    "avif": SHARED_IMAGES / "banner-4096x800.avif",
}


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
async def test_truncated_originals_are_400_at_every_cut(
    edge: Any, origin: FakeOrigin, fmt: str
) -> None:
    data = SAMPLES[fmt].read_bytes()
    cuts = sorted(
        {1, 7, 20, 64, 300} | {len(data) * i // 12 for i in range(1, 12)} | {len(data) - 1}
    )
    statuses = []
    for cut in cuts:
        answer = await serve(edge, origin, f"{fmt}-cut-{cut}", data[:cut])
        assert_quick(answer, decoded=True)
        statuses.append(answer.status)
    if fmt == "gif":
        # libnsgif, like browsers, shows the frames that arrived whole
        assert set(statuses) <= {200, 400}
        assert statuses[0] == 400
    elif fmt == "png":
        # only the very last byte (IEND's CRC, after all the data) may go missing harmlessly
        assert set(statuses[:-1]) == {400}, list(zip(cuts, statuses, strict=True))
    else:
        assert set(statuses) == {400}, list(zip(cuts, statuses, strict=True))
    await still_serving(edge)


async def test_truncated_grid_avif_is_not_served_as_grey_tiles(
    edge: Any, origin: FakeOrigin
) -> None:
    """libheif fills the missing tiles of a cut-off grid image with grey, silently."""
    data = SAMPLES["avif"].read_bytes()
    answer = await serve(edge, origin, "avif-three-quarters", data[: len(data) * 3 // 4])
    assert_refused(answer, "truncated")


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each SOS segment with its entropy-coded data."""
    scans, pos = [], 2
    while data[pos + 1] != 0xD9:
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if data[pos + 1] == 0xDA:
            # the coded data runs to the next marker that is not a stuffed 0xFF00 or RSTn
            end = data.index(b"\xff", end)
            while data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end = data.index(b"\xff", end + 2)
            scans.append((pos, end - pos))
        pos = end
    return scans


async def test_a_progressive_jpeg_with_thousands_of_scans_is_refused(
    edge: Any, origin: FakeOrigin
) -> None:
    """Every extra progressive scan costs a pass over the whole image in libjpeg."""
    progressive = pyvips.Image.new_from_file(str(SAMPLES["jpeg"])).jpegsave_buffer(
        interlace=True, Q=50
    )
    offset, length = min(jpeg_scans(progressive), key=lambda scan: scan[1])
    end = progressive.rindex(b"\xff\xd9")
    bomb = progressive[:end] + progressive[offset : offset + length] * 5000 + b"\xff\xd9"
    for query in ("width=100", "width=1920"):
        answer = await serve(edge, origin, "scan-bomb.jpg", bomb, query)
        assert_refused(answer, "could not be decoded", decoded=True)
    await still_serving(edge)


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [(b"IHDR", 400), (b"IDAT", 400), (b"IEND", 200)],
)
async def test_bad_png_crcs(edge: Any, origin: FakeOrigin, chunk: bytes, expected: int) -> None:
    # critical data with a bad CRC is refused; a bad CRC on IEND (no data) is harmless
    answer = await serve(edge, origin, f"png-crc-{chunk.decode()}", png_with_bad_crc(chunk))
    assert answer.status == expected, answer.text
    assert_quick(answer, decoded=True)
    await still_serving(edge)


async def test_ancillary_chunk_with_bad_crc_is_skipped(edge: Any, origin: FakeOrigin) -> None:
    data = png_with_chunk(b"tEXt", b"key\x00value", good_crc=False)
    answer = await serve(edge, origin, "png-text-crc", data)
    assert answer.status == 200


@functools.cache
def zlib_bomb(megabytes: int = 512) -> bytes:
    deflate = zlib.compressobj(1)  # fast; 512 MB still deflate to 2.3 MB
    zeros = bytes(1024 * 1024)
    return b"".join(deflate.compress(zeros) for _ in range(megabytes)) + deflate.flush()


@pytest.mark.parametrize("chunk", [b"iCCP", b"zTXt", b"iTXt"])
async def test_png_zlib_bombs_in_metadata_are_not_inflated(
    edge: Any, origin: FakeOrigin, chunk: bytes
) -> None:
    """512 MB of zeros deflated to 2.3 MB, in a compressed metadata chunk."""
    bomb = zlib_bomb()
    prefix = {b"iCCP": b"icc\x00\x00", b"zTXt": b"key\x00\x00", b"iTXt": b"key\x00\x01\x00\x00\x00"}
    data = png_with_chunk(chunk, prefix[chunk] + bomb)
    for query in ("width=32", "width=32&strip=0"):
        answer = await serve(edge, origin, f"png-{chunk.decode()}-bomb", data, query)
        assert answer.status in (200, 400)
        assert_quick(answer, decoded=True)
    await still_serving(edge)


# --------------------------------------------------------------------------- lies about type

NOT_IMAGES: dict[str, bytes] = {
    "html-page": b"<!doctype html><html><body>not an image</body></html>",
    "jpeg-magic-then-png": b"\xff\xd8\xff" + honest("png"),
    "png-magic-then-text": b"\x89PNG\r\n\x1a\n" + b"hello" * 100,
    "gif-magic-only": b"GIF89a",
    "riff-not-webp": b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\x00" * 8,
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(NOT_IMAGES))
async def test_bytes_that_are_not_what_they_claim_are_400(
    edge: Any, origin: FakeOrigin, case: str
) -> None:
    answer = await serve(edge, origin, f"{case}.jpg", NOT_IMAGES[case])
    assert_refused(answer)
    assert re.search(r"not an image|could not be read|not a readable|truncated", answer.text)
    await still_serving(edge)


async def test_random_bytes_labelled_image_jpeg_are_400(edge: Any) -> None:
    started = time.monotonic()
    response = await edge.get(f"/garbage/{SAMPLE}?width=100")
    assert response.status == 400
    assert "not an image" in await response.text()
    assert time.monotonic() - started < TIME_BOUND


async def test_the_bytes_decide_the_type_not_the_name(edge: Any, origin: FakeOrigin) -> None:
    answer = await serve(edge, origin, "really-a-png.jpg", honest("png", 64, 64), "")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "image/png"


# --------------------------------------------------------------------------- EXIF


@pytest.mark.parametrize("value", [0, 9, 255, 65535])
async def test_absurd_exif_orientation_is_ignored(
    edge: Any, origin: FakeOrigin, value: int
) -> None:
    data = jpeg_with_exif(orientation(value))
    answer = await serve(edge, origin, f"orientation-{value}", data, "width=32")
    assert answer.status == 200
    props = await edge.get(f"/ok/orientation-{value}?req=imageprops,json")
    assert (await props.json())["image.orientation"] == 1
    image = decode(await (await edge.get(f"/ok/orientation-{value}?width=32")).read())
    assert (image.width, image.height) == (32, 24)  # as stored: not turned


MALFORMED_EXIF: dict[str, bytes] = {
    "resolution-4294967295": resolution(0xFFFFFFFF, 1),
    "resolution-divide-by-zero": resolution(1, 0),
    "ifd-claims-65535-entries": b"II*\x00\x08\x00\x00\x00\xff\xff" + b"\x12\x01\x03\x00" * 10,
    "ifd-offset-outside": b"II*\x00" + struct.pack("<I", 0x7FFFFFF0),
    "ifd-chain-loops": tiff_ifd([(0x0112, 3, 1, struct.pack("<HH", 1, 0))], next_ifd=8),
    "exif-subifd-points-at-itself": tiff_ifd([(0x8769, 4, 1, struct.pack("<I", 8))]),
    "ascii-count-4g": tiff_ifd([(0x010F, 2, 0xFFFFFFFF, struct.pack("<I", 100))]),
    "orientation-long-4g": tiff_ifd([(0x0112, 4, 1, struct.pack("<I", 0xFFFFFFFF))]),
    "not-tiff-at-all": b"garbage garbage garbage",
}


@pytest.mark.parametrize("case", sorted(MALFORMED_EXIF))
@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "avif"])
async def test_malformed_exif_is_survived_even_when_kept(
    edge: Any, origin: FakeOrigin, case: str, fmt: str
) -> None:
    data = jpeg_with_exif(MALFORMED_EXIF[case])
    answer = await serve(edge, origin, f"exif-{case}", data, f"width=32&strip=0&format={fmt}")
    assert answer.status == 200, answer.text
    assert_quick(answer, decoded=True)


# --------------------------------------------------------------------------- SVG

SVG_FORMATS = DEFAULT_FORMATS + ",svg"


async def test_svg_is_refused_unless_allowed(edge: Any, origin: FakeOrigin) -> None:
    picture = svg('<circle cx="50" cy="50" r="40" fill="red"/>')
    for query in ("width=50", ""):
        answer = await serve(edge, origin, "circle.svg", picture, query)
        assert_refused(answer, "svg", "not allowed")


async def test_an_allowed_svg_is_only_ever_rasterised(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge_for(aiohttp_client, origin, SVG_FORMATS)
    picture = svg('<script>alert(1)</script><circle cx="50" cy="50" r="40" fill="red"/>')
    answer = await serve(client, origin, "circle.svg", picture, "")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "image/png"
    response = await client.get("/ok/circle.svg")
    assert (await response.read()).startswith(b"\x89PNG")


def red_fraction(png: bytes) -> float:
    image = decode(png).colourspace("srgb")
    red = (image[0] > 150) & (image[1] < 90) & (image[2] < 90)
    return float(red.avg()) / 255


async def test_svg_images_by_file_or_http_url_are_not_fetched(
    aiohttp_client: Any, origin: FakeOrigin, tmp_path: Path
) -> None:
    client = await edge_for(aiohttp_client, origin, SVG_FORMATS)
    red = honest("png", 100, 100)
    (tmp_path / "red.png").write_bytes(red)
    origin.put("red.png", red)
    # control: the same picture inline (data: URI) is drawn, so a fetched one would show
    inline = svg(
        f'<image href="data:image/png;base64,{base64.b64encode(red).decode()}" '
        'width="100" height="100"/>'
    )
    assert (await serve(client, origin, "inline.svg", inline, "format=png")).status == 200
    assert red_fraction(await (await client.get("/ok/inline.svg?format=png")).read()) > 0.9
    requests_before = origin.events["request:ok"]
    hrefs = {
        "file-xlink": f'<image xlink:href="file://{tmp_path}/red.png" width="100" height="100"/>',
        "file-href": f'<image href="file://{tmp_path}/red.png" width="100" height="100"/>',
        "relative": '<image href="red.png" width="100" height="100"/>',
        "http": f'<image href="{origin.url}ok/red.png" width="100" height="100"/>',
        "css": f"<style>rect {{ fill: url(http://127.0.0.1:{origin.port}/ok/red.png) }}</style>",
    }
    for name, body in hrefs.items():
        answer = await serve(client, origin, f"{name}.svg", svg(body), "format=png")
        assert answer.status in (200, 400), answer.text
        if answer.status == 200:
            png = await (await client.get(f"/ok/{name}.svg?format=png")).read()
            assert red_fraction(png) < 0.01, name
    # only the SVGs themselves were asked of the origin: two requests each
    assert origin.events["request:ok"] - requests_before == 2 * len(hrefs)


@pytest.mark.parametrize(
    ("case", "entity"),
    [
        ("xxe-file", 'SYSTEM "file:///etc/passwd"'),
        ("xxe-http", 'SYSTEM "http://127.0.0.1:{port}/ok/x"'),
    ],
)
async def test_svg_external_entities_are_refused(
    aiohttp_client: Any, origin: FakeOrigin, case: str, entity: str
) -> None:
    client = await edge_for(aiohttp_client, origin, SVG_FORMATS)
    requests_before = origin.events["request:ok"]
    prolog = (
        f'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY xxe {entity.format(port=origin.port)}>]>'
    )
    picture = svg("<text x='0' y='50'>&xxe;</text>", prolog=prolog)
    for query in ("format=png", ""):
        answer = await serve(client, origin, f"{case}.svg", picture, query)
        assert_refused(answer)
        assert "root:" not in answer.text
    assert origin.events["request:ok"] - requests_before == 2


@pytest.mark.parametrize(
    ("case", "make", "fragment"),
    [
        ("billion-laughs", billion_laughs, "could not be read"),
        ("use-bomb-10e9", lambda: use_bomb(10, 9), "expand to more than"),
        ("use-bomb-10e5", lambda: use_bomb(10, 5), "expand to more than"),
        ("use-cycle", lambda: svg('<g id="a"><use href="#a"/></g>'), "loop"),
    ],
)
async def test_svg_expansion_bombs_are_refused_fast(
    aiohttp_client: Any, origin: FakeOrigin, case: str, make: Callable[[], bytes], fragment: str
) -> None:
    client = await edge_for(aiohttp_client, origin, SVG_FORMATS)
    answer = await serve(client, origin, f"{case}.svg", make())
    assert_refused(answer, fragment)
    await still_serving(client)


async def test_an_svg_with_modest_reuse_still_renders(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    client = await edge_for(aiohttp_client, origin, SVG_FORMATS)
    answer = await serve(client, origin, "reuse.svg", use_bomb(10, 3))
    assert answer.status == 200, answer.text


# --------------------------------------------------------------------------- formats

#: each format and what the error must name: the format, or that it is not an image
OTHER_FORMATS: dict[str, tuple[Callable[[], bytes], str]] = {
    "tiff": (lambda: honest("tiff"), "tiff"),
    "heif": (heif_brand_only, "heif"),
    "bmp": (
        lambda: b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + b"\x28" + b"\x00" * 63,
        "not an image",
    ),
    "psd": (lambda: b"8BPS\x00\x01" + b"\x00" * 64, "not an image"),
    "pdf": (lambda: b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "not an image"),
    "postscript": (lambda: b"%!PS-Adobe-3.0\nshowpage\n", "not an image"),
    "miff": (
        lambda: b"id=ImageMagick\nclass=DirectClass columns=1 rows=1\n:\x1a\x00\x00\x00",
        "not an image",
    ),
    "xcf": (lambda: b"gimp xcf v011\x00" + b"\x00" * 32, "not an image"),
    "ppm": (lambda: b"P6\n1 1\n255\n\x00\x00\x00", "not an image"),
    "jpeg2000": (lambda: b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 32, "not an image"),
    "jpeg-xl": (lambda: b"\xff\x0a" + b"\x00" * 32, "not an image"),
    "ico": (lambda: b"\x00\x00\x01\x00\x01\x00" + b"\x00" * 32, "not an image"),
    "svgz": (lambda: zlib.compress(svg("")), "not an image"),
    "vips-native": (vips_native, "not an image"),
    "csv": (lambda: b"1,2,3\n4,5,6\n", "not an image"),
    "matrix": (lambda: b"2 2\n1 2\n3 4\n", "not an image"),
    "fits": (lambda: b"SIMPLE  =                    T" + b" " * 50, "not an image"),
    "matlab": (lambda: b"MATLAB 5.0 MAT-file" + b" " * 100, "not an image"),
}


@pytest.mark.parametrize("case", sorted(OTHER_FORMATS))
async def test_formats_outside_the_allow_list_are_400_naming_them(
    edge: Any, origin: FakeOrigin, case: str
) -> None:
    make, fragment = OTHER_FORMATS[case]
    data = make()
    for query in ("width=100", ""):  # transformed, and asked for as the original
        answer = await serve(edge, origin, f"file.{case}", data, query)
        assert_refused(answer, fragment)
    await still_serving(edge)


BLOCKED = 32  # VIPS_OPERATION_BLOCKED


def test_untrusted_and_unlisted_loaders_are_blocked_in_libvips() -> None:
    imaging.configure(frozenset(DEFAULT_FORMATS.split(",")))
    source = pyvips.Source.new_from_memory(b"1 1\n1\n")
    calls: dict[str, tuple[Any, ...]] = {
        "csvload_source": (source,),
        "matrixload_source": (source,),
        "vipsload_source": (source,),
        "rawload": ("/dev/null", 1, 1, 1),
        "svgload_buffer": (b"<svg/>",),
        "tiffload_buffer": (honest("tiff"),),
        "uhdrload_buffer": (honest("jpeg"),),
    }
    for nickname, arguments in calls.items():
        operation = pyvips.Operation.new_from_name(nickname)
        assert vips_lib.vips_operation_get_flags(operation.pointer) & BLOCKED, nickname
        with pytest.raises(pyvips.Error, match="blocked"):
            pyvips.Operation.call(nickname, *arguments)
    for nickname in ("matload", "fitsload", "magickload", "pdfload", "openslideload"):
        # not in this libvips build at all, or blocked
        try:
            operation = pyvips.Operation.new_from_name(nickname)
        except pyvips.Error:
            continue
        assert vips_lib.vips_operation_get_flags(operation.pointer) & BLOCKED, nickname
    for crafted in (b"1,2,3\n4,5,6\n", b"2 2\n1 2\n3 4\n", vips_native(), honest("tiff")):
        with pytest.raises(pyvips.Error, match="not in a known format"):
            pyvips.Image.new_from_source(pyvips.Source.new_from_memory(crafted), "")
    for allowed in (
        "jpegload_buffer",
        "pngload_buffer",
        "webpload_buffer",
        "gifload_buffer",
        "heifload_buffer",
    ):
        operation = pyvips.Operation.new_from_name(allowed)
        assert not vips_lib.vips_operation_get_flags(operation.pointer) & BLOCKED, allowed


# --------------------------------------------------------------------------- probe, directly

LIMITS = imaging.Limits(
    allowed_formats=frozenset({"jpeg", "png", "webp", "gif", "avif", "svg"}),
    max_source_pixels=50_000_000,
    max_animation_frames=100,
    max_output_dimension=8192,
    max_output_pixels=40_000_000,
)


def test_probe_counts_webp_frames_without_libwebp() -> None:
    """libwebp's demuxer is quadratic in frames: 80,000 took 12 s in libvips' header read."""
    imaging.configure(LIMITS.allowed_formats)
    data = webp_frames(200_000)
    started = time.monotonic()
    with pytest.raises(SourceTooLarge, match="too many frames"):
        imaging.probe(data, LIMITS)
    assert time.monotonic() - started < 0.1
    assert imaging.probe(webp_frames(100), LIMITS).pages == 100


def test_probe_bounds_the_webp_chunk_walk() -> None:
    imaging.configure(LIMITS.allowed_formats)
    still = honest("webp", 8, 8)
    junk = b"JUNK" + struct.pack("<I", 0)
    body = still[12:] + junk * 100_000
    data = b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body
    with pytest.raises(SourceTooLarge, match="too many chunks"):
        imaging.probe(data, LIMITS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00mif1avif\x00\x00\x00", "truncated"),
        (b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00mif1avif\x00\x00\x00\x04meta", "malformed"),
        (b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00mif1avif\x00\x00\x00\x01mdat\x00", "truncated"),
        (
            b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00mif1avif" + b"\x00\x00\x00\x08free" * 65,
            "boxes",
        ),
    ],
)
def test_probe_refuses_broken_iso_boxes(data: bytes, message: str) -> None:
    with pytest.raises(UndecodableImage, match=message):
        imaging.probe(data, LIMITS)


def test_probe_accepts_a_last_box_running_to_the_end() -> None:
    imaging.configure(LIMITS.allowed_formats)
    data = honest("heif", 16, 16, compression="av1", effort=0)
    # rewrite the final box's size as 0 ("to the end of the file")
    pos = 0
    while pos + int.from_bytes(data[pos : pos + 4], "big") < len(data):
        pos += int.from_bytes(data[pos : pos + 4], "big")
    data = data[:pos] + b"\x00\x00\x00\x00" + data[pos + 4 :]
    assert imaging.probe(data, LIMITS).width == 16


def test_svg_reference_counting() -> None:
    imaging.configure(LIMITS.allowed_formats)
    assert imaging.probe(use_bomb(10, 4), LIMITS).format == "svg"  # 11,111 uses: fine
    for bomb in (
        use_bomb(10, 5),
        use_bomb(2, 17),
        # through another namespace prefix bound to xlink
        use_bomb(10, 6).replace(b"<use href=", b"<use xlink:href="),
        # patterns that paint with patterns
        svg(
            '<defs><pattern id="p0" width="1" height="1"><rect width="1" height="1"/></pattern>'
            + "".join(
                f'<pattern id="p{i}" width="1" height="1">'
                + f'<rect width="1" height="1" fill="url(#p{i - 1})"/>' * 10
                + "</pattern>"
                for i in range(1, 8)
            )
            + '</defs><rect width="10" height="10" fill="url(#p7)"/>'
        ),
    ):
        with pytest.raises(SourceTooLarge, match="expand"):
            imaging.probe(bomb, LIMITS)
    # gradients only lend colours: thousands of shapes may share one
    gradient = (
        '<defs><linearGradient id="g"><stop offset="0"/><stop offset="1"/></linearGradient></defs>'
    )
    many = svg(gradient + '<rect width="1" height="1" fill="url(#g)"/>' * 20_000)
    assert imaging.probe(many, LIMITS).format == "svg"
    deep = svg("<g>" * 300 + "</g>" * 300)
    with pytest.raises(UndecodableImage):
        imaging.probe(deep, LIMITS)


# --------------------------------------------------------------------------- costly outputs


async def test_a_huge_error_image_is_not_drawn(aiohttp_client: Any, origin: FakeOrigin) -> None:
    """Any failing request names the error image's size and format: 8192x8192 AVIF took
    20 s and 1 GB to draw. Past ERROR_IMAGE_MAX_PIXELS the plain error is sent instead."""
    client = await start_edge(
        aiohttp_client,
        {"EDGE_ORIGIN": origin.url, "EDGE_CACHE": "none", "EDGE_ERROR_IMAGE": "generated"},
    )
    assert (await client.get(f"/ok/{SAMPLE}?width=50")).status == 200  # warm up
    query = "width=8192&height=8192&format=avif&bogus=1"
    answer = await serve(client, origin, "photo.jpg", honest("jpeg"), query)
    assert_refused(answer, "bogus", cache_control="public, max-age=60")
    assert "X-Edge-Error" not in answer.headers
    # a modest one is still drawn
    answer = await serve(client, origin, "photo.jpg", honest("jpeg"), "width=300&bogus=1")
    assert answer.status == 200
    assert answer.headers["X-Edge-Error"] == "bad_request"


def test_render_error_image_refuses_past_its_pixel_budget() -> None:
    started = time.monotonic()
    with pytest.raises(EdgeError, match="too large"):
        imaging.render_error_image("Bad Request", "x", 8192, 8192, OutputFormat.AVIF, None)
    assert time.monotonic() - started < 0.1
    side = math.isqrt(imaging.ERROR_IMAGE_MAX_PIXELS)
    body = imaging.render_error_image("Bad Request", "x", side, side, OutputFormat.JPEG, None)
    assert decode(body).width == side


async def test_an_svg_original_is_held_to_the_output_limits(
    aiohttp_client: Any, origin: FakeOrigin
) -> None:
    """An original request rasterises the SVG at its own size: 7000x7000 (under the source
    pixel limit) made a 49 Mpx PNG, past EDGE_MAX_OUTPUT_PIXELS, outside any admission."""
    client = await edge_for(aiohttp_client, origin, SVG_FORMATS)
    big = svg('<circle cx="50" cy="50" r="40" fill="red"/>', width=7000, height=7000)
    answer = await serve(client, origin, "big.svg", big, "")
    assert_refused(answer, "40000000", cache_control="public, max-age=60")
    fine = svg('<circle cx="50" cy="50" r="40" fill="red"/>', width=1000, height=1000)
    assert (await serve(client, origin, "fine.svg", fine, "")).status == 200
