"""Sources fed what users have: damaged and variable-rate videos, single pictures with EXIF orientation, odd file
names, files served over HTTP (OpenCV's reader, on the CPU; FFmpeg makes the videos OpenCV cannot write)."""

from __future__ import annotations

import functools
import http.server
import logging
import shutil
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from test_runner import FakeEngine, index_of, make_video, parse, read_video

from turbostream.cli import run as cli_run
from turbostream.errors import SourceError
from turbostream.io import sources
from turbostream.io.sources import CaptureThread, SourceSpec, VideoReader, parse_source

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs FFmpeg (.ci/run installs it)")


def _frames_read(path: Path) -> list[np.ndarray]:
    """Every frame a reader of `path` hands over, to its end."""
    reader = VideoReader(parse_source(str(path)))
    frames = []
    while (frame := reader.read()) is not None:
        frames.append(frame)
    reader.release()
    return frames


def _zero(path: Path, start: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    data[start : start + length] = bytes(length)
    path.write_bytes(bytes(data))


def _chunks(path: Path) -> list[int]:
    """Where each frame's chunk ("00dc", its size, its JPEG) starts in an MJPG AVI (make_video's .avi)."""
    data = path.read_bytes()
    movi = data.find(b"movi")
    starts, at = [], data.find(b"00dc", movi)
    while at != -1 and data[at + 8 : at + 10] == b"\xff\xd8":  # the index at the end names chunks too
        starts.append(at)
        at = data.find(b"00dc", at + 8)
    return starts


def test_damage_in_the_first_frames_is_skipped_not_a_file_without_frames(tmp_path, caplog):
    """A file whose first frames will not decode was refused whole ("has no readable frames"): only the first read
    was tried, where later reads skip damage. The frames after it are read now, and the loss is said."""
    src = make_video(tmp_path / "in.avi", n=40, size=(64, 64))
    for start in _chunks(src)[:3]:  # the first three frames' JPEG data, their chunks kept
        _zero(src, start + 8, int.from_bytes(src.read_bytes()[start + 4 : start + 8], "little"))
    caplog.set_level(logging.WARNING, logger="turbostream")
    frames = _frames_read(src)
    assert [index_of(f) for f in frames] == list(range(3, 40))
    assert "its first 3 frame(s) could not be decoded" in caplog.text


def test_a_hole_longer_than_a_hundred_frames_is_read_through_when_the_count_says_more_come(tmp_path, caplog):
    """100 failed reads in a row counted as the end of the file: a longer hole lost everything after it, and the
    run said "done". While the container's count says frames are still to come, the reader goes on."""
    n = 400
    src = make_video(tmp_path / "in.avi", n=n, size=(64, 64))
    for start in _chunks(src)[100:260]:  # frames 100..259: their JPEG data, their chunks kept
        _zero(src, start + 8, int.from_bytes(src.read_bytes()[start + 4 : start + 8], "little"))
    caplog.set_level(logging.WARNING, logger="turbostream")
    frames = _frames_read(src)
    assert len(frames) == n - 160
    assert [index_of(f) for f in frames[100:]] == [k % 128 for k in range(260, n)]  # indices are 7 bits
    assert "160 frame(s) after frame 100 could not be decoded" in caplog.text
    assert "ended after" not in caplog.text


def test_a_file_cut_short_still_ends_soon_after_its_last_frame(tmp_path):
    """Reading through holes must not make a truncated file's end slow: its missing frames fail at once."""
    src = make_video(tmp_path / "in.avi", n=400, size=(64, 64))
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 3])
    reader = VideoReader(parse_source(str(src)))
    while reader.read() is not None:
        pass
    assert 100 < reader.frames_read < 160


@needs_ffmpeg
def test_a_variable_frame_rate_webm_is_not_called_cut_short(tmp_path, caplog):
    """WebM carries no frame count: OpenCV's is the duration times the nominal rate, too high for a recording whose
    rate drops (60 frames at 30 fps, then 30 at 15). Its last frame is at its end: no "cut short" warning."""
    src = tmp_path / "vfr.webm"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=30", "-t", "4",
                    "-vf", "setpts='if(lt(N,60),N/30/TB,(60+(N-60)*2)/30/TB)'", "-fps_mode", "vfr",
                    "-c:v", "libvpx", "-b:v", "200k", str(src)], check=True, timeout=60)
    caplog.set_level(logging.WARNING, logger="turbostream")
    reader = VideoReader(parse_source(str(src)))
    assert reader.announced and reader.announced > 100  # the estimate: more frames than the file holds
    while reader.read() is not None:
        pass
    assert reader.frames_read == 90
    assert "cut short" not in caplog.text


def test_a_relative_file_name_with_a_colon_opens(tmp_path, monkeypatch):
    """FFmpeg read "take:1.mp4" as protocol "take": the file was "not a video format OpenCV can read"."""
    make_video(tmp_path / "take:1.mp4", n=5, size=(64, 64))
    monkeypatch.chdir(tmp_path)
    for name in ("take:1.mp4", "./take:1.mp4"):
        assert [index_of(f) for f in _frames_read(Path(name))] == list(range(5))


def test_a_folder_with_a_superscript_digit_in_a_name_is_ordered_not_refused(tmp_path):
    """str.isdigit() is true for "²", which int() refuses: the whole folder failed to open."""
    for name in ("frame10.png", "frame2.png", "5²2.png"):
        cv2.imwrite(str(tmp_path / name), np.full((16, 16, 3), 100, np.uint8))
    names = [p.name for p in sorted(tmp_path.iterdir(), key=sources._natural_key)]
    assert names == ["5²2.png", "frame2.png", "frame10.png"]


def _quadrants(width: int, height: int) -> np.ndarray:
    """RGB: red top left, green top right, blue bottom left, white bottom right."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2 :] = (0, 255, 0)
    image[height // 2 :, : width // 2] = (0, 0, 255)
    image[height // 2 :, width // 2 :] = 255
    return image


def _corner_colors(frame: np.ndarray) -> list[tuple[int, ...]]:
    h, w = frame.shape[:2]
    return [tuple(int(v) // 128 for v in frame[y, x]) for y, x in ((h // 4, w // 4), (h // 4, 3 * w // 4),
                                                                    (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4))]


def test_a_single_picture_is_read_upright_as_its_exif_orientation_says(tmp_path):
    """A phone portrait is stored sideways with EXIF orientation 6: `run -i photo.jpg` read it through OpenCV's
    video reader, which ignores EXIF (a folder of the same picture came out upright). Read as a folder of one now."""
    upright = _quadrants(96, 64)
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # 64 wide, 96 high: orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    spec = parse_source(str(tmp_path / "photo.jpg"))
    assert spec.picture
    with CaptureThread(spec, realtime=False) as capture:
        assert capture.size == (96, 64) and capture.frame_count == 1
        got = capture.take(5)
        assert got is not None and capture.take(5) is None and capture.ended
    assert _corner_colors(got.frame) == _corner_colors(upright)
    out = tmp_path / "out"
    assert cli_run.main(parse("run", "-i", str(tmp_path / "photo.jpg"), "-o", str(out)), engine=FakeEngine()) == 0
    assert len(list(out.iterdir())) == 1


@pytest.mark.parametrize("content, why", [(b"", "an empty file"), (b"not a picture", "not an image OpenCV can read")],
                         ids=["empty", "text"])
def test_a_picture_file_that_cannot_be_read_is_a_clear_error(tmp_path, content, why):
    (tmp_path / "photo.jpg").write_bytes(content)
    with pytest.raises(SourceError, match=rf"picture .*photo\.jpg could not be read: {why}"):
        CaptureThread(str(tmp_path / "photo.jpg")).start()


def _serving(folder: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def _capture_counting_opens(url: str, opened: list) -> CaptureThread:
    def opener(spec: SourceSpec):
        opened.append(spec)
        return sources.open_reader(spec)

    return CaptureThread(url, opener=opener, reconnect_delay_s=0.05)


def test_a_picture_at_a_url_is_one_frame_not_a_stream_replayed_forever(tmp_path, caplog):
    """A picture served over HTTP announces no frame count, so it read as a live stream: opened again at its end,
    forever, warning twice a second. It is one frame now, read once."""
    cv2.imwrite(str(tmp_path / "photo.jpg"), cv2.cvtColor(_quadrants(64, 64), cv2.COLOR_RGB2BGR))
    httpd = _serving(tmp_path)
    opened: list = []
    caplog.set_level(logging.INFO, logger="turbostream")
    try:
        with _capture_counting_opens(f"http://127.0.0.1:{httpd.server_address[1]}/photo.jpg", opened) as capture:
            got = [capture.latest(0.5) for _ in range(10)]
            assert capture.ended and capture.error is None
        assert len([g for g in got if g is not None]) == 1 and len(opened) == 1
        assert "reconnecting" not in caplog.text
    finally:
        httpd.shutdown()


@needs_ffmpeg
def test_a_file_at_a_url_that_announces_no_count_ends_when_it_starts_again(tmp_path, caplog):
    """An MPEG-TS file served over HTTP announces no frame count, so it reads as a live stream: at its end it was
    opened again, played again from its start, and so on forever (a run that never ended, its output growing
    faster than real time). A pass that ran ahead of real time, then a first frame the same as the first one, is a
    file: it ends there."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25", "-t", "4",
                    "-c:v", "mpeg2video", "-f", "mpegts", str(tmp_path / "clip.ts")], check=True, timeout=60)
    httpd = _serving(tmp_path)
    opened: list = []
    caplog.set_level(logging.INFO, logger="turbostream")
    try:
        capture = _capture_counting_opens(f"http://127.0.0.1:{httpd.server_address[1]}/clip.ts", opened)
        assert capture.spec.live
        with capture:
            deadline = time.monotonic() + 30
            while not capture.ended and time.monotonic() < deadline:
                capture.latest(0.5)
            assert capture.ended and capture.error is None
        assert len(opened) == 2 and capture.frames_read == 100
        assert "started again from its first frame: a file at a URL, not a live stream" in caplog.text
    finally:
        httpd.shutdown()


def test_a_video_file_whose_frames_all_fail_to_decode_is_refused_at_once(tmp_path):
    """Frames present, none decodable (each JPEG of an MJPG .avi zeroed): the open gives up after MAX_BAD_READS
    reads. Without that bound it read on until its 10 s open timeout, left its thread spinning, and the process
    aborted at exit ("terminate called without an active exception")."""
    path = make_video(tmp_path / "v.avi", n=50, size=(64, 64))
    data = bytearray(path.read_bytes())
    i = 0
    while (j := data.find(b"\xff\xd8\xff", i)) >= 0:
        k = data.find(b"\xff\xd9", j)
        data[j:k + 2] = bytes(k + 2 - j)
        i = k + 2
    path.write_bytes(bytes(data))
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="no readable frames"):
        CaptureThread(str(path), realtime=False).start()
    assert time.monotonic() - t0 < 5



def test_a_hole_in_a_video_file_is_read_through_for_at_most_max_hole_reads():
    """Past MAX_BAD_READS failed reads a file goes on only while its container announces frames still to come, and
    for at most MAX_HOLE_READS: a header announcing 10**9 frames over an undecodable rest must not read for ever."""
    reader = VideoReader.__new__(VideoReader)
    reader.announced, reader.frames_read, reader.bad_reads = 10**9, 5, 0
    assert reader._may_go_on(sources.MAX_BAD_READS - 1) and reader._may_go_on(sources.MAX_HOLE_READS - 1)
    assert not reader._may_go_on(sources.MAX_HOLE_READS)
    reader.announced = 5 + sources.MAX_BAD_READS  # nothing left to come: the end, after MAX_BAD_READS
    assert not reader._may_go_on(sources.MAX_BAD_READS)


class _TimedReader:
    """A video file's reader as CaptureThread sees it: blank frames with the given times in the file (pts_s), at a
    nominal 10 fps."""

    def __init__(self, times: list[float]):
        self.times, self.next = times, 0
        self.fps, self.frame_count, self.size, self.finite = 10.0, len(times), (16, 16), True
        self.pts_s = 0.0

    def read(self):
        if self.next >= len(self.times):
            return None
        self.pts_s, self.next = self.times[self.next], self.next + 1
        return np.zeros((16, 16, 3), np.uint8)

    def release(self):
        pass


def _paced(times: list[float], timeout: float = 10.0) -> list[tuple[float, float]]:
    """(time in the file, seconds since the first frame was handed over) of every frame a paced realtime capture of
    a file with these frame times hands over, taken as soon as each comes."""
    capture = CaptureThread(SourceSpec("file", "clip.mp4", "clip.mp4"), realtime=True,
                            opener=lambda spec: _TimedReader(times)).start()
    assert capture.pace  # a file in a realtime capture is played at its own pace
    got = []
    try:
        while (item := capture.take(timeout)) is not None:
            got.append((item.pts, item.t))
    finally:
        capture.close()
    return [(pts, t - got[0][1]) for pts, t in got]


def test_a_paced_file_is_delivered_by_its_frame_times_not_its_average_rate():
    """`run --realtime` and `serve --source` play a file as a camera would deliver it. A file whose frame rate varies
    (10 frames at 0.1 s, then 5 at 0.3 s: a nominal 10 fps) was paced by frame number at that rate, so its last frame
    came 1 s before its time, off its pictures' sound. Each frame now comes at its time in the file."""
    times = [k * 0.1 for k in range(10)] + [1.0 + k * 0.3 for k in range(5)]
    got = _paced(times)
    assert [pts for pts, _ in got] == times  # taken at once: none dropped as stale
    late = [t - pts for pts, t in got]
    assert min(late) >= -0.01  # never early
    assert late[-1] < 0.25, late  # by frame number at 10 fps the last frame came at 1.4 s, 0.8 s early


def test_a_paced_file_with_broken_frame_times_is_played_on_and_says_so(caplog):
    """A frame time that jumps past MAX_PACE_GAP_S (a broken timestamp) or goes backwards would freeze the picture
    or play a burst: such a frame comes one frame interval (the nominal 0.1 s) after the one before, said once."""
    caplog.set_level(logging.WARNING, logger="turbostream")
    jump = sources.MAX_PACE_GAP_S + 100
    times = [0.0, 0.1, 0.2, jump, jump + 0.1, 0.5, 0.6]
    start = time.perf_counter()
    got = _paced(times)
    assert time.perf_counter() - start < 5
    steps = [round(b - a, 1) for (_, a), (_, b) in zip(got, got[1:])]
    assert steps == [0.1] * 6, steps
    assert caplog.text.count("frame times in the file") == 1
    assert "jump 159.8 s ahead" in caplog.text


@needs_ffmpeg
def test_run_realtime_keeps_a_variable_frame_rate_file_on_its_timeline(tmp_path):
    """`run --realtime` on a real variable-rate file (10 frames at 0.1 s, then 5 at 0.3 s): its frames come by their
    times in the file and the video output is written on that timeline, the frame before a longer interval held over
    it. Paced and written by frame number (before), each frame took one slot of the average rate: by 1 s into the
    video it showed frame 6, where the file (and its sound) is at frame 10."""
    indexed = make_video(tmp_path / "indexed.avi", n=15, size=(64, 64), fps=10)
    src = tmp_path / "vfr.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(indexed),
                    "-vf", "setpts='if(lt(N,10),N/10,1+(N-10)*0.3)/TB'", "-fps_mode", "vfr",
                    "-c:v", "mpeg4", "-q:v", "2", str(src)], check=True, timeout=60)
    times = [k / 10 for k in range(10)] + [1 + k * 0.3 for k in range(5)]
    out = tmp_path / "out.avi"
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out), "--realtime"), engine=FakeEngine()) == 0
    written, fps = read_video(out)
    shown = [index_of(frame) for frame in written]
    # Each frame in the slot nearest its time (the first of two in one slot kept), held until the next one's.
    expected = []
    for slot in range(len(shown)):
        first = [k for k, t in enumerate(times) if round(t * fps) == slot]
        expected.append(first[0] if first else expected[-1])
    wrong = [(slot, got, want) for slot, (got, want) in enumerate(zip(shown, expected)) if got != want]
    assert len(wrong) <= 2, (fps, shown, expected)  # a frame or two dropped as stale on a loaded machine
    assert abs(len(shown) / fps - (times[-1] + 1 / fps)) < 1.5 / fps  # as long as the file
