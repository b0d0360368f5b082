"""The browser client's live-video controls: Chromium with a fake camera against a real server (tiny-random)."""

from __future__ import annotations

import contextlib
import socket

import pytest
from test_browser import TIMEOUT_MS, _watch, browser  # noqa: F401 - the module-scoped browser fixture

from turbostream.config import ServerConfig, StreamParams, preset
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
        # Mix back to 0: the plain prompt again; "blend with" keeps its text, and the slider blends with it again.
        page.fill("#mix", "0")
        page.wait_for_function("() => turbostream.params.prompt === 'a watercolor'", timeout=TIMEOUT_MS)
        assert page.input_value("#prompt-b") == "a pencil sketch"
        page.fill("#mix", "0.5")
        page.wait_for_function(
            """() => JSON.stringify(turbostream.params.prompt) === '[["a watercolor",0.5],["a pencil sketch",0.5]]'""",
            timeout=TIMEOUT_MS)
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


def test_a_refused_change_before_any_accepted_one_puts_the_servers_value_back(browser, tiny_components):  # noqa: F811
    # The server's parameters are known from ready on: a refused first change does not stay on screen.
    engine = Engine(preset("test"), tiny_components)
    with client_page(browser, engine, 1) as (_, page, problems):
        assert page.input_value("#steps") == "2"
        page.fill("#steps", "99")
        page.dispatch_event("#steps", "change")
        page.wait_for_function("() => turbostream.errors.length > 0", timeout=TIMEOUT_MS)
        assert "steps" in page.evaluate("() => turbostream.errors[0]")
        assert page.input_value("#steps") == "2"
        # A number field emptied sends nothing (not 0) and shows the value in force again. Messages are answered in
        # order, so the echo of a later change would carry a seed 0 sent before it.
        page.fill("#seed", "7")
        page.dispatch_event("#seed", "change")
        page.wait_for_function("() => turbostream.params.seed === 7", timeout=TIMEOUT_MS)
        for field in ("#seed", "#steps", "#transition"):
            page.fill(field, "")
            page.dispatch_event(field, "change")
        assert [page.input_value(f) for f in ("#seed", "#steps", "#transition")] == ["7", "2", "0"]
        page.select_option("#similarity", "0.95")
        page.wait_for_function("() => turbostream.params.similarity === 0.95", timeout=TIMEOUT_MS)
        assert page.evaluate("() => [turbostream.params.seed, turbostream.params.steps]") == [7, 2]
        assert len(page.evaluate("() => turbostream.errors")) == 1  # the refused 99 steps only
    assert problems == []


def test_strength_and_steps_offer_only_what_the_server_takes(browser, tiny_components):  # noqa: F811
    # The server refuses int(steps * strength) < 1: at 2 steps the slider stops at 0.5, at 4 steps at 0.25, and at
    # strength 0.25 the steps field's minimum is 4.
    engine = Engine(preset("test"), tiny_components)
    mins = "() => [document.getElementById('strength').min, document.getElementById('steps').min]"
    with client_page(browser, engine, 1) as (_, page, problems):
        assert page.evaluate(mins) == ["0.5", "2"]
        # Dragged below its minimum (fill refuses a value the slider changes): the slider stays at 0.5.
        value = page.evaluate("""() => { const s = document.getElementById('strength');
                                         s.value = '0.3'; s.dispatchEvent(new Event('input')); return s.value; }""")
        assert value == "0.5"
        page.fill("#steps", "4")
        page.dispatch_event("#steps", "change")
        page.wait_for_function("() => turbostream.params.steps === 4", timeout=TIMEOUT_MS)
        assert page.evaluate(mins) == ["0.25", "2"]
        page.fill("#strength", "0.25")
        page.wait_for_function("() => turbostream.params.strength === 0.25", timeout=TIMEOUT_MS)
        assert page.evaluate(mins) == ["0.25", "4"]
        page.fill("#steps", "10")
        page.dispatch_event("#steps", "change")
        page.wait_for_function("() => turbostream.params.steps === 10", timeout=TIMEOUT_MS)
        assert page.evaluate(mins) == ["0.1", "4"]
        assert page.evaluate("() => turbostream.errors") == []
    assert problems == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_changes_made_while_disconnected_apply_when_it_reconnects(browser, tiny_components):  # noqa: F811
    # The server restarts on the same port, with another default similarity; the prompt and seed changed meanwhile
    # reach the new connection, after the transition chosen before the drop, and the field the user never touched
    # keeps the new server's default (the page carries over what the user set, not the old server's defaults).
    port = free_port()

    def serve(similarity: float = 0.0):
        config = preset("test", default_params=StreamParams(similarity=similarity))
        return ServerThread(TurboServer(Engine(config, tiny_components), ServerConfig(port=port)))

    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    problems = _watch(page)
    with serve() as server:
        page.goto(server.url + "?autostart=1", timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.turbostream && turbostream.framesReceived >= 1", timeout=TIMEOUT_MS)
        page.fill("#transition", "1.5")
        page.dispatch_event("#transition", "change")
        page.wait_for_function("() => turbostream.params.transition_s === 1.5", timeout=TIMEOUT_MS)
    page.wait_for_function("() => turbostream.ready === null", timeout=TIMEOUT_MS)
    page.fill("#prompt", "typed while disconnected")
    page.fill("#seed", "7")
    page.dispatch_event("#seed", "change")
    with serve(similarity=0.5) as server:
        page.wait_for_function("""() => { const p = turbostream.params;
                                   return p.prompt === 'typed while disconnected' && p.seed === 7
                                       && p.transition_s === 1.5; }""", timeout=TIMEOUT_MS)
        params = next(iter(server.clients)).stream.params
        assert (params.prompt, params.seed, params.transition_s) == ("typed while disconnected", 7, 1.5)
        assert params.similarity == 0.5
        assert page.input_value("#prompt") == "typed while disconnected"
        assert page.input_value("#seed") == "7"
    context.close()
    # The browser logs each refused reconnect as a console error; nothing else may go wrong.
    assert [p for p in problems if "WebSocket connection" not in p] == []


def test_a_choice_the_restarted_server_refuses_is_dropped_alone(browser, tiny_components):  # noqa: F811
    # Chosen on a server with feature reuse: a prompt, a seed and reuse every 3 frames. The server comes back without
    # --reuse and refuses the reuse; the prompt and seed still carry over, and reuse is the new server's default.
    port = free_port()

    def serve(feature_reuse: bool):
        config = preset("test", feature_reuse=feature_reuse)
        return ServerThread(TurboServer(Engine(config, tiny_components), ServerConfig(port=port)))

    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    problems = _watch(page)
    with serve(feature_reuse=True) as server:
        page.goto(server.url + "?autostart=1", timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.turbostream && turbostream.framesReceived >= 1", timeout=TIMEOUT_MS)
        page.fill("#prompt", "a charcoal drawing")
        page.fill("#seed", "42")
        page.dispatch_event("#seed", "change")
        page.select_option("#reuse", "3")
        page.wait_for_function("""() => { const p = turbostream.params;
                                   return p.prompt === 'a charcoal drawing' && p.seed === 42 && p.reuse === 3; }""",
                               timeout=TIMEOUT_MS)
    page.wait_for_function("() => turbostream.ready === null", timeout=TIMEOUT_MS)
    with serve(feature_reuse=False) as server:
        page.wait_for_function("() => turbostream.errors.some((e) => e.includes('reuse'))", timeout=TIMEOUT_MS)
        page.wait_for_function("""() => { const p = turbostream.params;
                                   return p.prompt === 'a charcoal drawing' && p.seed === 42; }""", timeout=TIMEOUT_MS)
        params = next(iter(server.clients)).stream.params
        assert (params.prompt, params.seed, params.reuse) == ("a charcoal drawing", 42, 0)
        assert page.input_value("#prompt") == "a charcoal drawing" and page.input_value("#seed") == "42"
        assert page.is_disabled("#reuse")
    context.close()
    assert [p for p in problems if "WebSocket connection" not in p] == []


def test_a_change_the_dropped_connection_never_answered_goes_again(browser, tiny_components):  # noqa: F811
    # A stand-in /ws: the first connection closes on the first config, unanswered; the second echoes every config.
    import json

    from test_browser import _mock_ready, stand_in_page

    received: list[list[dict]] = []

    def client(ws) -> None:
        received.append([])
        mine, first = received[-1], len(received) == 1
        ws.send(_mock_ready("client"))

        def on_message(message) -> None:
            if isinstance(message, str):
                fields = json.loads(message)
                mine.append(fields)
                if first:
                    ws.close()
                else:
                    ws.send(json.dumps({**json.loads(_mock_ready("client"))["params"], **fields}))

        ws.on_message(on_message)

    with stand_in_page(browser, tiny_components, "/ws", client) as (page, problems):
        page.wait_for_function("() => window.turbostream && turbostream.conn === 'ready'", timeout=TIMEOUT_MS)
        page.fill("#seed", "7")
        page.dispatch_event("#seed", "change")
        page.wait_for_function("() => turbostream.params.seed === 7", timeout=TIMEOUT_MS)
        assert received == [[{"type": "config", "seed": 7}], [{"type": "config", "seed": 7}]]
        assert page.input_value("#seed") == "7"
    assert problems == []


def test_slider_labels_show_the_values_in_force_off_the_sliders_grid(browser, tiny_components):  # noqa: F811
    # A server started with --feedback 0.95 --strength 0.34 --steps 3: the feedback slider reaches 0.95 (it stopped
    # at 0.9), and the strength label says 0.34, the value the stream runs at, not the 0.35 its slider snaps to.
    params = StreamParams(strength=0.34, steps=3, feedback=0.95)
    engine = Engine(preset("test", default_params=params), tiny_components)
    with client_page(browser, engine, 1) as (_, page, problems):
        page.wait_for_function("() => turbostream.params && turbostream.params.feedback === 0.95", timeout=TIMEOUT_MS)
        assert page.input_value("#feedback") == "0.95"
        assert page.text_content("#feedback-value") == "0.95"
        assert page.text_content("#strength-value") == "0.34"
        page.fill("#feedback", "0.5")  # a user's own change shows as they make it
        assert page.text_content("#feedback-value") == "0.50"
    assert problems == []
