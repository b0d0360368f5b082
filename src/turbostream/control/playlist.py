"""Prompt playlists (`--prompts FILE`): looks that follow each other on a timer, for unattended installations.

The file is plain text, one look a line:

    # comments start with '#'; blank lines are skipped
    an oil painting, thick brush strokes | 45s
    a watercolor painting | 1.5m
    a charcoal drawing

Each line is a prompt, optionally followed by `| DURATION`: a number of seconds (`30`, `30s`, `2.5s`), minutes
(`1.5m`) or hours (`1h`), between 0.1 s and 24 h. A line without one stays for the default (`--prompt-duration`,
30 s). After the last line the list starts over. OSC `/turbostream/next` and `/turbostream/previous` step through it
(and restart the step's timer). The text after the last `|` is a duration only when it starts with a digit (or a dot
and a digit: `.5`), so a prompt may contain `|` elsewhere; `| 30x` is an error with its line number, not part of a
prompt.

Every line's prompt is read as `--prompt` reads its value (config.parse_prompt), the first as the others: plain text,
or a weighted blend in JSON when it starts with `[` (`[["a watercolor", 0.7], ["a pencil sketch", 0.3]] | 1m`). A
line that starts with `[` and is not such a blend is an error with its line number, when the file is read.

A look may set more than its prompt: a `|` part made only of NAME=VALUE words (before or after the duration) sets
those stream settings, as OSC's addresses name them, and LoRA scales (with --lora-live):

    a watercolor painting, soft washes | 1.5m | strength=0.6 seed=7 transition=2
    an ink wash | lora.ink-wash=1 lora.2=0

A look changes what it names; the rest stays as it was. The stream starts with the first look's settings, and the
engine with its LoRA scales. check_looks() tries the whole cycle against the command's settings before the model loads.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import LoraSpec, StreamParams, parse_prompt
from .targets import SETTINGS, LoraTarget

log = logging.getLogger("turbostream.control")

DEFAULT_DURATION_S = 30.0
MIN_DURATION_S = 0.1
MAX_DURATION_S = 24 * 3600.0
MAX_FILE_BYTES = 1 << 20  # a playlist is text a person wrote; a megabyte is thousands of looks
MAX_ENTRIES = 10_000
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)$", re.IGNORECASE)
MAX_SETTINGS = 32  # words in one look's settings: more than every setting and eight LoRAs
_SETTING_NAMES = ", ".join([*SETTINGS, "lora", "lora.N", "lora.NAME"])
_NAME_OF_FIELD = {field: name for name, (field, _) in SETTINGS.items()}


@dataclass(frozen=True)
class Look:
    """One playlist entry: a prompt shown for `duration_s` seconds (the text as written: parse_prompt reads it), and
    what else it sets: config fields ({"strength": 0.6}) and LoRA scales ((which, scale): which is None for the only
    LoRA, a number from 1 or a name, as LoraTarget takes them)."""

    prompt: str
    duration_s: float
    line: int  # in the file, for messages
    settings: tuple[tuple[str, Any], ...] = ()
    loras: tuple[tuple[int | str | None, float], ...] = ()

    def fields(self) -> dict[str, Any]:
        """The `config` fields this look applies: its prompt (read as --prompt reads it) and its settings."""
        return {"prompt": parse_prompt(self.prompt), **dict(self.settings)}


def parse_duration(text: str) -> float:
    """'30', '30s', '1.5m', '1h' -> seconds; ValueError with the accepted forms otherwise."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"duration {text.strip()!r}: use seconds (30 or 30s), minutes (1.5m) or hours (1h)")
    seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not MIN_DURATION_S <= seconds <= MAX_DURATION_S:
        raise ValueError(f"duration {text.strip()!r} must be between {MIN_DURATION_S:g} s and 24 h")
    return seconds


def _is_settings(part: str) -> bool:
    """Whether a `|` part of a line is settings: every word NAME=VALUE (a prompt's part has words without '=')."""
    words = part.split()
    return bool(words) and all("=" in word and not word.startswith("=") for word in words)


def parse_settings(part: str) -> tuple[tuple[tuple[str, Any], ...], tuple[tuple[int | str | None, float], ...]]:
    """'strength=0.6 lora.2=0.8' -> ((config field, value), ...), ((which LoRA, scale), ...); ValueError naming the
    word at fault. Ranges that depend on the stream are check_looks()'s."""
    words = part.split()
    if len(words) > MAX_SETTINGS:
        raise ValueError(f"{len(words)} settings in one look; at most {MAX_SETTINGS}")
    settings: dict[str, Any] = {}
    loras: dict[int | str | None, float] = {}
    for word in words:
        name, _, text = word.partition("=")
        key = name.lower()
        if key == "lora" or key.startswith("lora."):
            which: int | str | None = name[5:] or None
            if which is not None and which.isdigit():
                which = int(which)
            try:
                loras[which] = LoraSpec("playlist", float(text)).scale  # --lora's range check
            except ValueError as exc:
                raise ValueError(f"{word!r}: {exc}") from None
            continue
        if key not in SETTINGS:
            raise ValueError(f"unknown setting {name!r} in {word!r}: use {_SETTING_NAMES}")
        field, kind = SETTINGS[key]
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{word!r}: {name} must be {what}") from None
        settings[field] = value
    return tuple(settings.items()), tuple(loras.items())


def parse_playlist(text: str, default_duration_s: float = DEFAULT_DURATION_S, source: str = "playlist") -> list[Look]:
    """The looks of a playlist's text; ValueError naming the line of the first problem."""
    if not MIN_DURATION_S <= default_duration_s <= MAX_DURATION_S:
        raise ValueError(f"the default duration must be between {MIN_DURATION_S:g} s and 24 h, "
                         f"got {default_duration_s:g}")
    looks: list[Look] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        prompt, duration = line, default_duration_s
        settings: tuple = ()
        loras: tuple = ()
        found: set[str] = set()
        while True:  # the trailing parts: a duration and settings, in either order, at most one of each
            head, bar, tail = prompt.rpartition("|")
            if not bar:
                break
            try:
                if re.match(r"\.?[0-9]", tail.strip()) and "duration" not in found:  # a digit, or a dot and one
                    duration = parse_duration(tail)
                    found.add("duration")
                elif _is_settings(tail) and "settings" not in found:
                    settings, loras = parse_settings(tail)
                    found.add("settings")
                else:
                    break
            except ValueError as exc:
                raise ValueError(f"{source}, line {number}: {exc}") from None
            prompt = head.strip()
        if not prompt:
            what = " and ".join(w for w in ("a duration", "settings") if w.split()[-1] in found)
            raise ValueError(f"{source}, line {number}: {what} without a prompt")
        try:
            # The one validation (length, valid Unicode, a blend's weights), of the prompt as it will be applied.
            StreamParams(prompt=parse_prompt(prompt)).validate()
        except ValueError as exc:
            raise ValueError(f"{source}, line {number}: {exc}") from None
        looks.append(Look(prompt, duration, number, settings, loras))
        if len(looks) > MAX_ENTRIES:
            raise ValueError(f"{source}: more than {MAX_ENTRIES} prompts")
    if not looks:
        raise ValueError(f"{source} has no prompts (one prompt a line; lines starting with # are comments)")
    return looks


def check_looks(looks: list[Look], params: StreamParams, limits: tuple[int, bool], lora: LoraTarget) -> None:
    """Apply every look in turn, twice round (the first look after the last too), to the stream's starting `params`
    against the engine's `limits`, as the playlist will: ValueError ("line N: ...") for the first that would be refused
    (strength 0.3 at 2 steps, steps past the engine's limit, a LoRA it does not have or without --lora-live).
    lora: the LoraTarget of the command's LoRAs, whose check() each look's scales pass (nothing is changed)."""
    for look in [*looks, *looks]:
        try:
            params = params.updated(limits, **look.fields())
            for which, scale in look.loras:
                lora.check(which, scale)
        except ValueError as exc:
            raise ValueError(f"line {look.line}: {exc}") from None


def load_playlist(path: str | Path, default_duration_s: float = DEFAULT_DURATION_S) -> list[Look]:
    """parse_playlist() of a UTF-8 file; ValueError for a missing, unreadable, huge or badly formed file."""
    path = Path(path).expanduser()
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the playlist {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"the playlist {path} is over {MAX_FILE_BYTES // 1024} KiB; is it the right file?")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the playlist {path} is not UTF-8 text (byte {exc.start})") from None
    return parse_playlist(text, default_duration_s, source=str(path))


class Playlist:
    """Steps through looks on a thread of its own: after each look's duration, or at once on next()/previous().

    `apply(fields)` gets {"prompt": ..., and the look's settings} like a `config` message and may raise ValueError
    (logged; the playlist goes on); `lora(which, scale)` (a LoraTarget) each LoRA scale a look sets. The first look
    is not applied by start(): it is the stream's start (the commands set its prompt and settings, and the LoRAs'
    scales the engine loads with), so the first picture already has it; start() begins its timer.
    """

    def __init__(self, looks: list[Look], apply: Callable[[dict[str, Any]], Any] | None = None) -> None:
        if not looks:
            raise ValueError("a playlist needs at least one prompt")
        self.looks = list(looks)
        self.apply = apply
        self.lora = None  # a LoraTarget, for looks that set LoRA scales
        self.index = 0
        self.steps = {"time": 0, "next": 0, "previous": 0, "select": 0}  # how each step came about (tests, logs)
        self._cond = threading.Condition()
        self._pending = 0  # net steps asked for by next()/previous() and not yet taken, modulo the length
        self._asked: str | None = None  # the last of those: "next", "previous" or "select"
        self._deadline = 0.0
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Look:
        return self.looks[self.index]

    def start(self, apply: Callable[[dict[str, Any]], Any] | None = None, lora=None) -> Playlist:
        if apply is not None:
            self.apply = apply
        if lora is not None:
            self.lora = lora
        if self.apply is None:
            raise ValueError("a playlist needs a target to apply its prompts to")
        with self._cond:
            self._deadline = time.monotonic() + self.current.duration_s
        log.info("playlist: %d prompts; now %s", len(self.looks), self._describe(self.current))
        self._thread = threading.Thread(target=self._run, name="turbostream-playlist", daemon=True)
        self._thread.start()
        return self

    def next(self) -> None:
        """Step forward now (any thread)."""
        self._step(1)

    def previous(self) -> None:
        """Step back now (any thread)."""
        self._step(-1)

    def select(self, number: int) -> None:
        """Go to look `number` (from 1, in file order) now (any thread); ValueError if there is no such look."""
        if not 1 <= number <= len(self.looks):
            raise ValueError(f"no look {number}: the playlist has {len(self.looks)}, numbered from 1")
        with self._cond:
            # As a step from where the playlist is now: a later next()/previous() counts from the chosen look.
            self._pending = (number - 1 - self.index) % len(self.looks)
            self._asked = "select"
            self.steps["select"] += 1
            self._cond.notify()

    def _step(self, delta: int) -> None:
        with self._cond:
            # Bounded however many presses arrive: only the position modulo the length matters.
            self._pending = (self._pending + delta) % len(self.looks)
            self._asked = "next" if delta > 0 else "previous"
            self.steps[self._asked] += 1
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and self._asked is None:
                    left = self._deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stopped:
                    return
                if self._asked is not None:
                    delta, cause = self._pending, self._asked
                    self._pending, self._asked = 0, None
                else:
                    delta, cause = 1, "time"
                    self.steps["time"] += 1
                self.index = (self.index + delta) % len(self.looks)
                look = self.current
                self._deadline = time.monotonic() + look.duration_s
            self._show(look, cause)

    def _show(self, look: Look, cause: str) -> None:
        try:
            # As the first look was read (it became --prompt): a blend stays a blend on every cycle.
            self.apply(look.fields())
            for which, scale in look.loras:
                if self.lora is None:
                    raise ValueError("no LoRA target to set its scale")
                self.lora(which, scale)
        except ValueError as exc:
            log.warning("playlist: could not apply line %d: %s", look.line, exc)
            return
        log.info("playlist (%s): %s", cause, self._describe(look))

    def _describe(self, look: Look) -> str:
        sets = [f"{_NAME_OF_FIELD[field]}={value:g}" for field, value in look.settings]
        sets += [f"lora{'' if which is None else f'.{which}'}={scale:g}" for which, scale in look.loras]
        return (f"{self.index + 1}/{len(self.looks)} {look.prompt!r} for {look.duration_s:g} s"
                + (f" ({' '.join(sets)})" if sets else ""))
