"""The source's sound in `run`'s video files: found before the model loads, added when each file is finished.

OpenCV writes pictures only. When `run` reads a video file into a video file (.mp4, .mov, .mkv, .avi), FFmpeg
remuxes the finished file with the source's first audio stream, cut to the video's length: the video stream is copied
as it is (no second encode); the sound is copied when the container takes its codec (AAC or MP3 into .mp4 and .mov,
anything into .mkv, MP3 or PCM into .avi), else encoded (AAC; PCM for .avi). Both inputs start at their time 0, so
the sound stays on its frames wherever the video has one frame per source frame: every frame in order (the default),
or `--realtime`, which repeats a frame for the ones it dropped. `--max-frames` and a stopped run cut the sound where
the video ends.

Nothing is lost for the sound's sake: no ffmpeg is said before the model loads (the video is written silent), and a
remux that fails leaves the silent video as it was and says why. The remux writes a hidden file beside the video
and replaces the video with it only once it checks out. Stream outputs take the same SourceAudio and send the sound
live (stream.py).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .ffmpeg import INSTALL_FFMPEG, ffmpeg_program
from .sources import SourceSpec

log = logging.getLogger("turbostream.audio")

PROBE_TIMEOUT_S = 30.0  # reading a file's header; a network share may be slow, a local file takes milliseconds
# A remux copies the video and at most encodes the sound, hundreds of times faster than real time: a minute of
# margin, plus the video's own length for a slow disk.
REMUX_BASE_TIMEOUT_S = 60.0
STDERR_CHARS = 600  # ffmpeg's last words kept to say why a remux failed

# Audio codecs (FFmpeg's names) each container holds as they are, so they are copied; others are encoded.
COPY_AUDIO: dict[str, frozenset[str] | None] = {
    ".mp4": frozenset({"aac", "mp3", "alac"}),  # what players of .mp4 play everywhere (browsers, phones)
    ".mov": frozenset({"aac", "mp3", "alac", "pcm_s16le", "pcm_s24le"}),
    ".mkv": None,  # Matroska holds nearly any codec
    ".avi": frozenset({"mp3", "pcm_s16le", "pcm_u8"}),
}
ENCODE_AUDIO = {
    ".mp4": ("-c:a", "aac", "-b:a", "192k"),
    ".mov": ("-c:a", "aac", "-b:a", "192k"),
    ".mkv": ("-c:a", "aac", "-b:a", "192k"),
    ".avi": ("-c:a", "pcm_s16le"),  # AAC in AVI is not standard; PCM plays everywhere
}

# "  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, stereo, fltp, 128 kb/s (default)"
_AUDIO_STREAM = re.compile(r"^\s*Stream #\d+:\d+\S*: Audio: ([\w-]+)(.*)$", re.MULTILINE)
_RATE_AND_LAYOUT = re.compile(r", (\d+) Hz, ([^,]+)")


class AudioError(Exception):
    """A remux that did not give a file with sound; the message says why (the silent video is kept)."""


@dataclass(frozen=True)
class SourceAudio:
    """The first audio stream of a source file, as FFmpeg names it."""

    program: str  # the ffmpeg that found it, and remuxes with it
    path: Path  # the source file
    codec: str  # FFmpeg's codec name: aac, mp3, opus, pcm_s16le, ...
    description: str  # for messages: "aac, 48000 Hz, stereo"


def parse_audio_stream(ffmpeg_stderr: str) -> tuple[str, str] | None:
    """(codec, description) of the first audio stream in what `ffmpeg -i FILE` printed; None when it lists none."""
    match = _AUDIO_STREAM.search(ffmpeg_stderr)
    if match is None:
        return None
    codec = match.group(1)
    facts = _RATE_AND_LAYOUT.search(match.group(2))
    return codec, f"{codec}, {facts.group(1)} Hz, {facts.group(2).strip()}" if facts else codec


def probe_audio(program: str, path: Path | str) -> SourceAudio | None:
    """The first audio stream of a file, or None when it has none; AudioError when ffmpeg cannot be run."""
    path = Path(path)
    # Absolute: a relative "rec-10:30.mp4" would be read as the protocol "rec-10" (and "-x.mp4" as an option).
    try:
        done = subprocess.run([program, "-hide_banner", "-nostdin", "-i", os.path.abspath(path)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AudioError(f"{program} took over {PROBE_TIMEOUT_S:g} s to read {path}") from None
    except OSError as exc:
        raise AudioError(f"could not run {program}: {exc.strerror or exc}") from None
    found = parse_audio_stream(done.stderr)  # with no output named, ffmpeg lists the streams and exits 1
    return None if found is None else SourceAudio(program, path, *found)


def find_source_audio(source: SourceSpec, outputs, enabled: bool = True, loop: bool = False) -> SourceAudio | None:
    """The sound track to put into `run`'s video files and streams, or None (no such output, a source that is not a
    video file, a silent source, no ffmpeg, a source played in a loop: the last two said as a warning, the loop only
    when there is sound to leave out). Runs before the model loads."""
    takers = [o.describe() for o in outputs if o.kind in ("video", "stream")]
    if not enabled or not takers or source.kind != "file" or source.picture:
        return None
    named = ", ".join(takers)
    program = ffmpeg_program()
    if program is None:
        log.warning("no ffmpeg program was found, so %s is written without any sound %s has: %s",
                    named, source.target, INSTALL_FFMPEG)
        return None
    try:
        audio = probe_audio(program, source.target)
    except AudioError as exc:
        log.warning("%s is written without any sound %s has: %s", named, source.target, exc)
        return None
    if audio is not None and loop:
        # Each pass's pictures start over a little later than a pass's sound would (the file is opened again), so
        # the two would drift apart pass after pass.
        log.warning("--loop: %s carries no sound (%s has %s; played in a loop it would drift from the pictures)",
                    named, source.target, audio.description)
        return None
    return audio


def audio_arguments(suffix: str, codec: str) -> list[tuple[str, ...]]:
    """The ways to write a `codec` sound into a `suffix` file, best first: copied (when the container takes it),
    then encoded."""
    suffix = suffix.lower()
    takes = COPY_AUDIO[suffix]
    ways = [("-c:a", "copy")] if takes is None or codec in takes else []
    return [*ways, ENCODE_AUDIO[suffix]]


def remux_command(audio: SourceAudio, video: Path, seconds: float, out: Path, sound: tuple[str, ...]) -> list[str]:
    """ffmpeg: the video stream of `video` (copied) and the first audio stream of the source, cut at `seconds`."""
    cmd = [
        audio.program, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-i", os.path.abspath(video), "-i", os.path.abspath(audio.path),
        "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", *sound,
        "-t", f"{seconds:.6f}",
    ]
    if video.suffix.lower() in (".mp4", ".mov"):
        cmd += ["-movflags", "+faststart"]  # the index first: a browser plays the file while it downloads
    return cmd + [os.path.abspath(out)]


def remux_with_audio(audio: SourceAudio, video: Path, seconds: float) -> Path:
    """Write `video` with the source's sound, `seconds` long, into a hidden file beside it, and return that file's
    path (the caller checks it and puts it in place); AudioError with ffmpeg's reason when no way worked."""
    out = video.with_name(f".{video.stem}.sound{video.suffix}")
    timeout = REMUX_BASE_TIMEOUT_S + seconds
    reason = ""
    for sound in audio_arguments(video.suffix, audio.codec):
        try:
            # A session of its own: Ctrl-C at the terminal reaches turbostream only, whose finalizing rules decide
            # (the second press warns, the third quits: subprocess.run then kills ffmpeg).
            done = subprocess.run(remux_command(audio, video, seconds, out, sound), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                                  timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            reason = f"ffmpeg took over {timeout:.0f} s"
            continue
        except OSError as exc:
            reason = f"could not run {audio.program}: {exc.strerror or exc}"
            break
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        if done.returncode == 0 and out.is_file() and out.stat().st_size > 0:
            return out
        words = " ".join(done.stderr.split())[-STDERR_CHARS:]
        reason = f"ffmpeg exited with status {done.returncode}" + (f": {words}" if words else "")
    out.unlink(missing_ok=True)
    raise AudioError(reason)
