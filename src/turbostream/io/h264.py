"""H.264 video files through an ffmpeg child: what `run -o out.mp4` (.mov, .mkv) writes when ffmpeg has libx264.

OpenCV's pip wheels write MPEG-4 Part 2 (mp4v) only, which browsers, phones' galleries and upload sites do not play;
H.264 plays everywhere, in a third of the bytes. H264Writer has the interface of cv2.VideoWriter that VideoSink uses
(isOpened, write -> bool, release), so the sink's gap filling, checks and sound are the same for both writers.

BGR frames go to ffmpeg's stdin as raw video; ffmpeg encodes them (x264 `veryfast`, CRF 18: close to the frames as
they left the engine; 4:2:0 chroma, which players need) and writes the file. ffmpeg runs in a session of its own
(a terminal's Ctrl-C reaches turbostream alone, which then closes the file), and it finalizes the file itself when
its input ends, also when turbostream is killed. A write that fails (ffmpeg died: a full disk, a file size limit)
returns False, as OpenCV 5's does, and `failure` keeps ffmpeg's last words.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import deque
from pathlib import Path

import numpy as np

from .ffmpeg import STDERR_LINES, drain_stderr, ffmpeg_lists, ffmpeg_messages, ffmpeg_program, lists_libx264

H264_SUFFIXES = (".mp4", ".mov", ".mkv")  # .avi stays MJPG (every frame a picture: simple to edit)
CRF = 18  # x264's constant quality: 18 is close to the frames as they left the engine, a third of mp4v's bytes
PRESET = "veryfast"  # keeps ahead of the engine at 512x512 on a few cores; slower presets save bytes, not quality
CLOSE_TIMEOUT_S = 60.0  # ffmpeg encodes the frames it still holds (a few) and writes the index


def h264_program() -> str | None:
    """The ffmpeg that can write H.264 (libx264), or None: then video files are written by OpenCV in mp4v."""
    program = ffmpeg_program()
    return program if program is not None and lists_libx264(ffmpeg_lists(program)[0]) else None


def h264_command(program: str, path: Path, fps: float, size: tuple[int, int]) -> list[str]:
    """ffmpeg: raw BGR frames of `size` on stdin -> H.264 at `fps` into `path`."""
    cmd = [
        program, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "bgr24", "-video_size", f"{size[0]}x{size[1]}",
        "-framerate", f"{fps:.10g}",  # 29.97002997 (30000/1001, as OpenCV reports NTSC) read back as 30000/1001
        "-i", "pipe:0",
        "-an", "-c:v", "libx264", "-preset", PRESET, "-crf", str(CRF), "-pix_fmt", "yuv420p",
    ]
    if path.suffix.lower() in (".mp4", ".mov"):
        cmd += ["-movflags", "+faststart"]  # the index first: a browser plays the file while it downloads
    # Absolute: a relative "rec-10:30.mp4" would be read as the protocol "rec-10".
    return cmd + [os.path.abspath(path)]


class H264Writer:
    """cv2.VideoWriter's interface over an ffmpeg child: uint8 BGR (H, W, 3) frames -> an H.264 file."""

    def __init__(self, program: str, path: Path | str, fps: float, size: tuple[int, int]) -> None:
        self.path = Path(path)
        self.size = size
        self.failure: str | None = None  # why ffmpeg stopped taking frames or did not finish the file
        self._tail: deque[str] = deque(maxlen=STDERR_LINES)
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                h264_command(program, self.path, fps, size), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            self._proc = None
            self.failure = f"could not start {program}: {exc.strerror or exc}"
            return
        self._reader = threading.Thread(target=drain_stderr, args=(self._proc.stderr, self._tail),
                                        name=f"ffmpeg log {self.path.name}", daemon=True)
        self._reader.start()

    def isOpened(self) -> bool:  # noqa: N802 - cv2.VideoWriter's name
        return self._proc is not None

    def write(self, frame: np.ndarray) -> bool:
        """Hand one frame to ffmpeg; False once it no longer takes frames (its reason: `failure`)."""
        if self._proc is None or self.failure is not None:
            return False
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).data)
            return True
        except (BrokenPipeError, ConnectionResetError, OSError, ValueError):
            self.failure = self._reason(self._wait(5.0))
            return False

    def release(self) -> None:
        """End ffmpeg's input and wait for it to write the file; `failure` says why when it did not."""
        if self._proc is None:
            return
        try:
            self._proc.stdin.close()
        except OSError:
            pass  # it had died: its status says why
        status = self._wait(CLOSE_TIMEOUT_S)
        if status != 0 and self.failure is None:
            self.failure = self._reason(status)
        self._reader.join(2.0)
        self._proc = None

    def _wait(self, timeout: float) -> int:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            self._tail.append(f"did not finish in {timeout:g} s, stopped")
            return self._proc.returncode

    def _reason(self, status: int | None) -> str:
        self._reader.join(2.0)  # its last words are read once it has exited
        words = ffmpeg_messages(self._tail)
        return f"ffmpeg exited with status {status}" + (f": {words}" if words else "")
