"""A real Chromium loads a page whose images come from edge.

edge runs as its own process (``python -m edge``) on a loopback port. The page is served
by a small aiohttp app on another port and sends ``Accept-CH`` plus a Permissions-Policy
that delegates the hints to the image origin. Between Chromium and edge sits a recording
pass-through, so the test sees exactly what Chromium asked for (Accept, Sec-CH-DPR,
Sec-CH-Width) and what edge answered (status, Content-Type, Vary, the bytes). Chromium
runs at device scale factor 2, so srcset choices and the DPR hint are visible.

Checked: every image decodes in Chromium at the expected natural size; ``format=auto``
gives Chromium AVIF (its Accept names image/avif); a ``<picture>`` gets its AVIF
source; WebP decodes; an AVIF with alpha keeps transparent pixels; srcset 1x/2x and
width descriptors pick the right candidate; the hints Chromium sends fill dpr and width
only where the URL leaves them open and are then named in Vary; a CORS ``fetch()``
(Accept ``*/*``) gets JPEG and an explicit ``Accept: image/webp`` gets WebP; every one
of these requests is in edge's access log as 200 ok. A screenshot of the page is kept
in test-artifacts/browser-page.png.

Needs Debian's ``chromium`` and ``chromium-driver`` packages and the ``selenium``
package; skipped without them, except under CI, where that is a failure.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.conftest import REPO
from tests.helpers import decode, loader_format

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE = Path(__file__).resolve().parent / "browser" / "page.html"
SCREENSHOT = REPO / "test-artifacts" / "browser-page.png"

DEVICE_SCALE = 2
WINDOW = (1040, 760)
HINTS = ("Sec-CH-DPR", "Sec-CH-Width")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--lang=en-US",
    f"--force-device-scale-factor={DEVICE_SCALE}",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)
#: hop-by-hop and transport headers the pass-through does not copy
NOT_FORWARDED = frozenset(
    {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"}
)


@dataclass(frozen=True)
class Expected:
    """One image of the page: the URL Chromium should pick and what edge should send."""

    target: str  # path and query Chromium requests
    content_type: str
    size: tuple[int, int]  # pixels edge encodes
    density: float  # what the browser divides by for its natural size
    vary: frozenset[str]


EXPECTED = {
    # width=300 and no dpr: Sec-CH-DPR 2 doubles it, and edge says so in Vary
    "auto": Expected(
        "/photo-1200x980.jpg?width=300&format=auto",
        "image/avif",
        (600, 490),
        1,
        frozenset({"Accept", "Sec-CH-DPR"}),
    ),
    # the first <source> Chromium can decode wins; an explicit format needs no Vary
    "picture": Expected(
        "/flowers-1920x1080.jpg?width=300&dpr=1&format=avif",
        "image/avif",
        (300, 169),
        1,
        frozenset(),
    ),
    "webp": Expected(
        "/gallery-1024x772.webp?width=300&dpr=1&format=webp",
        "image/webp",
        (300, 226),
        1,
        frozenset(),
    ),
    "alpha": Expected(
        "/blackbug-alpha-640x480.png?width=200&dpr=1&format=auto",
        "image/avif",
        (200, 150),
        1,
        frozenset({"Accept"}),
    ),
    # at device scale 2 the 2x candidate is chosen; its dpr is in the URL, so no hint
    "density": Expected(
        "/photo-1200x980.jpg?width=150&dpr=2&format=auto",
        "image/avif",
        (300, 245),
        2,
        frozenset({"Accept"}),
    ),
    # sizes=200px at scale 2 wants 400 device pixels: the 400w candidate
    "widths": Expected(
        "/photo-1200x980.jpg?width=400&dpr=1&format=auto",
        "image/avif",
        (400, 327),
        2,
        frozenset({"Accept"}),
    ),
    # no width in the URL: Sec-CH-Width (160 CSS px x 2 = 320) rounded up to 350
    "hinted": Expected(
        "/flowers-1920x1080.jpg?format=auto",
        "image/avif",
        (350, 197),
        1,
        frozenset({"Accept", "Sec-CH-Width"}),
    ),
}

#: fetch() from the page, cross-origin with CORS: (path and query, Accept sent, type)
FETCHES = (
    ("/photo-1200x980.jpg?width=100&dpr=1&format=auto", None, "image/jpeg"),
    ("/photo-1200x980.jpg?width=120&dpr=1&format=auto", "image/webp", "image/webp"),
)

#: Runs in the page once it has loaded: decodes every image, samples the alpha image's
#: pixels through a canvas (it is loaded with CORS) and makes the fetch() requests.
PROBE = """
const [origin, fetches, done] = arguments;
(async () => {
  const images = [...document.images];
  const decoded = await Promise.allSettled(images.map((img) => img.decode()));
  const report = {images: {}, fetches: [], alpha: null};
  images.forEach((img, n) => {
    report.images[img.id] = {
      complete: img.complete,
      decoded: decoded[n].status === "fulfilled",
      failure: decoded[n].status === "rejected" ? String(decoded[n].reason) : "",
      naturalWidth: img.naturalWidth,
      naturalHeight: img.naturalHeight,
      currentSrc: img.currentSrc,
    };
  });
  const bug = document.getElementById("alpha");
  const canvas = document.createElement("canvas");
  canvas.width = bug.naturalWidth;
  canvas.height = bug.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(bug, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let opaque = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] === 255) opaque += 1;
  report.alpha = {corner: pixels[3], opaque: opaque, total: pixels.length / 4};
  for (const [target, accept] of fetches) {
    const init = {cache: "no-store", mode: "cors"};
    if (accept) init.headers = {Accept: accept};
    const response = await fetch(origin + target, init);
    const body = await response.arrayBuffer();
    report.fetches.push({
      target: target,
      status: response.status,
      type: response.headers.get("content-type"),
      bytes: body.byteLength,
    });
  }
  return report;
})().then(done, (error) => done({error: String(error)}));
"""


@dataclass
class Exchange:
    """One request Chromium sent to edge and edge's answer, as the pass-through saw it."""

    target: str
    request_headers: CIMultiDict[str]
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def vary(self) -> frozenset[str]:
        value = self.headers.get("Vary", "")
        return frozenset(token.strip() for token in value.split(",") if token.strip())


@dataclass
class EdgeProcess:
    url: str
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """SIGTERM, then wait for the exit and for the last log line."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.reader is not None:
            await self.reader

    def access_lines(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("log") == "access":
                entries.append(entry)
        return entries


def _unavailable() -> str:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    return ", ".join(missing)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Debian's Chromium through Debian's chromedriver, both named: nothing is downloaded."""
    missing = _unavailable()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test needs {missing} (chromium, chromium-driver, selenium)")
        pytest.skip(f"needs {missing}")
    # The driver is named explicitly, so Selenium Manager is skipped; offline all the same.
    monkeypatch.setenv("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(
        executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def edge() -> AsyncIterator[EdgeProcess]:
    """edge as operators run it, on a free loopback port, its log read from stderr."""
    port = _free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("EDGE_")}
    env.update(
        EDGE_HOST="127.0.0.1",
        EDGE_PORT=str(port),
        EDGE_CORS_ORIGINS="*",
        EDGE_LOG_FORMAT="json",
        EDGE_SHUTDOWN_GRACE="5",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge",
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    running = EdgeProcess(f"http://127.0.0.1:{port}", process)

    async def read_log() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            running.lines.append(line.decode(errors="replace").rstrip("\n"))

    running.reader = asyncio.create_task(read_log())
    try:
        await _wait_until_live(running)
        yield running
    finally:
        await running.stop()


async def _wait_until_live(running: EdgeProcess) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if running.process.returncode is not None:
                break
            try:
                async with session.get(f"{running.url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    await running.stop()
    log = "\n".join(running.lines[-30:])
    pytest.fail(f"edge did not come up (exit {running.process.returncode}):\n{log}")


def _pass_through(edge_url: str, upstream: aiohttp.ClientSession, seen: list[Exchange]) -> Any:
    """Forwards every GET to edge unchanged and records both sides."""

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED}
        async with upstream.get(edge_url + request.path_qs, headers=headers) as answer:
            body = await answer.read()
            seen.append(
                Exchange(
                    request.path_qs,
                    CIMultiDict(request.headers),
                    answer.status,
                    CIMultiDict(answer.headers),
                    body,
                )
            )
            back = {k: v for k, v in answer.headers.items() if k.lower() not in NOT_FORWARDED}
            return web.Response(status=answer.status, body=body, headers=back)

    app = web.Application()
    app.router.add_get("/{tail:.*}", forward)
    return app


def _page_app(image_origin: str) -> web.Application:
    html = Template(PAGE.read_text(encoding="utf-8")).substitute(edge=image_origin)
    delegated = ", ".join(f'{hint.lower()[4:]}=(self "{image_origin}")' for hint in HINTS)

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            text=html,
            content_type="text/html",
            headers={"Accept-CH": ", ".join(HINTS), "Permissions-Policy": delegated},
        )

    app = web.Application()
    app.router.add_get("/", page)
    return app


def _browse(driver: Any, page_url: str, image_origin: str) -> dict[str, Any]:
    """Load the page (the load event waits for every image), probe it, keep a screenshot."""
    driver.get(page_url)
    fetches = [[target, accept] for target, accept, _ in FETCHES]
    report: dict[str, Any] = driver.execute_async_script(PROBE, image_origin, fetches)
    report["devicePixelRatio"] = driver.execute_script("return window.devicePixelRatio")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    report["screenshot"] = driver.save_screenshot(str(SCREENSHOT))
    return report


def _format_of(content_type: str) -> str:
    """The libvips loader family a Content-Type should decode with."""
    return {"image/avif": "heif", "image/jpeg": "jpeg", "image/webp": "webp"}[content_type]


async def test_chromium_gets_decodable_negotiated_images(
    browser: Any, edge: EdgeProcess, aiohttp_server: Any
) -> None:
    seen: list[Exchange] = []
    async with aiohttp.ClientSession(auto_decompress=False) as upstream:
        proxy = await aiohttp_server(_pass_through(edge.url, upstream, seen))
        image_origin = f"http://127.0.0.1:{proxy.port}"
        page = await aiohttp_server(_page_app(image_origin))
        report = await asyncio.to_thread(_browse, browser, str(page.make_url("/")), image_origin)
    await edge.stop()

    assert "error" not in report, report.get("error")
    assert report["devicePixelRatio"] == DEVICE_SCALE
    assert report["screenshot"], "Chromium did not save the screenshot"
    by_target = {exchange.target: exchange for exchange in seen}
    assert set(report["images"]) == set(EXPECTED)

    for name, expected in EXPECTED.items():
        shown = report["images"][name]
        assert shown["complete"], f"{name}: not loaded"
        assert shown["decoded"], f"{name}: Chromium could not decode it: {shown['failure']}"
        assert shown["currentSrc"] == image_origin + expected.target, name

        exchange = by_target[expected.target]
        sent = exchange.request_headers
        # What Chromium asked for: it names AVIF and WebP, and it sends the DPR hint
        # cross-origin because the page delegated it.
        assert "image/avif" in sent.get("Accept", ""), (name, sent.get("Accept"))
        assert "image/webp" in sent.get("Accept", ""), (name, sent.get("Accept"))
        assert sent.get("Sec-CH-DPR") == str(DEVICE_SCALE), (name, dict(sent))

        # What edge answered.
        assert exchange.status == 200, (name, exchange.body[:200])
        assert exchange.headers["Content-Type"] == expected.content_type, name
        assert exchange.vary() == expected.vary, (name, exchange.headers.get("Vary"))
        assert exchange.headers.get("Access-Control-Allow-Origin") == "*", name
        served = decode(exchange.body)
        assert loader_format(served) == _format_of(expected.content_type), name
        assert (served.width, served.height) == expected.size, name

        # What Chromium made of it: natural size is the pixels over the chosen density.
        natural = (shown["naturalWidth"], shown["naturalHeight"])
        want = tuple(side / expected.density for side in expected.size)
        assert all(abs(got - w) <= 1 for got, w in zip(natural, want, strict=True)), (
            name,
            natural,
            want,
        )

    # The width hint: Chromium sent the layout width in device pixels, edge used it.
    hinted = by_target[EXPECTED["hinted"].target].request_headers
    assert hinted.get("Sec-CH-Width") == str(160 * DEVICE_SCALE)

    # The AVIF with alpha stayed transparent where the source is, opaque elsewhere.
    alpha = report["alpha"]
    assert alpha["corner"] == 0, alpha
    assert 0 < alpha["opaque"] < alpha["total"], alpha

    # fetch() from the page, cross-origin: CORS lets it read the answer; its default
    # Accept (*/*) does not count for format=auto, an explicit image/webp does.
    for (target, _, content_type), fetched in zip(FETCHES, report["fetches"], strict=True):
        assert fetched["target"] == target
        assert fetched["status"] == 200, fetched
        assert fetched["type"] == content_type, fetched
        assert fetched["bytes"] == len(by_target[target].body)
        assert "Accept" in by_target[target].vary()

    # edge's own record: every request the browser made is an ok 200 in the access log.
    logged = {entry["path"]: entry for entry in edge.access_lines()}
    for exchange in seen:
        entry = logged.get(exchange.target)
        assert entry is not None, f"{exchange.target} missing from edge's access log"
        assert (entry["status"], entry["outcome"]) == (200, "ok"), entry
