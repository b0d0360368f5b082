"""Frame sinks of the capture loop: an OpenCV window, a video file, a folder of images; SinkThread writes a file
sink on writer threads behind a bounded queue. Stream URLs (stream.py) and the virtual camera (virtualcam.py) are
parsed and checked here too; their sinks never block a writer thread (paced.py).

VideoSink writes .mp4/.mov/.mkv in H.264 through ffmpeg (h264.py; OpenCV's mp4v where there is no ffmpeg with
libx264) and .avi with MJPG, keeping the source's frame rate and timeline (and the source file's sound, added when
the file is finished: audio.py); FolderSink writes frame_000000.png ...; WindowSink needs a GUI build of OpenCV and
a display. Frames are uint8 RGB (H, W, 3).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import shutil
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from ..errors import SinkError, path_stat
from .audio import AudioError, SourceAudio, remux_with_audio
from .ffmpeg import INSTALL_FFMPEG
from .h264 import H264_SUFFIXES, H264Writer, h264_program
from .sources import SourceSpec, redact
from .stream import STREAM_FORMATS, StreamSink, check_stream_output, is_stream_url
from .virtualcam import VirtualCamSink, parse_virtualcam, virtualcam_module

log = logging.getLogger("turbostream.sinks")

# Containers and the codec OpenCV writes each with (.mp4, .mov and .mkv are H.264 through ffmpeg where it can): every
# one of these reads back with the OpenCV it was written by.
VIDEO_FOURCC = {".mp4": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
WINDOW_QUIT_KEYS = (ord("q"), ord("Q"), 27)  # q or Esc
WINDOW_FULLSCREEN_KEYS = (ord("f"), ord("F"))
LOW_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk is what filled up
# The slowest rate a stream or a virtual camera is sent at (PacedSink's lowest): receivers give up on a stream that
# goes quiet for seconds, so a slower source (a slideshow at 0.2 fps) has each frame repeated until the next.
PACED_MIN_FPS = 1.0



@dataclass(frozen=True)
class OutputSpec:
    """What the user's DST names. kind: "window", "video" (path with a video suffix), "folder", "stream" (a URL:
    rtmp://, srt://, rtsp://, udp://) or "virtualcam"; path is None for the last two and the window."""

    kind: str
    path: Path | None
    text: str

    def describe(self) -> str:
        if self.kind == "stream":
            return redact(self.text)
        return self.text if self.path is None else str(self.path)


OUTPUT_KINDS_HELP = ("'window', a video file (.mp4, .mov, .mkv, .avi), a folder of images (a path without a suffix, "
                     "or ending in /), a stream URL (rtmp://, srt://, rtsp://, udp://) or 'virtualcam'")


def parse_output(text: str) -> OutputSpec:
    """Classify DST: 'window', 'virtualcam[:DEVICE]', a stream URL, a video file (.mp4 .mov .mkv .avi), or a folder
    (no suffix, ends in /, or exists)."""
    spec = str(text).strip()
    if not spec:
        raise SinkError(f"empty output: use {OUTPUT_KINDS_HELP}")
    if spec == "-":  # not a folder named "-": there is no raw stream to stdout
        raise SinkError("output '-' (standard output) is not supported: to pipe frames to a player, stream them "
                        "(-o udp://127.0.0.1:5000, then ffplay udp://127.0.0.1:5000)")
    if spec.lower() == "window":
        return OutputSpec("window", None, spec)
    if spec.lower() == "virtualcam" or spec.lower().startswith("virtualcam:"):
        return OutputSpec("virtualcam", None, spec)
    if is_stream_url(spec):
        return OutputSpec("stream", None, spec)
    if "://" in spec:
        raise SinkError(f"unknown output {redact(spec)!r}: stream URLs start with "
                        f"{', '.join(s + '://' for s in STREAM_FORMATS)}")
    path = Path(spec).expanduser()
    found = path_stat(path, spec, SinkError)
    if spec.endswith(("/", os.sep)) or (found is not None and stat.S_ISDIR(found.st_mode)):
        return OutputSpec("folder", path, spec)
    suffix = path.suffix.lower()
    if suffix in VIDEO_FOURCC:
        return OutputSpec("video", path, spec)
    if not suffix:
        return OutputSpec("folder", path, spec)
    raise SinkError(f"unknown output {spec!r}: use {OUTPUT_KINDS_HELP}")


def window_support_error() -> str | None:
    """Why an OpenCV window cannot open here (headless OpenCV, no display), or None when it can."""
    match = re.search(r"^\s*GUI:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    if match and match.group(1).upper() == "NONE":
        return (
            "--output window needs OpenCV with GUI support, but the installed OpenCV is headless "
            "(opencv-python-headless). Install the GUI build: `pip uninstall -y opencv-python-headless && "
            "pip install opencv-python`, or write to a video file or a folder instead"
        )
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return (
            "--output window needs a display, and neither DISPLAY nor WAYLAND_DISPLAY is set "
            "(over ssh use `ssh -X`), or write to a video file or a folder instead"
        )
    return None


def write_image(path: Path, bgr: np.ndarray, params: tuple[int, ...] = ()) -> None:
    """Encode a uint8 BGR picture by path's suffix (.png, .jpg...) and write it whole; OSError if it cannot be.

    Python writes the file, not OpenCV (cv2.imwrite opens paths with the narrow C API on Windows, which cannot name
    a folder outside the ANSI code page), under a hidden temporary name renamed once complete: a full disk or a
    stop leaves no truncated picture under a frame's name for the next program to take as good."""
    ok, data = cv2.imencode(path.suffix, bgr, list(params))
    if not ok:
        raise OSError(f"OpenCV could not encode a {path.suffix} picture")
    partial = path.with_name(f".{path.name}.partial")
    try:
        data.tofile(partial)
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise


def ensure_writable_folder(folder: Path, output: str) -> None:
    """Create folder (and parents) if missing; SinkError naming `output` if it cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SinkError(f"cannot create folder {folder} for output {output!r}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SinkError(f"cannot write to folder {folder} (output {output!r}): permission denied")


def check_output_file(path: Path, output: str) -> None:
    """SinkError if path, a file about to be written, is an existing folder or an existing file not writable."""
    found = path_stat(path, output, SinkError)
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise SinkError(f"output {output!r} is an existing folder, not a file")
    if found is not None and not os.access(path, os.W_OK):
        raise SinkError(f"cannot overwrite {output!r}: permission denied")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder: the same resolved path (in Windows' case-blind terms there), or
    (both existing) one on disk. The second catches names a case-insensitive file system (macOS) or a hard link takes
    for one file: `-i take.mp4 -o Take.mp4` on a Mac is the input, and writing it would destroy the recording."""
    if os.path.normcase(a.resolve()) == os.path.normcase(b.resolve()):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet): only the same name is the same file
        return False


def check_outputs(outputs: list[OutputSpec], source: SourceSpec | None = None) -> None:
    """Everything about the outputs that can be known before the model loads; creates output folders.

    SinkError for: two outputs with the same path, more than one window, a window without GUI support, an output
    that is the input, a folder that cannot be created or written, a stream URL without FFmpeg to send it (or
    without a host), a virtual camera without pyvirtualcam.
    """
    if not outputs:
        raise SinkError(f"no output given: use {OUTPUT_KINDS_HELP}")
    names: set[str] = set()  # outputs that are not files: a window, stream URLs
    files: list[Path] = []
    for out in outputs:
        if out.path is None:
            twice = out.text.lower() in names
            names.add(out.text.lower())
        else:
            twice = any(same_file(out.path, f) for f in files)
            files.append(out.path)
        if twice:
            raise SinkError(f"output {out.describe()!r} is given twice")
    for out in outputs:
        if out.kind == "stream":
            check_stream_output(out.text)
            continue
        if out.kind == "virtualcam":
            virtualcam_module()  # the package; its backend is checked when the camera opens (still before the model)
            continue
        if out.kind == "window":
            reason = window_support_error()
            if reason:
                raise SinkError(reason)
            continue
        if source is not None and source.kind in ("file", "folder"):
            if same_file(out.path, Path(str(source.target))):
                raise SinkError(f"output {out.text!r} is the input; write somewhere else")
        folder = out.path if out.kind == "folder" else (out.path.parent if str(out.path.parent) else Path("."))
        ensure_writable_folder(folder, out.text)
        if out.kind == "video":
            check_output_file(out.path, out.text)
        if out.kind == "folder":
            old = sum(1 for _ in out.path.glob("frame_*.png"))
            if old:
                log.warning("%s already holds %d frame_*.png files; frames with the same numbers are overwritten",
                            out.path, old)


class VideoSink:
    """Writes frames into a video file at a fixed frame rate: H.264 through ffmpeg for .mp4/.mov/.mkv (mp4v by
    OpenCV where there is no ffmpeg with libx264, said when the sink is made), MJPG for .avi.

    The file is opened at the first frame, so a run that fails before producing anything leaves no empty file.
    fill_gaps keeps the source's timing in a realtime run, so a minute of camera is a minute of video even when the
    engine kept up with a third of it: "index" (a file played in real time) repeats a frame for the source frames
    dropped before it, by their index; "time" (cameras and URLs, whose real rate often differs from the one they
    announce: a webcam in low light, an IP camera) places each frame by when it was read, at `fps` frames a second of
    its clock, repeating it over the slots since the last one and leaving out a frame that comes more than one slot
    early (counted: `left_out`). "pts" (a video file read in order) places each frame by its time in the file the same
    way, with no lead: a file whose frame rate varies (phones record such files) keeps its timeline, and so its
    sound, at `fps` (the file's average rate): a frame is held over a longer interval (counted: `held`) and a frame
    in a slot already filled is left out; a constant-rate file has every frame once. Timestamps that do not increase
    (a broken file) are said once, and from there each frame is written once. None writes every frame once.

    A write that fails (disk full, quota, file size limit) is a SinkError: ffmpeg's writer and OpenCV 5 say so for
    each frame (write() returns False), ffmpeg also when it finishes the file, and close() opens the finished file
    and counts its frames, which also catches a failure that only the container's index met, and every failure under
    OpenCV 4 (whose write() reports nothing).

    audio: the source file's sound, remuxed into the finished file by close() and cut to its length; a remux that
    fails keeps the silent file and says why in `sound` (never a SinkError: the frames are all there).
    """

    MAX_REPEAT = 600  # one frame never stands in for more than this many (a stalled source, a clock jump)
    # ...except in a file ("pts"), where a still stretch of a screen recording may last minutes, and cutting it short
    # would put the sound out of step from there on; a timestamp that jumps hours still costs at most this.
    MAX_PTS_GAP_S = 600.0

    def __init__(self, path: Path | str, fps: float, size: tuple[int, int], *,
                 fill_gaps: Literal["index", "time", "pts"] | None = None, audio: SourceAudio | None = None) -> None:
        if fill_gaps not in (None, "index", "time", "pts"):
            raise ValueError(f"fill_gaps must be None, 'index', 'time' or 'pts', not {fill_gaps!r}")
        self.path = Path(path)
        self.audio = audio
        self.sound: str | None = None  # after close(), with audio: "with the source's sound (...)", or why not
        self.fps = float(fps)
        self.size = size  # (width, height)
        self.fill_gaps = fill_gaps
        self.frames_written = 0
        self.left_out = 0  # frames not written because they came early (fill_gaps "time", "pts")
        self.held = 0  # extra copies written to hold a frame over a longer interval of the file (fill_gaps "pts")
        self._t0: float | None = None  # fill_gaps "time": when the first frame written was read; "pts": its time
        self._last_t: float | None = None  # fill_gaps "pts": the time of the frame before
        self._last_bgr: np.ndarray | None = None  # fill_gaps "pts": the frame before, held over a longer interval
        self.failed: str | None = None  # why writing failed, once it has
        self.left: str | None = None  # after a failed write: what the file left behind holds
        self._writer: cv2.VideoWriter | H264Writer | None = None
        self._last_index: int | None = None
        suffix = self.path.suffix.lower()
        self._h264 = h264_program() if suffix in H264_SUFFIXES else None
        self.codec = "H.264" if self._h264 else VIDEO_FOURCC[suffix]
        if suffix in H264_SUFFIXES and self._h264 is None:
            log.warning("%s is written in mp4v (MPEG-4 Part 2), which browsers and phones do not play: there is no "
                        "ffmpeg with H.264 (libx264) to write it; %s", self.path, INSTALL_FFMPEG)

    def _open(self) -> cv2.VideoWriter | H264Writer:
        if self._h264 is not None:
            writer = H264Writer(self._h264, self.path, self.fps, self.size)
        else:
            # Absolute: FFmpeg takes the "rec-10" of a relative "rec-10:30.mp4" for a protocol's name (as sources.py).
            writer = cv2.VideoWriter(os.path.abspath(self.path), cv2.VideoWriter_fourcc(*self.codec), self.fps,
                                     self.size)
        if not writer.isOpened():
            why = getattr(writer, "failure", None)
            raise SinkError(f"could not open {self.path} for writing ({self.codec} video at "
                            f"{self.size[0]}x{self.size[1]}){f': {why}' if why else ''}")
        return writer

    def write(self, frame: np.ndarray, index: int, t: float | None = None) -> None:
        """Append uint8 RGB (H, W, 3); index is the source frame index (fill_gaps "index"), t when it was read, in
        seconds of any steady clock (fill_gaps "time"; None: now), or its time in the file (fill_gaps "pts"; None:
        written once). SinkError once a write fails."""
        if self.failed is not None:
            raise SinkError(f"writing {self.path} failed: {self.failed}")
        if self.fill_gaps == "pts":
            self._write_by_pts(frame, t)
            return
        repeats = self._repeats(index, t)
        if not repeats:
            self.left_out += 1
            return
        self._put(self._bgr(frame), repeats)

    def _bgr(self, frame: np.ndarray) -> np.ndarray:
        if (frame.shape[1], frame.shape[0]) != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)

    def _put(self, bgr: np.ndarray, repeats: int) -> None:
        """Write a BGR frame `repeats` times (opening the file at the first); SinkError when a write fails."""
        if self._writer is None:
            self._writer = self._open()
        for _ in range(repeats):
            # False: the backend could not write it (OpenCV 5). OpenCV 4 returns None whatever happened; close()
            # checks the file then.
            if self._writer.write(bgr) is False:
                self.failed = f"frame {self.frames_written + 1} could not be written: {self._why(self._writer)}"
                raise SinkError(f"writing {self.path} failed: {self.failed}")
            self.frames_written += 1

    def _repeats(self, index: int, t: float | None) -> int:
        """How many times this frame is written: 1, or more to fill the gap before it, or 0 (fill_gaps "time": a
        frame more than a slot early, which would make the video longer than the time it shows)."""
        if self.fill_gaps == "index":
            last, self._last_index = self._last_index, index
            return 1 if last is None else max(1, min(index - last, self.MAX_REPEAT))
        if self.fill_gaps != "time":
            return 1
        if t is None:
            t = time.perf_counter()
        if self._t0 is None:
            self._t0 = t
            return 1
        # Slots 0 .. frames_written - 1 are filled; this frame belongs in `slot`. One slot of lead is allowed, so two
        # frames that clock jitter puts in one slot (the next one then skips a slot) are both kept.
        slot = round((t - self._t0) * self.fps)
        if slot < self.frames_written - 1:
            return 0
        repeats = max(1, slot - self.frames_written + 1)
        if repeats > self.MAX_REPEAT:
            # A gap longer than MAX_REPEAT slots (a source reconnecting for minutes) is cut short: the clock moves on
            # by the slots not filled, so the frames after it are placed from here, not each repeated to catch up.
            self._t0 += (repeats - self.MAX_REPEAT) / self.fps
            repeats = self.MAX_REPEAT
        return repeats

    def _write_by_pts(self, frame: np.ndarray, t: float | None) -> None:
        """fill_gaps "pts": a frame shows in the file from its time to the next frame's, so the slots up to this
        frame's are filled with the frame before it (held), then this one takes its slot, unless a frame filled
        that slot already (left out). Written once without a usable time."""
        bgr = self._bgr(frame)
        last_t, self._last_t = self._last_t, t
        previous, self._last_bgr = self._last_bgr, bgr  # a frame left out still shows until the next one
        if t is None or last_t is None:  # no time to place it by, or the first frame: its slot is the next
            if self._t0 is None and t is not None:
                self._t0 = t
            self._put(bgr, 1)
            return
        if not t > last_t:
            log.warning("%s: the source's frame times stop increasing after %.3f s (a damaged or unusual file): from "
                        "here each frame is written once, and the sound may drift from the pictures",
                        self.path, last_t)
            self.fill_gaps = None
            self._put(bgr, 1)
            return
        slot = round((t - self._t0) * self.fps)
        if slot < self.frames_written:
            self.left_out += 1
            return
        hold = slot - self.frames_written
        most = max(self.MAX_REPEAT, round(self.MAX_PTS_GAP_S * self.fps))
        if hold > most:
            self._t0 += (hold - most) / self.fps  # the frames after it are placed from here
            hold = most
        if hold:
            self._put(previous, hold)
            self.held += hold
        self._put(bgr, 1)

    def close(self) -> None:
        """Finalize the file (writes the container's index: without it an .mp4 does not play), then check that it
        reads back with every frame written; SinkError if not."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        writer.release()
        if self.failed is None and getattr(writer, "failure", None):  # ffmpeg could not finish the file
            self.failed = f"ffmpeg could not finish the file: {self._why(writer)}"
            self.left = self._check_file(left=True)
            raise SinkError(self.failed)
        if self.failed is not None:  # a write failed: say what the file left behind is worth, not what went in
            self.left = self._check_file(left=True)
        elif self.frames_written:
            problem = self._check_file()
            if problem:
                self.failed = f"{problem}: {self._why()}"
                raise SinkError(self.failed)
            if self.audio is not None:
                self._add_sound(self.audio)

    def _add_sound(self, audio: SourceAudio) -> None:
        """Remux the finished file with the source's sound, cut to the video's length; the file is replaced only by
        one that checks out (opens, holds every frame)."""
        seconds = self.frames_written / self.fps
        log.info("%s: adding the sound of %s (%s)", self.path, audio.path.name, audio.description)
        try:
            remuxed = remux_with_audio(audio, self.path, seconds)
            try:
                problem = self._check_file(path=remuxed)
                if problem:
                    raise AudioError(f"the remuxed file failed its check: {problem}")
                os.replace(remuxed, self.path)
            finally:
                remuxed.unlink(missing_ok=True)
        except (AudioError, OSError) as exc:
            reason = str(exc) if isinstance(exc, AudioError) else (exc.strerror or str(exc))
            self.sound = f"without the source's sound: {reason}"
            log.warning("%s is kept without the sound of %s: %s", self.path, audio.path.name, reason)
            return
        self.sound = f"with the source's sound ({audio.description})"

    def _check_file(self, left: bool = False, path: Path | None = None) -> str | None:
        """What is wrong with the finished file, or None. Opening reads only the container's header and index
        (milliseconds, however long the video): a file cut short by a full disk lacks its index (an .mp4 does not
        open, an .avi or .mkv counts no frames) or counts fewer frames than were written. left: the file a failed
        write left behind, described as such (it does not play, or how many frames it holds). path: another file to
        check the same way (the remux that adds the sound)."""
        path = path or self.path
        cap = cv2.VideoCapture(os.path.abspath(path))
        try:
            if not cap.isOpened():
                return "the file left does not open (no index): it holds nothing playable" if left \
                    else "the finished file does not open"
            count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        finally:
            cap.release()
        if left:
            return f"the file left holds about {int(count)} frames" if count >= 1 else \
                "the file left has no index of its frames (players that scan for frames may read some)"
        if not count >= 1:
            return "the finished file has no index of its frames"
        # .mkv's count is estimated from its duration (it may round below the truth): only the others are exact.
        if path.suffix.lower() != ".mkv" and int(count) < self.frames_written:
            return f"the finished file holds {int(count)} of the {self.frames_written} frames written"
        return None

    def _why(self, writer=None) -> str:
        """The likely reason a write failed, from what can be checked afterwards (OpenCV keeps its errno; ffmpeg's
        writer has its last words, said when the checks find nothing plainer)."""
        said = getattr(writer, "failure", None)
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            return said or f"the file is gone ({exc.strerror or exc})"
        try:
            import resource  # not on Windows

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY and size >= limit:
                return f"it reached the process's file size limit of {limit} bytes (ulimit -f)"
        except (ImportError, OSError, ValueError):
            pass
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            free = None
        if free is not None and free < LOW_DISK_BYTES:
            return f"the disk is full ({free // 1024} KiB free)"
        return said or "the disk may be full or over a quota"

    def describe(self) -> str:
        if self.failed is not None:
            left = f"; {self.left}" if self.left else ""
            return f"{self.path}: FAILED after {self.frames_written} frames: {self.failed}{left}"
        if not self.frames_written:
            return f"{self.path}: no frames (no file written)"
        n = self.left_out
        if self._last_t is not None:  # placed by the file's own times ("pts")
            left_out = (f" ({self.held} repeated and {n} left out to keep the source's timing)"
                        if n or self.held else "")
        else:
            left_out = (f" ({n} frame{'' if n == 1 else 's'} that came faster than {self.fps:g} a second left out "
                        "to keep real time)" if n else "")
        sound = f", {self.sound}" if self.sound else ""
        return (f"{self.path}: {self.frames_written} frames, {self.size[0]}x{self.size[1]} {self.codec}, "
                f"{self.fps:g} fps, {self.frames_written / self.fps:.1f} s{left_out}{sound}")


class FolderSink:
    """Writes every frame as FOLDER/frame_NNNNNN.png, numbered by its source frame index.

    Each frame is its own file, so several writer threads may call write() at once (`workers`): PNG encoding of
    a 512x512 frame takes 10-20 ms, slower than the engine, and OpenCV releases the GIL while it encodes.
    """

    workers = 4

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.frames_written = 0
        self._count_lock = threading.Lock()

    def write(self, frame: np.ndarray, index: int, t: float | None = None) -> None:
        """Write uint8 RGB (H, W, 3) as frame_<index>.png (t, when it was read, is not needed)."""
        target = self.path / f"frame_{index:06d}.png"
        # PNG compression 1: lossless and a few times faster to write than the default 3.
        try:
            write_image(target, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), (cv2.IMWRITE_PNG_COMPRESSION, 1))
        except OSError as exc:
            raise SinkError(f"could not write {target}: {exc.strerror or exc}") from None
        with self._count_lock:
            self.frames_written += 1

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.path}/: {self.frames_written} PNG frames"


class WindowSink:
    """An OpenCV window; show() returns False once the user pressed q or Esc or closed it. Main thread only.

    f toggles full screen; `fullscreen` opens it so (an installation started at boot has nobody to press f). Needs a
    GUI build of OpenCV (window_support_error says why not).
    """

    def __init__(self, title: str = "turbostream", fullscreen: bool = False) -> None:
        reason = window_support_error()
        if reason:
            raise SinkError(reason)
        self.title = title
        self.frames_written = 0
        self._fullscreen = False
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
            if fullscreen:
                cv2.setWindowProperty(title, cv2.WND_PROP_FULLSCREEN, cv2.WINDOW_FULLSCREEN)
                self._fullscreen = True
        except cv2.error as exc:
            raise SinkError(f"could not open a window: {str(exc).strip().splitlines()[-1]}") from None

    def show(self, frame: np.ndarray) -> bool:
        cv2.imshow(self.title, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.frames_written += 1
        return self.poll()

    def poll(self) -> bool:
        """Handle window events (keeps the window responsive between frames); False when the user asked to quit."""
        key = cv2.waitKey(1) & 0xFF
        if key in WINDOW_QUIT_KEYS:
            return False
        if key in WINDOW_FULLSCREEN_KEYS:
            self._fullscreen = not self._fullscreen
            mode = cv2.WINDOW_FULLSCREEN if self._fullscreen else cv2.WINDOW_NORMAL
            cv2.setWindowProperty(self.title, cv2.WND_PROP_FULLSCREEN, mode)
        try:
            if self.frames_written and cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
                return False  # closed with the window manager's button
        except cv2.error:
            return False
        return True

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:
            pass

    def describe(self) -> str:
        return f"window: {self.frames_written} frames shown"


def open_sink(out: OutputSpec, fps: float, size: tuple[int, int], *,
              fill_gaps: Literal["index", "time", "pts"] | None = None, audio: SourceAudio | None = None):
    """The sink for a checked output other than the window: VideoSink (fill_gaps, audio: see there), FolderSink,
    StreamSink (audio: see there) or VirtualCamSink.

    A virtual camera opens now (SinkError when there is no backend); the others open at their first frame.
    """
    paced_fps = max(fps, PACED_MIN_FPS)
    if out.kind == "video":
        return VideoSink(out.path, fps, size, fill_gaps=fill_gaps, audio=audio)
    if out.kind == "folder":
        return FolderSink(out.path)
    if out.kind == "stream":
        return StreamSink(out.text, paced_fps, size, audio=audio)
    if out.kind == "virtualcam":
        return VirtualCamSink(paced_fps, size, parse_virtualcam(out.text))
    raise ValueError(f"no sink for a {out.kind} output")


class SinkThread:
    """Runs a sink's writes on writer threads behind a bounded queue (put() waits when it is full): every output of
    `run` goes through one.

    A sink has write(frame, index, t) (t: when the frame was read, perf_counter() seconds) and close() (SinkError, or
    any exception, for a failure), describe() for the run's summary, and optionally `path` (what messages and thread
    names call it; the class name otherwise) and `workers`.
    One thread for a video (frames must arrive in order); `sink.workers` threads for sinks whose frames are
    independent files. close() writes what is queued, then finalizes the sink once.
    """

    _END = object()

    def __init__(self, sink, maxsize: int = 8) -> None:
        self.sink = sink
        self.error: str | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.name = str(getattr(sink, "path", type(sink).__name__))
        self._threads = [
            threading.Thread(target=self._run, name=f"writer {self.name} {k}", daemon=True)
            for k in range(max(1, int(getattr(sink, "workers", 1))))
        ]
        for thread in self._threads:
            thread.start()

    def put(self, frame: np.ndarray, index: int, t: float | None = None) -> None:
        """Queue a frame (its source index, when it was read) for writing; SinkError once writing has failed."""
        while True:
            if self.error is not None:
                raise SinkError(self.error)
            try:
                self._queue.put((frame, index, t), timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is self._END:
                    return
                if self.error is None:  # after a failure, drain until close() so put() never blocks for good
                    self.sink.write(*item)
        except Exception as exc:
            if self.error is None:
                self.error = str(exc) if isinstance(exc, SinkError) else f"writing {self.name} failed: {exc}"
            while self._queue.get() is not self._END:
                pass

    def close(self) -> None:
        """Write what is queued, finalize the file and join the writer threads; idempotent."""
        if not self._threads:
            return
        # One end marker per running thread, counted before any is queued: a thread that takes a marker exits, and
        # counting as the markers go in would skip it and leave another thread waiting for one forever.
        for _ in range(sum(thread.is_alive() for thread in self._threads)):
            self._queue.put(self._END)
        for thread in self._threads:
            thread.join()
        self._threads = []
        try:
            self.sink.close()
        except Exception as exc:  # a failed finalize is still worth reporting, not a crash
            self.error = self.error or f"finalizing {self.name} failed: {exc}"
