"""Frame sources: a camera index ("0"), a video file, an rtsp:// / http(s):// / rtmp:// / udp:// URL, or a folder of
images, read by OpenCV on a thread of its own (CaptureThread), which hands frames over in one of two ways:

- realtime (live sources, `run --realtime`, `serve --source`): a one-frame slot. A newer frame replaces one
  nobody took yet (counted in `dropped`), so a slow consumer always gets the newest frame and latency never
  builds up. A file read this way is paced to its own frame rate, as a camera would deliver it.
- in order (files and folders by default): a bounded queue; the reader waits when it is full. Nothing is dropped
  and memory stays bounded.

Frames are uint8 RGB (H, W, 3) everywhere, as in the rest of turbostream; OpenCV's BGR stays inside io/.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import cv2
import numpy as np

from ..config import RunConfig
from ..errors import SourceError, path_stat

log = logging.getLogger("turbostream.sources")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "srt")  # srt: through ffmpeg (ffmpeg_reader.py)
# A frame rate outside this range is a container's placeholder (0, 90000...), not a real rate. Slideshows and
# timelapses run below 1 fps (0.2: a picture every 5 s); 0.01 is a frame every 100 s.
SANE_FPS = (0.01, 240.0)
DEFAULT_FPS = RunConfig.fallback_fps  # image folders, and sources that report no usable rate
OPEN_TIMEOUT_S = RunConfig.open_timeout_s
RECONNECT_ATTEMPTS = RunConfig.reconnect_attempts
MIN_SIDE = 8  # a smaller picture cannot be fitted to the engine (codec.check_frame): a folder skips it
# A damaged spot in a video file (a broken download, a recording glitch) makes OpenCV's read fail for the frames
# whose packets will not decode, and then go on with the next ones; a failed read is the end of the file only after
# this many failures in a row (an intact file's end costs that many quick failed reads, once). While the container's
# frame count says frames are still to come, a longer hole is read through, up to MAX_HOLE_READS failures.
MAX_BAD_READS = 100
MAX_HOLE_READS = 10_000
# A paced file (`run --realtime`, `serve --source`) shows each frame for as long as the file says, as a player does;
# a still longer than this is taken for a broken timestamp rather than frozen on (a live show would stop for it).
MAX_PACE_GAP_S = 60.0
# A file that ends this many frames (or this share of them) short of the count its container announces is reported
# as cut short; counts estimated from the duration are often a frame or two off.
SHORT_END_FRAMES, SHORT_END_SHARE = 2, 0.01


def quiet_opencv() -> None:
    """Silence OpenCV's and FFmpeg's own console messages (our errors say what failed); call before opening."""
    # FFmpeg reads this when OpenCV first loads its backend; a value the user set wins.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # very old OpenCV builds
        pass


# Query parameters that carry secrets: SRT's passphrase and stream id, a CDN's token or key.
SECRET_QUERY_KEYS = ("passphrase", "streamid", "key", "token", "password", "pass", "secret")


def redact(url: str) -> str:
    """A URL fit for logs and messages, inputs and outputs alike: its password, an RTMP stream key (the path after
    the app) and secret query parameters as ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc, path, query = parts.netloc, parts.path, parts.query
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    if parts.scheme.lower() in ("rtmp", "rtmps"):
        segments = path.split("/")
        if len([s for s in segments if s]) >= 2:  # /app/KEY -> /app/***
            path = "/".join(segments[:-1] + ["***"])
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*/:")
    if (netloc, path, query) == (parts.netloc, parts.path, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, path=path, query=query))


def _natural_key(path: Path) -> list:
    """frame_2.png before frame_10.png. The split's odd parts are the digit runs (str.isdigit would also take "²",
    which int() refuses); text and numbers stay at alternate places, so keys compare."""
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", path.name))]


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """An OpenCV image (BGR, BGRA or gray) -> uint8 RGB (H, W, 3)."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# ------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceSpec:
    """What the user's SRC names. kind: "camera" (target: int index), "file", "folder" or "url" (target: str)."""

    kind: str
    target: int | str
    text: str

    @property
    def live(self) -> bool:
        """Cameras and URLs deliver frames at their own pace: frames not taken in time are stale."""
        return self.kind in ("camera", "url")

    @property
    def listens(self) -> bool:
        """An srt:// source in listener mode: opening it waits, without a time limit, for a sender to call."""
        if self.kind != "url" or not str(self.target).lower().startswith("srt://"):
            return False
        try:
            query = parse_qsl(urlsplit(str(self.target)).query, keep_blank_values=True)
        except ValueError:
            return False
        return any(k.lower() == "mode" and v.lower() == "listener" for k, v in query)

    @property
    def picture(self) -> bool:
        """A single picture file (read as a folder of one)."""
        return self.kind == "file" and Path(str(self.target)).suffix.lower() in IMAGE_SUFFIXES

    def describe(self) -> str:
        if self.kind == "camera":
            return f"camera {self.target}"
        if self.kind == "url":
            return redact(str(self.target))
        return f"{self.kind} {self.target}"


def parse_source(text: str) -> SourceSpec:
    """Classify SRC without opening it: camera index, URL, folder or video file; SourceError if it names nothing."""
    spec = str(text).strip()
    if not spec:
        raise SourceError("no input given: use a camera index (0), a video file, a URL or a folder of images")
    if spec.isdigit():
        return SourceSpec("camera", int(spec), spec)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    if match:
        scheme = match.group(1).lower()
        if scheme not in URL_SCHEMES:
            raise SourceError(
                f"unsupported URL scheme {scheme!r} in {redact(spec)}: use one of "
                + ", ".join(f"{s}://" for s in URL_SCHEMES)
            )
        if scheme == "srt":
            from .ffmpeg_reader import check_ffmpeg_source  # (it imports this module)

            check_ffmpeg_source(spec)  # no port, no ffmpeg, no SRT in it: said before the model loads
        return SourceSpec("url", spec, spec)
    path = Path(spec).expanduser()
    found = path_stat(path, spec, SourceError)
    if found is not None and stat.S_ISDIR(found.st_mode):
        return SourceSpec("folder", str(path), spec)
    if found is not None and stat.S_ISREG(found.st_mode):
        if not os.access(path, os.R_OK):
            raise SourceError(f"cannot read {spec}: permission denied")
        return SourceSpec("file", str(path), spec)
    if found is not None:
        raise SourceError(f"input {spec} is neither a file nor a folder")
    raise SourceError(
        f"no such file or folder: {spec} "
        "(the input is a camera index like 0, a video file, a URL or a folder of images)"
    )


class VideoReader:
    """A camera, video file or URL through cv2.VideoCapture; opening reads the first frame to prove it works."""

    def __init__(self, spec: SourceSpec, open_timeout_s: float = OPEN_TIMEOUT_S) -> None:
        self.spec = spec
        if spec.kind == "url":
            ms = int(open_timeout_s * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
            cap = cv2.VideoCapture(str(spec.target), cv2.CAP_FFMPEG, params)
        elif spec.kind == "file":
            # Absolute: FFmpeg takes the "take" of a relative "take:1.mp4" for a protocol's name.
            cap = cv2.VideoCapture(os.path.abspath(spec.target))
        else:
            cap = cv2.VideoCapture(spec.target)
        if not cap.isOpened():
            cap.release()
            raise SourceError(self._open_failure())
        if spec.kind == "camera":
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # where the driver supports it: no backlog of old frames
        ok, first = cap.read()
        skipped = 0
        while (not ok or first is None) and spec.kind == "file" and skipped < MAX_BAD_READS:
            skipped += 1  # damage in the first frames: the file may go on past it, as read() does
            ok, first = cap.read()
        if not ok or first is None:
            cap.release()
            raise SourceError(self._no_frames())
        if skipped:
            log.warning("video file %s: its first %d frame(s) could not be decoded (a damaged spot?) and were skipped",
                        spec.target, skipped)
        if min(first.shape[:2]) < MIN_SIDE:
            cap.release()
            raise SourceError(f"{spec.describe()} has frames of {first.shape[1]}x{first.shape[0]}: too small "
                              f"({MIN_SIDE}x{MIN_SIDE} at least)")
        self._cap, self._first = cap, first
        self.frames_read = 1
        self.bad_reads = skipped  # failed reads of a file that later went on: frames lost to damage
        self._last_ms = cap.get(cv2.CAP_PROP_POS_MSEC)  # the time of the last frame read (its end check)
        self._end_checked = False
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps: float | None = fps if SANE_FPS[0] <= fps <= SANE_FPS[1] else None
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        # A URL that announces a frame count is a video file served over the network (http(s), HLS on demand; live
        # streams announce none): like a file, it ends where its reads end, where a live stream that stops is opened
        # again (opening a file again would play it again from its start, forever).
        # A picture at a URL announces no count, and is one frame all the same.
        picture = spec.kind == "url" and urlsplit(str(spec.target)).path.lower().endswith(IMAGE_SUFFIXES)
        self.finite = spec.kind == "file" or (spec.kind == "url" and (count > 0 or picture))
        self.announced: int | None = count if self.finite and count > 0 else None
        # The progress total of an in-order run: a file's only (a URL is read as live, newest frame first).
        self.frame_count: int | None = self.announced if spec.kind == "file" else None
        self.size = (first.shape[1], first.shape[0])

    def _open_failure(self) -> str:
        s = self.spec
        if s.kind == "camera":
            return (
                f"camera {s.target} could not be opened: no such device, or it is busy or not permitted "
                "(try another index; on Linux `ls /dev/video*` lists cameras)"
            )
        if s.kind == "url":
            return (
                f"could not open {redact(str(s.target))}: unreachable, refused, or not a stream OpenCV can read "
                "(check the address and credentials; -v shows OpenCV's own messages)"
            )
        return f"could not open video file {s.target}: not a video format or codec OpenCV can read"

    def _no_frames(self) -> str:
        s = self.spec
        if s.kind == "file":
            return f"video file {s.target} has no readable frames"
        return f"{s.describe()} opened but delivered no frame"

    def read(self) -> np.ndarray | None:
        """The next frame, uint8 RGB; None at the end of a file or when a live source fails."""
        if self._first is not None:
            bgr, self._first = self._first, None
            return _to_rgb(bgr)
        ok, bgr = self._cap.read()
        failed = 0
        # A file goes on past a damaged spot (its failed reads return at once); a network read may wait its whole
        # timeout before failing, so a URL is not retried here: a live one is the capture's to reconnect, and a video
        # file at a URL ends where its reads end.
        while (not ok or bgr is None) and self.spec.kind == "file" and self._may_go_on(failed):
            failed += 1
            ok, bgr = self._cap.read()
        if not ok or bgr is None:
            self._check_end()
            return None
        if failed:
            self.bad_reads += failed
            log.warning("%s: %d frame(s) after frame %d could not be decoded (a damaged spot?) and were skipped",
                        self._name(), failed, self.frames_read)
        self.frames_read += 1
        self._last_ms = self._cap.get(cv2.CAP_PROP_POS_MSEC)
        return _to_rgb(bgr)

    @property
    def pts_s(self) -> float:
        """The presentation time of the frame read last, in seconds (OpenCV's, from the file's timestamps)."""
        return self._last_ms / 1000.0

    def _may_go_on(self, failed: int) -> bool:
        """Whether a file whose last `failed` reads failed may still have frames after them."""
        if failed < MAX_BAD_READS:
            return True
        # A longer hole, where the container counts frames still to come (a count only estimated from the duration
        # may be a few frames high: those cost a quick failed read each, at the end).
        to_come = (self.announced or 0) - (self.frames_read + self.bad_reads + failed)
        return to_come > 0 and failed < MAX_HOLE_READS

    def _name(self) -> str:
        return f"video file {self.spec.target}" if self.spec.kind == "file" else self.spec.describe()

    def _check_end(self) -> None:
        """At a file's end: warn (once a reader; a looping capture's later passes are quiet) when it ended well short
        of the frame count its container announced."""
        expected = self.announced
        if expected is None or self._end_checked:
            return
        self._end_checked = True
        got = self.frames_read + self.bad_reads
        tolerance = max(SHORT_END_FRAMES, SHORT_END_SHARE * expected)
        if self.fps and self._last_ms > 0:
            # Matroska/WebM carry no frame count: OpenCV's is the duration times the nominal rate, too high for a
            # file whose rate varies (a phone or a browser recording). Its last frame's time still tells an intact
            # file (its last frame near the end of its duration) from one cut short.
            duration_ms = expected / self.fps * 1000.0
            if self._last_ms >= duration_ms - (tolerance + 1) * 1000.0 / self.fps:
                return
        if expected - got > tolerance:
            # The count is the container's: a file trimmed without re-encoding counts frames it never shows, so
            # this may be a whole file; a download or recording cut off is the case worth a warning.
            log.warning("%s ended after %d of the %d frames its container counts: cut short or damaged (or trimmed "
                        "without re-encoding, which keeps frames it never shows)", self._name(), self.frames_read,
                        expected)

    def release(self) -> None:
        self._cap.release()


def read_image(path: Path) -> tuple[np.ndarray | None, str]:
    """The uint8 BGR picture in file path, turned as its EXIF orientation says, or None and why not.

    The file is read by Python and decoded from memory (cv2.imdecode), not opened by OpenCV (cv2.imread): on Windows
    OpenCV opens paths with the narrow C API, which cannot open a name outside the ANSI code page (`Fotos_José`,
    any CJK folder). OpenCV raises, instead of answering None, for a picture past its pixel limit
    (OPENCV_IO_MAX_IMAGE_PIXELS: 2^30 by default)."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror or exc}"
    if data.size == 0:
        return None, "an empty file"
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error:
        return None, "too large for OpenCV to decode (past its pixel limit, OPENCV_IO_MAX_IMAGE_PIXELS)"
    return image, "" if image is not None else "not an image OpenCV can read"


class FolderReader:
    """A folder of images (jpg, png, webp, bmp) in natural name order; unreadable files, and pictures under
    MIN_SIDE pixels on a side (icons), are skipped with a warning. A single picture file is read as a folder of one
    (through OpenCV's image reader, which turns it as its EXIF orientation says; its video reader would not)."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        folder = Path(str(spec.target))
        if spec.kind == "file":
            image, why = read_image(folder)  # read twice (here and below): once, at open, for a clear error
            if image is None:
                raise SourceError(f"picture {folder} could not be read: {why}")
            if min(image.shape[:2]) < MIN_SIDE:
                raise SourceError(f"picture {folder} is {image.shape[1]}x{image.shape[0]}: too small "
                                  f"({MIN_SIDE}x{MIN_SIDE} at least)")
            files = [folder]
        else:
            try:
                files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            except OSError as exc:
                raise SourceError(f"cannot list folder {folder}: {exc.strerror or exc}") from None
        if not files:
            raise SourceError(f"folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        self._files = deque(sorted(files, key=_natural_key))
        self.frame_count: int | None = len(files)
        self.fps: float | None = None
        self.skipped = 0
        self._first: np.ndarray | None = None
        self._first = self.read()
        if self._first is None:
            raise SourceError(f"folder {folder}: none of its {len(files)} images could be read "
                              f"(or each is under {MIN_SIDE}x{MIN_SIDE} px)")
        self.size = (self._first.shape[1], self._first.shape[0])

    def read(self) -> np.ndarray | None:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        while self._files:
            path = self._files.popleft()
            image, why = read_image(path)
            if image is None:
                self.skipped += 1
                log.warning("skipping %s: %s", path, why)
                continue
            if min(image.shape[:2]) < MIN_SIDE:
                self.skipped += 1
                log.warning("skipping %s: %dx%d is too small (%dx%d at least)", path, image.shape[1],
                            image.shape[0], MIN_SIDE, MIN_SIDE)
                continue
            return _to_rgb(image)
        return None

    def release(self) -> None:
        self._files.clear()


def open_reader(spec: SourceSpec, open_timeout_s: float = OPEN_TIMEOUT_S, stop: threading.Event | None = None):
    """Open a source (blocking; network sources give up after open_timeout_s, an SRT listener once `stop` is set):
    a FolderReader, an FfmpegReader (srt://) or a VideoReader; SourceError if it cannot be used."""
    if spec.kind == "folder" or spec.picture:
        return FolderReader(spec)
    from .ffmpeg_reader import FfmpegReader, reads_through_ffmpeg  # (it imports this module)

    if reads_through_ffmpeg(spec):
        return FfmpegReader(spec, open_timeout_s, stop=stop)
    return VideoReader(spec, open_timeout_s)


@dataclass(frozen=True)
class CapturedFrame:
    """One frame as read: index counts every frame read from the source (dropped ones too); t is perf_counter();
    pts, for a video file's frames, its presentation time in seconds (where it falls in the video: a file whose frame
    rate varies spaces its frames unevenly; a looping file's later passes go on from the first's end); None for other
    sources."""

    index: int
    frame: np.ndarray
    t: float
    pts: float | None = None


class CaptureThread:
    """Reads a source on its own thread; the consumer takes the newest frame (realtime) or every frame in order.

    The constructor parses SRC (SourceError for a missing file or a bad URL scheme); start() opens the source on
    the capture thread and waits for the outcome, raising SourceError when it cannot be opened (a network source
    gives up after open_timeout_s). Then take()/latest() hand frames over until `ended`. close() stops and joins
    the thread, which releases the capture.

    Live sources that stop delivering frames are reopened up to `reconnect` times (reconnect_delay_s, then twice
    that, ... apart; counted in `reconnects`) before the capture ends with `error` set. The end of a file is not an
    error.
    `transform` runs on the capture thread on every frame (the runner fits frames to the engine size there, off
    the GPU thread). `pace` (default: realtime and not live) delivers a file at its own frame rate, like a camera,
    from the first take() on. `loop` starts a file or folder over at its end (installations; not for live sources).
    """

    def __init__(
        self,
        spec: str | SourceSpec,
        *,
        realtime: bool = True,
        queue_size: int = 8,
        reconnect: int | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        pace: bool | None = None,
        open_timeout_s: float = OPEN_TIMEOUT_S,
        reconnect_delay_s: float = 0.5,
        loop: bool = False,
        opener: Callable[[SourceSpec], VideoReader | FolderReader] | None = None,
    ) -> None:
        self.spec = spec if isinstance(spec, SourceSpec) else parse_source(spec)
        self.realtime = realtime
        self.queue_size = 1 if realtime else max(1, int(queue_size))
        self.reconnect = (RECONNECT_ATTEMPTS if self.spec.live else 0) if reconnect is None else max(0, reconnect)
        self.pace = (realtime and not self.spec.live) if pace is None else pace
        self.latest_pts: float | None = None  # the time in the file of the frame latest() returned last
        self._pts_pass, self._pts_offset, self._last_pts = 0, 0.0, 0.0  # a looping file's times go on across passes
        self._pace_chosen = pace is not None
        self._pace_warned = False  # a paced file's frame times were found unusable once (warned)
        self.transform = transform
        self.open_timeout_s = open_timeout_s
        self.reconnect_delay_s = reconnect_delay_s
        self.loop = loop and not self.spec.live
        self.loops = 0  # times a looping file or folder started over
        self._opener = opener or (lambda s: open_reader(s, open_timeout_s, stop=self._stop))
        # Set by start() once the source is open; plain values, written by the capture thread only.
        self.fps: float | None = None  # the source's own frame rate when it reports a sane one
        self.frame_count: int | None = None  # files and folders: frames announced by the container
        self.size: tuple[int, int] | None = None  # (width, height) of the source's frames
        self.frames_read = 0
        self.dropped = 0
        self.reconnects = 0
        self._error: str | None = None
        self._pending: deque[CapturedFrame] = deque()
        self._cond = threading.Condition()
        self._finished = False
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._wanted = threading.Event()  # set by the first take(): a paced file starts its clock then
        self._thread: threading.Thread | None = None
        self._abandoned = False  # close() waited for the thread in vain: it is left to exit on its own
        self._reader: VideoReader | FolderReader | None = None  # the open source; the capture thread's alone

    # -------------------------------------------------------------- consumer side

    def start(self) -> CaptureThread:
        """Open the source on the capture thread and start reading; SourceError (after cleanup) if it cannot open."""
        if self._thread is not None:
            raise RuntimeError("CaptureThread.start() called twice")
        self._thread = threading.Thread(target=self._run, name=f"capture {self.spec.describe()}", daemon=True)
        self._thread.start()
        # The backend's own timeouts bound opening; the margin covers a backend that ignores them. A listener waits
        # for its sender as long as it takes: until then, Ctrl-C (or close() from another thread) ends the wait.
        try:
            if self.spec.listens:
                # In steps: a lock waited on without a timeout does not wake for Ctrl-C on Windows.
                while not self._opened.wait(0.25):
                    pass
                opened = True
            else:
                opened = self._opened.wait(self.open_timeout_s + 5.0)
        except BaseException:
            self.close(timeout=2.0)
            raise
        if not opened:
            self.close(timeout=0.5)
            self._error = f"timed out opening {self.spec.describe()} after {self.open_timeout_s:.0f} s"
            raise SourceError(self._error)
        if self._error is not None and self.size is None:
            self._thread.join()
            raise SourceError(self._error)
        return self

    def take(self, timeout: float) -> CapturedFrame | None:
        """The next frame to process (newest when realtime, next in order otherwise); None after timeout or at end."""
        deadline = time.monotonic() + max(0.0, timeout)
        self._wanted.set()
        with self._cond:
            while not self._pending:
                if self._finished:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            item = self._pending.popleft()
            self._cond.notify_all()  # a reader waiting for room in the queue
            return item

    def latest(self, timeout: float) -> tuple[int, np.ndarray] | None:
        """(frame_index, uint8 RGB frame) newer than the last one returned, waiting up to timeout s; else None.
        `latest_pts` is then that frame's time in a video file (None for other sources)."""
        item = self.take(timeout)
        if item is None:
            return None
        self.latest_pts = item.pts
        return item.index, item.frame

    @property
    def ended(self) -> bool:
        """True once the source finished or failed and every frame it delivered has been taken."""
        with self._cond:
            return self._finished and not self._pending

    @property
    def error(self) -> str | None:
        """Why the source failed (a message for the user), or None; the end of a file is not a failure."""
        return self._error

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self, timeout: float | None = None) -> None:
        """Stop reading, join the thread (it releases the capture); safe to call more than once."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if (thread is not None and thread.is_alive() and thread is not threading.current_thread()
                and not self._abandoned):
            # A network read can block until its own timeout; the thread is a daemon if it outlives this wait.
            thread.join(self.open_timeout_s + 2.0 if timeout is None else timeout)
            if thread.is_alive():
                # Once is enough: a later close() (the command's own, after the pipeline's) does not wait again.
                self._abandoned = True
                log.warning("capture of %s did not stop in time; leaving it to exit", self.spec.describe())
        with self._cond:
            self._pending.clear()  # a closed capture hands nothing more over, and reads as ended

    def __enter__(self) -> CaptureThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- capture thread

    def _run(self) -> None:
        self._reader = None
        try:
            try:
                self._reader = self._opener(self.spec)
            except SourceError as exc:
                self._error = str(exc)
                return
            except Exception as exc:  # an OpenCV error is still the source's fault, not ours
                self._error = f"could not open {self.spec.describe()}: {exc}"
                return
            reader = self._reader
            self.fps, self.frame_count, self.size = reader.fps, reader.frame_count, reader.size
            if self.spec.live and getattr(reader, "finite", False) and self.realtime and not self._pace_chosen:
                # A video file at a URL arrives as fast as it downloads: played at its own rate, as a file is.
                self.pace = True
            self._opened.set()
            self._read_loop()
        except Exception as exc:
            log.debug("capture thread failed", exc_info=True)
            self._error = f"reading {self.spec.describe()} failed: {exc}"
        finally:
            if self._reader is not None:
                self._reader.release()
                self._reader = None
            with self._cond:
                self._finished = True
                self._cond.notify_all()
            self._opened.set()

    def _read_loop(self) -> None:
        """Read until the end, a stop, or a live source lost for good; self._reader is the open reader, if any."""
        failures = 0
        # A file served over HTTP that announces no frame count (MPEG-TS) reads as a live stream, and opening it again
        # plays it from its start. Such a pass ran ahead of real time (it downloads faster than it plays), and the
        # source opened again starts with the very first frame it started with: both together tell the file, where a
        # live stream opened again at a black frame, or one that delivered a burst at connect, keeps reconnecting.
        first_digest: bytes | None = None
        reopened = ran_ahead = False
        pass_start, pass_frames = time.perf_counter(), 0
        interval = 1.0 / (self.fps or DEFAULT_FPS)
        if self.pace:
            # A file played as if live starts when someone watches (the model may load for minutes before),
            # not at open: its first seconds would otherwise all be dropped as stale.
            while not self._wanted.wait(0.1):
                if self._stop.is_set():
                    return
        t_start = time.perf_counter()
        due: float | None = None  # when the frame handed over last was due (pace)
        while not self._stop.is_set():
            frame = self._reader.read() if self._reader is not None else None
            if frame is None and self.loop and self.frames_read and not self._stop.is_set():
                # An installation playing a file forever: start over (indices keep counting up).
                self._reader.release()
                self._reader = None
                self._reader = self._opener(self.spec)
                self._reader._end_checked = True  # its end was judged on the first pass
                self.loops += 1
                frame = self._reader.read()
            if frame is None:
                if not self.spec.live or self._stop.is_set():
                    break  # end of a file or folder
                if self._reader is not None and getattr(self._reader, "finite", False):
                    log.info("%s ended after %d frames", self.spec.describe(), self._reader.frames_read)
                    break  # a video file at a URL: opening it again would play it again, forever
                rate = self.fps or DEFAULT_FPS
                pass_s = time.perf_counter() - pass_start
                ran_ahead = pass_frames >= 2 * rate and pass_frames > 2 * rate * pass_s
                if failures >= self.reconnect:
                    what = self.spec.describe()
                    self._error = (
                        f"lost {what}: no frames after {failures} reconnect attempt(s)" if failures
                        else f"{what} stopped delivering frames"
                    )
                    break
                failures += 1
                self.reconnects += 1
                delay = min(self.reconnect_delay_s * 2 ** (failures - 1), 8.0)
                log.warning(
                    "%s stopped delivering frames; reconnecting in %.1f s (attempt %d of %d)",
                    self.spec.describe(), delay, failures, self.reconnect,
                )
                if self._reader is not None:
                    self._reader.release()
                    self._reader = None
                if self._stop.wait(delay):
                    break
                try:
                    self._reader = self._opener(self.spec)
                    reopened = True
                    pass_start, pass_frames = time.perf_counter(), 0
                except SourceError as exc:
                    log.warning("%s", exc)
                continue
            failures = 0
            if self.spec.kind == "url" and (first_digest is None or reopened):
                digest = hashlib.blake2b(frame.tobytes(), digest_size=16).digest()
                if reopened and ran_ahead and digest == first_digest:
                    log.info("%s started again from its first frame: a file at a URL, not a live stream; it ended "
                             "after %d frames", self.spec.describe(), self.frames_read)
                    break
                first_digest = first_digest or digest
                reopened = False
            pass_frames += 1
            if self.transform is not None:
                frame = self.transform(frame)
            # A file's frames carry their time in the file; a looping capture's later passes go on from the first's
            # end (each pass starts at its file's time 0 again), so times only increase.
            pts = getattr(self._reader, "pts_s", None) if self.spec.kind == "file" else None
            if pts is not None:
                if self.loops != self._pts_pass:  # a new pass: it starts a frame after the last one handed over
                    self._pts_pass, self._pts_offset = self.loops, self._last_pts + interval - pts
                pts += self._pts_offset
            if self.pace:
                # Deliver each frame when a player would show it, as a camera delivers: a file's frame its time in
                # the file after the one before (a file whose frame rate varies keeps its timing, and so stays on
                # its sound), other frames (folders) one frame interval after it. A slow decode just runs late:
                # the clock is not moved by it.
                due = t_start if due is None else due + self._pace_step(pts, interval)
                delay = due - time.perf_counter()
                if delay > 0 and self._stop.wait(delay):
                    break
            if pts is not None:
                self._last_pts = pts
            self._hand_over(CapturedFrame(self.frames_read, frame, time.perf_counter(), pts))
            self.frames_read += 1

    def _pace_step(self, pts: float | None, interval: float) -> float:
        """Seconds from the frame handed over last to this one when paced: the difference of their times in the file,
        or one frame interval where there is no time, where times stop increasing, or over a gap longer than
        MAX_PACE_GAP_S (a broken timestamp: it would freeze the picture; said once, in a warning)."""
        if pts is None or self.frames_read == 0:
            return interval
        step = pts - self._last_pts
        if 0 < step <= MAX_PACE_GAP_S:
            return step
        if not self._pace_warned:
            self._pace_warned = True
            what = ("stop increasing" if step <= 0 else
                    f"jump {step:.1f} s ahead (more than a {MAX_PACE_GAP_S:.0f} s still: a broken timestamp?)")
            log.warning("%s: the frame times in the file %s after %.3f s: such frames are played one frame interval "
                        "apart", self.spec.describe(), what, self._last_pts)
        return interval

    def _hand_over(self, item: CapturedFrame) -> None:
        with self._cond:
            if self.realtime:
                # Latest wins: a frame nobody took yet is stale now.
                while self._pending:
                    self._pending.popleft()
                    self.dropped += 1
            else:
                # In order: wait for room, so the queue (and memory) stays bounded.
                while len(self._pending) >= self.queue_size and not self._stop.is_set():
                    self._cond.wait(0.1)
                if self._stop.is_set():
                    return
            self._pending.append(item)
            self._cond.notify_all()
