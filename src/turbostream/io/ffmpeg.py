"""The ffmpeg program that stream outputs, H.264 files, the source's sound and srt:// sources run as a child process:
where it is, what it can do, and what it said.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import deque
from collections.abc import Callable
from functools import lru_cache

FFMPEG_ENV = "TURBOSTREAM_FFMPEG"  # the ffmpeg program to use, when it is not `ffmpeg` on PATH
STDERR_LINES = 12  # ffmpeg's last messages kept to explain a failure
_FFMPEG_PREFIX = re.compile(r"^\[[\w\s#:./-]+ @ (?:0x)?[0-9a-fA-F]+\]\s*")
INSTALL_FFMPEG = ("install FFmpeg (Debian/Ubuntu: apt-get install ffmpeg; macOS: brew install ffmpeg; Windows: "
                  f"winget install ffmpeg), or point {FFMPEG_ENV} at an ffmpeg program")


def ffmpeg_program() -> str | None:
    """The ffmpeg to run: $TURBOSTREAM_FFMPEG, else `ffmpeg` on PATH; None when there is none."""
    configured = os.environ.get(FFMPEG_ENV)
    if configured:
        return shutil.which(configured) or (configured if os.access(configured, os.X_OK) else None)
    return shutil.which("ffmpeg")


@lru_cache(maxsize=8)
def ffmpeg_lists(program: str) -> tuple[str, str, str]:
    """(encoders, protocols, formats) as ffmpeg lists them; empty strings when it cannot be run."""
    out = []
    for what in ("-encoders", "-protocols", "-formats"):
        try:
            out.append(subprocess.run([program, "-hide_banner", what], capture_output=True, text=True,
                                      timeout=20).stdout)
        except (OSError, subprocess.SubprocessError):
            out.append("")
    return out[0], out[1], out[2]


def lists_libx264(encoders: str) -> bool:
    """Whether `ffmpeg -encoders` listed the H.264 encoder turbostream uses."""
    return re.search(r"^\s*V\S*\s+libx264\s", encoders, re.MULTILINE) is not None


def lists_protocol(protocols: str, name: str, *, output: bool) -> bool:
    """Whether `ffmpeg -protocols` listed `name` among the protocols it writes (output) or reads."""
    sections = protocols.split("Output:")  # "Input:" and its names, then "Output:" and its
    return re.search(rf"^\s*{name}\s*$", sections[-1] if output else sections[0], re.MULTILINE) is not None


def ffmpeg_messages(tail, last: int | None = None) -> str:
    """ffmpeg's distinct messages among the `last` lines of its stderr kept in `tail` (all: None), without the
    "[libx264 @ 0x55...]" prefixes, joined by "; "; "" when it said nothing."""
    lines = [_FFMPEG_PREFIX.sub("", line).strip() for line in tail]
    lines = [line for line in lines if line]
    return "; ".join(dict.fromkeys(lines[-last:] if last else lines))


def drain_stderr(pipe, tail: deque[str], take: Callable[[str], str | None] | None = None) -> None:
    """Read ffmpeg's stderr to its end (a full pipe would stall it), keeping the last lines; `take(line)`, where
    given, sees every line first and returns what to keep of it (None: nothing)."""
    try:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if take is not None and (line := take(line)) is None:
                continue
            tail.append(line[:500])
    except (OSError, ValueError):
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass
