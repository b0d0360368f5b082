"""`turbostream run` and `turbostream generate` on the CPU: capture, pipeline, sinks, errors (tiny-random, 64 px)."""

from __future__ import annotations

import _thread
import argparse
import io
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest

from turbostream import cli
from turbostream.cli import generate as cli_generate
from turbostream.cli import run as cli_run
from turbostream.codec import fit_frame
from turbostream.config import StreamParams
from turbostream.errors import SinkError, SourceError
from turbostream.io import sinks
from turbostream.io.sinks import VideoSink
from turbostream.io.sources import CaptureThread, SourceSpec
from turbostream.control.prompt_line import PromptLine
from turbostream.pipeline import LATENCY_WINDOW, Pipeline

CLI_MODEL = ["--model", "tiny-random", "--device", "cpu", "--size", "64"]


# ------------------------------------------------------------------------------------------------ helpers


BITS = 7  # frames 0..127 carry their index


def indexed_frame(k: int, width: int, height: int) -> np.ndarray:
    """A frame that names its index k: BITS light/dark bands across its central square (what fit_frame keeps).

    Coarse bands survive lossy codecs and resizing, so a frame read back from any output says which it was.
    """
    frame = np.full((height, width, 3), 128, np.uint8)
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    for b in range(BITS):
        frame[y0 + b * side // BITS : y0 + (b + 1) * side // BITS, x0 : x0 + side] = 220 if (k >> b) & 1 else 40
    return frame


def index_of(frame: np.ndarray) -> int:
    height, width = frame.shape[:2]
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    rows = [y0 + int((b + 0.5) * side / BITS) for b in range(BITS)]
    return sum(1 << b for b, r in enumerate(rows) if frame[r, x0 + side // 4 : x0 + 3 * side // 4].mean() > 128)


def make_video(path: Path, n: int = 12, size: tuple[int, int] = (96, 80), fps: float = 10.0, *,
               flat: bool = True) -> Path:
    """n frames of (width, height) `size`: indexed_frame(k) (flat=True) or random noise."""
    fourcc = "MJPG" if path.suffix == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for k in range(n):
        if flat:
            frame = indexed_frame(k, *size)
        else:
            frame = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        writer.write(frame)
    writer.release()
    return path


def oversized_png(path: Path) -> Path:
    """A 1 KB PNG whose header declares 60000x60000 pixels: past OpenCV's pixel limit, so cv2.imread raises."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000)))
                     + chunk(b"IEND", b""))
    return path


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} does not open"
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames, fps


def parse(command: str, *argv: str) -> argparse.Namespace:
    """The real option parser of a subcommand (defaults included)."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    {"run": cli_run, "generate": cli_generate}[command].add_parser(sub)
    return parser.parse_args([command, *argv])


class FakeEngine:
    """Stands in for Engine: returns the fitted frames unchanged after `delay` s; records every call."""

    def __init__(self, width=64, height=64, max_batch=4, delay=0.0, on_run=None):
        self.width, self.height, self.max_batch, self.delay = width, height, max_batch, delay
        self.model_name, self.random_weights = "fake", False
        self.on_run = on_run
        self.calls: list[list[int]] = []
        self.thread: int | None = None

    def warmup(self):
        self.thread = threading.get_ident()

    def run(self, frames, params):
        assert threading.get_ident() == self.thread, "run() on another thread than warmup()"
        assert len(frames) == len(params) <= self.max_batch
        self.calls.append([index_of(f) for f in frames])
        if self.on_run:
            self.on_run(self, frames)
        if self.delay:
            time.sleep(self.delay)
        return [fit_frame(f, self.width, self.height) for f in frames]


@pytest.fixture(autouse=True)
def _no_model_loading(monkeypatch):
    """Tests inject an engine; one that reaches model loading by mistake fails loudly instead of taking seconds."""

    def refuse(args):
        raise AssertionError("build_engine called: inputs must be checked before the model loads")

    monkeypatch.setattr(cli_run, "build_engine", refuse)


@pytest.fixture
def allow_load(monkeypatch):
    """For the tests of the real CLI: lets runner load tiny-random itself."""
    monkeypatch.undo()


# ------------------------------------------------------------------------------------------------ run: files


def test_video_file_to_video_file_keeps_count_size_and_fps(tmp_path, make_engine):
    src = make_video(tmp_path / "in.mp4", n=12, size=(96, 80), fps=10, flat=False)
    out = tmp_path / "out" / "styled.mp4"
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out)), engine=make_engine()) == 0
    frames, fps = read_video(out)
    assert len(frames) == 12
    assert frames[0].shape == (64, 64, 3)
    assert fps == pytest.approx(10.0)
    assert max(f.std() for f in frames) > 5  # pictures, not an empty stream


def test_files_keep_every_frame_in_order_batched(tmp_path):
    src = make_video(tmp_path / "in.avi", n=20)
    out = tmp_path / "out.avi"
    # A slow engine lets the reader run ahead, so later calls get batches of the frames already decoded.
    engine = FakeEngine(max_batch=4, delay=0.02)
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out)), engine=engine) == 0
    assert [i for call in engine.calls for i in call] == list(range(20))
    assert max(len(call) for call in engine.calls) > 1
    frames, _ = read_video(out)
    assert [index_of(f) for f in frames] == list(range(20))


def test_run_freezes_the_warm_heap_while_it_streams_and_thaws_at_the_end(tmp_path):
    """As `serve` does (heap.py): after warm-up no full garbage collection walks the process's objects mid-run."""
    from turbostream import heap

    held = heap._holders
    during = []
    engine = FakeEngine(max_batch=1, on_run=lambda engine, frames: during.append(heap._holders))
    src = make_video(tmp_path / "in.avi", n=4)
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(tmp_path / "out.avi")), engine=engine) == 0
    assert during == [held + 1] * 4  # frozen before the first frame, for every one
    assert heap._holders == held


def test_max_frames_stops_early(tmp_path):
    src = make_video(tmp_path / "in.avi", n=20)
    out_video, out_dir = tmp_path / "out.avi", tmp_path / "frames"
    args = parse("run", "-i", str(src), "-o", str(out_video), "-o", f"{out_dir}/", "--max-frames", "5")
    assert cli_run.main(args, engine=FakeEngine(max_batch=4)) == 0
    frames, _ = read_video(out_video)
    assert [index_of(f) for f in frames] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in out_dir.iterdir()) == [f"frame_{k:06d}.png" for k in range(5)]


def test_image_folder_in_and_out(tmp_path, make_engine):
    src = tmp_path / "photos"
    src.mkdir()
    # Natural order (img_2 before img_10), any size and format; other files ignored, broken images skipped.
    for name, k, size in (("img_10.png", 2, (70, 90)), ("img_2.jpg", 1, (120, 64)), ("img_1.webp", 0, (64, 64))):
        cv2.imwrite(str(src / name), indexed_frame(k, *size))
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "styled"
    engine = FakeEngine(max_batch=2)
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out)), engine=engine) == 0
    written = sorted(out.iterdir())
    assert [p.name for p in written] == ["frame_000000.png", "frame_000001.png", "frame_000002.png"]
    images = [cv2.imread(str(p)) for p in written]
    assert all(img.shape == (64, 64, 3) for img in images)
    assert [index_of(img) for img in images] == [0, 1, 2]
    # The real engine on a folder, into a folder and a video at once (no frame rate: the fallback).
    out2, video = tmp_path / "styled2", tmp_path / "styled2.mp4"
    args = parse("run", "-i", str(src), "-o", str(out2), "-o", str(video))
    assert cli_run.main(args, engine=make_engine()) == 0
    assert len(list(out2.glob("frame_*.png"))) == 3
    frames, fps = read_video(video)
    assert len(frames) == 3 and fps == pytest.approx(30.0)


def test_folder_skips_pictures_too_small_to_use(tmp_path, caplog):
    """An icon (6x6) or a 5 px strip in a folder is skipped with a warning, as an unreadable file is: the run goes
    on."""
    src = tmp_path / "photos"
    src.mkdir()
    cv2.imwrite(str(src / "img_1.png"), indexed_frame(0, 100, 80))
    cv2.imwrite(str(src / "img_2.png"), np.full((6, 6, 3), 90, np.uint8))  # a favicon
    cv2.imwrite(str(src / "img_3.png"), np.full((2000, 5, 3), 90, np.uint8))  # a thin strip
    cv2.imwrite(str(src / "img_4.png"), indexed_frame(1, 100, 80))
    out = tmp_path / "styled"
    caplog.set_level(logging.INFO, logger="turbostream")
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out)), engine=FakeEngine()) == 0
    images = [cv2.imread(str(p)) for p in sorted(out.glob("frame_*.png"))]
    assert [index_of(img) for img in images] == [0, 1]
    assert "(100x80, 4 images, every frame, in order)" in caplog.text  # images, not frames: two are skipped
    assert "img_2.png: 6x6 is too small (8x8 at least)" in caplog.text
    assert "img_3.png: 5x2000 is too small" in caplog.text
    # A folder of nothing but icons has nothing to run on: said before the model loads.
    (icons := tmp_path / "icons").mkdir()
    cv2.imwrite(str(icons / "a.png"), np.full((6, 6, 3), 90, np.uint8))
    with pytest.raises(SourceError, match="none of its 1 images could be read .or each is under 8x8 px"):
        cli_run.main(parse("run", "-i", str(icons), "-o", str(tmp_path / "none")), engine=FakeEngine())


def test_a_video_of_frames_too_small_is_a_clear_error(tmp_path, capsys):
    """A video's frames cannot be skipped one by one: a 6x6 video is refused when it opens, before the model loads
    (the autouse fixture fails any model load), with the reason and status 2."""
    src = make_video(tmp_path / "tiny.avi", n=5, size=(6, 6))
    assert cli.main(["run", "-i", str(src), "-o", str(tmp_path / "out.avi"), *CLI_MODEL]) == 2
    err = capsys.readouterr().err
    assert "has frames of 6x6: too small (8x8 at least)" in err and "Traceback" not in err
    assert not (tmp_path / "out.avi").exists()


def test_a_damaged_spot_in_a_video_file_is_skipped_not_taken_for_its_end(tmp_path, caplog):
    """3000 zeroed bytes in the middle of a 100-frame file: OpenCV's reads fail for the frames there, then go on.
    The run keeps every frame after the damage (it used to stop there, saying "done"), and says what was lost; the
    video holds the last frame before the damage over it, so it keeps the file's timeline (and its sound in step)."""
    src = make_video(tmp_path / "in.mp4", n=100, size=(64, 64))
    data = bytearray(src.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 3000] = bytes(3000)
    src.write_bytes(bytes(data))
    frames, _ = read_video(src)
    readable_before_damage = len(frames)  # what a reader that stops at the first failure gets
    assert readable_before_damage < 90
    out = tmp_path / "out.avi"
    caplog.set_level(logging.INFO, logger="turbostream")
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out)), engine=FakeEngine()) == 0
    written, _ = read_video(out)
    indices = [index_of(f) for f in written]
    assert len(set(indices)) > readable_before_damage + 20 and indices[-1] == 99 and indices == sorted(indices)
    lost = int(re.search(rf"(\d+) frame\(s\) after frame {readable_before_damage} could not be decoded \(a damaged "
                         r"spot\?\)", caplog.text).group(1))
    assert 0 < lost < 100 - readable_before_damage
    last_good = readable_before_damage - 1
    assert len(written) == 100 and indices[last_good : last_good + lost + 1] == [indices[last_good]] * (lost + 1)
    assert f"out.avi: 100 frames, 64x64 MJPG, 10 fps, 10.0 s ({lost} repeated and 0 left out to keep the source's " \
           "timing)" in caplog.text
    assert "ended after" not in caplog.text  # it was read to its end


def test_a_video_file_cut_short_is_reported(tmp_path, caplog):
    """A file whose container announces 100 frames but holds 40 (a download cut off) ends with a warning that says
    so, not only "done"."""
    src = make_video(tmp_path / "in.avi", n=100, size=(64, 64))
    frames, _ = read_video(src)
    assert len(frames) == 100
    data = src.read_bytes()
    src.write_bytes(data[: int(len(data) * 0.4)])  # MJPG in AVI: the index at the end is gone, the count is not
    caplog.set_level(logging.WARNING, logger="turbostream")
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(tmp_path / "out.avi")), engine=FakeEngine()) == 0
    n = len(read_video(tmp_path / "out.avi")[0])
    assert 0 < n < 100
    assert f"ended after {n} of the 100 frames its container counts: cut short or damaged" in caplog.text
    # A capture looping the file (an installation) says so once, not at every pass.
    caplog.clear()
    with CaptureThread(str(src), realtime=False, loop=True) as capture:
        deadline = time.monotonic() + 20
        while capture.loops < 3 and time.monotonic() < deadline:
            capture.take(0.5)
    assert capture.loops >= 3
    assert caplog.text.count("frames its container counts") == 1


def test_a_source_slower_than_one_frame_a_second_keeps_its_rate(tmp_path):
    """A slideshow or timelapse at 0.5 fps is a frame rate, not a missing one (which falls back to 30 fps)."""
    src = make_video(tmp_path / "slides.avi", n=4, fps=0.5)
    capture = CaptureThread(str(src), realtime=False).start()
    assert capture.fps == pytest.approx(0.5)
    capture.close()
    out = tmp_path / "out.mp4"
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out)), engine=FakeEngine()) == 0
    frames, fps = read_video(out)
    assert len(frames) == 4 and fps == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ capture thread


def test_realtime_drops_stale_frames_and_latency_stays_bounded(tmp_path):
    """A 100 fps live-paced source into an engine that needs 40 ms a frame: newest frames only, bounded latency."""
    src = make_video(tmp_path / "fast.avi", n=60, fps=100)
    seen = []  # (index given to the engine, frames the capture had read by then)

    def record(engine, frames):
        seen.append((index_of(frames[0]), capture.frames_read))

    capture = CaptureThread(str(src), realtime=True, transform=partial(fit_frame, width=64, height=64)).start()
    assert capture.pace  # a file read in realtime is delivered at its own rate, like a camera
    sink = VideoSink(tmp_path / "out.avi", 100, (64, 64), fill_gaps="index")
    engine = FakeEngine(max_batch=4, delay=0.04, on_run=record)
    summary = Pipeline(engine, capture, [sink], StreamParams(), batch=1).run()
    assert summary.stopped == "end"
    assert 5 <= summary.frames <= 30
    assert summary.dropped >= 20 and capture.dropped >= summary.dropped
    indices = [i for i, _ in seen]
    assert indices == sorted(set(indices))  # in order, never a frame twice
    # Each call got the newest frame: at most the one being handed over meanwhile is newer.
    assert all(index >= read - 2 for index, read in seen), seen
    # Latency is about one engine call, not the growing backlog an in-order queue would build (~1.5 s here).
    assert max(summary.latencies) < 0.3, max(summary.latencies)
    # The video keeps the source's timing: each frame stands in for the dropped ones before it.
    frames, _ = read_video(tmp_path / "out.avi")
    assert len(frames) == summary.last_index - summary.first_index + 1


def test_a_camera_slower_than_it_announces_is_recorded_in_real_time(tmp_path, monkeypatch):
    """A camera announcing 30 fps that delivers 10 (a webcam in low light) recorded by a live run: the video lasts as
    long as the run saw (each frame repeated over the slots since the one before), not a third of it, and its frames
    stay in order. Frames placed by their index alone made a 3x fast-forward."""

    class SlowCamera:
        fps, frame_count, size = 30.0, None, (64, 64)

        def __init__(self):
            self.k = 0

        def read(self):
            time.sleep(0.1)
            self.k += 1
            return indexed_frame(self.k % 128, 64, 64)

        def release(self):
            pass

    monkeypatch.setattr(cli_run, "CaptureThread", partial(CaptureThread, opener=lambda spec: SlowCamera()))
    out = tmp_path / "camera.avi"
    args = parse("run", "-i", "rtsp://camera.invalid/stream", "-o", str(out), "--max-frames", "15")
    assert cli_run.main(args, engine=FakeEngine()) == 0
    frames, fps = read_video(out)
    seen = [index_of(f) for f in frames]
    assert fps == 30 and seen == sorted(seen)
    # Reads k and k + n are at least n x 0.1 s apart (a sleep may run long, a busy machine may drop a frame): 3 slots
    # of 1/30 s a read. Placed by index alone, the video held one frame a read (15 to 16 here).
    reads = seen[-1] - seen[0]
    assert reads >= 14 and 3 * reads - 2 <= len(frames) <= 3 * reads * 1.3 + 2, (len(frames), seen)


def test_a_video_sink_by_time_leaves_out_frames_more_than_a_slot_early(tmp_path):
    """fill_gaps "time": a frame early by one slot is kept (clock jitter), one early by more is left out and counted,
    and a gap is filled by repeating the next frame; at most MAX_REPEAT copies for a long gap, and the frames after
    it are not repeated to catch up."""
    sink = sinks.VideoSink(tmp_path / "timed.avi", 10, (32, 32), fill_gaps="time")
    frame = np.zeros((32, 32, 3), np.uint8)
    for t in (100.0, 100.1, 100.1, 100.1, 100.5, 100.5, 1000.0, 1000.1):
        sink.write(frame, 0, t)
    sink.close()
    # Slots: 0 (1 written); 1 (2); 1 again, one early (kept: 3); 1 again, two early (left out); 5 (three copies fill
    # slots 3-5: 6); 5 again, one early (kept: 7); then a jump of 9,000 slots (MAX_REPEAT copies), after which the
    # clock starts from there: the next frame, a slot later, is written once.
    assert sink.left_out == 1
    assert sink.frames_written == 3 + 3 + 1 + sinks.VideoSink.MAX_REPEAT + 1
    assert "(1 frame that came faster than 10 a second left out to keep real time)" in sink.describe()
    with pytest.raises(ValueError, match="fill_gaps"):
        sinks.VideoSink(tmp_path / "x.avi", 10, (32, 32), fill_gaps=True)


def test_a_video_sink_by_pts_holds_frames_over_their_time_and_bounds_gaps(tmp_path, caplog):
    """fill_gaps "pts": a frame fills its slot and the slots before it hold the frame before it; a frame whose slot
    is filled already is left out (counted, and it is what the next gap holds); a gap of hours holds at most
    MAX_PTS_GAP_S; times that stop increasing switch the sink to one write per frame, said once."""
    sink = sinks.VideoSink(tmp_path / "pts.avi", 10, (32, 32), fill_gaps="pts")
    for k, t in enumerate((5.0, 5.1, 5.14, 5.4, 5.5, 3605.5, 3605.6, 3605.6, 3605.7)):
        sink.write(indexed_frame(k, 32, 32), k, t)
    sink.close()
    most = round(sinks.VideoSink.MAX_PTS_GAP_S * 10)
    frames, _ = read_video(tmp_path / "pts.avi")
    shown = [index_of(f) for f in frames]
    # Slots 0, 1; 5.14 falls in slot 1 too (left out, but shown until 5.4: slots 2 and 3 hold it); 5.5: slot 5; an
    # hour later: `most` slots held by frame 4, then frame 5; frame 6 the next slot; then the times stop increasing:
    # frames 7 and 8 once each.
    assert shown[:6] == [0, 1, 2, 2, 3, 4]
    assert shown[6:6 + most] == [4] * most and shown[6 + most:] == [5, 6, 7, 8]
    assert sink.left_out == 1 and sink.held == 2 + most
    assert caplog.text.count("the source's frame times stop increasing after 3605.600 s") == 1
    assert f"({2 + most} repeated and 1 left out to keep the source's timing)" in sink.describe()


def test_a_long_run_keeps_a_bounded_window_of_latencies(tmp_path):
    """The summary's latency percentiles come from the latest LATENCY_WINDOW frames: a run of hours holds no more."""
    n = LATENCY_WINDOW + 88
    src = make_video(tmp_path / "long.avi", n=n, size=(32, 32), fps=100)
    capture = CaptureThread(str(src), realtime=False, transform=partial(fit_frame, width=32, height=32)).start()
    sink = VideoSink(tmp_path / "out.avi", 100, (32, 32))
    summary = Pipeline(FakeEngine(width=32, height=32, max_batch=4), capture, [sink], StreamParams(), batch=4).run()
    assert summary.stopped == "end" and summary.frames == n
    assert len(summary.latencies) == LATENCY_WINDOW


def test_in_order_capture_is_bounded_and_drops_nothing(tmp_path):
    src = make_video(tmp_path / "in.avi", n=30)
    capture = CaptureThread(str(src), realtime=False, queue_size=3).start()
    assert capture.frame_count == 30 and capture.fps == pytest.approx(10.0) and capture.size == (96, 80)
    got = []
    while True:
        item = capture.latest(timeout=2.0)
        if item is None:
            break
        time.sleep(0.002)  # a slow consumer: the reader must wait, not run ahead or drop
        assert capture.frames_read - len(got) <= 3 + 2
        got.append(item[0])
        assert index_of(item[1]) == item[0]
    assert got == list(range(30))
    assert capture.ended and capture.error is None and capture.dropped == 0
    t0 = time.perf_counter()
    assert capture.latest(timeout=5.0) is None  # at the end: at once, not after the timeout
    assert time.perf_counter() - t0 < 1.0
    capture.close()


def test_latest_times_out_and_close_stops_a_live_source(tmp_path):
    src = make_video(tmp_path / "slow.avi", n=20, fps=2)
    capture = CaptureThread(str(src), realtime=True).start()
    assert capture.latest(timeout=2.0)[0] == 0
    t0 = time.perf_counter()
    assert capture.latest(timeout=0.05) is None  # the next frame is due in 0.5 s
    assert time.perf_counter() - t0 < 0.4
    assert not capture.ended
    capture.close()
    assert capture.ended and not capture._thread.is_alive()


def test_loop_starts_a_file_over(tmp_path):
    src = make_video(tmp_path / "in.avi", n=4)
    capture = CaptureThread(str(src), realtime=False, loop=True).start()
    got = [index_of(capture.latest(timeout=2.0)[1]) for _ in range(10)]
    capture.close()
    assert got == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1] and capture.loops >= 2


def test_run_loop_plays_a_file_again_until_max_frames(tmp_path, caplog):
    """`run --loop`: an installation's file played for ever; here until --max-frames, into a folder whose frames keep
    counting across passes."""
    src = make_video(tmp_path / "in.avi", n=10)
    out = tmp_path / "frames"
    caplog.set_level(logging.INFO, logger="turbostream")
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out), "--loop", "--max-frames", "25"),
                        engine=FakeEngine()) == 0
    written = sorted(out.glob("frame_*.png"))
    assert [p.name for p in written] == [f"frame_{k:06d}.png" for k in range(25)]
    assert [index_of(cv2.imread(str(p))) for p in written] == [*range(10), *range(10), *range(5)]
    assert "reached --max-frames: 25 frames" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["-i", "0", "-o", "{tmp}/f/", "--loop", "--max-frames", "5"],
     "--loop plays a video file or folder of images again at its end: a camera or a URL goes on by itself"),
    (["-o", "{tmp}/out.mp4", "--loop"], "--loop never ends by itself: with a video file or folder output add "
                                        "--max-frames N"),
    (["-o", "{tmp}/frames/", "--loop"], "--loop never ends by itself"),
])
def test_run_loop_refuses_what_cannot_loop_or_would_never_end(tmp_path, capsys, argv, message):
    src = make_video(tmp_path / "in.avi", n=3)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "-i" not in argv:
        argv = ["-i", str(src), *argv]
    assert cli.main(["run", *argv, *CLI_MODEL]) == 2  # before the model loads (it would fail this test)
    assert message in capsys.readouterr().err


class _FlakyReader:
    def __init__(self, frames: int):
        self.left, self.fps, self.frame_count, self.size = frames, None, None, (16, 16)

    def read(self):
        if self.left <= 0:
            return None
        self.left -= 1
        return np.zeros((16, 16, 3), np.uint8)

    def release(self):
        pass


def test_live_source_reconnects_then_reports_the_loss():
    opens = iter([_FlakyReader(3), SourceError("refused"), _FlakyReader(2), SourceError("refused")])

    def opener(spec):
        outcome = next(opens, SourceError("refused"))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    spec = SourceSpec("url", "rtsp://user:secret@cam.local/stream", "rtsp://user:secret@cam.local/stream")
    capture = CaptureThread(spec, realtime=False, reconnect=2, reconnect_delay_s=0.01, opener=opener).start()
    got = []
    while (item := capture.latest(timeout=2.0)) is not None:
        got.append(item[0])
    assert got == [0, 1, 2, 3, 4]  # indices continue across a reconnect
    assert capture.ended and capture.reconnects == 4
    assert "lost rtsp://user:***@cam.local/stream" in capture.error and "secret" not in capture.error
    capture.close()


def test_a_capture_stuck_in_a_read_is_waited_for_once(caplog):
    """A network read that hangs past close()'s wait: the thread is left to exit, and a second close() (the command
    closes after the pipeline did) returns at once instead of waiting open_timeout_s + 2 s again."""
    release = threading.Event()

    class StuckReader(_FlakyReader):
        def read(self):
            if self.left <= 0:
                release.wait(30)  # a stalled stream: the backend's own read timeout is long
                return None
            return super().read()

    spec = SourceSpec("url", "rtsp://cam.local/stream", "rtsp://cam.local/stream")
    capture = CaptureThread(spec, realtime=True, reconnect=0, open_timeout_s=20,
                            opener=lambda s: StuckReader(1)).start()
    try:
        assert capture.latest(timeout=5.0) is not None
        capture.close(timeout=0.2)
        assert capture._thread.is_alive() and "did not stop in time" in caplog.text
        t0 = time.perf_counter()
        capture.close()  # would wait up to 22 s
        assert time.perf_counter() - t0 < 1.0
        assert caplog.text.count("did not stop in time") == 1
    finally:
        release.set()
        capture._thread.join(10)


def test_a_picture_past_opencvs_pixel_limit_is_skipped_and_the_folder_goes_on(tmp_path, caplog):
    """cv2.imread raises (not None) for a picture declaring more pixels than it decodes: that picture is skipped as
    an unreadable one is, and the pictures after it are still run (the run used to stop there, losing them)."""
    src = tmp_path / "photos"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), indexed_frame(0, 100, 80))
    oversized_png(src / "b.png")
    cv2.imwrite(str(src / "c.png"), indexed_frame(1, 100, 80))
    out = tmp_path / "styled"
    caplog.set_level(logging.WARNING, logger="turbostream")
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out)), engine=FakeEngine()) == 0
    assert [index_of(cv2.imread(str(p))) for p in sorted(out.glob("frame_*.png"))] == [0, 1]
    assert "b.png: too large for OpenCV to decode" in caplog.text


def test_an_unreadable_input_file_says_so(tmp_path, monkeypatch):
    """A file without read permission is named as such, not as "not a video format" (os.access stands in for the
    permission bits, which root, who runs CI, would pass)."""
    from turbostream.io import sources

    src = make_video(tmp_path / "in.avi", n=2)
    real_access = sources.os.access
    monkeypatch.setattr(sources.os, "access", lambda p, mode: False if Path(p) == src else real_access(p, mode))
    with pytest.raises(SourceError, match="cannot read .*in.avi: permission denied"):
        CaptureThread(str(src))


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "ends-before-its-count"])
def test_a_video_file_at_a_url_ends_at_its_end(tmp_path, cut):
    """http(s):// counts as live, so a video file served over HTTP that reached its end was reopened as a lost
    stream, and played again, forever (a run that never ended, its output growing). A URL that announces a frame
    count ends where its reads end now, opened once, also when that is before the count (a file trimmed without
    re-encoding, a download cut off), and plays at its own frame rate like a file."""
    import functools
    import http.server

    if cut:  # MJPG in AVI cut at 60 %: it announces 12 frames and holds about 7
        data = make_video(tmp_path / "whole.avi", n=12, size=(64, 64), fps=20.0).read_bytes()
        (tmp_path / "clip.avi").write_bytes(data[: int(len(data) * 0.6)])
    else:
        make_video(tmp_path / "clip.mp4", n=12, size=(64, 64), fps=20.0)
    name = "clip.avi" if cut else "clip.mp4"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    opened = []

    def opener(spec):
        from turbostream.io.sources import open_reader

        opened.append(spec)
        return open_reader(spec)

    try:
        capture = CaptureThread(f"http://127.0.0.1:{httpd.server_address[1]}/{name}", opener=opener)
        assert capture.spec.live and capture.realtime
        with capture:
            assert capture.pace  # a finite video at a URL is played at its own rate
            indices = []
            deadline = time.monotonic() + 20
            while not capture.ended and time.monotonic() < deadline:
                got = capture.latest(0.5)
                if got is not None:
                    indices.append(got[0])
            assert capture.ended and capture.error is None
            assert len(opened) == 1 and capture.reconnects == 0
            assert indices == sorted(indices) and indices[-1] == capture.frames_read - 1
            assert capture.frames_read == 12 if not cut else 0 < capture.frames_read < 12
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        CaptureThread(str(tmp_path / "missing.mp4"))
    with pytest.raises(SourceError, match="unsupported URL scheme 'ftp'"):
        CaptureThread("ftp://example.com/video.mp4")
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match="camera 7 could not be opened"):
        CaptureThread("7").start()
    assert time.perf_counter() - t0 < 5
    (tmp_path / "fake.mp4").write_text("not a video")
    with pytest.raises(SourceError, match="could not open video file"):
        CaptureThread(str(tmp_path / "fake.mp4")).start()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="has no images"):
        CaptureThread(str(tmp_path / "empty")).start()


# ------------------------------------------------------------------------------------------------ run: errors and stops


@pytest.mark.parametrize(
    "make_input,output,message",
    [
        (lambda d: str(d / "missing.mp4"), "out.mp4", "no such file or folder: "),
        (lambda d: "7", "out.mp4", "camera 7 could not be opened"),
        (lambda d: "rtsp://127.0.0.1:9/stream", "out.mp4", "could not open rtsp://127.0.0.1:9/stream"),
        (lambda d: "http://user:pw@127.0.0.1:9/cam.mjpg", "out.mp4", "could not open http://user:***@127.0.0.1:9"),
        (lambda d: str(make_video(d / "in.avi", n=2)), "out.xyz", "unknown output 'OUT/out.xyz'"),
        (lambda d: str(make_video(d / "in.avi", n=2)), "window", "opencv-python"),
        (lambda d: str(make_video(d / "in.avi", n=2)), "in.avi", "is the input"),
    ],
)
def test_bad_inputs_and_outputs_fail_with_one_message(tmp_path, capsys, make_input, output, message):
    if output == "window" and sinks.window_support_error() is None:
        pytest.skip("this OpenCV has a GUI and a display")
    src = make_input(tmp_path)
    dst = output if output == "window" else str(tmp_path / output)
    t0 = time.perf_counter()
    assert cli.main(["run", "-i", src, "-o", dst, *CLI_MODEL]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert err.startswith("turbostream: error: ") and "Traceback" not in err
    assert message.replace("OUT", str(tmp_path)) in err
    assert "pw@" not in err


def test_an_output_that_is_the_input_under_another_name_is_refused(tmp_path, capsys):
    """On a case-insensitive file system (macOS, Windows) `-i take.avi -o Take.avi` names the input: the path check
    passed it and the run overwrote the recording. A hard link is the same file under another name here."""
    src = make_video(tmp_path / "take.avi", n=2)
    os.link(src, tmp_path / "Take.avi")
    picture = tmp_path / "photo.png"
    cv2.imwrite(str(picture), np.zeros((32, 32, 3), np.uint8))
    os.link(picture, tmp_path / "Photo.png")
    before = src.read_bytes()
    assert cli.main(["run", "-i", str(src), "-o", str(tmp_path / "Take.avi"), *CLI_MODEL]) == 2
    assert "is the input; write somewhere else" in capsys.readouterr().err
    assert cli.main(["run", "-i", str(picture), "-o", str(tmp_path / "out.avi"), "-o", str(tmp_path / "take.avi"),
                     "-o", str(tmp_path / "Take.avi"), *CLI_MODEL]) == 2
    assert "is given twice" in capsys.readouterr().err
    assert cli.main(["generate", "a cat", "--image", str(picture), "-o", str(tmp_path / "Photo.png"), *CLI_MODEL]) == 2
    assert "is the input image; write somewhere else" in capsys.readouterr().err
    assert src.read_bytes() == before and not (tmp_path / "out.avi").exists()


def test_window_needs_a_gui_build_of_opencv():
    if sinks.window_support_error() is None:
        pytest.skip("this OpenCV has a GUI and a display")
    with pytest.raises(SinkError, match="pip install opencv-python"):
        sinks.WindowSink()


def test_window_output_shows_frames_and_q_quits(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(sinks, "window_support_error", lambda: None)
    monkeypatch.setattr(cv2, "namedWindow", lambda *a: None)
    monkeypatch.setattr(cv2, "imshow", lambda title, frame: shown.append(frame))
    monkeypatch.setattr(cv2, "waitKey", lambda ms: ord("q") if len(shown) >= 3 else -1)
    monkeypatch.setattr(cv2, "getWindowProperty", lambda *a: 1.0)
    monkeypatch.setattr(cv2, "destroyWindow", lambda *a: None)
    src = make_video(tmp_path / "in.avi", n=40)
    out = tmp_path / "out.avi"
    args = parse("run", "-i", str(src), "-o", "window", "-o", str(out))
    assert cli_run.main(args, engine=FakeEngine(max_batch=1, delay=0.005)) == 0
    frames, _ = read_video(out)
    assert 3 <= len(shown) < 40 and len(frames) >= 3  # quit early; what was shown is in the file too


def test_fullscreen_opens_the_window_full_screen_and_f_still_toggles(tmp_path, monkeypatch, capsys):
    """An installation started at boot has nobody to press f: --fullscreen opens the window so."""
    shown, modes, keys = [], [], iter([-1, ord("f"), -1, ord("q")])
    monkeypatch.setattr(sinks, "window_support_error", lambda: None)
    monkeypatch.setattr(cv2, "namedWindow", lambda *a: None)
    monkeypatch.setattr(cv2, "setWindowProperty", lambda title, prop, value: modes.append(value))
    monkeypatch.setattr(cv2, "imshow", lambda title, frame: shown.append(frame))
    monkeypatch.setattr(cv2, "waitKey", lambda ms: next(keys, ord("q")))
    monkeypatch.setattr(cv2, "getWindowProperty", lambda *a: 1.0)
    monkeypatch.setattr(cv2, "destroyWindow", lambda *a: None)
    src = make_video(tmp_path / "in.avi", n=40)
    args = parse("run", "-i", str(src), "-o", "window", "--fullscreen")
    assert cli_run.main(args, engine=FakeEngine(max_batch=1, delay=0.005)) == 0
    assert modes == [cv2.WINDOW_FULLSCREEN, cv2.WINDOW_NORMAL]  # full screen from the start; f went back
    assert cli.main(["run", "-i", str(src), "-o", str(tmp_path / "out.avi"), "--fullscreen", *CLI_MODEL]) == 2
    assert "--fullscreen is for the window output: add -o window" in capsys.readouterr().err


def test_ctrl_c_finalizes_the_video(tmp_path):
    """Ctrl-C (SIGINT to the main thread) mid-run: exit 130, and the file plays with the frames written."""

    def interrupt(engine, frames):
        if len(engine.calls) == 6:
            _thread.interrupt_main()

    src = make_video(tmp_path / "in.mp4", n=60)
    out = tmp_path / "out.mp4"
    engine = FakeEngine(max_batch=1, delay=0.005, on_run=interrupt)
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out)), engine=engine) == 130
    frames, fps = read_video(out)
    assert 4 <= len(frames) < 60 and fps == pytest.approx(10.0)
    assert [index_of(f) for f in frames] == list(range(len(frames)))


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_finalizes_the_video_even_with_ctrl_c_ignored(tmp_path, sig, status):
    """SIGTERM stops the run as Ctrl-C does (exit 143, the file plays), also in a process started in the background,
    where SIGINT is ignored; the previous SIGTERM handler is back afterwards. SIGHUP too (a terminal or an ssh session
    closed under a recording: its default would end the process on the spot, the .mp4 without its index), exit 129."""
    import os

    def terminate(engine, frames):
        if len(engine.calls) == 6:
            os.kill(os.getpid(), sig)

    def caught(signum, frame):  # the test process's own, for the time of the test: a stray signal never kills it
        pass

    before = signal.signal(sig, caught)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        src = make_video(tmp_path / "in.mp4", n=60)
        out = tmp_path / "out.mp4"
        engine = FakeEngine(max_batch=1, delay=0.005, on_run=terminate)
        assert cli_run.main(parse("run", "-i", str(src), "-o", str(out)), engine=engine) == status
        assert signal.getsignal(sig) is caught  # the run's handler is gone with the run
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(sig, before)
    frames, _ = read_video(out)
    assert 4 <= len(frames) < 60 and [index_of(f) for f in frames] == list(range(len(frames)))


def test_a_hangup_stops_the_run_unless_it_is_ignored():
    """Under nohup SIGHUP is ignored and a closed terminal must not stop the run (nor the server): only SIGTERM then."""
    from turbostream.cli.signals import stop_signals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert stop_signals() == [signal.SIGTERM]
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert stop_signals() == [signal.SIGTERM, signal.SIGHUP]
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_failing_output_stops_the_run_and_the_others_are_finalized(tmp_path):
    class FullDisk(sinks.FolderSink):
        def write(self, frame, index, t=None):
            if index >= 3:
                raise SinkError(f"could not write {self.path}/frame_{index:06d}.png (disk full?)")
            super().write(frame, index, t)

    src = make_video(tmp_path / "in.avi", n=40)
    capture = CaptureThread(str(src), realtime=False).start()
    video = VideoSink(tmp_path / "out.avi", 10, (64, 64))
    full = FullDisk(tmp_path / "frames")
    (tmp_path / "frames").mkdir()
    summary = Pipeline(FakeEngine(max_batch=1, delay=0.002), capture, [video, full], StreamParams()).run()
    assert summary.stopped == "error" and "disk full" in summary.error
    assert summary.frames < 40 and full.frames_written == 3
    frames, _ = read_video(tmp_path / "out.avi")
    assert len(frames) >= 3  # the video was finalized: it plays


def test_files_are_finalized_before_a_stream_output_that_is_slow_to_close(tmp_path):
    """A stream output whose receiver hangs takes its close timeout (10 s); listed first, it held up the .mp4 after
    it, which `docker stop`'s SIGKILL 10 s after SIGTERM then cut off unfinalized. Files close first."""
    from turbostream.io.paced import PacedSink

    closed = []

    class HangingStream(PacedSink):
        name = "hanging stream"

        def write(self, frame, index, t=None):
            pass

        def close(self, timeout_s: float = 10.0) -> None:
            closed.append("stream")

    class Folder(sinks.FolderSink):
        def close(self):
            closed.append("folder")
            super().close()

    src = make_video(tmp_path / "in.avi", n=5)
    (tmp_path / "frames").mkdir()
    capture = CaptureThread(str(src), realtime=False).start()
    outputs = [HangingStream(30, (64, 64)), Folder(tmp_path / "frames")]
    summary = Pipeline(FakeEngine(max_batch=1), capture, outputs, StreamParams()).run()
    assert summary.frames == 5 and closed == ["folder", "stream"]


def test_the_prompt_line_reads_the_terminal_only_in_the_foreground(monkeypatch):
    """`turbostream run ... &` from a shell: a read of the terminal from the background stops the whole process
    (SIGTTIN) until `fg`. The prompt line starts only where the process owns its terminal."""
    import os

    monkeypatch.setattr(os, "tcgetpgrp", lambda fd: os.getpgrp())
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))  # no real terminal needed: fileno faked
    monkeypatch.setattr(sys.stdin, "fileno", lambda: 0, raising=False)
    assert cli_run._in_the_foreground()
    monkeypatch.setattr(os, "tcgetpgrp", lambda fd: os.getpgrp() + 1)  # another group owns the terminal
    assert not cli_run._in_the_foreground()

    def no_terminal(fd):
        raise OSError(25, "Inappropriate ioctl for device")

    monkeypatch.setattr(os, "tcgetpgrp", no_terminal)
    assert not cli_run._in_the_foreground()
    # Windows has no job control and no os.tcgetpgrp: the prompt line was never started there.
    monkeypatch.delattr(os, "tcgetpgrp")
    assert cli_run._in_the_foreground()


def test_closing_writer_threads_ends_every_one(monkeypatch):
    """close() queues an end marker per running writer thread. Here thread 1 takes the first marker and exits before
    thread 0 asks for one (as when thread 1 happens to wait first): thread 0 must still get its own."""
    import queue

    started_1, threads = threading.Event(), {}

    class ThreadOneFirst(queue.Queue):
        def get(self, *args, **kw):
            if threading.current_thread().name.endswith(" 1"):
                threads[1] = threading.current_thread()
                started_1.set()
            else:  # thread 0 asks once thread 1 has taken a marker and ended
                assert started_1.wait(10)
                threads[1].join(10)
            return super().get(*args, **kw)

        def put(self, item, *args, **kw):
            super().put(item, *args, **kw)
            if item is sinks.SinkThread._END:
                threads[1].join(10)  # the first marker is thread 1's: it has ended before close() goes on

    class TwoWorkers:
        path, workers = "two", 2

        def write(self, frame, index, t=None):
            pass

        def close(self):
            pass

    monkeypatch.setattr(queue, "Queue", ThreadOneFirst)
    writer = sinks.SinkThread(TwoWorkers())
    assert started_1.wait(10)
    closing = threading.Thread(target=writer.close, daemon=True)
    closing.start()
    closing.join(20)
    assert not closing.is_alive(), "close() left a writer thread waiting for an end marker"


def test_prompt_line_changes_parameters_live():
    pipeline = Pipeline(FakeEngine(), CaptureThread("0"), [], StreamParams(prompt="a"))
    line = PromptLine(pipeline)
    assert "'a watercolor'" in line.apply("a watercolor\n")
    line.apply("/strength 0.75")
    line.apply("/seed 9")
    assert pipeline.params == StreamParams("a watercolor", 0.75, 2, 9)
    with pytest.raises(ValueError, match="steps x strength"):
        line.apply("/strength 0.2")
    with pytest.raises(ValueError, match="needs a number"):
        line.apply("/seed nine")
    assert line.apply("/quit") == "quit" and pipeline._stop.is_set()


def test_the_prompt_line_changes_the_run_through_the_target_osc_and_the_playlist_use():
    """The prompt line read the parameters and set them itself, outside the lock OSC and the playlist change them
    under: an OSC change landing between its read and its set was lost. It hands fields to the shared RunTarget."""
    from turbostream.control import RunTarget

    pipeline = Pipeline(FakeEngine(), CaptureThread("0"), [], StreamParams(prompt="a"))
    target = RunTarget(pipeline)
    calls = []

    class Recording(RunTarget):
        def __call__(self, fields):
            calls.append(fields)
            target({"strength": 0.9})  # an OSC change that lands while the typed line is being applied
            return super().__call__(fields)

    line = PromptLine(pipeline, target=Recording(pipeline))
    line.apply("a watercolor")
    assert calls == [{"prompt": "a watercolor"}]
    assert (pipeline.params.prompt, pipeline.params.strength) == ("a watercolor", 0.9)  # neither change lost


# ------------------------------------------------------------------------------------------------ the real CLI


def test_cli_run_end_to_end(tmp_path, allow_load, capsys):
    src = make_video(tmp_path / "in.mp4", n=12, flat=False)
    out = tmp_path / "out.avi"
    assert cli.main(["run", "-i", str(src), "-o", str(out), "--max-frames", "6", *CLI_MODEL]) == 0
    frames, fps = read_video(out)
    assert len(frames) == 6 and frames[0].shape == (64, 64, 3) and fps == pytest.approx(10.0)


@pytest.mark.parametrize("sig, status, how", [(signal.SIGINT, 130, "stopped by Ctrl-C"),
                                              (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_cli_ctrl_c_in_a_real_process(tmp_path, sig, status, how):
    """A real SIGINT to a real `turbostream run` (live-paced file): exit 130, the .mp4 is finalized and plays. SIGTERM
    (kill, timeout, docker stop, systemctl stop) takes the same path, with exit status 143."""
    src = make_video(tmp_path / "in.mp4", n=400, fps=40)
    out, frames_dir = tmp_path / "out.mp4", tmp_path / "frames"
    cmd = [sys.executable, "-m", "turbostream.cli", "run", "-i", str(src), "-o", str(out), "-o", f"{frames_dir}/",
           "--realtime", *CLI_MODEL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(frames_dir.glob("*.png"))) < 3 and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == status, output
    assert "Traceback" not in output and how in output
    frames, fps = read_video(out)
    assert len(frames) >= 3 and frames[0].shape == (64, 64, 3) and fps == pytest.approx(40.0)


# ------------------------------------------------------------------------------------------------ generate


def test_generate_text_to_image_and_count(tmp_path, make_engine):
    engine = make_engine()
    out = tmp_path / "pics" / "fox.png"
    assert cli_generate.main(parse("generate", "a red fox", "-o", str(out), "--seed", "5"), engine=engine) == 0
    one = cv2.imread(str(out))
    assert one.shape == (64, 64, 3)
    assert cli_generate.main(parse("generate", "a red fox", "-o", str(out), "--seed", "5", "--count", "3"),
                                engine=engine) == 0
    many = [cv2.imread(str(tmp_path / "pics" / f"fox-{k}.png")) for k in range(3)]
    assert np.array_equal(many[0], one)  # the first of the batch has the same seed
    assert not np.array_equal(many[0], many[1])  # the next seed draws another picture


def test_generate_image_to_image_any_input_size(tmp_path, make_engine):
    image = tmp_path / "photo.jpg"
    cv2.imwrite(str(image), np.random.default_rng(1).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    out = tmp_path / "styled.png"
    args = parse("generate", "a watercolor", "--image", str(image), "-o", str(out), "--strength", "0.6")
    assert args.steps is None  # -> 2 for image-to-image
    assert cli_generate.main(args, engine=make_engine()) == 0
    assert cv2.imread(str(out)).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--image", "IN/missing.png"], "no such image file"),
        (["--image", "IN/text.png"], "could not read"),
        (["-o", "IN/text.png/out.png"], "cannot create folder"),
        (["-o", "IN/out.gif"], "must end in one of"),
        (["--count", "0"], "--count must be at least 1"),
        (["--image", "IN/ok.png", "--steps", "1", "--strength", "0.5"], "steps x strength"),
        (["--strength", "0.3"], "--strength is for image-to-image: text-to-image (no --image) runs the whole schedule"),
        (["--steps", "99"], "error: --steps must be between 1 and 10, got 99"),
        (["--image", "IN/huge.png"], "could not read IN/huge.png: too large for OpenCV to decode"),
        (["--image", "IN/ok.png", "-o", "IN/ok.png"], "is the input image; write somewhere else"),
        (["--image", "IN/ok.png", "-o", "IN/sub/../ok.png"], "is the input image; write somewhere else"),
        (["-o", "IN/folder.png"], "is an existing folder, not a file"),
        (["-o", "IN/folder.png", "--count", "2", "--image", "IN/ok.png"], "OUT-1 is the input image"),
        (["--compile"], "generate draws each picture eagerly, without CUDA graphs or torch.compile: --compile would "
                        "do nothing here; leave it out"),
        (["--compile-aot", "--frame-graph", "--buckets", "1,2"], "--compile-aot, --buckets, --frame-graph would do"),
        (["--no-compile-cache"], "--compile-cache/--no-compile-cache would do nothing"),
    ],
)
def test_generate_errors(tmp_path, capsys, extra, message):
    """Each is one message and status 2, before the model loads; an input photo is never overwritten."""
    (tmp_path / "text.png").write_text("not an image")
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((32, 32, 3), np.uint8))
    oversized_png(tmp_path / "huge.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "sub").mkdir()
    if "OUT-1" in message:  # with --count 2 the outputs are folder-0.png and folder-1.png; the second is the input
        extra = [e.replace("IN/ok.png", "IN/folder-1.png") for e in extra]
        cv2.imwrite(str(tmp_path / "folder-1.png"), np.zeros((32, 32, 3), np.uint8))
        message = "folder-1.png' is the input image"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    extra = [e.replace("IN", str(tmp_path)) for e in extra]
    argv = ["generate", "a cat", "-o", str(tmp_path / "out.png"), *CLI_MODEL, *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("IN", str(tmp_path)) in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_an_output_file_that_cannot_be_overwritten_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """An existing output file without write permission: one message, status 2, no model load (run and generate);
    os.access stands in for the permission bits, which root would pass."""
    locked = [tmp_path / "locked.mp4", tmp_path / "locked.png"]
    for p in locked:
        p.write_bytes(b"old")
    real_access = sinks.os.access
    monkeypatch.setattr(sinks.os, "access", lambda p, mode: False if Path(p) in locked else real_access(p, mode))
    src = make_video(tmp_path / "in.avi", n=2)
    assert cli.main(["run", "-i", str(src), "-o", str(locked[0]), *CLI_MODEL]) == 2
    assert "cannot overwrite" in capsys.readouterr().err
    monkeypatch.setattr(cli_generate, "build_engine", lambda args: pytest.fail("the model loaded"))
    assert cli.main(["generate", "a cat", "-o", str(locked[1]), *CLI_MODEL]) == 2
    assert "cannot overwrite" in capsys.readouterr().err
    assert all(p.read_bytes() == b"old" for p in locked)


def test_cli_generate_end_to_end(tmp_path, allow_load):
    out = tmp_path / "cat.png"
    assert cli.main(["generate", "a cat", "-o", str(out), *CLI_MODEL]) == 0
    assert cv2.imread(str(out)).shape == (64, 64, 3)


def test_a_failing_sink_without_a_path_is_an_error_not_a_hang():
    """The error message read `sink.path`: a sink without one (a user's own) raised AttributeError on the writer
    thread, which died before setting `error`, and put() then waited for room forever."""

    class Npy:
        def write(self, frame, index, t=None):
            raise OSError("disk full")

        def close(self):
            pass

    writer = sinks.SinkThread(Npy(), maxsize=2)
    with pytest.raises(SinkError, match="writing Npy failed: disk full"):
        for index in range(10):
            writer.put(np.zeros((8, 8, 3), np.uint8), index)
    writer.close()


def test_pictures_are_read_and_written_by_python_and_never_left_half_written(tmp_path, monkeypatch, capsys, allow_load):
    """On Windows cv2.imread/imwrite open paths through the narrow C API and fail on a name outside the ANSI code
    page (`Fotos_José`): a folder of pictures was "none of its images could be read", every output "could not
    write". Python opens the files now (cv2.imdecode/imencode), so those OpenCV calls must not be needed at all. A
    picture is written under a hidden name and renamed when whole: a failed write leaves nothing under its name."""
    inputs, outputs = tmp_path / "Fotos_José", tmp_path / "Ausgabe_Jürgen"
    inputs.mkdir()
    for k in range(3):
        ok, data = cv2.imencode(".png", np.full((32, 32, 3), 40 * k, np.uint8))
        data.tofile(inputs / f"bild_{k}.png")

    def windows_narrow_path(*args, **kwargs):
        raise AssertionError("cv2.imread/imwrite cannot open non-ANSI paths on Windows")

    monkeypatch.setattr(cv2, "imread", windows_narrow_path)
    monkeypatch.setattr(cv2, "imwrite", windows_narrow_path)
    assert cli.main(["run", "-i", str(inputs), "-o", f"{outputs}/", *CLI_MODEL]) == 0
    assert sorted(p.name for p in outputs.iterdir()) == [f"frame_{k:06d}.png" for k in range(3)]
    assert cli.main(["generate", "eine Katze", "--image", str(inputs / "bild_1.png"),
                     "-o", str(outputs / "katze.png"), *CLI_MODEL]) == 0
    picture, why = sinks_read(outputs / "katze.png")
    assert picture is not None and picture.shape == (64, 64, 3), why

    def disk_full(src, dst):  # the partial file is written; the disk fills before it is complete and renamed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinks.os, "replace", disk_full)
    capsys.readouterr()
    assert cli.main(["generate", "eine Katze", "-o", str(outputs / "voll.png"), *CLI_MODEL]) == 1  # while running
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device (0 of 1 pictures written)" in err
    assert [p.name for p in outputs.iterdir() if "voll" in p.name] == []  # no half picture, no temporary


def sinks_read(path: Path):
    from turbostream.io.sources import read_image

    return read_image(path)


def test_a_stop_signal_lost_while_the_model_loads_still_stops_the_run(tmp_path, monkeypatch, capsys):
    """SIGTERM raises KeyboardInterrupt wherever the main thread is; while the model loads that can be inside a
    finalizer, which Python only prints: the run went on to the end and exited 0 (`docker stop` then SIGKILLed it,
    leaving an .mp4 without its index). The signal is remembered and the run stops once it can."""
    src = make_video(tmp_path / "in.avi", n=6)

    def loading_the_model(args):
        try:
            signal.raise_signal(signal.SIGTERM)  # arrives during loading...
        except KeyboardInterrupt:
            pass  # ...and a finalizer swallows its KeyboardInterrupt
        return FakeEngine()

    monkeypatch.setattr(cli_run, "build_engine", loading_the_model)
    out = tmp_path / "out.avi"
    assert cli.main(["run", "-i", str(src), "-o", str(out), *CLI_MODEL]) == 143
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert not out.exists()


def test_an_engine_failing_mid_run_is_one_error_with_the_summary_of_what_was_kept(tmp_path, monkeypatch, capsys):
    """A CUDA error on the 3rd call: the outputs are finalized (they play, with the frames before it), and the run
    ends as other failed runs do (the summary, `turbostream: error: ...`, status 1), not with a traceback."""
    src = make_video(tmp_path / "in.avi", n=12)

    def illegal_access(engine, frames):
        if len(engine.calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(cli_run, "build_engine", lambda args: FakeEngine(max_batch=1, on_run=illegal_access))
    out = tmp_path / "out.avi"
    assert cli.main(["run", "-i", str(src), "-o", str(out), *CLI_MODEL]) == 1
    err = capsys.readouterr().err  # the log goes there too
    assert "turbostream: error: the engine failed: RuntimeError: CUDA error: an illegal memory access" in err
    assert "stopped by an error: 2 frames" in err and f"{out}: 2 frames" in err and "Traceback" not in err
    frames, _ = read_video(out)
    assert len(frames) == 2  # the two computed before the error, in a file that plays


def test_the_status_lines_rate_keeps_a_window_not_the_whole_run():
    """The status line's frames/s is over the last 2 s: after ten minutes at 30 frames/s it says 10 once the run
    slows to 10, and it keeps about a window's samples, not one per frame of the run."""
    from turbostream.pipeline import _Rate

    rate, t, count = _Rate(window=2.0), 0.0, 0
    for _ in range(30 * 600):
        t, count = t + 1 / 30, count + 1
        rate.add(t, count)
    for _ in range(10 * 10):
        t, count = t + 1 / 10, count + 1
        now = rate.add(t, count)
    assert now == pytest.approx(10.0, rel=0.1) and len(rate._changes) <= 2 * 2.0 * 30


def test_a_slow_output_holds_the_reader_back_within_the_hand_offs_bounds(tmp_path):
    """A file read in order into an output slower than the engine: the reader waits for the writer, holding no more
    frames than the hand-offs between them (capture, engine results, the writer's queue) hold; unbounded, the whole
    file would sit in memory as decoded frames (at 4K, 24 MiB each)."""
    n = 150
    src = make_video(tmp_path / "in.avi", n=n, size=(32, 32))
    capture = CaptureThread(str(src), realtime=False, transform=partial(fit_frame, width=32, height=32)).start()
    lags = []

    class SlowOutput:
        path = tmp_path / "slow"

        def write(self, frame, index, t=None):
            lags.append(capture.frames_read - index)  # frames decoded but not yet written
            time.sleep(0.005)

        def close(self):
            pass

        def describe(self):
            return "slow"

    summary = Pipeline(FakeEngine(width=32, height=32, max_batch=4), capture, [SlowOutput()], StreamParams(),
                       batch=4).run()
    assert summary.frames == n and len(lags) == n
    held = capture.queue_size + max(8, 2 * 4) + 8 + 4 + 2  # capture, results, writer queue, a batch, in hand
    assert max(lags) <= held, (max(lags), held)
