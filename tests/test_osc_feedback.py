"""OSC feedback (`--osc-feedback HOST:PORT`): a desk's faders follow the stream's settings, whoever changed them.
Desks are played by UDP sockets on loopback, read back with python-osc; `run` with stand-in engines, `serve` with a
tiny-random one."""

from __future__ import annotations

import _thread
import asyncio
import json
import socket
import threading
import time

import pytest
from pythonosc.osc_message import OscMessage
from pythonosc.udp_client import SimpleUDPClient
from test_control import RecordingEngine, _free_udp_port, _parse_run, _video, _wait_for
from websockets.asyncio.client import connect

from turbostream import cli
from turbostream.cli import run as cli_run
from turbostream.config import StreamParams
from turbostream.control import Controls, OscFeedback, OscServer, Playlist
from turbostream.control.osc_feedback import MAX_TARGETS, changes, encode, feedback_state, parse_target
from turbostream.control.playlist import Look

P = "/turbostream/"


class Desk:
    """A desk listening on a free loopback UDP port: every message it got, in order, as (address, [args])."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.got: list[tuple[str, list]] = []

    def read(self, until, timeout: float = 20.0) -> list[tuple[str, list]]:
        """Read until `until(self.got)` holds (AssertionError after `timeout` s); returns what came."""
        deadline = time.monotonic() + timeout
        while not until(self.got):
            assert time.monotonic() < deadline, f"the desk got {self.got}"
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            message = OscMessage(data)
            self.got.append((message.address, list(message.params)))
        return self.got

    def last(self, address: str):
        """The newest arguments sent to `address` (None if none came)."""
        return next((args for got, args in reversed(self.got) if got == address), None)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def desk():
    d = Desk()
    yield d
    d.close()


# ------------------------------------------------------------------------------------------------ Sans-I/O


def test_the_state_names_every_setting_on_the_address_a_desk_sends_it_to():
    blend = StreamParams(prompt=[["a watercolor", 0.7], ["a pencil sketch", 0.3]], strength=0.6, steps=3,
                         seed=2**32 - 1, transition_s=1.5, reuse=2)
    state = feedback_state(blend, (0.8, -0.5), look=3)
    assert state == {
        P + "prompt": (("s", '[["a watercolor", 0.7], ["a pencil sketch", 0.3]]'),),
        P + "strength": (("f", 0.6),), P + "steps": (("i", 3),),
        P + "seed": (("h", 2**32 - 1),),  # past OSC's 32-bit int: its 64-bit one, not an overflow
        P + "similarity": (("f", 0.0),), P + "transition": (("f", 1.5),), P + "feedback": (("f", 0.0),),
        P + "reuse": (("i", 2),), P + "lora/1": (("f", 0.8),), P + "lora/2": (("f", -0.5),), P + "look": (("i", 3),),
    }
    # What a desk sends back is read as it was sent: the blend's JSON is a blend again.
    for address, args in state.items():
        message = OscMessage(encode(address, args))
        assert message.address == address and len(message.params) == 1
    assert json.loads(OscMessage(encode(P + "prompt", state[P + "prompt"])).params[0])[0] == ["a watercolor", 0.7]
    assert OscMessage(encode(P + "seed", state[P + "seed"])).params == [2**32 - 1]
    # Only what changed is sent again; no stream yet: nothing at all.
    moved = feedback_state(StreamParams(prompt=blend.prompt, strength=0.75, steps=3, seed=2**32 - 1,
                                        transition_s=1.5, reuse=2), (0.8, -0.5), look=4)
    assert changes(state, moved) == {P + "strength": (("f", 0.75),), P + "look": (("i", 4),)}
    assert feedback_state(None, (0.8,), 1) == {}
    assert P + "look" not in feedback_state(StreamParams())  # no playlist, no look


@pytest.mark.parametrize("text, message", [
    ("localhost", "takes HOST:PORT"), ("127.0.0.1:0", "takes HOST:PORT"), ("127.0.0.1:99999", "takes HOST:PORT"),
    (":9000", "takes HOST:PORT"), ("no-such-desk.invalid:9000", "cannot resolve 'no-such-desk.invalid'"),
])
def test_a_desk_address_that_cannot_work_is_refused_with_why(text, message):
    with pytest.raises(ValueError, match=message):
        OscFeedback([text])


def test_desk_addresses_parse_and_are_bounded():
    assert parse_target("[::1]:9001") == ("::1", 9001)
    assert parse_target("desk.local:8000") == ("desk.local", 8000)
    with pytest.raises(ValueError, match=f"at most {MAX_TARGETS} desks"):
        OscFeedback([f"127.0.0.1:{9000 + k}" for k in range(MAX_TARGETS + 1)])


def test_feedback_sends_each_change_once_to_every_desk_and_everything_on_refresh():
    desks = [Desk(), Desk()]
    params = {"now": None}
    feedback = OscFeedback([d.address for d in desks], interval_s=0.01)
    try:
        feedback.start(lambda: feedback_state(params["now"]))
        time.sleep(0.1)
        assert feedback.sent == 0  # no stream yet: the desk keeps what it shows
        params["now"] = StreamParams("a fox")
        for d in desks:
            d.read(lambda got: len(got) == 8)  # the prompt and the 7 settings
            assert d.last(P + "prompt") == ["a fox"] and d.last(P + "steps") == [2]
        params["now"] = StreamParams("a fox", strength=0.75)
        for d in desks:
            d.read(lambda got: len(got) == 9)
            assert d.got[-1] == (P + "strength", [0.75])  # that one only
        feedback.refresh()  # a desk that restarted asks for everything
        for d in desks:
            d.read(lambda got: len(got) == 17)
            assert {address for address, _ in d.got[9:]} == {address for address, _ in d.got[:8]}
        time.sleep(0.1)
        assert all(len(d.got) == 17 for d in desks)  # nothing changes: nothing more is sent
        assert feedback.sent == 34 and feedback.failed == 0
    finally:
        feedback.stop()
        for d in desks:
            d.close()


def test_a_failing_send_is_counted_logged_once_and_the_next_change_still_goes(desk, caplog):
    feedback = OscFeedback([desk.address, "127.0.0.1:9"], interval_s=0.01)

    class Refusing:
        def sendto(self, data, address):
            raise OSError(105, "No buffer space available")

        def close(self):
            pass

    feedback._socks[1] = Refusing()  # the second desk's network is down
    params = {"now": StreamParams("a")}
    feedback.start(lambda: feedback_state(params["now"]))
    try:
        desk.read(lambda got: len(got) == 8)
        params["now"] = StreamParams("b")
        desk.read(lambda got: len(got) == 9)
        assert desk.got[-1] == (P + "prompt", ["b"])
    finally:
        feedback.stop()
    assert feedback.failed == 9
    assert caplog.text.count("OSC feedback to 127.0.0.1:9 failed: No buffer space available") == 1


def test_osc_selects_a_look_and_asks_for_a_refresh():
    playlist = Playlist([Look("first", 60.0, 1), Look("second", 60.0, 2), Look("third", 60.0, 3)])
    applied = []
    osc = OscServer("127.0.0.1", 0)

    class Feedback:
        refreshes = 0

        def refresh(self):
            Feedback.refreshes += 1

    try:
        osc.apply = applied.append
        assert osc.handle_message(P + "refresh", []) == "ignored"  # no --osc-feedback: nobody to send to
        assert osc.handle_message(P + "look", [2]) == "rejected"  # no --prompts
        osc.playlist, osc.feedback = playlist, Feedback()
        playlist.start(applied.append)
        assert osc.handle_message(P + "look", [3.0]) == "applied"  # a fader's float
        _wait_for(lambda: playlist.index == 2)
        assert applied[-1]["prompt"] == "third"
        assert osc.handle_message(P + "next", []) == "applied"  # counted from the chosen look: wraps to the first
        _wait_for(lambda: playlist.index == 0)
        assert osc.handle_message(P + "look", [4]) == "rejected"
        assert osc.handle_message(P + "look", ["two"]) == "bad_arguments"
        assert osc.handle_message(P + "look", []) == "bad_arguments"
        assert osc.handle_message(P + "refresh", [0]) == "ignored"  # a button's release
        assert osc.handle_message(P + "refresh", [1]) == "applied" and Feedback.refreshes == 1
        assert playlist.steps["select"] == 1
    finally:
        playlist.stop()
        osc.stop()


# ------------------------------------------------------------------------------------------------ commands


def test_run_sends_its_settings_to_the_desk_whoever_changes_them(tmp_path, desk):
    """`run --osc-port P --osc-feedback DESK --prompts looks.txt`: the desk gets the first look at the start, a
    strength it sent over OSC back as applied, and the playlist's look and prompt when OSC chooses another look."""
    playlist = tmp_path / "looks.txt"
    playlist.write_text("first look | 1h\nsecond look | 1h | seed=7\n")
    port = _free_udp_port()
    sender = SimpleUDPClient("127.0.0.1", port)
    done = threading.Event()
    stopped: list[int] = []
    failed: list[AssertionError] = []

    def on_call(k):
        if k == 2:
            threading.Thread(target=drive, daemon=True).start()
        if done.is_set() and not stopped:
            stopped.append(k)
            _thread.interrupt_main()  # Ctrl-C: the run stops

    def drive():
        try:
            desk.read(lambda got: desk.last(P + "look") == [1] and desk.last(P + "prompt") == ["first look"])
            sender.send_message(P + "strength", 0.6)
            desk.read(lambda got: desk.last(P + "strength") is not None and
                      abs(desk.last(P + "strength")[0] - 0.6) < 1e-6)
            sender.send_message(P + "look", 2)
            desk.read(lambda got: desk.last(P + "look") == [2] and desk.last(P + "prompt") == ["second look"]
                      and desk.last(P + "seed") == [7])
        except AssertionError as exc:  # said by the test, not lost with this thread
            failed.append(exc)
        finally:
            done.set()

    engine = RecordingEngine(on_call)
    args = _parse_run("-i", _video(tmp_path / "in.avi", n=3000), "-o", str(tmp_path / "out.avi"), "--realtime",
                      "--osc-port", str(port), "--osc-feedback", desk.address, "--prompts", str(playlist))
    assert cli_run.main(args, engine=engine) == 130  # Ctrl-C's status
    assert done.is_set() and not failed, failed
    assert engine.params[-1].prompt == "second look" and engine.params[-1].strength == 0.6
    assert desk.last(P + "strength")[0] == pytest.approx(0.6)


def test_a_viewers_change_of_the_broadcast_reaches_the_desk(engine, desk):
    """`serve --source ... --osc-feedback DESK`: a viewer with the control token changes the prompt on the /view
    page; the desk shows it."""
    from test_server import FakeCapture

    from turbostream.config import ServerConfig
    from turbostream.serve import TurboServer
    from turbostream.serve.integrations import Integrations

    async def main():
        server = TurboServer(engine, ServerConfig(port=0, source="fake:0", control_token="c"),
                             capture_factory=FakeCapture)
        extras = Integrations(server, Controls(feedback=OscFeedback([desk.address])), size=(64, 64))
        await server.start()
        extras.start(asyncio.get_running_loop())
        try:
            assert await server.wait_ready(30)
            await asyncio.to_thread(desk.read, lambda got: desk.last(P + "prompt") is not None)
            controller = await connect(f"ws://127.0.0.1:{server.port}/view/ws?control=c")
            assert json.loads(await controller.recv())["control"] is True
            await controller.send(json.dumps({"type": "config", "prompt": "a charcoal drawing", "steps": 4}))
            await asyncio.to_thread(desk.read, lambda got: desk.last(P + "prompt") == ["a charcoal drawing"]
                                    and desk.last(P + "steps") == [4])
            await controller.close()
        finally:
            await server.stop()
            extras.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_osc_feedback_is_checked_before_the_model_loads(capsys, tmp_path):
    video = _video(tmp_path / "in.avi", n=3)
    assert cli.main(["run", "-i", video, "-o", str(tmp_path / "out.avi"), "--model", "tiny-random", "--device",
                     "cpu", "--osc-feedback", "desk"]) == 2
    assert "--osc-feedback takes HOST:PORT" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "tiny-random", "--device", "cpu", "--osc-feedback", "127.0.0.1:9001"]) == 2
    assert "add --source SRC" in capsys.readouterr().err
