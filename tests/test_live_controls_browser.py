"""The browser client's live-video controls: Chromium with a fake camera against a real server (tiny-random)."""

from __future__ import annotations

import contextlib

import pytest
from test_browser import TIMEOUT_MS, _watch, browser  # noqa: F401 - the module-scoped browser fixture

from turbostream.config import ServerConfig, preset
from turbostream.engine import Engine
from turbostream.serve import ServerThread, TurboServer

pytestmark = pytest.mark.browser


@contextlib.contextmanager
def client_page(browser, engine, frames: int):  # noqa: F811
    """A real server on the engine and the client page streaming from a fake camera, `frames` results received:
    (server, page, the page's problems)."""
    with ServerThread(TurboServer(engine, ServerConfig(port=0))) as server:
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        page = context.new_page()
        problems = _watch(page)
        page.goto(server.url + "?autostart=1", timeout=TIMEOUT_MS)
        page.wait_for_function(f"() => window.turbostream && turbostream.framesReceived >= {frames}",
                               timeout=TIMEOUT_MS)
        yield server, page, problems
        context.close()


def test_controls_change_the_stream_live(browser, tiny_components):  # noqa: F811
    # Imported here, not at the top: the browser fixture skips first where playwright is missing (the GPU machine).
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    engine = Engine(preset("test", feature_reuse=True), tiny_components)  # as with serve --reuse N
    with client_page(browser, engine, 3) as (server, page, problems):
        assert page.is_enabled("#reuse")  # the server allows reuse (ready's limits.feature_reuse)
        page.select_option("#similarity", "0.95")
        page.fill("#transition", "1.5")
        page.dispatch_event("#transition", "change")
        page.fill("#feedback", "0.5")  # a range input: fill sets its value and fires input
        page.select_option("#reuse", "3")
        page.fill("#prompt", "a watercolor")
        page.fill("#prompt-b", "a pencil sketch")
        page.fill("#mix", "0.25")
        try:
            page.wait_for_function(
                """() => { const p = turbostream.params || {};
                    return p.similarity === 0.95 && p.transition_s === 1.5 && p.feedback === 0.5 && p.reuse === 3
                        && JSON.stringify(p.prompt) === '[["a watercolor",0.75],["a pencil sketch",0.25]]'; }""",
                timeout=TIMEOUT_MS)
        except PlaywrightTimeout:  # say what the page had instead (this wait once timed out in a full CI run)
            seen = page.evaluate("() => JSON.stringify({params: turbostream.params, errors: turbostream.errors})")
            raise AssertionError(f"the page never confirmed the controls; it had {seen}; problems {problems}") from None
        stream = next(iter(server.clients)).stream
        assert stream.params.prompt == (("a watercolor", 0.75), ("a pencil sketch", 0.25))
        assert stream.params.reuse == 3
        before = page.evaluate("() => turbostream.framesReceived")
        page.wait_for_function(f"() => turbostream.framesReceived >= {before + 3}", timeout=TIMEOUT_MS)
        # Mix back to 0: the plain prompt again.
        page.fill("#mix", "0")
        page.wait_for_function("() => turbostream.params.prompt === 'a watercolor'", timeout=TIMEOUT_MS)
    assert problems == []


def test_a_control_being_edited_keeps_its_value_when_another_changes_echo_arrives(browser, tiny_components):  # noqa: F811
    # The echo of one change redraws every control from the server's parameters. A number being typed must survive
    # it, or its own change would then send the old value (the race behind a timeout of the test above).
    engine = Engine(preset("test"), tiny_components)
    with client_page(browser, engine, 1) as (_, page, problems):
        page.fill("#transition", "1.5")  # typed, not yet committed: the field has the focus
        # Another control changed from a script: focus stays where it is, and its echo arrives meanwhile.
        page.evaluate("""() => { const s = document.getElementById('similarity');
                                 s.value = '0.95'; s.dispatchEvent(new Event('change')); }""")
        page.wait_for_function("() => turbostream.params && turbostream.params.similarity === 0.95",
                               timeout=TIMEOUT_MS)
        assert page.evaluate("() => document.activeElement.id") == "transition"
        assert page.input_value("#transition") == "1.5"
        page.dispatch_event("#transition", "change")
        page.wait_for_function("() => turbostream.params.transition_s === 1.5", timeout=TIMEOUT_MS)
    assert problems == []
