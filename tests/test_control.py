"""External control: OSC messages (sent with python-osc over loopback UDP) and prompt playlists, changing a running
broadcast (`serve --source`, a viewer sees the `config`) and a running `run` (tiny-random engine and stand-ins)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient
from test_server import FakeCapture, metrics_until
from websockets.asyncio.client import connect

from turbostream import cli
from turbostream.cli import run as cli_run
from turbostream.cli.controls import controls_from_args
from turbostream.cli.options import stream_params
from turbostream.codec import fit_frame
from turbostream.config import ServerConfig, StreamParams
from turbostream.control import Controls, OscServer, Playlist, RunTarget, parse_playlist
from turbostream.control.playlist import MAX_ENTRIES, MAX_FILE_BYTES, Look, load_playlist, parse_duration
from turbostream.errors import UserError
from turbostream.serve import TurboServer
from turbostream.serve.integrations import Integrations

TIMEOUT = 60


async def _broadcast_with(engine, controls: Controls):
    """A server with a source, started with these controls; returns (server, integrations)."""
    server = TurboServer(engine, ServerConfig(port=0, source="fake:0"), capture_factory=FakeCapture)
    extras = Integrations(server, controls, size=(64, 64))
    await server.start()
    extras.start(asyncio.get_running_loop())
    assert await server.wait_ready(30)
    return server, extras


async def _open_viewer(server):
    ws = await connect(f"ws://127.0.0.1:{server.port}/view/ws", max_size=2**23)
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready" and ready["role"] == "viewer"
    return ws, ready


async def _config_where(ws, predicate, timeout=20.0):
    """The first `config` message for which predicate(msg) holds; every config seen on the way in `seen`."""
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.recv()
            if isinstance(msg, str) and (obj := json.loads(msg))["type"] == "config":
                seen.append(obj)
                if predicate(obj):
                    return obj, seen


def _metrics(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _wait_for(condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ serve


def test_osc_changes_the_broadcast_and_bad_messages_are_ignored_and_counted(engine, caplog):
    caplog.set_level(logging.INFO, logger="turbostream.control")

    async def main():
        osc = OscServer("127.0.0.1", 0)
        server, extras = await _broadcast_with(engine, Controls(osc))
        try:
            viewer, _ = await _open_viewer(server)
            sender = SimpleUDPClient("127.0.0.1", osc.port)
            sender.send_message("/turbostream/prompt", "a storm at sea")
            sender.send_message("/turbostream/seed", 9)
            echo, _ = await _config_where(viewer, lambda m: m["prompt"] == "a storm at sea" and m["seed"] == 9)
            assert echo["strength"] == 0.5 and echo["steps"] == 2

            # A flood of bad messages: each ignored and counted, the first of each kind logged, nothing changes.
            for _ in range(50):
                sender.send_message("/turbostream/strength", 7.0)  # out of range
            sender.send_message("/turbostream/steps", "three")  # wrong type
            sender.send_message("/turbostream/seed", 1.5)  # not an integer
            sender.send_message("/turbostream/nowhere", 1)  # unknown address
            sender.send_message("/turbostream/next", [])  # no playlist on this server
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.sendto(b"\x00\xffnot osc at all", ("127.0.0.1", osc.port))
                raw.sendto(b"#bundle\x00" + b"\xff" * 40, ("127.0.0.1", osc.port))
            sender.send_message("/turbostream/steps", 4.0)  # integral floats (TouchDesigner sends floats) are fine
            sender.send_message("/turbostream/strength", 0.75)
            echo, seen = await _config_where(viewer, lambda m: m["strength"] == 0.75)
            assert echo == {"type": "config", "prompt": "a storm at sea", "strength": 0.75, "steps": 4, "seed": 9,
                            "similarity": 0.0, "transition_s": 0.0, "feedback": 0.0, "reuse": 0}
            assert all(m["strength"] != 7.0 for m in seen)
            _wait_for(lambda: sum(osc.counts.values()) == 60, what="every OSC message counted")
            assert osc.counts == {"applied": 4, "ignored": 1, "rejected": 50, "bad_arguments": 2,
                                  "unknown_address": 1, "malformed": 2}
            assert server.broadcast.stream.params == StreamParams("a storm at sea", 0.75, 4, 9)
            text = await asyncio.to_thread(_metrics, server)
            assert 'turbostream_osc_messages_total{result="rejected"} 50.0' in text
            assert 'turbostream_osc_messages_total{result="applied"} 4.0' in text
            assert 'turbostream_osc_messages_total{result="malformed"} 2.0' in text
            # The broadcast still streams.
            frames = 0
            async with asyncio.timeout(20):
                while frames < 3:
                    frames += isinstance(await viewer.recv(), bytes)
            await viewer.close()
        finally:
            await server.stop()
            extras.stop()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    refused = [r for r in caplog.records if "refused /turbostream/strength" in r.getMessage()]
    assert len(refused) == 1 and "strength must be in (0, 1]" in refused[0].getMessage()
    assert sum("not OSC" in r.getMessage() for r in caplog.records) == 1


def test_playlist_advances_the_broadcast_on_time_and_on_next(engine, tmp_path):
    looks = [Look("look one", 0.3, 1), Look("look two", 60.0, 2), Look("look three", 60.0, 3)]

    async def main():
        osc = OscServer("127.0.0.1", 0)
        server, extras = await _broadcast_with(engine, Controls(osc, Playlist(looks)))
        try:
            viewer, _ = await _open_viewer(server)
            await _config_where(viewer, lambda m: m["prompt"] == "look two")  # after 0.3 s
            sender = SimpleUDPClient("127.0.0.1", osc.port)
            sender.send_message("/turbostream/next", 1.0)  # a button's press
            sender.send_message("/turbostream/next", 0.0)  # and its release: ignored
            await _config_where(viewer, lambda m: m["prompt"] == "look three")
            sender.send_message("/turbostream/next", [])
            await _config_where(viewer, lambda m: m["prompt"] == "look one")  # wraps around
            sender.send_message("/turbostream/previous", [])
            await _config_where(viewer, lambda m: m["prompt"] == "look three")
            assert extras.controls.playlist.steps["time"] >= 1 and osc.counts["ignored"] == 1
            await viewer.close()
        finally:
            await server.stop()
            extras.stop()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


@pytest.mark.slow
def test_serve_command_with_osc_and_a_playlist(tmp_path):
    """The real command: `serve --source FILE --osc-port P --prompts FILE` starts with the playlist's first prompt,
    OSC changes the broadcast, /metrics counts it, SIGTERM ends it with status 0."""
    import signal
    import subprocess
    import sys

    playlist = tmp_path / "looks.txt"
    playlist.write_text("the first look | 1h\nthe second look\n")
    port, osc_port = _free_tcp_port(), _free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "turbostream", "serve", "--model", "tiny-random", "--size", "64", "--device", "cpu",
         "--port", str(port), "--source", _video(tmp_path / "in.avi", n=40), "--osc-port", str(osc_port),
         "--prompts", str(playlist)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve never became ready"
            time.sleep(0.2)

        async def main():
            ws = await connect(f"ws://127.0.0.1:{port}/view/ws")
            ready = json.loads(await ws.recv())
            assert ready["params"]["prompt"] == "the first look"
            SimpleUDPClient("127.0.0.1", osc_port).send_message("/turbostream/prompt", "sent over OSC")
            await _config_where(ws, lambda m: m["prompt"] == "sent over OSC")
            await ws.close()

        asyncio.run(asyncio.wait_for(main(), TIMEOUT))
        # The OSC thread counts the message once its change is handed to the event loop, which may send the viewer
        # its config first: the count can trail the config by a thread switch.
        metrics_until(port, lambda text: 'turbostream_osc_messages_total{result="applied"} 1.0' in text, 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "OSC: listening on udp 127.0.0.1:" in proc.stdout.read()


def test_serve_refuses_controls_without_a_source(capsys):
    assert cli.main(["serve", "--model", "tiny-random", "--device", "cpu", "--osc-port", "0"]) == 2
    assert "add --source SRC" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ run


class RecordingEngine:
    """Stands in for Engine: returns the fitted frames, records the parameters of every call; on_call(k) hooks;
    warmup takes warmup_s."""

    def __init__(self, on_call=None, warmup_s=0.0):
        self.width = self.height = 64
        self.max_batch = 1
        self.model_name, self.random_weights, self.loras = "fake", False, ()
        self.params: list[StreamParams] = []
        self.on_call = on_call
        self.warmup_s = warmup_s

    def warmup(self):
        time.sleep(self.warmup_s)

    def run(self, frames, params):
        self.params.append(params[0])
        if self.on_call:
            self.on_call(len(self.params))
        time.sleep(0.005)
        return [fit_frame(f, 64, 64) for f in frames]


def _video(path, n=120, fps=50.0):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 64))
    for k in range(n):
        writer.write(np.full((64, 64, 3), k % 256, np.uint8))
    writer.release()
    return str(path)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_run(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_run.add_parser(parser.add_subparsers())
    return parser.parse_args(["run", *argv])


def test_osc_changes_a_running_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="turbostream.control")
    port = _free_udp_port()
    sender = SimpleUDPClient("127.0.0.1", port)

    def on_call(k):
        if k == 3:
            sender.send_message("/turbostream/prompt", "from the lighting desk")
            sender.send_message("/turbostream/seed", 42)
            sender.send_message("/turbostream/strength", -1.0)  # refused, the run goes on

    engine = RecordingEngine(on_call)
    args = _parse_run("-i", _video(tmp_path / "in.avi"), "-o", str(tmp_path / "out.avi"), "--realtime",
                      "--max-frames", "40", "--osc-port", str(port))
    assert cli_run.main(args, engine=engine) == 0
    assert engine.params[0] == StreamParams()
    assert engine.params[-1] == StreamParams("from the lighting desk", 0.5, 2, 42)
    assert any("refused /turbostream/strength -1.0" in r.getMessage() for r in caplog.records)


def _play(tmp_path, text: str, last: str) -> list[StreamParams]:
    """A realtime run of 200 frames with the playlist `text`, whose OSC port gets /turbostream/next once the look
    with the prompt `last` shows (it wraps to the first): the parameters of each engine call."""
    playlist = tmp_path / "looks.txt"
    playlist.write_text(text)
    port = _free_udp_port()
    sender = SimpleUDPClient("127.0.0.1", port)
    sent = threading.Event()

    def on_call(k):
        if engine.params[-1].prompt == last and not sent.is_set():
            sent.set()
            sender.send_message("/turbostream/next", [])

    engine = RecordingEngine(on_call)
    args = _parse_run("-i", _video(tmp_path / "in.avi", n=250), "-o", str(tmp_path / "out.avi"), "--realtime",
                      "--max-frames", "200", "--osc-port", str(port), "--prompts", str(playlist))
    assert cli_run.main(args, engine=engine) == 0
    return engine.params


def test_playlist_advances_a_run_on_time_and_on_next(tmp_path):
    params = _play(tmp_path, "# a show\nfirst look | 0.3s\n\nsecond look | 0.3\nthird look | 1m\n", "third look")
    order = [p.prompt for k, p in enumerate(params) if k == 0 or p.prompt != params[k - 1].prompt]
    # The first look from the start, the second after 0.3 s, the third after 0.6 s; next wraps to the first.
    assert order[:4] == ["first look", "second look", "third look", "first look"], order


def test_a_runs_playlist_sets_each_looks_settings(tmp_path):
    """The run starts with the first look's settings; each step applies the next look's, and keeps what it does not
    name; after the last, the first look's again."""
    params = _play(tmp_path, "first | 0.3s | strength=0.75 seed=7\nsecond | 0.3s | seed=8\n"
                             "third | 1m | steps=4 strength=0.5\n", "third")
    seen = [(p.prompt, p.strength, p.steps, p.seed) for p in params]
    order = [look for k, look in enumerate(seen) if k == 0 or look != seen[k - 1]]
    assert order[:4] == [("first", 0.75, 2, 7), ("second", 0.75, 2, 8), ("third", 0.5, 4, 8),
                         ("first", 0.75, 4, 7)], order


def test_a_runs_playlist_starts_its_clock_once_the_engine_is_warm(tmp_path):
    """A warm-up longer than the first look (a real engine captures graphs for seconds) must not eat it: the first
    frames get the first look, and it lasts its 0.3 s from there."""
    playlist = tmp_path / "looks.txt"
    playlist.write_text("first look | 0.3s\nsecond look | 1m\n")
    engine = RecordingEngine(warmup_s=0.8)
    args = _parse_run("-i", _video(tmp_path / "in.avi", n=250), "-o", str(tmp_path / "out.avi"), "--realtime",
                      "--max-frames", "60", "--prompts", str(playlist))
    assert cli_run.main(args, engine=engine) == 0
    prompts = [p.prompt for p in engine.params]
    assert prompts[0] == "first look" and "second look" in prompts, prompts


def test_run_target_uses_the_one_validation():
    class Holder:
        params = StreamParams()

        def set_params(self, p):
            self.params = p

    holder = Holder()
    target = RunTarget(holder)
    assert target({"steps": 3, "seed": 5}) == StreamParams(steps=3, seed=5)
    for bad in ({"strength": 0.1}, {"steps": 0}, {"prompt": "x" * 1001}, {"seed": -1}, {"color": "red"}):
        with pytest.raises(ValueError):
            target(bad)
    assert holder.params == StreamParams(steps=3, seed=5)


# ------------------------------------------------------------------------------------------------ Sans-I/O


def test_osc_message_results():
    applied = []

    def apply(fields):
        applied.append(fields)
        return StreamParams().updated(**fields)

    class Steps:
        def __init__(self):
            self.moves = []

        def next(self):
            self.moves.append(1)

        def previous(self):
            self.moves.append(-1)

    nested: list = []
    for _ in range(5000):  # arrays in arrays, an OSC "[" tag per level
        nested = [nested]
    osc = OscServer("127.0.0.1", 0)
    try:
        osc.apply, osc.playlist = apply, Steps()
        cases = [
            ("/turbostream/prompt", ["a fox"], "applied"),
            ("/turbostream/prompt", [3], "bad_arguments"),
            ("/turbostream/prompt", ["a", "b"], "bad_arguments"),
            ("/turbostream/prompt", ['[["a fox", 1], ["a crow", 3]]'], "applied"),  # a blend, as --prompt reads it
            ("/turbostream/prompt", ['[["a fox", 1], ["a crow"]]'], "rejected"),  # a pair without its weight
            ("/turbostream/prompt", ["[a fox"], "bad_arguments"),  # not JSON
            ("/turbostream/seed", list(range(8000)), "bad_arguments"),  # not one 16 KB log line
            ("/turbostream/prompt", [nested], "bad_arguments"),  # repr() of it raised RecursionError: not counted
            ("/turbostream/strength", [1], "applied"),
            ("/turbostream/strength", [float("nan")], "rejected"),
            ("/turbostream/strength", [True], "bad_arguments"),
            ("/turbostream/steps", [3.0], "applied"),
            ("/turbostream/steps", [99], "rejected"),
            ("/turbostream/seed", [2**40], "rejected"),
            ("/turbostream/seed", [], "bad_arguments"),
            ("/turbostream/next", [], "applied"),
            ("/turbostream/previous", [1], "applied"),
            ("/turbostream/next", [0], "ignored"),
            ("/turbostream/next", ["go"], "bad_arguments"),
            ("/other/prompt", ["x"], "unknown_address"),
        ]
        for address, args, expected in cases:
            assert osc.handle_message(address, args) == expected, (address, args)
        assert applied[:2] == [{"prompt": "a fox"}, {"prompt": (("a fox", 1), ("a crow", 3))}]
        assert applied[3] == {"strength": 1.0}  # after the blend refused by apply
        assert osc.playlist.moves == [1, -1]
        assert osc.handle_datagram(b"garbage") == ["malformed"]
    finally:
        osc.stop()


def test_osc_port_in_use_is_a_clear_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(OSError, match=r"cannot listen for OSC on 127.0.0.1:\d+"):
            OscServer("127.0.0.1", taken.getsockname()[1])


def test_playlist_format():
    text = """# looks for the foyer
    an oil painting, thick brush strokes | 45s
    a watercolor | 1.5m
      a charcoal drawing
    neon | cyberpunk city | 2h
    a poster | minimal
    tiny | .5
    a city at night | ...dreamy
    """
    looks = parse_playlist(text, default_duration_s=20)
    assert [(lk.prompt, lk.duration_s, lk.line) for lk in looks] == [
        ("an oil painting, thick brush strokes", 45.0, 2), ("a watercolor", 90.0, 3), ("a charcoal drawing", 20.0, 4),
        ("neon | cyberpunk city", 7200.0, 5), ("a poster | minimal", 20.0, 6), ("tiny", 0.5, 7),
        ("a city at night | ...dreamy", 20.0, 8),  # text after "|" that is no number: part of the prompt
    ]
    assert parse_duration("30") == parse_duration("30s") == parse_duration("0.5m") == 30.0
    for bad, message in [
        ("a look | 30x", "line 1: duration '30x'"),
        ("ok\n| 30s", "line 2: a duration without a prompt"),
        ("a look | 0", "between 0.1 s and 24 h"),
        ("# only comments\n\n", "has no prompts"),
        ("x" * 1001, "line 1: prompt is 1001 characters"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_playlist(bad)


def test_every_playlist_line_is_read_as_prompt_reads_it(tmp_path):
    """The first line as the others (as --prompt: a JSON blend when it starts with '['): a line starting with '['
    that is no blend is an error naming the playlist and the line, wherever it is; a blend stays one every cycle."""
    for text, line in (("[night] a neon city | 10s\nan oil painting | 10s\n", 1),
                       ("an oil painting | 10s\n[night] a neon city | 10s\n", 2)):
        path = tmp_path / f"line{line}.txt"
        path.write_text(text)
        args = _parse_run("-i", "in.avi", "-o", "out.avi", "--prompts", str(path))
        with pytest.raises(UserError, match=re.escape(f"{path}, line {line}: a prompt starting with '[' is read as")):
            controls_from_args(args)
    blend = '[["a watercolor", 0.7], ["a pencil sketch", 0.3]]'
    path = tmp_path / "blend.txt"
    path.write_text(f"{blend} | 0.1s\nan oil painting | 0.1s\n")
    args = _parse_run("-i", "in.avi", "-o", "out.avi", "--prompts", str(path))
    controls = controls_from_args(args)
    as_blend = (("a watercolor", 0.7), ("a pencil sketch", 0.3))
    assert stream_params(args).prompt == as_blend  # the stream starts with the blend
    shown = []
    controls.playlist.start(lambda fields: shown.append(fields["prompt"]))
    try:
        _wait_for(lambda: len(shown) >= 3, what="a cycle and a half")
    finally:
        controls.stop()
    assert shown[:3] == ["an oil painting", as_blend, "an oil painting"]


def test_a_look_sets_settings_and_lora_scales_beside_its_prompt():
    text = """a watercolor | 1.5m | strength=0.6 seed=7 transition=2
    an ink wash | lora.ink-wash=1 lora.2=0 | 10s
    a pencil sketch | LORA=-0.5 Steps=4
    neon | style=cyberpunk city
    tiny | a=b c
    """
    looks = parse_playlist(text, default_duration_s=20)
    assert [(lk.prompt, lk.duration_s, lk.settings, lk.loras) for lk in looks] == [
        ("a watercolor", 90.0, (("strength", 0.6), ("seed", 7), ("transition_s", 2.0)), ()),
        ("an ink wash", 10.0, (), (("ink-wash", 1.0), (2, 0.0))),
        ("a pencil sketch", 20.0, (("steps", 4),), ((None, -0.5),)),
        ("neon | style=cyberpunk city", 20.0, (), ()),  # a word without '=': the part is the prompt's
        ("tiny | a=b c", 20.0, (), ()),
    ]
    assert looks[0].fields() == {"prompt": "a watercolor", "strength": 0.6, "seed": 7, "transition_s": 2.0}
    for bad, message in [
        ("a look | style=oil", "line 1: unknown setting 'style' in 'style=oil': use strength, steps, seed, "
                               "similarity, transition, feedback, reuse, lora, lora.N, lora.NAME"),
        ("a look | steps=2.5", "line 1: 'steps=2.5': steps must be a whole number"),
        ("a look | strength=lots", "line 1: 'strength=lots': strength must be a number"),
        ("a look | lora=11", "line 1: 'lora=11': "),
        ("ok\n| strength=0.5", "line 2: settings without a prompt"),
        ("ok\n| 5s | seed=1", "line 2: a duration and settings without a prompt"),
        ("a look | " + " ".join(["seed=1"] * 33), "33 settings in one look; at most 32"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_playlist(bad)


def test_a_playlist_file_is_bounded_in_bytes_and_looks(tmp_path):
    """A playlist is text a person wrote: a file over MAX_FILE_BYTES (the wrong file, say a video) is refused before
    it is read whole, and one with more than MAX_ENTRIES looks too, each with what it holds."""
    big = tmp_path / "big.txt"
    big.write_text("a look\n" * (MAX_FILE_BYTES // 7 + 1))
    with pytest.raises(ValueError, match=f"is over {MAX_FILE_BYTES // 1024} KiB"):
        load_playlist(big)
    many = tmp_path / "many.txt"
    many.write_text("a\n" * (MAX_ENTRIES + 1))
    with pytest.raises(ValueError, match=f"more than {MAX_ENTRIES} prompts"):
        load_playlist(many)
    many.write_text("a\n" * MAX_ENTRIES)
    assert len(load_playlist(many)) == MAX_ENTRIES


def test_a_playlist_is_tried_whole_against_the_command_before_the_model_loads(tmp_path):
    """The stream starts with the first look's settings (and the engine with its LoRA scales); a look that the
    stream or the engine would refuse, anywhere in the cycle, is an error naming its line at start."""
    from turbostream.config import LoraSpec

    path = tmp_path / "looks.txt"
    path.write_text("first | strength=0.75 seed=7 lora.2=0.25\nsecond | steps=4 lora=1\n")
    args = _parse_run("-i", "in.avi", "-o", "out.avi", "--prompts", str(path), "--lora-live", "--osc-port", "0")
    args.lora = [LoraSpec("a.safetensors", 1.0), LoraSpec("b.safetensors", 0.5)]
    with pytest.raises(UserError, match=re.escape(f"{path}, line 2: 2 LoRAs are loaded: say which")):
        controls_from_args(args)
    path.write_text("first | strength=0.75 seed=7 lora.2=0.25\nsecond | steps=4 lora.a=1\nthird | steps=2\n")
    args.lora = [LoraSpec("a.safetensors", 1.0), LoraSpec("b.safetensors", 0.5)]
    controls = controls_from_args(args)
    controls.stop()
    start = stream_params(args)
    assert (start.prompt, start.strength, start.seed, start.steps) == ("first", 0.75, 7, 2)
    assert [spec.scale for spec in args.lora] == [1.0, 0.25]  # the engine loads with the first look's scales
    for text, line, message in [
        ("first | strength=0.4\n", 1, "steps x strength must be at least 1"),  # 0.4 x 2: no UNet evaluation
        ("first\nsecond | steps=4 strength=0.3\nthird | steps=2\n", 3, "steps x strength must be at least 1"),
        ("first\nsecond | steps=99\n", 2, "steps must be between 1 and 10"),
        ("first\nsecond | reuse=3\n", 2, "reuse"),
        ("first | lora=0.5\n", 1, "start with --lora-live"),
    ]:
        path.write_text(text)
        argv = ["-i", "in.avi", "-o", "out.avi", "--prompts", str(path)]
        args = _parse_run(*argv)
        args.lora = [LoraSpec("a.safetensors", 1.0)]
        with pytest.raises(UserError, match=re.escape(f"{path}, line {line}: ") + ".*" + re.escape(message)):
            controls_from_args(args)


def test_a_playlist_applies_each_looks_settings_and_lora_scales():
    applied, scales = [], []
    looks = [Look("a", 0.15, 1), Look("b", 0.15, 2, (("strength", 0.8), ("seed", 3)), ((2, 0.5),)),
             Look("c", 30, 3, (), ((None, 1.5), ("ink", 0.0)))]
    playlist = Playlist(looks)
    playlist.start(applied.append, lora=lambda which, scale: scales.append((which, scale)))
    try:
        _wait_for(lambda: playlist.index == 2 and len(scales) == 3, what="two steps")
    finally:
        playlist.stop()
    assert applied == [{"prompt": "b", "strength": 0.8, "seed": 3}, {"prompt": "c"}]
    assert scales == [(2, 0.5), (None, 1.5), ("ink", 0.0)]


def test_playlist_steps_on_time_next_and_previous():
    shown = []
    playlist = Playlist([Look("a", 0.2, 1), Look("b", 30, 2), Look("c", 30, 3)])
    playlist.start(lambda fields: shown.append(fields["prompt"]))
    try:
        _wait_for(lambda: shown == ["b"], what="the timed step")
        playlist.previous()
        _wait_for(lambda: shown == ["b", "a"], what="previous")
        playlist.previous()
        _wait_for(lambda: shown == ["b", "a", "c"], what="previous wraps")
        for _ in range(4):  # four presses at once: one step of four, from c to a
            playlist.next()
        _wait_for(lambda: shown[-1] == "a" and playlist.index == 0, what="four steps")
    finally:
        playlist.stop()
    assert playlist.steps["next"] == 4 and playlist.steps["previous"] == 2 and playlist.steps["time"] == 1


def test_osc_32_bit_floats_mean_the_decimal_that_was_sent():
    """OSC `f` arguments are 32-bit: strength 0.7 arrived as 0.699999988..., and steps 10 x that ran 6 UNet
    evaluations where the browser's 0.7 runs 7. A 32-bit float means its shortest decimal; a 64-bit `d` argument
    that no 32-bit float holds exactly is kept as it is."""
    from pythonosc.osc_message_builder import OscMessageBuilder

    applied = []

    def apply(fields):
        applied.append(fields)
        return StreamParams(steps=10).updated(**fields)

    osc = OscServer("127.0.0.1", 0)
    try:
        osc.apply = apply
        for tag, value in (("f", 0.7), ("f", 0.9), ("d", 0.7), ("d", 0.1234567890123), ("f", 0.25)):
            builder = OscMessageBuilder("/turbostream/strength")
            builder.add_arg(value, tag)
            assert osc.handle_datagram(builder.build().dgram) == ["applied"], (tag, value)
        assert [f["strength"] for f in applied] == [0.7, 0.9, 0.7, 0.1234567890123, 0.25]
        assert StreamParams(steps=10).updated(**applied[0]).unet_evals == 7
        # Whole numbers are exact as they are: a seed of 2^31 sent as a float (the browser's dice draw up to 2^31)
        # is 2^31, not the shorter decimal 2147483600 that stands for the same 32-bit float.
        for tag, value in (("f", 2.0**31), ("d", 4294967040.0), ("f", 123456792.0)):
            builder = OscMessageBuilder("/turbostream/seed")
            builder.add_arg(value, tag)
            assert osc.handle_datagram(builder.build().dgram) == ["applied"], (tag, value)
        assert [f["seed"] for f in applied[5:]] == [2**31, 4294967040, 123456792]
    finally:
        osc.stop()


def test_an_engine_configured_for_more_steps_takes_them_from_every_control():
    """EngineConfig.max_steps (up to 50) is the step limit the ready message advertises, but every way of changing
    parameters first checked against the default limit (10): steps 12 on a 20-step engine were refused, and with a
    default of 15 steps every change was, even a new prompt alone."""
    from turbostream.config import StreamParams
    from turbostream.control.targets import RunTarget
    from turbostream.serve import protocol

    limits = (20, True)
    default = StreamParams(steps=15, strength=0.5)
    assert protocol.apply_config(default, {"prompt": "a watercolor"}, *limits).steps == 15
    assert protocol.apply_config(StreamParams(), {"steps": 12}, *limits).steps == 12
    with pytest.raises(protocol.ProtocolError, match="steps must be between 1 and 20, got 21"):
        protocol.apply_config(StreamParams(), {"steps": 21}, *limits)
    with pytest.raises(protocol.ProtocolError, match="steps must be between 1 and 10, got 12"):
        protocol.apply_config(StreamParams(), {"steps": 12}, 10)

    class Run:  # what RunTarget drives (OSC and playlists in `run`)
        params = default

        def set_params(self, params):
            self.params = params

    run = Run()
    RunTarget(run, limits)({"strength": 0.6})
    assert (run.params.steps, run.params.strength) == (15, 0.6)


@pytest.mark.parametrize("steps", [0, 11, 51])
def test_a_steps_value_out_of_range_is_refused_with_the_engines_limit(steps):
    """A config, an OSC message or a /steps line with steps 0 or past 50 was told "between 1 and 50" (the widest
    limit any engine has) by a 10-step engine, which then refused 11 to 50 too."""
    from turbostream.config import StreamParams
    from turbostream.control.targets import RunTarget
    from turbostream.serve import protocol

    with pytest.raises(protocol.ProtocolError, match=f"steps must be between 1 and 10, got {steps}$"):
        protocol.apply_config(StreamParams(), {"steps": steps}, 10)
    with pytest.raises(ValueError, match=f"steps must be between 1 and 10, got {steps}$"):
        RunTarget(type("Run", (), {"params": StreamParams()})(), (10, True))({"steps": steps})
    with pytest.raises(protocol.ProtocolError, match="unknown stream parameter"):
        protocol.apply_config(StreamParams(), {"limits": (99, True)}, 10)  # never taken for the limits


def test_a_playlist_on_a_file_read_in_order_warns_that_durations_are_wall_clock(tmp_path, caplog):
    """A file run in order goes as fast as the engine: "| 2s" became 57 s of video on a CPU, more on a GPU."""
    from test_runner import FakeEngine, make_video

    looks = tmp_path / "looks.txt"
    looks.write_text("a | 2s\nb | 2s\n")
    src = make_video(tmp_path / "in.avi", n=4, size=(64, 64))
    caplog.set_level(logging.WARNING, logger="turbostream")
    args = cli.build_parser().parse_args(["run", "-i", str(src), "-o", str(tmp_path / "out.avi"), "--prompts",
                                          str(looks), "--model", "tiny-random", "--device", "cpu", "--size", "64"])
    assert cli_run.main(args, engine=FakeEngine()) == 0
    assert "each look lasts its duration in wall-clock time" in caplog.text


def test_an_osc_message_of_unknown_type_tags_is_malformed_and_logged_once(caplog):
    """4,000 type tags python-osc does not know ('x'): each was parsed as an argument and logged as a warning (20,001
    records for 5 datagrams); the message is refused as malformed, its log line throttled."""
    tags = b"," + b"x" * 4000
    datagram = b"/turbostream/seed\x00\x00\x00" + tags + b"\x00" * (4 - len(tags) % 4)
    osc = OscServer("127.0.0.1", 0)
    try:
        with caplog.at_level(logging.DEBUG):
            results = [osc.handle_datagram(datagram) for _ in range(5)]
    finally:
        osc.stop()
    assert results == [["malformed"]] * 5, results
    assert len(caplog.records) <= 1, len(caplog.records)
