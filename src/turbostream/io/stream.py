"""Streaming outputs (`run -o URL`, `serve --publish URL`): H.264 through an `ffmpeg` child process fed raw RGB frames
on its stdin.

| scheme               | container | for                                                                 |
| -------------------- | --------- | ------------------------------------------------------------------- |
| rtmp://, rtmps://    | FLV       | OBS (with a media server), nginx-rtmp, MediaMTX, streaming services |
| srt://               | MPEG-TS   | SRT receivers (OBS Media Source, MediaMTX, srt-live-transmit)       |
| rtsp://              | RTSP push | a media server that takes publishers (MediaMTX), over TCP           |
| udp://               | MPEG-TS   | a LAN receiver or multicast group (ffplay, VLC, OBS Media Source)   |

Low-latency x264 (veryfast, zerolatency: no B-frames, no lookahead), a keyframe every second (a viewer joins within
about a second), constant frame rate at the source's rate: the PacedSink thread sends the newest frame every 1/fps
seconds and repeats the last one when the engine is slower, so the stream keeps real time. A URL that cannot be
reached (ffmpeg exits) is logged with ffmpeg's reason and tried again after 1 s, doubling up to 30 s, for as long
as the command runs; meanwhile frames are dropped, never queued, and the engine never waits for the network.

With `audio` (a video file that `run` plays into a stream, or that `serve --source` publishes), ffmpeg also reads
the file's sound at its own rate (-re), from the time in the file of the frame its session starts with, and sends it
beside the pictures (AAC): both go at real time from the same point, so the sound stays on its pictures within the
stylization's latency; a session started again after a failure starts the sound again where the pictures are.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import cv2
import numpy as np

from ..errors import SinkError
from .ffmpeg import (
    INSTALL_FFMPEG,
    STDERR_LINES,
    drain_stderr,
    ffmpeg_lists,
    ffmpeg_messages,
    ffmpeg_program,
    lists_libx264,
    lists_protocol,
)
from .paced import PacedSink
from .sources import redact

if TYPE_CHECKING:
    from .audio import SourceAudio

log = logging.getLogger("turbostream.sinks")

# URL scheme -> ffmpeg output format.
STREAM_FORMATS = {"rtmp": "flv", "rtmps": "flv", "srt": "mpegts", "rtsp": "rtsp", "udp": "mpegts"}
RETRY_S, RETRY_MAX_S = 1.0, 30.0  # first wait after a failure, doubling up to this
STREAMING_AFTER_S = 2.0  # a process that took frames this long is streaming: the failure count starts over
IO_TIMEOUT_US = 10_000_000  # ffmpeg gives up on a connection or a write that hangs for 10 s (then we retry)
BITS_PER_PIXEL = 0.15  # bitrate = width x height x fps x this (1.2 Mbit/s at 512x512, 30 fps), at least:
MIN_BITRATE = 400_000


def is_stream_url(text: str) -> bool:
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(text).strip())  # urlsplit raises on "udp://[::1:9"
    return scheme is not None and scheme.group(1).lower() in STREAM_FORMATS


def check_stream_output(url: str, option: str = "-o") -> None:
    """Everything about a stream output that can be known before the model loads; SinkError with what to do."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
        parts.hostname  # noqa: B018 - an unclosed "[" of an IPv6 host raises here, on some Pythons only
    except ValueError as exc:
        raise SinkError(f"stream URL {shown!r} cannot be read: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in STREAM_FORMATS:
        raise SinkError(f"unknown stream URL {shown!r}: use {', '.join(s + '://' for s in STREAM_FORMATS)}")
    if not parts.hostname:
        raise SinkError(f"stream URL {shown!r} names no host (for example {scheme}://127.0.0.1:PORT/...)")
    try:
        port = parts.port
    except ValueError:
        raise SinkError(f"stream URL {shown!r} has a port that is not a number from 0 to 65535") from None
    if port is None and scheme in ("udp", "srt"):  # RTMP and RTSP have default ports; these do not
        raise SinkError(f"stream URL {shown!r} names no port: {scheme}:// has no default "
                        f"(for example {scheme}://{parts.hostname}:9000)")
    program = ffmpeg_program()
    if program is None:
        raise SinkError(f"{option} {shown} streams through FFmpeg, and no ffmpeg program was found: {INSTALL_FFMPEG}")
    encoders, protocols, formats = ffmpeg_lists(program)
    if not encoders:
        raise SinkError(f"{program} could not be run to list its encoders: {INSTALL_FFMPEG}")
    if not lists_libx264(encoders):
        raise SinkError(f"{program} has no H.264 encoder (libx264): install an FFmpeg build with it "
                        "(Debian's and Homebrew's have it)")
    protocol = "tcp" if scheme == "rtsp" else scheme  # RTSP is a muxer in FFmpeg, carried over TCP
    if protocols and not lists_protocol(protocols, protocol, output=True):
        raise SinkError(f"{program} cannot write to {scheme}:// (built without it): install an FFmpeg build "
                        f"with {scheme.upper()} (Debian's has every scheme turbostream uses)")
    fmt = STREAM_FORMATS[scheme]
    if formats and not re.search(rf"^\s*[D ]E\S*\s+{fmt}\s", formats, re.MULTILINE):
        raise SinkError(f"{program} cannot write the {fmt} format that {scheme}:// needs")


def default_bitrate(size: tuple[int, int], fps: float) -> int:
    return max(MIN_BITRATE, int(size[0] * size[1] * fps * BITS_PER_PIXEL))


def ffmpeg_command(program: str, url: str, size: tuple[int, int], fps: float, bitrate: int,
                   audio: SourceAudio | None = None, audio_from_s: float = 0.0) -> list[str]:
    """The ffmpeg command line: raw RGB frames on stdin -> low-latency H.264 at `url`; with `audio`, the source
    file's sound from `audio_from_s` seconds into it, read at its own rate, as AAC beside them."""
    scheme = urlsplit(url).scheme.lower()
    gop = str(max(1, round(fps)))  # a keyframe every second
    rate = str(bitrate)
    cmd = [
        program, "-hide_banner", "-nostdin", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{size[0]}x{size[1]}", "-framerate", f"{fps:g}",
        "-i", "pipe:0",
    ]
    if audio is not None:
        # -shortest: the stream ends with the pictures, not when the file's sound runs out later.
        cmd += ["-re", "-ss", f"{max(0.0, audio_from_s):.3f}", "-i", os.path.abspath(audio.path),
                "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "160k", "-ar", "48000", "-ac", "2",
                "-shortest"]
    else:
        cmd += ["-an"]
    cmd += [
        "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
        "-g", gop, "-keyint_min", gop, "-sc_threshold", "0", "-bf", "0",
        "-b:v", rate, "-maxrate", rate, "-bufsize", rate,
        "-flush_packets", "1", "-rw_timeout", str(IO_TIMEOUT_US),
    ]
    if scheme == "rtsp":
        cmd += ["-rtsp_transport", "tcp"]
    if STREAM_FORMATS[scheme] == "mpegts":
        cmd += ["-muxdelay", "0", "-muxpreload", "0"]
    if scheme == "udp" and "pkt_size" not in urlsplit(url).query:
        url += ("&" if urlsplit(url).query else "?") + "pkt_size=1316"  # 7 TS packets a datagram
    return cmd + ["-f", STREAM_FORMATS[scheme], url]


class StreamSink(PacedSink):
    """Streams frames to a URL through ffmpeg; write() never blocks and never raises, and a failure never stops a run.

    on_failure(reason) is called for each failed attempt (metrics). `up` is True while ffmpeg takes frames.
    """

    name = "stream"

    def __init__(self, url: str, fps: float, size: tuple[int, int], *, bitrate: int | None = None,
                 program: str | None = None, retry_s: float = RETRY_S, retry_max_s: float = RETRY_MAX_S,
                 on_failure=None, audio: SourceAudio | None = None) -> None:
        super().__init__(fps, size)
        self.audio = audio  # the source file's sound, sent beside the pictures (frames written with their pts)
        self.audio_from_s: float | None = None  # with audio: where in the file the latest session's sound starts
        self.url = url
        self.path = self.shown = redact(url)  # `path`: what SinkThread calls it
        self.bitrate = bitrate or default_bitrate(size, fps)
        self.program = program or ffmpeg_program() or "ffmpeg"
        self.retry_s, self.retry_max_s = retry_s, retry_max_s
        self.on_failure = on_failure
        self.failures = 0  # failed attempts in all
        self.last_error: str | None = None
        self.up = False
        self._streamed = False  # the current process has taken frames for STREAMING_AFTER_S
        self._proc: subprocess.Popen | None = None

    def _send_loop(self) -> None:
        failed_in_a_row = 0
        while not self.closing:
            reason = self._session()
            if reason is None:  # closing
                return
            self.up = False
            self.failures += 1
            failed_in_a_row = 1 if self._streamed else failed_in_a_row + 1
            self.last_error = reason
            delay = min(self.retry_s * 2 ** (failed_in_a_row - 1), self.retry_max_s)
            if failed_in_a_row == 1:
                log.error("cannot stream to %s: %s; trying again in %g s (the other outputs go on)",
                          self.shown, reason, delay)
            else:
                log.warning("still cannot stream to %s (attempt %d): %s; next try in %g s",
                            self.shown, failed_in_a_row, reason, delay)
            if self.on_failure is not None:
                self.on_failure(reason)
            if self._stop.wait(delay):
                return

    def _session(self) -> str | None:
        """One ffmpeg process, fed until it fails (returns why) or the sink closes (returns None)."""
        self._streamed = False
        # The sound starts where the pictures do: the time in the file of the newest frame (0 before any).
        start = self.slot_time or 0.0
        self.audio_from_s = start if self.audio is not None else None
        cmd = ffmpeg_command(self.program, self.url, self.size, self.fps, self.bitrate, self.audio, start)
        try:
            # Its own session: a terminal's Ctrl-C goes to the whole foreground process group, and an ffmpeg killed
            # by it mid-stream is a failed attempt and unflushed packets; it ends when its stdin is closed.
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as exc:
            return f"could not start {self.program}: {exc.strerror or exc}"
        self._proc = proc
        tail: deque[str] = deque(maxlen=STDERR_LINES)
        reader = threading.Thread(target=drain_stderr, args=(proc.stderr, tail), name="turbostream ffmpeg log",
                                  daemon=True)
        reader.start()
        started = time.perf_counter()
        deadline = started
        sent = 0  # counted in frames_sent unless the session fails before it streamed
        try:
            while True:
                frame, _ = self.next_frame()
                if (frame.shape[1], frame.shape[0]) != self.size:
                    frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
                proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).data)
                proc.stdin.flush()
                sent += 1
                if not self._streamed and time.perf_counter() - started >= STREAMING_AFTER_S:
                    self._streamed = self.up = True
                    log.info("streaming to %s (H.264 %dx%d, %g fps, %.1f Mbit/s)", self.shown, *self.size,
                             self.fps, self.bitrate / 1e6)
                deadline = self.wait_tick(deadline)
                if deadline is None or proc.poll() is not None:
                    break
        except (BrokenPipeError, ConnectionResetError, OSError, ValueError):
            pass  # ffmpeg exited: its reason is on stderr
        if self.closing:
            self._end(proc, reader)
            if self._streamed or proc.returncode == 0:  # ffmpeg took them all and delivered them
                self.frames_sent += sent
            elif sent:
                # It never reached streaming and did not finish cleanly (a target still connecting, refusing, or
                # not there): those frames reached nobody, and the summary says so.
                self.failures += 1
                self.last_error = f"not streaming yet when the run ended ({self._reason(proc.returncode, tail)})"
            return None
        if self._streamed:
            self.frames_sent += sent
        self._end(proc, reader, graceful=False)
        return self._reason(proc.returncode, tail)

    def _end(self, proc: subprocess.Popen, reader: threading.Thread, graceful: bool = True) -> None:
        """Close ffmpeg's input (it writes what it has and exits), wait a little, then kill it."""
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(5.0 if graceful else 2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(2.0)
        self._proc = None

    def _reason(self, status: int | None, tail: deque[str]) -> str:
        text = ffmpeg_messages(tail, last=2)
        if not text:
            return f"ffmpeg exited with status {status}"
        text = text.replace(self.url, self.shown)
        secret_path, shown_path = urlsplit(self.url).path, urlsplit(self.shown).path
        if secret_path.strip("/") and secret_path != shown_path:  # ffmpeg may quote the stream key alone
            text = text.replace(secret_path, shown_path)
        return text

    def _finish(self) -> None:
        self.up = False  # closed: ffmpeg ended the stream

    def _abort(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def describe(self) -> str:
        if not self.frames_sent and not self.failures:
            return f"{self.shown}: no frames"
        sound = f", with the source's sound ({self.audio.description})" if self.audio is not None else ""
        text = (f"{self.shown}: {self.frames_sent} frames streamed ({self.size[0]}x{self.size[1]} H.264, "
                f"{self.fps:g} fps{sound})")
        if self.failures:
            text += f", {self.failures} failed attempts (last: {self.last_error})"
        return text
