"""Stream and virtual-camera outputs of `turbostream run` (and `serve --publish`): H.264 over udp:// read back by
FFmpeg, an unreachable rtmp:// target that fails clearly while the other outputs go on, write() that never blocks,
and -o virtualcam without a backend. CPU, tiny-random, loopback only."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_server import FakeCapture

from turbostream import cli
from turbostream.cli import run as cli_run
from turbostream.codec import fit_frame
from turbostream.errors import SinkError
from turbostream.io import sinks
from turbostream.io.ffmpeg import FFMPEG_ENV
from turbostream.io.sources import redact
from turbostream.io.stream import StreamSink, check_stream_output

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg program (apt-get install ffmpeg)")
CLI_MODEL = ["--model", "tiny-random", "--device", "cpu", "--size", "64"]


def _video(path: Path, n: int, fps: float) -> str:
    """n frames whose top half is bright and bottom half dark: a picture a codec keeps."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (96, 80))
    for k in range(n):
        frame = np.full((80, 96, 3), 30, np.uint8)
        frame[:40] = 220
        frame[:, :8] = (k * 8) % 256
        writer.write(frame)
    writer.release()
    return str(path)


def _parse_run(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_run.add_parser(parser.add_subparsers())
    return parser.parse_args(["run", *argv])


def _free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PassEngine:
    """Stands in for Engine: the fitted frame back, as fast as asked."""

    width = height = 64
    max_batch = 1
    model_name, random_weights, loras = "fake", False, ()

    def warmup(self):
        pass

    def run(self, frames, params):
        return [fit_frame(f, 64, 64) for f in frames]



def _udp_receiver(tmp_path, frames: int):
    """An ffmpeg listening on a free UDP port (it listens first: UDP has no connection), decoding `frames` frames
    into PNGs under tmp_path/received, or giving up after 30 s: (process, port, folder)."""
    port = _free_port(socket.SOCK_DGRAM)
    out = tmp_path / "received"
    out.mkdir()
    receiver = subprocess.Popen(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-probesize", "32768", "-analyzeduration", "2000000",
         "-i", f"udp://127.0.0.1:{port}?timeout=30000000", "-frames:v", str(frames), str(out / "frame_%03d.png")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    return receiver, port, out


@pytest.fixture(autouse=True)
def _no_model_loading(monkeypatch):
    """Outputs are checked (a virtual camera opened) before the model loads: a test that reaches loading fails."""

    def refuse(args):
        raise AssertionError("build_engine called before the outputs were checked")

    monkeypatch.setattr(cli_run, "build_engine", refuse)


@needs_ffmpeg
def test_udp_stream_is_read_back_by_ffmpeg(tmp_path, make_engine, caplog):
    caplog.set_level(logging.INFO, logger="turbostream")
    receiver, port, out = _udp_receiver(tmp_path, frames=10)
    try:
        src = _video(tmp_path / "in.avi", n=60, fps=20)  # 3 s, played in real time: a stream is live
        args = _parse_run("-i", src, "-o", f"udp://127.0.0.1:{port}")
        t0 = time.perf_counter()
        assert cli_run.main(args, engine=make_engine()) == 0
        assert time.perf_counter() - t0 > 2.5  # real time kept: 60 frames at 20 fps
        assert receiver.wait(30) == 0, receiver.stderr.read()
    finally:
        if receiver.poll() is None:
            receiver.kill()
    frames = [cv2.imread(str(p)) for p in sorted(out.glob("frame_*.png"))]
    assert len(frames) == 10
    assert all(f.shape == (64, 64, 3) for f in frames)  # the engine's size
    assert max(float(f.std()) for f in frames) > 5  # pictures, not a gray stream
    assert any(f"udp://127.0.0.1:{port}: " in r.getMessage() and "frames streamed" in r.getMessage()
               for r in caplog.records)


@needs_ffmpeg
def test_unreachable_rtmp_errors_clearly_and_the_other_outputs_go_on(tmp_path, caplog, capsys):
    """The stream's failures never stop the run, and the file gets every frame; but a stream no frame ever reached
    ends the run with status 1 (it said "done" and 0: a script pushing to a server that was down read success)."""
    caplog.set_level(logging.INFO, logger="turbostream")
    port = _free_port()  # nothing listens there: connection refused
    url = f"rtmp://127.0.0.1:{port}/live/s3cretStreamKey"
    video = tmp_path / "out.avi"
    src = _video(tmp_path / "in.avi", n=30, fps=20)
    t0 = time.perf_counter()
    assert cli_run.main(_parse_run("-i", src, "-o", url, "-o", str(video)), engine=PassEngine()) == 1
    err = capsys.readouterr().err
    assert f"turbostream: error: no frame reached rtmp://127.0.0.1:{port}/live/*** (" in err and "Connection" in err
    assert time.perf_counter() - t0 < 1.5 + 10  # the failing stream did not hold the run up
    cap = cv2.VideoCapture(str(video))
    count = 0
    while cap.read()[0]:
        count += 1
    assert count >= 25  # the file got the run (a live run keeps time: dropped frames are stood in for)
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert f"cannot stream to rtmp://127.0.0.1:{port}/live/***" in log
    assert "Connection refused" in log and "trying again in 1 s" in log
    assert "failed attempts" in log  # the summary line of the output
    assert "s3cretStreamKey" not in log


def test_frames_sent_to_a_target_that_never_answered_are_not_counted_as_streamed(tmp_path):
    """A run that ends while ffmpeg still connects (a TCP port that accepts and never answers RTMP's handshake): the
    summary said "8 frames streamed" though nothing was received. They count as a failed attempt now."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepts into the backlog, never reads or answers
    try:
        url = f"rtmp://127.0.0.1:{listener.getsockname()[1]}/live/key"
        sink = StreamSink(url, 20, (64, 64))
        frame = np.zeros((64, 64, 3), np.uint8)
        for k in range(8):
            sink.write(frame, k)
            time.sleep(0.05)
        sink.close(timeout_s=1.0)
        assert sink.frames_sent == 0 and sink.failures == 1, sink.describe()
        assert "0 frames streamed" in sink.describe() and "not streaming yet when the run ended" in sink.describe()
    finally:
        listener.close()


def test_write_never_blocks_on_a_stalled_receiver(tmp_path):
    # A "ffmpeg" that never reads its input: the sender thread blocks on the pipe; write() must not.
    stalled = tmp_path / "stalled-ffmpeg"
    stalled.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    stalled.chmod(0o755)
    sink = StreamSink("udp://127.0.0.1:9", 30, (256, 256), program=str(stalled))
    frame = np.zeros((256, 256, 3), np.uint8)
    t0 = time.perf_counter()
    for k in range(300):  # 59 MB of frames, far more than a pipe holds
        sink.write(frame, k)
    assert time.perf_counter() - t0 < 0.5
    assert sink.frames_in == 300 and sink.replaced >= 250  # newest frame wins; nothing queues
    t0 = time.perf_counter()
    sink.close(timeout_s=1.0)  # the stuck child is killed
    assert time.perf_counter() - t0 < 10


def test_ffmpeg_runs_in_a_session_of_its_own(tmp_path):
    """A terminal's Ctrl-C goes to its whole foreground process group: ffmpeg there died with the run's first Ctrl-C
    (a failed attempt, unflushed packets). It is in a session of its own, ended by the sink alone."""
    sleeper = tmp_path / "sleeping-ffmpeg"
    sleeper.write_text(f"#!{sys.executable}\nimport sys\nsys.stdin.buffer.read()\n")
    sleeper.chmod(0o755)
    sink = StreamSink("udp://127.0.0.1:9", 30, (64, 64), program=str(sleeper))
    sink.write(np.zeros((64, 64, 3), np.uint8), 0)
    deadline = time.monotonic() + 10
    while sink._proc is None and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert sink._proc is not None
        assert os.getsid(sink._proc.pid) == sink._proc.pid != os.getsid(0)
        assert os.getpgid(sink._proc.pid) != os.getpgrp()
    finally:
        sink.close(timeout_s=5.0)


def test_stream_urls_are_checked_before_the_model_loads(monkeypatch, capsys, tmp_path):
    src = _video(tmp_path / "in.avi", n=2, fps=10)
    assert cli.main(["run", "-i", src, "-o", "ftp://example.com/x", *CLI_MODEL]) == 2
    assert "stream URLs start with rtmp://" in capsys.readouterr().err
    assert cli.main(["run", "-i", src, "-o", "rtmp:///live/key", *CLI_MODEL]) == 2
    assert "names no host" in capsys.readouterr().err
    # udp:// and srt:// have no default port: ffmpeg failed on every attempt, and the run said "done" with 0 frames.
    for url in ("udp://127.0.0.1", "srt://127.0.0.1?mode=caller"):
        assert cli.main(["run", "-i", src, "-o", url, *CLI_MODEL]) == 2
        assert "names no port" in capsys.readouterr().err
    assert cli.main(["run", "-i", src, "-o", "udp://127.0.0.1:99999", *CLI_MODEL]) == 2
    assert "port that is not a number" in capsys.readouterr().err
    monkeypatch.setenv(FFMPEG_ENV, str(tmp_path / "no-such-ffmpeg"))
    assert cli.main(["run", "-i", src, "-o", "srt://127.0.0.1:9000?passphrase=hunter22", *CLI_MODEL]) == 2
    err = capsys.readouterr().err
    assert "no ffmpeg program was found" in err and "apt-get install ffmpeg" in err and "hunter22" not in err
    with pytest.raises(SinkError, match="no ffmpeg program"):
        check_stream_output("udp://127.0.0.1:9000")
    # serve names its own option (it has no -o)
    assert cli.main(["serve", "--source", src, "--publish", "udp://127.0.0.1:9000", "--port", "0", *CLI_MODEL]) == 2
    assert "error: --publish udp://127.0.0.1:9000 streams through FFmpeg" in capsys.readouterr().err


def test_stream_secrets_are_redacted():
    assert redact("rtmp://a.rtmp.youtube.com/live2/abcd-1234") == "rtmp://a.rtmp.youtube.com/live2/***"
    assert redact("rtmps://user:pw@host/app/key?x=1") == "rtmps://user:***@host/app/***?x=1"
    assert redact("srt://h:9000?mode=caller&passphrase=p4ss&streamid=publish:cam") == \
        "srt://h:9000?mode=caller&passphrase=***&streamid=***"
    assert redact("udp://239.0.0.1:5000?pkt_size=1316") == "udp://239.0.0.1:5000?pkt_size=1316"
    # inputs too: the one redaction names sources and outputs alike (inputs showed tokens and stream keys)
    assert redact("https://cam.example/live.m3u8?token=SECRET123") == "https://cam.example/live.m3u8?token=***"
    assert redact("rtsp://user:pw@cam.local/stream") == "rtsp://user:***@cam.local/stream"


def test_virtualcam_without_the_package_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)  # import pyvirtualcam -> ImportError
    src = _video(tmp_path / "in.avi", n=2, fps=10)
    assert cli.main(["run", "-i", src, "-o", "virtualcam", *CLI_MODEL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("turbostream: error: -o virtualcam needs the pyvirtualcam package")
    assert "pip install pyvirtualcam" in err and "Traceback" not in err


def test_virtualcam_without_a_backend_says_what_to_install(tmp_path, capsys):
    pytest.importorskip("pyvirtualcam")
    if sys.platform.startswith("linux") and any(Path("/sys/devices/virtual/video4linux").glob("video*")):
        pytest.skip("this machine has a v4l2loopback device: the camera would open")
    src = _video(tmp_path / "in.avi", n=2, fps=10)
    assert cli.main(["run", "-i", src, "-o", "virtualcam", *CLI_MODEL]) == 2
    err = capsys.readouterr().err
    assert "the virtual camera could not be opened" in err and "Traceback" not in err
    assert ("v4l2loopback" if sys.platform.startswith("linux") else "OBS") in err


# A `turbostream run` into a video file whose writes start failing after `limit` bytes, as on a full disk: the file
# size limit (RLIMIT_FSIZE, `ulimit -f`) makes the kernel refuse writes past it (EFBIG) in this child process alone.
# With "opencv4", VideoWriter.write() returns None whatever happened, as OpenCV 4's does.
_FULL_DISK_CHILD = r"""
import argparse, logging, resource, signal, sys
import cv2
from turbostream.cli import run as cli_run
from turbostream.codec import fit_frame

logging.basicConfig(level=logging.INFO)  # the run's summary, one line per output

src, out, limit, opencv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if opencv == "opencv4":
    VideoWriter = cv2.VideoWriter

    class Writer4:
        def __init__(self, *args):
            self._writer = VideoWriter(*args)
        def isOpened(self):
            return self._writer.isOpened()
        def write(self, frame):
            self._writer.write(frame)
        def release(self):
            self._writer.release()
    cv2.VideoWriter = Writer4

class Engine:
    width = height = 128
    max_batch = 1
    model_name, random_weights, loras = "fake", False, ()
    def warmup(self):
        pass
    def run(self, frames, params):
        return [fit_frame(f, 128, 128) for f in frames]

parser = argparse.ArgumentParser()
cli_run.add_parser(parser.add_subparsers())
args = parser.parse_args(["run", "-i", src, "-o", out])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
sys.exit(cli_run.main(args, engine=Engine()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as Linux applies it")
@pytest.mark.parametrize("suffix, how", [
    (".mp4", "installed"), (".mp4", "opencv4"), (".avi", "installed"), (".avi", "opencv4"),
    pytest.param(".mp4", "ffmpeg", marks=needs_ffmpeg), pytest.param(".mkv", "ffmpeg", marks=needs_ffmpeg),
])
def test_a_video_file_that_cannot_be_written_stops_the_run(tmp_path, suffix, how):
    """Writes that fail mid-run (disk full) end the run with status 1 and the reason, not 0 and a file that does not
    play: caught as they fail where the writer says so (ffmpeg's H.264 writer, OpenCV 5's write()), or where ffmpeg
    could not finish the file, else when the finished file is checked. "installed" and "opencv4" write .mp4 with
    OpenCV (no ffmpeg found); the ffmpeg child inherits the size limit."""
    rng = np.random.default_rng(0)
    src = tmp_path / "in.avi"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 128))
    for _ in range(60):  # noise: every frame costs tens of KB in either codec
        writer.write(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / f"out{suffix}"
    env = dict(os.environ)
    if how != "ffmpeg":
        env[FFMPEG_ENV] = str(tmp_path / "no-such-ffmpeg")
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(src), str(out), "100000", how],
                          capture_output=True, text=True, timeout=120, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "turbostream: error: " in output and str(out) in output and "file size limit of 100000 bytes" in output
    assert f"{out}: FAILED" in output and "Traceback" not in output  # the summary does not claim the frames
    # ...and says what the file left behind holds (where the failure was a write's, which OpenCV 5 reports, or
    # ffmpeg's end; else the check of the finished file says it): an .mp4 cut off before its index holds nothing
    # playable.
    assert (f"{out} is written in mp4v" in output) == (suffix == ".mp4" and how != "ffmpeg")
    if how == "ffmpeg":  # a write fails (ffmpeg stopped taking frames), or ffmpeg's end, where the index goes
        assert "could not be written" in output or "ffmpeg could not finish the file" in output, output
    if "could not be written" in output or "could not finish" in output:
        assert ("the file left does not open (no index): it holds nothing playable" if suffix == ".mp4"
                else "; the file left ") in output, output
    else:
        assert any(f"the finished file {what}" in output for what in ("does not open", "has no index", "holds")), \
            output


def test_a_slow_source_streams_at_one_frame_a_second_at_least():
    """A slideshow's 0.2 fps is kept for a video file; a stream or virtual camera repeats its frames at 1 fps (a
    receiver gives up on a quiet stream, and the paced outputs refuse rates below 1)."""
    stream = sinks.open_sink(sinks.parse_output("udp://127.0.0.1:9"), 0.2, (64, 64))
    video = sinks.open_sink(sinks.parse_output("slides.mp4"), 0.2, (64, 64))
    assert stream.fps == 1.0 and video.fps == 0.2
    stream.close()


def test_outputs_parse():
    assert sinks.parse_output("virtualcam").kind == "virtualcam"
    assert sinks.parse_output("virtualcam:/dev/video10").kind == "virtualcam"
    spec = sinks.parse_output("rtmp://host/live/key")
    assert spec.kind == "stream" and spec.describe() == "rtmp://host/live/***"
    with pytest.raises(SinkError, match="given twice"):
        sinks.check_outputs([sinks.parse_output("virtualcam"), sinks.parse_output("VirtualCam")])


@needs_ffmpeg
def test_serve_publish_streams_the_broadcast_without_viewers(tmp_path, tiny_components):
    """`serve --source SRC --publish udp://...`: the broadcast is stylized for the stream alone and read back."""
    import asyncio

    from turbostream.config import ServerConfig, preset
    from turbostream.engine import Engine
    from turbostream.serve import TurboServer
    from turbostream.serve.integrations import Integrations

    receiver, port, out = _udp_receiver(tmp_path, frames=5)

    async def main():
        server = TurboServer(Engine(preset("test"), tiny_components), ServerConfig(port=0, source="fake"),
                             capture_factory=FakeCapture)
        extras = Integrations(server, publish=(f"udp://127.0.0.1:{port}",), size=(64, 64), fps=20)
        await server.start()
        extras.start(asyncio.get_running_loop())
        try:
            assert await server.wait_ready(30)
            deadline = time.monotonic() + 40
            while receiver.poll() is None:  # no viewer is connected the whole time
                assert time.monotonic() < deadline, "the receiver got no stream"
                await asyncio.sleep(0.1)
            while b"turbostream_publish_up 1.0" not in server.metrics.render():  # up after 2 s of streaming
                assert time.monotonic() < deadline + 10, "the publisher never counted as up"
                await asyncio.sleep(0.1)
        finally:
            await server.stop()
            await asyncio.get_running_loop().run_in_executor(None, extras.stop)
        return extras.publishers[0]

    try:
        publisher = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        if receiver.poll() is None:
            receiver.kill()
    assert receiver.returncode == 0, receiver.stderr.read()
    frames = [cv2.imread(str(p)) for p in sorted(out.glob("frame_*.png"))]
    assert len(frames) == 5 and all(f.shape == (64, 64, 3) for f in frames)
    assert publisher.failures == 0 and publisher.frames_sent > 0


def test_a_video_name_with_a_colon_is_written_where_it_says(tmp_path, monkeypatch):
    """FFmpeg read "rec-10" of a relative "rec-10:30.mp4" as a protocol: the run loaded the model, then failed to
    open the file (and "file:clip.mp4" wrote clip.mp4). The writer gets the absolute path."""
    monkeypatch.chdir(tmp_path)
    src = _video(tmp_path / "in.avi", n=5, fps=10)
    assert cli_run.main(_parse_run("-i", src, "-o", "rec-10:30.mp4"), engine=PassEngine()) == 0
    cap = cv2.VideoCapture(str(tmp_path / "rec-10:30.mp4"))
    assert cap.read()[0]


def test_output_dash_is_refused_not_a_folder_named_dash(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a folder named "-" would be made
    src = _video(tmp_path / "in.avi", n=2, fps=10)
    assert cli.main(["run", "-i", str(src), "-o", "-", *CLI_MODEL]) == 2
    assert "output '-' (standard output) is not supported" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()


def test_the_published_stream_ends_when_the_source_file_ends(tmp_path, tiny_components):
    """`serve --source FILE --publish URL`: viewers got source_ended, but the publisher went on sending the last
    frame for as long as the server ran (a media server recording a still image, publish_up saying all was well).
    The stream ends with the source now."""
    import asyncio

    from turbostream.config import ServerConfig, preset
    from turbostream.engine import Engine
    from turbostream.serve import TurboServer
    from turbostream.serve.integrations import Integrations
    from turbostream.serve.server import default_capture

    src = _video(tmp_path / "in.avi", n=40, fps=10)  # 4 s

    async def main():
        server = TurboServer(Engine(preset("test"), tiny_components), ServerConfig(port=0, source=src),
                             capture_factory=default_capture)
        extras = Integrations(server, publish=(f"udp://127.0.0.1:{_free_port()}",), size=(64, 64), fps=10)
        await server.start()
        extras.start(asyncio.get_running_loop())
        try:
            assert await server.wait_ready(30)
            deadline = time.monotonic() + 30
            seen_up = False
            while True:
                up = b"turbostream_publish_up 1.0" in server.metrics.render()
                seen_up = seen_up or up
                if seen_up and not up:
                    break
                assert time.monotonic() < deadline, f"the stream never ended (up at some point: {seen_up})"
                await asyncio.sleep(0.1)
            assert server.broadcast.state["state"] == "ended"
        finally:
            await server.stop()
            await asyncio.get_running_loop().run_in_executor(None, extras.stop)
        return extras.publishers[0]

    publisher = asyncio.run(asyncio.wait_for(main(), 60))
    assert publisher.failures == 0 and 20 <= publisher.frames_sent <= 80  # about the file's 4 s at 10 fps


def test_a_looped_source_file_goes_on_past_its_end(tmp_path, tiny_components, capsys):
    """`serve --source FILE --loop`: an installation's file plays again at its end, and the broadcast (and its
    published streams) go on; `--loop` on a camera is refused before the model loads."""
    import asyncio
    import functools

    from test_audio import TimesWritten

    from turbostream.config import ServerConfig, preset
    from turbostream.engine import Engine
    from turbostream.serve import TurboServer
    from turbostream.serve.server import default_capture

    src = _video(tmp_path / "in.avi", n=10, fps=10)  # 1 s

    async def main():
        server = TurboServer(Engine(preset("test"), tiny_components), ServerConfig(port=0, source=src),
                             capture_factory=functools.partial(default_capture, loop=True))
        server.broadcast.outputs.append(output)  # the broadcast runs for an output (as for --publish)
        await server.start()
        try:
            assert await server.wait_ready(30)
            deadline = time.monotonic() + 30
            while len(output.times) < 25:  # two and a half passes of the file
                assert time.monotonic() < deadline and server.broadcast.state["state"] != "ended"
                await asyncio.sleep(0.1)
        finally:
            await server.stop()

    output = TimesWritten()
    asyncio.run(asyncio.wait_for(main(), 60))
    assert output.times == sorted(output.times) and output.times[-1] >= 2.0  # the times go on across passes
    assert cli.main(["serve", "--source", "0", "--loop", *CLI_MODEL]) == 2
    assert "--loop plays a --source video file or folder of images again at its end" in capsys.readouterr().err


def test_one_frame_stands_in_for_at_most_max_repeat_missing_ones(tmp_path):
    """A live run's video keeps the source's timing by repeating a frame for those dropped before the next; a
    stalled source or a clock jump (frame 0, then 10,000) wrote no more than MAX_REPEAT copies, not 10,000."""
    sink = sinks.VideoSink(tmp_path / "gap.avi", 30, (32, 32), fill_gaps="index")
    frame = np.zeros((32, 32, 3), np.uint8)
    sink.write(frame, 0)
    sink.write(frame, 10_000)
    sink.close()
    assert sink.frames_written == 1 + sinks.VideoSink.MAX_REPEAT
