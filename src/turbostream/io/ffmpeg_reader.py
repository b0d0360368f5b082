"""srt:// sources: a stream OpenCV's own FFmpeg cannot open, read through the ffmpeg program as raw RGB frames.

SRT is how OBS, vMix, TouchDesigner and media servers (MediaMTX, SRT gateways) send video over a network, and the
FFmpeg that OpenCV's wheels bundle has no SRT. The system's ffmpeg (Debian's, Homebrew's and the Windows builds have
libsrt) decodes the stream and writes its frames to our pipe as uint8 RGB; its stderr says their size and rate
before the first frame ("Output #0 ... rawvideo ... WxH ... N fps"), which is how the reader learns them.

turbostream calls a sender that listens (OBS with `srt://0.0.0.0:9000?mode=listener` as its server; MediaMTX:
`srt://HOST:8890?streamid=read:PATH`), or listens itself (`srt://0.0.0.0:9000?mode=listener`) for a sender that
calls (OBS's default). A listener is opened without a time limit: it waits for its sender until the capture stops
(`stop`); when the sender goes away, the capture opens it again, and it waits for the next one.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import numpy as np

from ..errors import SourceError
from .ffmpeg import (
    INSTALL_FFMPEG,
    STDERR_LINES,
    drain_stderr,
    ffmpeg_lists,
    ffmpeg_messages,
    ffmpeg_program,
    lists_protocol,
)
from .sources import SANE_FPS, SourceSpec, redact

log = logging.getLogger("turbostream.sources")

FFMPEG_SCHEMES = ("srt",)  # URL schemes read through the ffmpeg program rather than OpenCV
# ffmpeg looks at the stream this long before it starts decoding (its default is 5 s, which a viewer waits through
# at every connect); a sender's keyframe interval longer than this still works: the frame size is learnt from the
# first decoded frame.
ANALYZE_S = 1.0
# A listener's ffmpeg that fails sooner than this after it started never listened (its port is taken): an error,
# not a wait for the next call, which is LISTEN_AGAIN_S after a call that failed (bounding the ffmpeg starts).
LISTEN_FAILS_AT_ONCE_S, LISTEN_AGAIN_S = 1.0, 0.5
MAX_SIDE = 8192  # a frame size past this in ffmpeg's report is not believed (a frame would be 200 MB)
_OUTPUT_STREAM = re.compile(r"Stream #\d+:\d+.*?: Video: rawvideo\b.*?, (\d+)x(\d+)")
_FPS = re.compile(r", (\d+(?:\.\d+)?) fps\b")


def reads_through_ffmpeg(spec: SourceSpec) -> bool:
    return spec.kind == "url" and str(spec.target).lower().split("://", 1)[0] in FFMPEG_SCHEMES


def check_ffmpeg_source(url: str) -> None:
    """What can be known about an srt:// source before opening it; SourceError with what to do."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise SourceError(f"{shown}: not a valid URL (srt://HOST:PORT, an IPv6 host in brackets)") from None
    if not host or port is None:
        raise SourceError(f"{shown}: an SRT source is srt://HOST:PORT (SRT has no default port), for example "
                          "srt://192.168.1.20:9000")
    program = ffmpeg_program()
    if program is None:
        raise SourceError(f"{shown}: srt:// sources are read through FFmpeg, and no ffmpeg program was "
                          f"found: {INSTALL_FFMPEG}")
    protocols = ffmpeg_lists(program)[1]
    if protocols and not lists_protocol(protocols, "srt", output=False):
        raise SourceError(f"{shown}: {program} cannot read srt:// (built without libsrt): install an FFmpeg "
                          "build with SRT (Debian's, Homebrew's and the Windows builds have it)")


class FfmpegReader:
    """An srt:// stream through an ffmpeg child; opening waits (up to open_timeout_s; a listener until `stop` is
    set) for the stream's first frame.

    read() -> uint8 RGB (H, W, 3), or None once the stream ends or stalls (ffmpeg gives up on a read that waits
    longer than open_timeout_s, and exits): the capture then opens it again, as it does any live URL.
    """

    finite = False  # a live stream: opening it again is a reconnect, not a replay
    frame_count = None

    def __init__(self, spec: SourceSpec, open_timeout_s: float, stop: threading.Event | None = None) -> None:
        self.spec = spec
        url = str(spec.target)
        check_ffmpeg_source(url)
        self._url, self._shown = url, redact(url)
        self.frames_read = 0
        self.fps: float | None = None
        self.size: tuple[int, int] = (0, 0)
        if spec.listens:
            log.info("%s: waiting for a sender to call (until one does, or the command stops)", spec.describe())
        warned = False
        while True:
            started = time.monotonic()
            try:
                self._first = self._open(open_timeout_s, stop)
                return
            except SourceError as exc:
                stopped = stop is not None and stop.is_set()
                if not spec.listens or stopped or time.monotonic() - started < LISTEN_FAILS_AT_ONCE_S:
                    raise  # a listener that cannot listen (its port taken, a bad option) fails at once
                # A sender that called and left before a frame (or failed the handshake: a wrong passphrase) is
                # the sender's doing: the listener waits for the next call. Said once; the rest at debug level.
                log.log(logging.DEBUG if warned else logging.WARNING, "%s (waiting for the next call)", exc)
                warned = True
                if stop is not None and stop.wait(LISTEN_AGAIN_S):
                    raise SourceError(f"{spec.describe()}: stopped before a sender called") from None

    def _open(self, open_timeout_s: float, stop: threading.Event | None) -> np.ndarray:
        """Start ffmpeg and wait for the stream's size and first frame; SourceError (ffmpeg released) if none."""
        spec = self.spec
        self._tail: deque[str] = deque(maxlen=STDERR_LINES)
        self._header = threading.Event()
        command = [
            ffmpeg_program(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "info",
            "-fflags", "nobuffer", "-analyzeduration", str(int(ANALYZE_S * 1e6)),
            "-rw_timeout", str(int(open_timeout_s * 1e6)),  # connecting, and every read after, in microseconds
            "-i", self._url, "-map", "0:v:0", "-an", "-sn", "-dn", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
        ]
        try:
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE)
        except OSError as exc:
            raise SourceError(f"could not start ffmpeg for {spec.describe()}: {exc}") from None
        self._stderr = threading.Thread(target=drain_stderr, name="turbostream ffmpeg source log", daemon=True,
                                        args=(self._proc.stderr, self._tail, self._line_taker(self._header)))
        self._stderr.start()
        # ffmpeg's own timeout bounds the connect; the margin covers the stream analysis and a first keyframe. A
        # listener waits for its sender without a limit (ffmpeg's accept has none), until `stop`.
        deadline = None if spec.listens else time.monotonic() + open_timeout_s + ANALYZE_S + 5.0
        while not self._header.wait(0.05):
            stopped = stop is not None and stop.is_set()
            if stopped or self._proc.poll() is not None or (deadline is not None and time.monotonic() > deadline):
                self.release()
                if stopped:
                    raise SourceError(f"{spec.describe()}: stopped before a sender called")
                said = ffmpeg_messages(self._tail, last=3)
                raise SourceError(f"could not open {spec.describe()}: "
                                  + (said or f"no video came within {open_timeout_s:.0f} s"))
        width, height = self.size
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            self.release()
            raise SourceError(f"{spec.describe()}: ffmpeg reports frames of {width}x{height}, which cannot be used")
        first = self._read_frame()
        if first is None:
            self.release()
            said = ffmpeg_messages(self._tail, last=3)
            raise SourceError(f"{spec.describe()} opened but delivered no frame" + (f": {said}" if said else ""))
        return first

    def _line_taker(self, header: threading.Event) -> Callable[[str], str | None]:
        """drain_stderr's `take` for one ffmpeg (its own `header` and place in its listing): the output stream's size
        and rate, once (then `header` is set), else the line to keep to explain a failure (None: the listing)."""
        in_output = False

        def take(line: str) -> str | None:
            nonlocal in_output
            # ffmpeg names the URL in its messages, with the passphrase or stream id in it: shown redacted.
            line = line.replace(self._url, self._shown)
            if not header.is_set():
                in_output = in_output or line.startswith("Output #0")
                match = _OUTPUT_STREAM.search(line) if in_output else None
                if match:
                    self.size = (int(match.group(1)), int(match.group(2)))
                    fps = _FPS.search(line)
                    rate = float(fps.group(1)) if fps else 0.0
                    self.fps = rate if SANE_FPS[0] <= rate <= SANE_FPS[1] else None
                    header.set()
                    return None
            return line if line.strip() and not line.startswith(" ") else None

        return take

    def _read_frame(self) -> np.ndarray | None:
        width, height = self.size
        buffer = bytearray(width * height * 3)
        view, got = memoryview(buffer), 0
        while got < len(buffer):
            try:
                n = self._proc.stdout.readinto(view[got:])
            except (OSError, ValueError):  # the pipe closed under us (release() from another thread)
                return None
            if not n:
                return None  # ffmpeg ended: the sender stopped, or a read timed out
            got += n
        return np.frombuffer(buffer, np.uint8).reshape(height, width, 3)

    def read(self) -> np.ndarray | None:
        if self._first is not None:
            frame, self._first = self._first, None
        else:
            frame = self._read_frame()
        if frame is None:
            if self._proc.poll() not in (None, 0):
                said = ffmpeg_messages(self._tail, last=2)
                if said:
                    log.info("%s: ffmpeg stopped reading: %s", self.spec.describe(), said)
            return None
        self.frames_read += 1
        return frame

    def release(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
