"""`run`'s .mp4/.mov/.mkv files in H.264 through ffmpeg (io/h264.py), and OpenCV's mp4v where there is no ffmpeg with
libx264: every frame, the exact frame rate, a file that plays while it downloads, failures said, a killed run's file
still whole."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_runner import FakeEngine, index_of, indexed_frame, make_video, parse, read_video

from turbostream.cli import run as cli_run
from turbostream.io import sinks
from turbostream.io.ffmpeg import FFMPEG_ENV

FFMPEG, FFPROBE = shutil.which("ffmpeg"), shutil.which("ffprobe")
pytestmark = pytest.mark.skipif(FFMPEG is None or FFPROBE is None,
                                reason="needs ffmpeg and ffprobe (apt-get install ffmpeg)")


def video_stream(path: Path) -> dict[str, str]:
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream=codec_name,pix_fmt,r_frame_rate,nb_frames", "-of", "default=nw=1", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.split())


def run(*argv: str, engine=None) -> int:
    return cli_run.main(parse("run", *argv), engine=engine or FakeEngine(max_batch=4))


def fake_ffmpeg(tmp_path: Path, encoders: str, encode: str) -> Path:
    """An ffmpeg that lists `encoders` and runs `encode` (shell) where it would encode frames from its stdin; it reads
    files as the real one does."""
    script = tmp_path / "fake-ffmpeg"
    script.write_text(f"""#!/bin/sh
case " $* " in
  *" -encoders "*) echo "{encoders}" ;;
  *" -protocols "*|*" -formats "*) ;;
  *" pipe:0 "*) {encode} ;;
  *) exec {FFMPEG} "$@" ;;
esac
""")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])
def test_video_files_are_h264_with_every_frame_in_order(tmp_path, suffix, caplog):
    src = make_video(tmp_path / "in.avi", n=24, fps=10)
    out = tmp_path / f"out{suffix}"
    with caplog.at_level(logging.INFO, logger="turbostream"):
        assert run("-i", str(src), "-o", str(out)) == 0
    stream = video_stream(out)
    assert (stream["codec_name"], stream["pix_fmt"], stream["r_frame_rate"]) == ("h264", "yuv420p", "10/1")
    frames, fps = read_video(out)
    assert [index_of(f) for f in frames] == list(range(24)) and fps == pytest.approx(10.0)
    assert f"out{suffix}: 24 frames, 64x64 H.264, 10 fps, 2.4 s" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    if suffix != ".mkv":  # the index before the frames: a browser plays the file while it downloads
        data = out.read_bytes()
        assert 0 < data.find(b"moov") < data.find(b"mdat")


def test_avi_stays_mjpg(tmp_path):
    src = make_video(tmp_path / "in.avi", n=5, fps=10)
    assert run("-i", str(src), "-o", str(tmp_path / "out.avi")) == 0
    assert video_stream(tmp_path / "out.avi")["codec_name"] == "mjpeg"


@pytest.mark.parametrize("fps, rate", [(30000 / 1001, "30000/1001"), (0.2, "1/5")], ids=["ntsc", "slideshow"])
def test_the_frame_rate_is_kept_exactly(tmp_path, fps, rate):
    """NTSC's 29.97 (30000/1001, as OpenCV reports it) stays 30000/1001, not 2997/100 (which drifts); a slideshow's
    0.2 fps stays one frame every 5 s."""
    out = tmp_path / "out.mp4"
    sink = sinks.open_sink(sinks.parse_output(str(out)), fps, (64, 64))
    for k in range(3):
        sink.write(indexed_frame(k, 64, 64), k)
    sink.close()
    assert video_stream(out)["r_frame_rate"] == rate and video_stream(out)["nb_frames"] == "3"


@pytest.mark.parametrize("ffmpeg", ["none", "no-libx264"])
def test_without_an_h264_ffmpeg_mp4v_is_written_and_said_before_the_model_loads(tmp_path, ffmpeg, caplog,
                                                                                   monkeypatch):
    program = (tmp_path / "no-such-ffmpeg" if ffmpeg == "none" else
               fake_ffmpeg(tmp_path, " V....D mpeg4     MPEG-4 part 2", "exit 1"))
    monkeypatch.setenv(FFMPEG_ENV, str(program))
    src = make_video(tmp_path / "in.avi", n=6, fps=10)
    out = tmp_path / "out.mp4"
    said_before_loading = []
    engine = FakeEngine(on_run=lambda e, f: said_before_loading.append("is written in mp4v" in caplog.text))
    with caplog.at_level(logging.INFO, logger="turbostream"):
        assert run("-i", str(src), "-o", str(out), engine=engine) == 0
    assert said_before_loading[0]
    assert (f"{out} is written in mp4v (MPEG-4 Part 2), which browsers and phones do not play: there is no ffmpeg "
            "with H.264 (libx264)") in caplog.text
    assert video_stream(out)["codec_name"] == "mpeg4"
    assert [index_of(f) for f in read_video(out)[0]] == list(range(6))


def test_an_ffmpeg_that_dies_mid_run_stops_the_run_with_its_reason(tmp_path, capsys, monkeypatch):
    program = fake_ffmpeg(tmp_path, " V....D libx264   libx264 H.264",
                          'head -c 40000 > /dev/null; echo "[libx264 @ 0x5581] broke on purpose" >&2; exit 1')
    monkeypatch.setenv(FFMPEG_ENV, str(program))
    src = make_video(tmp_path / "in.avi", n=40, fps=10)
    status = run("-i", str(src), "-o", str(tmp_path / "out.mp4"), engine=FakeEngine(max_batch=1))
    err = capsys.readouterr().err
    assert status == 1
    assert "could not be written: ffmpeg exited with status 1: broke on purpose" in err, err


_KILLED_CHILD = r"""
import argparse, sys, time
sys.path.insert(0, sys.argv[3])
from test_runner import FakeEngine
from turbostream.cli import run as cli_run

parser = argparse.ArgumentParser()
cli_run.add_parser(parser.add_subparsers())
args = parser.parse_args(["run", "-i", sys.argv[1], "-o", sys.argv[2]])
sys.exit(cli_run.main(args, engine=FakeEngine(max_batch=1, delay=0.05)))
"""


def test_a_killed_run_leaves_a_file_that_plays(tmp_path):
    """SIGKILL (the OOM killer, kill -9) gives turbostream no chance to finalize; ffmpeg sees its input end and
    finalizes the file itself: the frames it had play."""
    src = make_video(tmp_path / "in.avi", n=120, fps=10)
    out = tmp_path / "out.mp4"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(src), str(out), str(Path(__file__).parent)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not out.exists():  # the first frame has gone to ffmpeg
        assert child.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
        time.sleep(0.05)
    time.sleep(1.5)  # about 30 frames more of the 120 (6 s)
    writer = [p for p in psutil.process_iter(["cmdline"])
              if p.pid != child.pid and str(out) in (p.info["cmdline"] or [])]
    assert len(writer) == 1  # the ffmpeg writing the file
    child.send_signal(signal.SIGKILL)
    child.wait()
    gone, alive = psutil.wait_procs(writer, timeout=30)  # left on its own, it sees its input end and finishes
    assert gone and not alive
    frames, _ = read_video(out)
    assert 3 <= len(frames) < 120
    assert [index_of(f) for f in frames] == list(range(len(frames)))
