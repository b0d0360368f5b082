"""`run`'s video files keep the source file's sound (io/audio.py): copied or encoded per container, cut to the
video, on its frames; and nothing lost when ffmpeg is missing or fails."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_control import _free_udp_port
from test_runner import FakeEngine, index_of, make_video, parse, read_video

from turbostream.cli import run as cli_run
from turbostream.io.audio import audio_arguments, parse_audio_stream
from turbostream.io.ffmpeg import FFMPEG_ENV

FFMPEG, FFPROBE = shutil.which("ffmpeg"), shutil.which("ffprobe")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None or FFPROBE is None,
                                  reason="needs ffmpeg and ffprobe (apt-get install ffmpeg)")
RATE = 48000


def with_sound(video: Path, out: Path, sound: str, codec: str, seconds: float) -> Path:
    """`video`'s frames (copied) with the lavfi audio `sound` encoded by `codec`, `seconds` long."""
    subprocess.run([FFMPEG, "-loglevel", "error", "-y", "-i", str(video), "-f", "lavfi", "-i", sound,
                    "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", codec, "-t", f"{seconds}", str(out)],
                   check=True)
    return out


def streams(path: Path) -> dict[str, tuple[str, float | None]]:
    """{codec_type: (codec_name, duration_s)} of a file's first video and audio streams, as ffprobe reads them."""
    lines = subprocess.run([FFPROBE, "-v", "error", "-show_entries", "stream=codec_type,codec_name,duration",
                            "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout
    found: dict[str, tuple[str, float | None]] = {}
    for line in lines.split():
        name, kind, duration = line.split(",")[:3]
        found.setdefault(kind, (name, float(duration) if duration not in ("", "N/A") else None))
    return found


def sound_of(path: Path) -> np.ndarray:
    """The file's sound as mono 16-bit samples at RATE."""
    raw = subprocess.run([FFMPEG, "-loglevel", "error", "-i", str(path), "-map", "0:a:0", "-f", "s16le", "-ac", "1",
                          "-ar", str(RATE), "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.int16)


def run(*argv: str, engine=None) -> int:
    return cli_run.main(parse("run", *argv), engine=engine or FakeEngine(max_batch=4))


@pytest.fixture
def clip(tmp_path) -> Path:
    """3 s at 10 fps of indexed frames, with 1 s of silence then a 440 Hz tone (AAC in MP4)."""
    frames = make_video(tmp_path / "frames.mp4", n=30, fps=10)
    tone = f"aevalsrc=if(gte(t\\,1)\\,0.5*sin(2*PI*440*t)\\,0):s={RATE}:d=3"
    return with_sound(frames, tmp_path / "clip.mp4", tone, "aac", 3)


# ------------------------------------------------------------------------------------------------ unit


def test_the_first_audio_stream_is_read_from_ffmpegs_listing():
    listing = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'in.mp4':
  Duration: 00:00:03.00, start: 0.000000, bitrate: 135 kb/s
  Stream #0:0[0x1](und): Video: mpeg4 (Simple Profile) (mp4v / 0x7634706D), yuv420p, 96x80, 10 fps (default)
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, stereo, fltp, 69 kb/s (default)
  Stream #0:2[0x3](eng): Audio: ac3, 44100 Hz, 5.1(side), fltp, 384 kb/s
At least one output file must be specified"""
    assert parse_audio_stream(listing) == ("aac", "aac, 48000 Hz, stereo")
    assert parse_audio_stream("  Stream #0:1: Audio: pcm_s16le, 44100 Hz, mono, s16, 705 kb/s") == \
        ("pcm_s16le", "pcm_s16le, 44100 Hz, mono")
    assert parse_audio_stream("  Stream #0:0: Video: h264, yuv420p, 640x480\n  Stream #0:1: Data: none") is None


@pytest.mark.parametrize("suffix, codec, ways", [
    (".mp4", "aac", [("-c:a", "copy"), ("-c:a", "aac", "-b:a", "192k")]),
    (".MP4", "opus", [("-c:a", "aac", "-b:a", "192k")]),  # opus in .mp4 plays in few players: encoded
    (".mkv", "opus", [("-c:a", "copy"), ("-c:a", "aac", "-b:a", "192k")]),
    (".avi", "aac", [("-c:a", "pcm_s16le")]),
    (".avi", "mp3", [("-c:a", "copy"), ("-c:a", "pcm_s16le")]),
])
def test_sound_is_copied_where_the_container_takes_it_else_encoded(suffix, codec, ways):
    assert audio_arguments(suffix, codec) == ways


# ------------------------------------------------------------------------------------------------ end to end


@needs_ffmpeg
@pytest.mark.parametrize("suffix, codec", [(".mp4", "aac"), (".mov", "aac"), (".mkv", "aac"), (".avi", "pcm_s16le")])
def test_a_video_file_keeps_its_sound_on_its_frames(tmp_path, clip, caplog, suffix, codec):
    """Every frame, in order, and the sound beside them: the tone starts at the frame it started on (1 s)."""
    out = tmp_path / f"styled{suffix}"
    with caplog.at_level(logging.INFO, logger="turbostream"):
        assert run("-i", str(clip), "-o", str(out)) == 0
    frames, fps = read_video(out)
    assert [index_of(f) for f in frames] == list(range(30)) and fps == pytest.approx(10.0)
    found = streams(out)
    assert found["audio"][0] == codec  # AAC copied into .mp4/.mov/.mkv; PCM into .avi
    samples = sound_of(out)
    assert len(samples) / RATE == pytest.approx(3.0, abs=0.05)
    onset = np.flatnonzero(np.abs(samples.astype(np.int32)) > 3000)[0] / RATE
    assert onset == pytest.approx(1.0, abs=0.03)
    assert "sound: aac, 48000 Hz, mono, kept in the video files and streams" in caplog.text
    written = "MJPG" if suffix == ".avi" else "H.264"
    assert f"styled{suffix}: 30 frames, 64x64 {written}, 10 fps, 3.0 s, with the source's sound (aac, 48000 Hz, " \
           "mono)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["frames.mp4", "clip.mp4", out.name])  # no leftovers


@needs_ffmpeg
def test_the_sound_is_cut_where_the_video_ends(tmp_path, clip):
    """--max-frames 12 of 10 fps: 1.2 s of video, and 1.2 s of sound (not the source's 3)."""
    out = tmp_path / "start.mp4"
    assert run("-i", str(clip), "-o", str(out), "--max-frames", "12") == 0
    assert len(read_video(out)[0]) == 12
    assert len(sound_of(out)) / RATE == pytest.approx(1.2, abs=0.05)


@needs_ffmpeg
def test_a_realtime_run_keeps_its_sound_in_step(tmp_path, clip):
    """--realtime drops frames the engine cannot keep up with and repeats the last one in their place: the video
    keeps the source's time, so the sound still fits it."""
    out = tmp_path / "live.mp4"
    assert run("-i", str(clip), "-o", str(out), "--realtime", engine=FakeEngine(max_batch=1, delay=0.15)) == 0
    frames, _ = read_video(out)
    indices = [index_of(f) for f in frames]
    assert len(set(indices)) < len(indices)  # frames were dropped and filled
    assert abs(len(frames) - 30) <= 2
    assert len(sound_of(out)) / RATE == pytest.approx(len(frames) / 10, abs=0.05)


@needs_ffmpeg
def test_an_opus_sound_is_encoded_for_mp4_and_copied_into_mkv(tmp_path):
    frames = make_video(tmp_path / "frames.mkv", n=20, fps=10)
    src = with_sound(frames, tmp_path / "opus.mkv", f"sine=frequency=300:sample_rate={RATE}", "libopus", 2)
    assert run("-i", str(src), "-o", str(tmp_path / "a.mp4"), "-o", str(tmp_path / "b.mkv")) == 0
    assert streams(tmp_path / "a.mp4")["audio"][0] == "aac"
    assert streams(tmp_path / "b.mkv")["audio"][0] == "opus"


@needs_ffmpeg
def test_a_silent_source_or_no_audio_gives_a_silent_video(tmp_path, clip, caplog):
    silent = make_video(tmp_path / "silent.mp4", n=10, fps=10)
    with caplog.at_level(logging.INFO, logger="turbostream"):
        assert run("-i", str(silent), "-o", str(tmp_path / "a.mp4")) == 0
        assert run("-i", str(clip), "-o", str(tmp_path / "b.mp4"), "--no-audio") == 0
    assert "audio" not in streams(tmp_path / "a.mp4") and "audio" not in streams(tmp_path / "b.mp4")
    assert "sound" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_without_ffmpeg_the_video_is_written_silent_and_said_so_before_the_model_loads(tmp_path, clip, caplog,
                                                                                        monkeypatch):
    monkeypatch.setenv(FFMPEG_ENV, str(tmp_path / "no-such-ffmpeg"))
    said_before_loading = []
    engine = FakeEngine(on_run=lambda e, f: said_before_loading.append("no ffmpeg program" in caplog.text))
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="turbostream"):
        assert run("-i", str(clip), "-o", str(out), engine=engine) == 0
    assert said_before_loading and said_before_loading[0]
    assert f"no ffmpeg program was found, so {out} is written without any sound {clip} has" in caplog.text
    assert len(read_video(out)[0]) == 30
    if FFPROBE:
        assert "audio" not in streams(out)


def fake_ffmpeg(tmp_path: Path, remux: str) -> Path:
    """An ffmpeg that reads files as the real one does and runs `remux` (shell) in place of a remux; $OUT is the
    file it was asked to write."""
    script = tmp_path / "fake-ffmpeg"
    script.write_text(f"""#!/bin/sh
for last; do :; done
case " $* " in
  *" -map "*) OUT="$last"; {remux} ;;
  *) exec {FFMPEG} "$@" ;;
esac
""")
    script.chmod(0o755)
    return script


@needs_ffmpeg
@pytest.mark.parametrize("remux, reason", [
    ('echo "$OUT: No space left on device" >&2; exit 1', "ffmpeg exited with status 1: .*No space left on device"),
    ('head -c 5000 /dev/urandom > "$OUT"', "the remuxed file failed its check: the finished file does not open"),
], ids=["ffmpeg-fails", "ffmpeg-writes-garbage"])
def test_a_failed_remux_keeps_the_silent_video_whole(tmp_path, clip, caplog, monkeypatch, remux, reason):
    """Nothing lost for the sound's sake: the video as written, every frame, the run a success, the reason said,
    and no hidden file left beside it."""
    monkeypatch.setenv(FFMPEG_ENV, str(fake_ffmpeg(tmp_path, remux)))
    out = tmp_path / "out" / "styled.mp4"
    with caplog.at_level(logging.INFO, logger="turbostream"):
        assert run("-i", str(clip), "-o", str(out)) == 0
    frames, _ = read_video(out)
    assert [index_of(f) for f in frames] == list(range(30))
    assert "audio" not in streams(out)
    assert os.listdir(out.parent) == ["styled.mp4"]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "is kept without the sound of clip.mp4" in warning[0]
    assert re.search(f"styled.mp4: 30 frames, .*, without the source's sound: {reason}", caplog.text)


@needs_ffmpeg
def test_a_variable_frame_rate_file_keeps_its_pictures_on_its_sound(tmp_path, caplog):
    """A file whose frames come 0.1 s apart for 2 s, then 0.3 s apart (phones record such files): the video is
    written at its average rate with each frame placed at its time in the file (held over the longer intervals, left
    out where two fall in one slot), so the picture at any moment is the source's picture then, and the sound, copied
    as it is, stays on it. Written one frame after another at the average rate (as before), the first part played
    slow and the second fast: the pictures of the second part came up to a second off their sound."""
    frames = make_video(tmp_path / "frames.avi", n=30, fps=10)
    vfr = tmp_path / "vfr.mp4"
    subprocess.run([FFMPEG, "-loglevel", "error", "-y", "-i", str(frames), "-f", "lavfi", "-i",
                    f"sine=frequency=440:sample_rate={RATE}", "-map", "0:v", "-map", "1:a",
                    "-vf", "setpts='if(lt(N,20),N/10,2+(N-20)*0.3)/TB'", "-fps_mode", "vfr", "-c:v", "mpeg4",
                    "-q:v", "2", "-c:a", "aac", "-t", "5", str(vfr)], check=True)
    probe = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v", "-show_entries", "packet=pts_time",
                            "-of", "csv=p=0", str(vfr)], capture_output=True, text=True, check=True).stdout
    times = sorted(float(t) for t in probe.split())  # frame k's time in the file, s (as its container rounds them)
    assert len(times) == 30 and max(b - a for a, b in zip(times, times[1:])) > 0.15 + min(b - a for a, b in
                                                                                          zip(times, times[1:]))
    out = tmp_path / "styled.mp4"
    with caplog.at_level(logging.INFO, logger="turbostream"):
        assert run("-i", str(vfr), "-o", str(out)) == 0
    written, fps = read_video(out)
    assert fps < 9.5  # the file's average rate (30 frames in about 5 s), not the 10 of its first part
    shown = [index_of(f) for f in written]
    for slot, index in enumerate(shown):
        # What the source shows then, half a slot either way: the frames shown at some moment of that span.
        start, end = (slot - 0.5) / fps, (slot + 0.5) / fps
        could_be = {k for k, t in enumerate(times) if t <= end and (k + 1 == len(times) or times[k + 1] > start)}
        assert index in could_be, (slot, index, could_be)
    assert set(shown) >= set(range(20, 30))  # every frame of the slow part shows
    assert len(sound_of(out)) / RATE == pytest.approx(len(written) / fps, abs=0.05)
    assert re.search(r"styled.mp4: \d+ frames, .* \((\d+) repeated and (\d+) left out to keep the source's timing\)",
                     caplog.text)


@needs_ffmpeg
def test_a_file_streamed_live_carries_its_sound_beside_its_pictures(tmp_path, clip, caplog):
    """`run -i clip.mp4 -o udp://...`: the stream has the file's sound (AAC), which starts where the pictures do and
    goes at the same real-time pace, so the tone that starts at source frame 10 (1 s) is heard when frame 10 shows."""
    receiver, port, received = _ts_receiver(tmp_path)
    try:
        with caplog.at_level(logging.INFO, logger="turbostream"):
            assert run("-i", str(clip), "-o", f"udp://127.0.0.1:{port}") == 0
        receiver.wait(30)
    finally:
        receiver.kill()
        receiver.wait()
    assert "with the source's sound (aac, 48000 Hz, mono)" in caplog.text
    assert streams(received)["audio"][0] == "aac"
    # When frame 10 shows, and when the tone starts, on the stream's clock.
    shown_at = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time",
                               "-of", "csv=p=0", str(received)], capture_output=True, text=True, check=True).stdout
    times = [float(t.split(",")[0]) for t in shown_at.split()]
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    subprocess.run([FFMPEG, "-loglevel", "error", "-i", str(received), "-map", "0:v:0", "-fps_mode", "passthrough",
                    str(frames_dir / "%04d.png")], check=True)
    import cv2

    shown = [index_of(cv2.imread(str(p))) for p in sorted(frames_dir.iterdir())]
    assert len(shown) == len(times) and max(shown) >= 20
    frame10_at = times[next(k for k, index in enumerate(shown) if index >= 10)]
    audio_start = float(subprocess.run([FFPROBE, "-v", "error", "-select_streams", "a:0", "-show_entries",
                                        "stream=start_time", "-of", "csv=p=0", str(received)],
                                       capture_output=True, text=True, check=True).stdout.split()[0].strip(","))
    samples = sound_of(received)
    tone_at = audio_start + np.flatnonzero(np.abs(samples.astype(np.int32)) > 3000)[0] / RATE
    assert abs(tone_at - frame10_at) < 0.4, (tone_at, frame10_at)  # the run's latency: a frame here


def _ts_receiver(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """An ffmpeg listening on a free UDP port, copying what comes into received.ts: (process, port, file). Listening
    first (UDP has no connection); a small probe, so that it keeps the stream's first seconds; it ends by itself
    after 25 video frames (a signal would interrupt its writing too)."""
    port = _free_udp_port()
    received = tmp_path / "received.ts"
    receiver = subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-probesize", "32768",
                                 "-analyzeduration", "2000000", "-i", f"udp://127.0.0.1:{port}?timeout=30000000",
                                 "-map", "0", "-c", "copy", "-frames:v", "25", "-shortest", str(received)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return receiver, port, received


@needs_ffmpeg
def test_a_servers_published_file_carries_its_sound(tmp_path, clip, tiny_components):
    """`serve --source clip.mp4 --publish udp://...`: the published stream has the file's sound, starting with the
    pictures (at the time in the file of the first frame published)."""
    import asyncio

    from turbostream.config import ServerConfig, preset
    from turbostream.engine import Engine
    from turbostream.io.audio import probe_audio
    from turbostream.serve import TurboServer
    from turbostream.serve.integrations import Integrations
    from turbostream.serve.server import default_capture

    receiver, port, received = _ts_receiver(tmp_path)

    async def main():
        server = TurboServer(Engine(preset("test"), tiny_components), ServerConfig(port=0, source=str(clip)),
                             capture_factory=default_capture)
        extras = Integrations(server, publish=(f"udp://127.0.0.1:{port}",), size=(64, 64), fps=10,
                              audio=probe_audio(FFMPEG, clip))
        await server.start()
        extras.start(asyncio.get_running_loop())
        try:
            assert await server.wait_ready(30)
            await asyncio.to_thread(receiver.wait, 40)
        finally:
            await server.stop()
            await asyncio.get_running_loop().run_in_executor(None, extras.stop)
        return extras.publishers[0]

    try:
        publisher = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        receiver.kill()
        receiver.wait()
    assert "with the source's sound (aac, 48000 Hz, mono)" in publisher.describe()
    found = streams(received)
    assert found["audio"][0] == "aac" and found["video"][0] == "h264"
    starts = subprocess.run([FFPROBE, "-v", "error", "-show_entries", "stream=codec_type,start_time", "-of",
                             "csv=p=0", str(received)], capture_output=True, text=True, check=True).stdout.split()
    start = {kind: float(at) for kind, at in (line.split(",")[:2] for line in starts if "," in line)}
    assert abs(start["audio"] - start["video"]) < 0.4, start
    tone_at = np.flatnonzero(np.abs(sound_of(received).astype(np.int32)) > 3000)[0] / RATE
    # The sound starts where the first picture published is in the file: its start, or a frame or two later where
    # the broadcast's first frames went out before the publisher was added (a loaded machine). The tone, at 1 s in
    # the file, is that much earlier in the stream.
    assert 0 <= publisher.audio_from_s <= 0.5
    assert tone_at == pytest.approx(1.0 - publisher.audio_from_s, abs=0.1)


@needs_ffmpeg
def test_a_stream_session_starts_the_sound_where_the_pictures_are(tmp_path, clip):
    """A session started again after a failure (the server went away) starts the file's sound at the time in the
    file of the frame it sends first, not at the file's start: each ffmpeg is asked for -ss at the newest frame's."""
    from turbostream.io.audio import probe_audio
    from turbostream.io.stream import StreamSink

    calls = tmp_path / "calls.txt"
    program = tmp_path / "failing-ffmpeg"
    program.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncat > /dev/null &\nexit 1\n')
    program.chmod(0o755)
    sink = StreamSink("udp://127.0.0.1:9", 10, (64, 64), program=str(program), retry_s=0.05, retry_max_s=0.05,
                      audio=probe_audio(FFMPEG, clip))
    frame = np.zeros((64, 64, 3), np.uint8)
    try:
        sink.write(frame, 12, 1.2)
        _wait(lambda: calls.exists() and "-ss 1.200" in calls.read_text())
        sink.write(frame, 25, 2.5)
        _wait(lambda: "-ss 2.500" in calls.read_text())
    finally:
        sink.close()
    first = calls.read_text().splitlines()[0]
    assert f"-re -ss 1.200 -i {clip} -map 0:v:0 -map 1:a:0 -c:a aac" in first


@needs_ffmpeg
def test_the_broadcast_hands_its_outputs_each_frames_time_in_the_file(tmp_path, clip, tiny_components):
    """What the published sound starts from: the broadcast of a file writes each stylized frame to its outputs with
    the frame's time in the file."""
    import asyncio

    from turbostream.config import ServerConfig, preset
    from turbostream.engine import Engine
    from turbostream.serve import TurboServer
    from turbostream.serve.server import default_capture

    output = TimesWritten()

    async def main():
        server = TurboServer(Engine(preset("test"), tiny_components), ServerConfig(port=0, source=str(clip)),
                             capture_factory=default_capture)
        server.broadcast.outputs.append(output)
        await server.start()
        try:
            assert await server.wait_ready(30)
            await asyncio.to_thread(_wait, lambda: len(output.times) >= 15, 20.0)
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert None not in output.times and output.times == sorted(output.times)
    assert 0 <= output.times[0] < 0.5 and all(round(10 * t, 6).is_integer() for t in output.times)  # 10 fps


class TimesWritten:
    """An output of the broadcast that keeps the time each frame was written with."""

    def __init__(self):
        self.times = []

    def write(self, frame, index=0, t=None):
        self.times.append(t)

    def close(self):
        pass


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@needs_ffmpeg
def test_a_looped_file_is_written_without_its_sound_and_says_why(tmp_path, clip, caplog):
    out = tmp_path / "looped.mp4"
    with caplog.at_level(logging.INFO, logger="turbostream"):
        assert run("-i", str(clip), "-o", str(out), "--loop", "--max-frames", "45") == 0
    assert f"--loop: {out} carries no sound ({clip} has aac, 48000 Hz, mono; played in a loop it would drift" \
        in caplog.text
    assert "audio" not in streams(out) and [index_of(f) for f in read_video(out)[0]] == [*range(30), *range(15)]
