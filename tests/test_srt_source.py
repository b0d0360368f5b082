"""srt:// sources (io/ffmpeg_reader.py): an SRT sender on loopback (ffmpeg in listener mode, as OBS is set up) read
through the ffmpeg program, a sender that stalls, and the refusals said before the model loads."""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time

import cv2
import pytest
from test_control import _free_udp_port, _wait_for
from test_runner import FakeEngine, parse

from turbostream import cli
from turbostream.cli import run as cli_run
from turbostream.errors import SourceError
from turbostream.io.ffmpeg import FFMPEG_ENV, ffmpeg_lists, ffmpeg_program
from turbostream.io.sources import CaptureThread, parse_source


def _has_srt() -> bool:
    program = ffmpeg_program()
    return program is not None and " srt" in ffmpeg_lists(program)[1]


needs_srt = pytest.mark.skipif(not _has_srt(), reason="needs an ffmpeg with SRT (.ci/run installs Debian's)")


def _bound(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _send(url: str, seconds: float, color: str = "red") -> subprocess.Popen:
    """ffmpeg sending a 96x80 picture of one colour at 10 fps to `url` (H.264 in MPEG-TS, as OBS sends it)."""
    return subprocess.Popen(["ffmpeg", "-v", "error", "-nostdin", "-re", "-f", "lavfi", "-i",
                             f"color=c={color}:size=96x80:rate=10", "-t", str(seconds), "-c:v", "libx264", "-tune",
                             "zerolatency", "-g", "10", "-f", "mpegts", url])


@contextlib.contextmanager
def srt_sender(seconds: float = 30, passphrase: str | None = None):
    """An SRT listener sending a red picture (see _send): (process, the URL to call it at)."""
    port = _free_udp_port()
    proc = _send(f"srt://127.0.0.1:{port}?mode=listener" + (f"&passphrase={passphrase}" if passphrase else ""),
                 seconds)
    try:
        deadline = time.monotonic() + 20
        while not _bound(port):  # the listener is up once its port is taken
            assert proc.poll() is None and time.monotonic() < deadline, "the SRT sender did not start"
            time.sleep(0.05)
        yield proc, f"srt://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


@needs_srt
def test_an_srt_stream_is_read_as_it_comes():
    with srt_sender() as (_, url):
        capture = CaptureThread(url).start()
        try:
            assert capture.size == (96, 80) and capture.fps == 10.0
            frames = [capture.take(10.0) for _ in range(5)]
        finally:
            capture.close()
    assert all(item is not None for item in frames)
    assert [item.index for item in frames] == sorted(item.index for item in frames)
    red, green, blue = frames[-1].frame[40, 48]
    assert red > 240 and green < 15 and blue < 15  # RGB, as every source hands it over


@needs_srt
def test_a_round_trip_over_srt_and_into_a_file(tmp_path):
    """OBS or TouchDesigner listening both ways (README: "A round trip over SRT"): `run -i srt://... -o srt://...
    -o out.avi` calls the sender, and calls the receiver with the stylized stream, as H.264."""
    port = _free_udp_port()
    received = tmp_path / "received.ts"
    receiver = subprocess.Popen(["ffmpeg", "-v", "error", "-nostdin", "-y", "-i",
                                 f"srt://127.0.0.1:{port}?mode=listener", "-c", "copy", str(received)])
    out = tmp_path / "out.avi"
    try:
        deadline = time.monotonic() + 20
        while not _bound(port):
            assert receiver.poll() is None and time.monotonic() < deadline, "the SRT receiver did not start"
            time.sleep(0.05)
        with srt_sender() as (_, url):
            argv = ["-i", url, "-o", f"srt://127.0.0.1:{port}", "-o", str(out), "--max-frames", "20"]
            assert cli_run.main(parse("run", *argv), engine=FakeEngine()) == 0
        receiver.wait(30)  # the stream's end ends the receiver's file
    finally:
        receiver.kill()
        receiver.wait()
    video = cv2.VideoCapture(str(out))
    ok, first = video.read()
    video.release()
    assert ok and first[32, 32, 2] > 200  # red (OpenCV reads BGR)
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-count_frames", "-show_entries",
                            "stream=codec_name,nb_read_frames", "-of", "csv=p=0", str(received)],
                           capture_output=True, text=True, timeout=60).stdout.strip()
    codec, frames = probe.splitlines()[0].split(",")[:2]  # the stream (its program is listed after it)
    assert codec == "h264" and int(frames) >= 5, probe


@needs_srt
def test_a_stalled_srt_sender_is_given_up_and_reconnected_then_reported(caplog):
    """A sender that stops sending without closing (a frozen machine, a cable pulled): ffmpeg gives up on the read
    after the open timeout, the capture reconnects, and with the sender still gone reports the loss."""
    with srt_sender() as (sender, url):
        capture = CaptureThread(url, open_timeout_s=2, reconnect=1, reconnect_delay_s=0.1).start()
        try:
            assert capture.take(10.0) is not None
            sender.send_signal(signal.SIGSTOP)
            start = time.monotonic()
            while capture.take(1.0) is not None or not capture.ended:
                assert time.monotonic() - start < 30, "a stalled stream was never given up"
            assert "lost srt://127.0.0.1:" in capture.error and capture.reconnects == 1
        finally:
            capture.close()


@needs_srt
def test_a_wrong_passphrase_is_said_without_the_passphrase():
    with srt_sender(passphrase="the-right-one-1") as (_, url):
        with pytest.raises(SourceError) as info:
            CaptureThread(f"{url}?passphrase=a-wrong-one-22", open_timeout_s=3).start()
    message = str(info.value)
    assert "passphrase=***" in message and "a-wrong-one-22" not in message
    assert "could not open srt://127.0.0.1:" in message


def test_an_srt_source_that_cannot_work_is_refused_before_anything_opens(monkeypatch, tmp_path):
    with pytest.raises(SourceError, match="SRT has no default port"):
        parse_source("srt://127.0.0.1")
    monkeypatch.setenv(FFMPEG_ENV, os.devnull + "-no-ffmpeg-here")
    with pytest.raises(SourceError, match="srt:// sources are read through FFmpeg, and no ffmpeg program was found"):
        parse_source("srt://127.0.0.1:9000")
    without_srt = tmp_path / "ffmpeg"  # an ffmpeg built without libsrt (its -protocols listing)
    without_srt.write_text("#!/bin/sh\nprintf 'Supported file protocols:\\nInput:\\n  file\\n  udp\\n"
                           "Output:\\n  file\\n  srt\\n'\n")
    without_srt.chmod(0o755)
    monkeypatch.setenv(FFMPEG_ENV, str(without_srt))
    with pytest.raises(SourceError, match="cannot read srt:// \\(built without libsrt\\)"):
        parse_source("srt://127.0.0.1:9000")


@needs_srt
def test_serve_broadcasts_an_srt_source_to_its_viewers(engine):
    """`serve --source srt://...`: the sender's frames are stylized once and reach a /view viewer as JPEGs."""
    import asyncio
    import json

    from websockets.asyncio.client import connect

    from turbostream.config import ServerConfig
    from turbostream.serve import TurboServer
    from turbostream.serve.server import default_capture

    async def main(url):
        server = TurboServer(engine, ServerConfig(port=0, source=url), capture_factory=default_capture)
        await server.start()
        try:
            assert await server.wait_ready(30)
            async with connect(f"ws://127.0.0.1:{server.port}/view/ws", max_size=2**23) as viewer:
                states, frames = [], 0
                async with asyncio.timeout(30):
                    while frames < 3:
                        message = await viewer.recv()
                        if isinstance(message, bytes):
                            frames += 1
                        elif (obj := json.loads(message))["type"] == "source":
                            states.append(obj["state"])
                assert "live" in states
        finally:
            await server.stop()

    with srt_sender() as (_, url):
        asyncio.run(asyncio.wait_for(main(url), 60))


@needs_srt
def test_a_listener_waits_for_its_sender_and_for_the_next_one():
    """`-i srt://0.0.0.0:PORT?mode=listener`: turbostream listens, OBS calls (its default). Opening waits as long as
    it takes; a sender that leaves is followed by a wait for the next one; close() ends a wait at once."""
    port = _free_udp_port()
    capture = CaptureThread(f"srt://127.0.0.1:{port}?mode=listener", open_timeout_s=3, reconnect_delay_s=0.1)
    opened = threading.Thread(target=capture.start, daemon=True)
    opened.start()
    _wait_for(lambda: _bound(port), 20, "the listener")
    time.sleep(4)  # longer than the open timeout: a listener is not given up
    assert opened.is_alive() and capture.error is None
    senders = [_send(f"srt://127.0.0.1:{port}", 4, "red")]
    try:
        opened.join(20)
        assert not opened.is_alive() and capture.size == (96, 80)
        first = capture.take(10.0)
        assert first is not None and first.frame[40, 48, 0] > 240
        senders[0].wait(20)  # the first sender is done: the listener waits for the next
        senders.append(_send(f"srt://127.0.0.1:{port}", 10, "blue"))
        deadline = time.monotonic() + 30
        while True:
            item = capture.take(1.0)
            if item is not None and item.frame[40, 48, 2] > 240:
                break  # the second sender's picture
            assert time.monotonic() < deadline and not capture.ended, capture.error
        assert item.index > first.index and capture.reconnects >= 1
    finally:
        start = time.monotonic()
        capture.close()
        for sender in senders:
            sender.kill()
            sender.wait()
    assert time.monotonic() - start < 5
    _wait_for(lambda: not _bound(port), 20, "the listener's port to be free")  # its ffmpeg is gone


@needs_srt
def test_ctrl_c_while_a_run_waits_for_its_sender_ends_it_and_its_listener(tmp_path):
    port = _free_udp_port()
    threading.Timer(2.0, _thread.interrupt_main).start()  # Ctrl-C while nobody has called yet
    argv = ["-i", f"srt://127.0.0.1:{port}?mode=listener", "-o", str(tmp_path / "out.avi"), "--model",
            "tiny-random", "--device", "cpu", "--size", "64"]
    assert cli.main(["run", *argv]) == 130  # before the model loads: nothing to finalize
    _wait_for(lambda: not _bound(port), 20, "the listener's port to be free")


@needs_srt
def test_a_server_waiting_for_its_sender_stops_at_once(engine):
    """`serve --source srt://...?mode=listener` with no sender yet: viewers are told it waits; the server stops
    without waiting for one, and its listener goes with it."""
    import asyncio
    import json

    from websockets.asyncio.client import connect

    from turbostream.config import ServerConfig
    from turbostream.serve import TurboServer
    from turbostream.serve.server import default_capture

    port = _free_udp_port()

    async def main():
        server = TurboServer(engine, ServerConfig(port=0, source=f"srt://127.0.0.1:{port}?mode=listener"),
                             capture_factory=default_capture)
        await server.start()
        try:
            assert await server.wait_ready(30)
            async with connect(f"ws://127.0.0.1:{server.port}/view/ws") as viewer:
                async with asyncio.timeout(20):
                    while True:
                        message = json.loads(await viewer.recv())
                        if message["type"] == "source" and "waiting for a sender" in message["message"]:
                            break
            await asyncio.to_thread(_wait_for, lambda: _bound(port), 20, "the listener")
        finally:
            start = time.monotonic()
            await server.stop()
            assert time.monotonic() - start < 10
        await asyncio.to_thread(_wait_for, lambda: not _bound(port), 20, "the listener's port to be free")

    asyncio.run(asyncio.wait_for(main(), 90))


@needs_srt
def test_a_listener_whose_port_is_taken_fails_at_once():
    """Not a wait for a sender that can never call (nor an ffmpeg started again and again): an error."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        start = time.monotonic()
        with pytest.raises(SourceError, match="Address already in use"):
            CaptureThread(f"srt://127.0.0.1:{taken.getsockname()[1]}?mode=listener").start()
    assert time.monotonic() - start < 5
