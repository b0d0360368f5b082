"""The browser client end to end: Debian's Chromium with a fake camera, driven by Playwright, against a real server.

Screenshots land in test-artifacts/ at the repository root (gitignored; CI keeps them as artifacts).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from test_server import FakeCapture

from turbostream.config import ServerConfig, preset
from turbostream.engine import Engine
from turbostream.serve import ServerThread, TurboServer

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
]
TIMEOUT_MS = 45_000  # a 2-core CI machine starting Chromium and the tiny engine side by side


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _watch(page) -> list[str]:
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    return problems


def _canvas_spread(page, selector: str) -> float:
    """Standard deviation of the canvas's pixel values: 0 for a blank canvas."""
    return page.evaluate(
        """(sel) => {
            const c = document.querySelector(sel);
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let sum = 0, sq = 0, n = 0;
            for (let i = 0; i < d.length; i += 4) for (let k = 0; k < 3; k++) { sum += d[i + k]; sq += d[i + k] ** 2; n++; }
            const mean = sum / n;
            return Math.sqrt(sq / n - mean * mean);
        }""",
        selector,
    )


def test_autostart_streams_stylized_frames(browser, tiny_components):
    ARTIFACTS.mkdir(exist_ok=True)
    engine = Engine(preset("test"), tiny_components)
    with ServerThread(TurboServer(engine, ServerConfig(port=0))) as server:
        context = browser.new_context(viewport={"width": 1100, "height": 800})
        page = context.new_page()
        problems = _watch(page)
        page.goto(server.url + "?autostart=1", timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.turbostream && window.turbostream.framesReceived >= 5",
                               timeout=TIMEOUT_MS)
        page.wait_for_function("() => Number(document.body.dataset.frames || 0) >= 5", timeout=TIMEOUT_MS)
        state = page.evaluate("() => ({conn: turbostream.conn, sent: turbostream.framesSent, "
                              "model: document.getElementById('model').textContent})")
        assert state["conn"] == "ready" and state["sent"] >= 5
        assert "tiny-random" in state["model"] and "64×64" in state["model"]
        assert _canvas_spread(page, "#output") > 3  # a picture, not an empty canvas

        # The prompt applies live: typing sends a config (debounced) and the server confirms it.
        page.fill("#prompt", "a charcoal drawing")
        page.wait_for_function("() => turbostream.params && turbostream.params.prompt === 'a charcoal drawing'",
                               timeout=TIMEOUT_MS)
        before = page.evaluate("() => turbostream.framesReceived")
        page.wait_for_function(f"() => turbostream.framesReceived >= {before + 3}", timeout=TIMEOUT_MS)
        page.wait_for_function("() => document.getElementById('fps').textContent !== '0.0'", timeout=TIMEOUT_MS)
        page.screenshot(path=str(ARTIFACTS / "browser-autostart.png"))

        # Snapshot saves the current output as a PNG.
        with page.expect_download(timeout=TIMEOUT_MS) as download:
            page.click("#snapshot")
        saved = ARTIFACTS / "browser-snapshot.png"
        download.value.save_as(str(saved))
        assert download.value.suggested_filename.endswith(".png")
        assert saved.read_bytes().startswith(b"\x89PNG")

        # A bad value shows the server's error to the user, and the stream goes on.
        page.fill("#steps", "99")
        page.dispatch_event("#steps", "change")
        page.wait_for_selector("#error:not([hidden])", timeout=TIMEOUT_MS)
        assert "steps" in page.text_content("#error-text")
        before = page.evaluate("() => turbostream.framesReceived")
        page.wait_for_function(f"() => turbostream.framesReceived >= {before + 2}", timeout=TIMEOUT_MS)

        # Phone-sized screen: the panes stack and everything still fits the width.
        page.set_viewport_size({"width": 390, "height": 844})
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390
        page.screenshot(path=str(ARTIFACTS / "browser-phone.png"), full_page=True)

        # Stop and start the camera again: the stream resumes.
        page.click("#stop")
        assert page.evaluate("() => turbostream.media === null")
        page.click("#camera")
        before = page.evaluate("() => turbostream.framesReceived")
        page.wait_for_function(f"() => turbostream.framesReceived >= {before + 3}", timeout=TIMEOUT_MS)
        context.close()
        assert problems == []


def test_view_page_shows_the_broadcast_and_controls_it(browser, tiny_components):
    ARTIFACTS.mkdir(exist_ok=True)
    engine = Engine(preset("test"), tiny_components)
    # Tokens as users type them: base64 with '+', which form decoding would turn into spaces.
    config = ServerConfig(port=0, source="test-pattern", token="v1+ew/k=", control_token="c+tl")
    with ServerThread(TurboServer(engine, config, capture_factory=FakeCapture)) as server:
        context = browser.new_context(viewport={"width": 800, "height": 600})
        page = context.new_page()
        problems = _watch(page)
        page.goto(server.url + "view?token=v1+ew/k=&control=c+tl", timeout=TIMEOUT_MS)
        page.wait_for_function("() => Number(document.body.dataset.frames || 0) >= 5", timeout=TIMEOUT_MS)
        assert page.is_visible("#control")  # the control token shows the prompt box
        page.fill("#prompt", "a mosaic")
        page.click("#control button")
        deadline = time.monotonic() + 20
        while server.broadcast.stream.params.prompt != "a mosaic":
            assert time.monotonic() < deadline, "the viewer's prompt never reached the broadcast"
            time.sleep(0.05)
        assert _canvas_spread(page, "#output") > 3
        page.screenshot(path=str(ARTIFACTS / "browser-view.png"))
        context.close()
        assert problems == []


def test_kiosk_view_shows_nothing_but_the_frame(browser, tiny_components):
    """/view?kiosk=1, as OBS's Browser Source or TouchDesigner's Web Render TOP shows it: the frame on black."""
    from PIL import Image

    ARTIFACTS.mkdir(exist_ok=True)
    engine = Engine(preset("test"), tiny_components)
    config = ServerConfig(port=0, source="test-pattern")
    with ServerThread(TurboServer(engine, config, capture_factory=FakeCapture)) as server:
        context = browser.new_context(viewport={"width": 640, "height": 360})
        page = context.new_page()
        problems = _watch(page)
        page.goto(server.url + "view?kiosk=1", timeout=TIMEOUT_MS)
        page.wait_for_function("() => Number(document.body.dataset.frames || 0) >= 5", timeout=TIMEOUT_MS)
        # Nothing but the frame: no text anywhere, no bar, badge, error or control; black; the canvas fills the window.
        assert page.evaluate("() => document.body.innerText.trim()") == ""
        for selector in ("header.bar", "#conn", "#fps", "#model", "#error", "#control"):
            assert not page.is_visible(selector), selector
        assert page.evaluate("() => getComputedStyle(document.body).backgroundColor") == "rgb(0, 0, 0)"
        assert page.locator("#output").bounding_box() == {"x": 0, "y": 0, "width": 640, "height": 360}
        assert page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.scrollHeight]") \
            == [640, 360]
        shot = ARTIFACTS / "browser-kiosk.png"
        page.screenshot(path=str(shot))
        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        # The square frame is centred at full height (360x360); the bands beside it are pure black.
        assert pixels[:, :130].max() == 0 and pixels[:, -130:].max() == 0
        assert pixels[:, 150:490].std() > 3  # the picture
        context.close()
        assert problems == []
