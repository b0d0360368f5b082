"""The browser client end to end: Debian's Chromium with a fake camera, driven by Playwright, against a real server.

Screenshots land in test-artifacts/ at the repository root (gitignored; CI keeps them as artifacts).
"""

from __future__ import annotations

import contextlib
import io
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
            for (let i = 0; i < d.length; i += 4)
                for (let k = 0; k < 3; k++) { sum += d[i + k]; sq += d[i + k] ** 2; n++; }
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


def test_camera_asked_for_twice_leaves_one_stream_and_stop_ends_it(browser, tiny_components):
    # Two requests before the first answers (a double click; Camera while the permission prompt is open): the older
    # stream is stopped when it arrives, not left live unseen, and Stop ends everything.
    engine = Engine(preset("test"), tiny_components)
    live = "() => __streams.filter((s) => s.getVideoTracks().some((t) => t.readyState === 'live')).length"
    with ServerThread(TurboServer(engine, ServerConfig(port=0))) as server:
        context = browser.new_context()
        page = context.new_page()
        problems = _watch(page)
        page.add_init_script("""(() => {
            window.__streams = [];
            const md = navigator.mediaDevices, getUserMedia = md.getUserMedia.bind(md);
            md.getUserMedia = async (c) => { const s = await getUserMedia(c); __streams.push(s); return s; };
        })()""")
        page.goto(server.url, timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.turbostream && turbostream.conn === 'ready'", timeout=TIMEOUT_MS)
        page.evaluate("() => { const b = document.getElementById('camera'); b.click(); b.click(); }")
        page.wait_for_function("() => __streams.length === 2 && turbostream.media !== null", timeout=TIMEOUT_MS)
        page.wait_for_function(f"() => ({live})() === 1", timeout=TIMEOUT_MS)
        assert page.evaluate("() => __streams[1] === turbostream.media")
        before = page.evaluate("() => turbostream.framesReceived")
        page.wait_for_function(f"() => turbostream.framesReceived >= {before + 2}", timeout=TIMEOUT_MS)
        page.click("#stop")
        assert page.evaluate(live) == 0

        # A track of a replaced stream that ends later (the browser's "stop sharing") leaves the newer stream alone.
        page.click("#camera")
        page.wait_for_function("() => turbostream.media !== null", timeout=TIMEOUT_MS)
        page.evaluate("() => { window.__first = turbostream.media; }")
        page.click("#camera")
        page.wait_for_function("() => turbostream.media !== null && turbostream.media !== __first", timeout=TIMEOUT_MS)
        assert page.evaluate("""() => { const current = turbostream.media;
            __first.getVideoTracks().forEach((t) => t.dispatchEvent(new Event('ended')));
            return turbostream.media === current; }""")
        context.close()
        assert problems == []


def test_view_prompt_box_keeps_a_blend(browser, tiny_components):
    # A blended broadcast prompt shows as its JSON, and Apply sends it back as a blend, not as the text "a,0.7,b,0.3".
    import json

    from turbostream.config import StreamParams

    blend = (("a watercolor", 0.7), ("a pencil sketch", 0.3))
    engine = Engine(preset("test", default_params=StreamParams(prompt=blend)), tiny_components)
    config = ServerConfig(port=0, source="test-pattern", control_token="c")
    with ServerThread(TurboServer(engine, config, capture_factory=FakeCapture)) as server:
        context = browser.new_context()
        page = context.new_page()
        problems = _watch(page)
        with page.expect_websocket(timeout=TIMEOUT_MS) as opened:
            page.goto(server.url + "view?control=c", timeout=TIMEOUT_MS)
        ws = opened.value
        page.wait_for_function("() => window.turbostream && turbostream.framesReceived >= 1", timeout=TIMEOUT_MS)
        assert json.loads(page.input_value("#prompt")) == [list(entry) for entry in blend]

        def config_echo(payload) -> bool:
            return isinstance(payload, str) and json.loads(payload).get("type") == "config"

        with ws.expect_event("framereceived", predicate=config_echo, timeout=TIMEOUT_MS) as echo:
            page.click("#control button")  # Apply, unchanged
        assert json.loads(echo.value)["prompt"] == [list(entry) for entry in blend]
        assert server.broadcast.stream.params.prompt == blend

        page.fill("#prompt", '[["a mosaic", 0.5], ["a pencil sketch", 0.5]]')
        with ws.expect_event("framereceived", predicate=config_echo, timeout=TIMEOUT_MS):
            page.click("#control button")
        assert server.broadcast.stream.params.prompt == (("a mosaic", 0.5), ("a pencil sketch", 0.5))

        # A blend of long prompts is longer than one prompt's 1000 characters as JSON: the box still takes typing
        # (its last character typed here by hand; a box held to 1000 would drop it and send broken JSON as text).
        long = (("a mosaic " * 60, 0.5), ("a pencil sketch " * 35, 0.5))
        text = json.dumps([list(entry) for entry in long])
        assert len(text) > 1000
        page.fill("#prompt", text[:-1])
        page.press("#prompt", "End")
        page.keyboard.type(text[-1])
        with ws.expect_event("framereceived", predicate=config_echo, timeout=TIMEOUT_MS):
            page.click("#control button")
        assert server.broadcast.stream.params.prompt == long
        context.close()
        assert problems == []


def test_a_token_with_a_bare_percent_sign_connects(browser, tiny_components):
    # ?token=50%off is not a valid percent escape: the page takes it as typed (as the server's unquote does) instead
    # of dying on a URIError before it connects.
    engine = Engine(preset("test"), tiny_components)
    with ServerThread(TurboServer(engine, ServerConfig(port=0, token="50%off"))) as server:
        context = browser.new_context()
        page = context.new_page()
        problems = _watch(page)
        page.goto(server.url + "?token=50%off", timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.turbostream && turbostream.conn === 'ready'", timeout=TIMEOUT_MS)
        context.close()
        assert problems == []


def _mock_ready(role: str) -> str:
    import json

    params = {"prompt": "x", "strength": 0.5, "steps": 2, "seed": 0, "similarity": 0, "transition_s": 0,
              "feedback": 0, "reuse": 0}
    return json.dumps({"type": "ready", "role": role, "control": False, "model": "mock", "random_weights": False,
                       "width": 64, "height": 64, "params": params,
                       "limits": {"max_steps": 10, "feature_reuse": False}})


@contextlib.contextmanager
def stand_in_page(browser, tiny_components, socket_path: str, handler, page_path: str = "",
                  init_script: str | None = None):
    """The page at page_path of a real server (the page and its scripts over HTTP), its WebSocket at socket_path
    answered by handler (a playwright WebSocketRoute) instead of the server: yields (page, the page's problems)."""
    engine = Engine(preset("test"), tiny_components)
    with ServerThread(TurboServer(engine, ServerConfig(port=0))) as server:
        context = browser.new_context()
        if init_script is not None:
            context.add_init_script(init_script)
        page = context.new_page()
        problems = _watch(page)
        page.route_web_socket(lambda url: url.split("?")[0].endswith(socket_path), handler)
        page.goto(server.url + page_path, timeout=TIMEOUT_MS)
        yield page, problems
        context.close()


def test_kiosk_view_keeps_only_the_last_50_errors(browser, tiny_components):
    # A kiosk runs for days: its error list (window.turbostream.errors) stays bounded, as on the client page.
    import json

    def viewer(ws) -> None:  # a stand-in /view/ws: ready, then 60 errors
        ws.send(_mock_ready("viewer"))
        for i in range(60):
            ws.send(json.dumps({"type": "error", "code": "source_lost", "message": f"error {i}"}))

    with stand_in_page(browser, tiny_components, "/view/ws", viewer, "view?kiosk=1") as (page, problems):
        page.wait_for_function("() => window.turbostream && turbostream.errors.at(-1) === 'error 59 (source_lost)'",
                               timeout=TIMEOUT_MS)
        errors = page.evaluate("() => turbostream.errors")
        assert len(errors) == 50 and errors[0] == "error 10 (source_lost)"
    assert problems == []


def test_the_client_page_keeps_only_the_last_50_errors(browser, tiny_components):
    # A page left open for days (an installation's camera page) keeps a bounded error list too.
    import json

    def client(ws) -> None:  # a stand-in /ws: ready, then 60 errors
        ws.send(_mock_ready("client"))
        for i in range(60):
            ws.send(json.dumps({"type": "error", "code": "bad_image", "message": f"error {i}"}))

    with stand_in_page(browser, tiny_components, "/ws", client) as (page, problems):
        page.wait_for_function("() => window.turbostream && turbostream.errors.at(-1) === 'error 59 (bad_image)'",
                               timeout=TIMEOUT_MS)
        errors = page.evaluate("() => turbostream.errors")
        assert len(errors) == 50 and errors[0] == "error 10 (bad_image)"
    assert problems == []


def test_a_view_that_draws_slowly_skips_to_the_newest_frame_instead_of_queueing(browser, tiny_components):
    """/view chained every frame received onto its drawing: a screen slower than the broadcast (a weak kiosk machine)
    queued them all, its memory growing and its picture falling further behind (20 s after 30 s). One frame waits
    at most now, and the newest replaces it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, "JPEG")
    frame = buf.getvalue()
    slow = """(() => {  // a renderer that takes 200 ms a frame
      const decode = window.createImageBitmap.bind(window);
      window.createImageBitmap = (blob) => new Promise((ok, fail) => setTimeout(() => decode(blob).then(ok, fail), 200));
    })();"""

    def viewer(ws) -> None:  # a stand-in /view/ws: ready, then 40 frames at once
        ws.send(_mock_ready("viewer"))
        for _ in range(40):
            ws.send(frame)

    with stand_in_page(browser, tiny_components, "/view/ws", viewer, "view?kiosk=1", init_script=slow) as (page,
                                                                                                      problems):
        page.wait_for_function("() => window.turbostream && turbostream.framesReceived === 40", timeout=TIMEOUT_MS)
        page.wait_for_timeout(1000)  # five draws' time: what waited is drawn, nothing more is
        got = page.evaluate("() => [turbostream.framesDrawn, turbostream.framesSkipped]")
        assert got[0] <= 3 and got[0] + got[1] == 40, got  # the first, maybe one more, and the newest
    assert problems == []


def test_a_frame_header_left_by_a_dropped_connection_is_not_applied_to_the_next(browser, tiny_components):
    # A stand-in /ws: the first connection sends a frame header and closes before its result; the second answers the
    # first frame with a result alone. The old header (seq 5, skipped) must not count frames of the new connection
    # as dropped or skipped.
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    connections = []

    def client(ws) -> None:
        connections.append(ws)
        ws.send(_mock_ready("client"))
        if len(connections) == 1:
            ws.send('{"type": "frame", "seq": 5, "batch": 1, "server_ms": 1, "skipped": true}')
            ws.close()
        else:
            answered = []

            def on_message(message) -> None:
                if isinstance(message, bytes) and not answered:
                    answered.append(True)
                    ws.send(jpeg)

            ws.on_message(on_message)

    with stand_in_page(browser, tiny_components, "/ws", client, "?autostart=1&inflight=2") as (page, problems):
        page.wait_for_function("() => window.turbostream && turbostream.framesReceived >= 1", timeout=TIMEOUT_MS)
        assert len(connections) == 2
        assert page.evaluate("() => [turbostream.skipped, turbostream.dropped]") == [0, 0]
    assert problems == []


# A still screen share: a canvas stream that delivers one frame and then nothing (a static slide or document).
STILL_SOURCE = """
navigator.mediaDevices.getUserMedia = async () => {
  const c = document.createElement('canvas'); c.width = 64; c.height = 64;
  const g = c.getContext('2d');
  for (let i = 0; i < 64; i += 8) { g.fillStyle = `hsl(${i * 5},80%,50%)`; g.fillRect(i, 0, 8, 64); }
  const stream = c.captureStream(0);
  setTimeout(() => stream.getVideoTracks()[0].requestFrame(), 100);
  return stream;
};
"""


def test_a_still_input_is_sent_again_after_a_reconnect_and_the_last_result_stays_up(browser, tiny_components):
    # A stand-in /ws answers the still frame, then drops; the next connection must get that frame again (nothing new
    # comes from a still screen), and the result on screen stays until its answer comes.
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    frames_seen: list[int] = []
    connections = []

    def client(ws) -> None:
        connections.append(ws)
        frames_seen.append(0)
        index = len(frames_seen) - 1
        ws.send(_mock_ready("client"))

        def on_message(message) -> None:
            if isinstance(message, bytes):
                frames_seen[index] += 1
                if index == 0:
                    ws.send(jpeg)

        ws.on_message(on_message)

    with stand_in_page(browser, tiny_components, "/ws", client, "?autostart=1", STILL_SOURCE) as (page, problems):
        page.wait_for_function("() => window.turbostream && turbostream.framesReceived >= 1", timeout=TIMEOUT_MS)
        connections[0].close()
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while len(frames_seen) < 2 or frames_seen[1] < 1:
            assert time.monotonic() < deadline, f"not sent again: frames per connection {frames_seen}"
            page.wait_for_timeout(50)  # not time.sleep: the stand-in's handlers run while playwright is called
        mean_alpha = page.evaluate("""() => { const c = document.getElementById('output');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let s = 0; for (let i = 3; i < d.length; i += 4) s += d[i]; return s / (d.length / 4); }""")
        assert mean_alpha == 255  # the first connection's result, not a canvas cleared by the second ready
    assert [p for p in problems if "WebSocket" not in p] == []


def test_the_view_prompt_being_typed_survives_a_reconnect(browser, tiny_components):
    # A stand-in /view/ws with the control token's box: the first connection drops while the operator types; the
    # next one's ready must not overwrite the half-typed prompt.
    import json

    connections = []

    def viewer(ws) -> None:
        connections.append(ws)
        ws.send(json.dumps({**json.loads(_mock_ready("viewer")), "control": True}))

    with stand_in_page(browser, tiny_components, "/view/ws", viewer, "view") as (page, problems):
        page.wait_for_function("() => !document.getElementById('control').hidden", timeout=TIMEOUT_MS)
        assert page.input_value("#prompt") == "x"
        page.fill("#prompt", "a stained glass window, half typed")  # focus stays in the box
        connections[0].close()
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while len(connections) < 2:
            assert time.monotonic() < deadline, "the view page did not reconnect"
            page.wait_for_timeout(50)
        page.wait_for_function("() => turbostream.conn === 'live'", timeout=TIMEOUT_MS)
        assert page.input_value("#prompt") == "a stained glass window, half typed"
    assert [p for p in problems if "WebSocket" not in p] == []


def _ready_with(**changes) -> str:
    import json

    ready = json.loads(_mock_ready("client"))
    ready.update(changes)
    return json.dumps(ready)


def test_unanswered_frames_are_waited_for_and_a_silent_connection_is_replaced(browser, tiny_components):
    """A slow link: the server alive (its stats arrive) but no answer yet. The page cleared its frames in flight
    after 4 s and sent two more on top of them, again and again: 20 s of lag and a ping-timeout close every 40 s.
    A dead link (nothing arrives any more): the page showed "ready" over a frozen picture for ever. Now it waits
    for the answers, and drops a connection silent for 10 s for a new one."""
    import json

    connections, frames = [], []

    def client(ws) -> None:
        connections.append(ws)
        frames.append(0)
        index = len(frames) - 1
        ws.send(_ready_with(stats_interval_s=1.0))

        def on_message(message) -> None:
            if isinstance(message, bytes):
                frames[index] += 1

        ws.on_message(on_message)

    with stand_in_page(browser, tiny_components, "/ws", client, "?autostart=1&inflight=2") as (page, problems):
        page.wait_for_function("() => window.turbostream && turbostream.framesSent >= 2", timeout=TIMEOUT_MS)
        for _ in range(7):  # alive and slow: stats every second, no answer
            connections[0].send(json.dumps({"type": "stats", "fps": 0.0, "latency_ms": {"p50": None}, "dropped": 0,
                                            "clients": 1}))
            page.wait_for_timeout(1000)
        assert frames[0] == 2 and len(connections) == 1, (frames, len(connections))
        # Dead: nothing more arrives. Within 10 s (and a second's check) the page gives it up.
        page.wait_for_function("() => turbostream.conn.includes('no message from the server for 10 s')",
                               timeout=20_000)
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while len(connections) < 2 or frames[1] < 1:
            assert time.monotonic() < deadline, f"no new connection streaming: {frames}"
            page.wait_for_timeout(100)
        assert frames[0] == 2
    assert [p for p in problems if "WebSocket" not in p] == []


def test_frames_over_the_servers_message_limit_are_never_sent_and_the_page_says_why(browser, tiny_components):
    """Sent, a frame over --max-message-bytes closed the connection (1009) and the page reconnected every half second,
    saying only "disconnected". It lowers the JPEG quality instead, and says so where even that is too large."""
    received = []

    def client(ws) -> None:
        ws.send(_ready_with(limits={"max_steps": 10, "feature_reuse": False, "max_message_bytes": 100}))
        ws.on_message(lambda message: received.append(len(message)) if isinstance(message, bytes) else None)

    with stand_in_page(browser, tiny_components, "/ws", client, "?autostart=1") as (page, problems):
        page.wait_for_function("() => turbostream.errors.some((e) => e.includes(\"over this server's limit of 100\"))",
                               timeout=TIMEOUT_MS)
        assert page.evaluate("() => turbostream.quality") == pytest.approx(0.3)
        assert received == []
    assert problems == []


def test_a_close_shows_its_reason_and_a_denied_camera_stays_said(browser, tiny_components):
    """Only a refusal (1008) showed the close's reason; a ping timeout or a frame over the limit was "disconnected".
    A denied camera was said in an 8-second banner, after which the page invited to start the camera again."""
    connections = []

    def client(ws) -> None:
        connections.append(ws)
        ws.send(_mock_ready("client"))
        if len(connections) == 1:
            ws.close(code=1011, reason="keepalive ping timeout")

    denied = """navigator.mediaDevices.getUserMedia = async () => {
        throw new DOMException('denied', 'NotAllowedError'); };"""
    with stand_in_page(browser, tiny_components, "/ws", client, "", denied) as (page, problems):
        page.wait_for_function("() => turbostream.conn.includes('(keepalive ping timeout)')", timeout=TIMEOUT_MS)
        page.click("#camera")
        page.wait_for_function("() => document.getElementById('in-empty').textContent.includes('permission denied')",
                               timeout=TIMEOUT_MS)
        assert "site settings" in page.inner_text("#in-empty") and page.is_visible("#in-empty")
    assert [p for p in problems if "WebSocket" not in p] == []


def test_a_kiosk_replaces_a_connection_gone_silent(browser, tiny_components):
    """A /view page sends nothing, so a dead connection (no FIN, no RST) went unnoticed for as long as the OS kept
    it: a projector or OBS source frozen on the last frame, "live". Ten seconds without a message now reconnects."""
    connections = []

    def viewer(ws) -> None:
        connections.append(ws)
        ws.send(_mock_ready("viewer"))  # then nothing, as over a dead link

    with stand_in_page(browser, tiny_components, "/view/ws", viewer, "view?kiosk=1") as (page, problems):
        page.wait_for_function("() => window.turbostream && turbostream.ready !== null", timeout=TIMEOUT_MS)
        t0 = time.monotonic()
        deadline = t0 + 30
        while len(connections) < 2:
            assert time.monotonic() < deadline, "the silent connection was kept"
            page.wait_for_timeout(200)
        assert time.monotonic() - t0 > 8  # not at once: ten seconds of silence (less the check's own second)
    assert [p for p in problems if "WebSocket" not in p] == []


def _ink_wash_lora(folder) -> str:
    """A one-layer LoRA of the tiny UNet, saved as ink-wash.safetensors in folder (clients see "ink-wash")."""
    import torch
    from safetensors.torch import save_file

    from turbostream.models import load_components

    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    out_features, in_features = load_components("tiny-random", device="cpu").unet.get_submodule(to_q).weight.shape
    path = folder / "ink-wash.safetensors"
    save_file({f"unet.{to_q}.lora_A.weight": torch.ones(2, in_features),
               f"unet.{to_q}.lora_B.weight": torch.ones(out_features, 2)}, path)
    return str(path)


def test_both_pages_name_the_loras_merged_into_the_model(browser, tmp_path):
    """--lora: the client page and the viewer page show each merged LoRA's name and scale beside the model, and a
    scale changed while serving (--lora-live) as soon as it changes."""
    path = _ink_wash_lora(tmp_path)
    engine = Engine(preset("test", loras=(f"{path}:0.8",), lora_live=True))
    config = ServerConfig(port=0, source="test-pattern")
    with ServerThread(TurboServer(engine, config, capture_factory=FakeCapture)) as server:
        context = browser.new_context()
        watched, pages = [], []  # each page's problems, filled by its events as they come
        for page_path in ("", "view"):
            page = context.new_page()
            watched.append(_watch(page))
            page.goto(server.url + page_path, timeout=TIMEOUT_MS)
            page.wait_for_function("() => document.getElementById('model').textContent.includes('LoRA')",
                                   timeout=TIMEOUT_MS)
            text = page.evaluate("() => document.getElementById('model').textContent")
            assert "tiny-random · 64×64 · LoRA ink-wash 0.8 · random weights" in text, text
            pages.append(page)
        server.change_lora(None, 0.3)  # --lora-live: what OSC's /turbostream/lora calls; both pages follow
        for page in pages:
            page.wait_for_function("() => document.getElementById('model').textContent.includes('ink-wash 0.3')",
                                   timeout=TIMEOUT_MS)
        context.close()
        assert watched == [[], []]



def test_a_control_viewer_moves_a_lora_slider_and_every_page_follows(browser, tmp_path):
    """--lora-live with the control token: /view shows a slider per LoRA; moving it changes the model for every
    stream, and the other pages show the new scale. Without the token there is no slider."""
    path = _ink_wash_lora(tmp_path)
    engine = Engine(preset("test", loras=(f"{path}:0.8",), lora_live=True))
    config = ServerConfig(port=0, source="test-pattern", control_token="c")
    with ServerThread(TurboServer(engine, config, capture_factory=FakeCapture)) as server:
        context = browser.new_context()
        operator, audience = context.new_page(), context.new_page()
        watched = [_watch(operator), _watch(audience)]
        operator.goto(server.url + "view?control=c", timeout=TIMEOUT_MS)
        audience.goto(server.url + "view", timeout=TIMEOUT_MS)
        operator.wait_for_selector("#lora-1", state="visible", timeout=TIMEOUT_MS)
        audience.wait_for_function("() => document.getElementById('model').textContent.includes('ink-wash 0.8')",
                                   timeout=TIMEOUT_MS)
        assert audience.locator("#lora-1").count() == 0  # no control token: no slider
        operator.evaluate("""() => { const s = document.getElementById('lora-1');
            s.focus(); s.value = '0.25'; s.dispatchEvent(new Event('input')); }""")
        audience.wait_for_function("() => document.getElementById('model').textContent.includes('ink-wash 0.25')",
                                   timeout=TIMEOUT_MS)
        deadline = time.monotonic() + 30  # the broadcast's next call applies it to the engine
        while [x["scale"] for x in engine.loras] != [0.25]:
            assert time.monotonic() < deadline, engine.loras
            time.sleep(0.05)
        context.close()
        assert watched == [[], []]
