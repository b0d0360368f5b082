"""The prompt line of `turbostream run` in a terminal: each line typed changes the run's stream, through the same
target (RunTarget: one check, one lock) as OSC and the playlist, so a typed change and an OSC one never overwrite
each other's fields."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from ..config import parse_prompt, stream_limits
from .targets import SETTINGS, LoraTarget, RunTarget

log = logging.getLogger("turbostream.run")

# command -> (field, how its value is read)
COMMANDS = {**SETTINGS, "prompt": ("prompt", parse_prompt)}
USAGE = ("/strength X, /steps N, /seed N, /prompt TEXT, /similarity S, /transition SECONDS, /feedback F, /reuse N, "
         "/lora [N|NAME] SCALE (with --lora-live), /quit")


class PromptLine:
    """Reads stdin lines while a run goes on: text changes the prompt; /strength X, /steps N, /seed N,
    /similarity S, /transition SECONDS, /feedback F, /reuse N; /lora [N|NAME] SCALE; /quit. A prompt starting with
    '[' is a JSON blend.

    pipeline: the run (its .stop() for /quit); target: what applies the fields (the run's RunTarget, shared with OSC
    and the playlist; one of its own by default); lora: what changes a LoRA's scale (the run's LoraTarget, shared
    with OSC; None: /lora is refused)."""

    def __init__(self, pipeline, stream=None, target: RunTarget | None = None, lora: LoraTarget | None = None) -> None:
        self.pipeline = pipeline
        self.lora = lora
        self.target = target if target is not None else RunTarget(pipeline, stream_limits(pipeline.engine))
        self.stream = stream if stream is not None else sys.stdin
        self._thread = threading.Thread(target=self._run, name="prompt line", daemon=True)

    def start(self) -> PromptLine:
        log.info("type a new prompt and press Enter to change it (also %s)", USAGE)
        self._thread.start()
        return self

    def fields(self, line: str) -> dict[str, Any] | str | None:
        """The fields one line changes, "quit", or None for a blank line; ValueError with a message."""
        line = line.strip()
        if not line:
            return None
        if not line.startswith("/"):
            return {"prompt": parse_prompt(line)}
        cmd, _, value = line[1:].partition(" ")
        cmd, value = cmd.lower(), value.strip()
        if cmd in ("quit", "q", "exit"):
            return "quit"
        if cmd == "lora":
            return {"lora": lora_words(value)}
        if cmd not in COMMANDS:
            raise ValueError(f"unknown command /{cmd}: use {USAGE}")
        name, kind = COMMANDS[cmd]
        try:
            return {name: kind(value)}
        except ValueError as exc:
            if kind in (int, float):
                raise ValueError(f"/{cmd} needs a number, got {value!r}") from None
            raise ValueError(str(exc)) from None

    def apply(self, line: str) -> str | None:
        """Apply one line; returns what changed (for the log), or raises ValueError with a message."""
        fields = self.fields(line)
        if fields is None:
            return None
        if fields == "quit":
            self.pipeline.stop()
            return "quit"
        if "lora" in fields:
            if self.lora is None:
                raise ValueError("/lora: no LoRA scale can change in this run (--lora FILE with --lora-live)")
            scales = self.lora(*fields["lora"])
            return "LoRA " + ", ".join(f"{name} {scale:g}" for name, scale in zip(self.lora.names, scales))
        new = self.target(fields)  # checked against this engine's limits, under the target's lock
        controls = "".join(f", {name} {getattr(new, name)}"
                           for name in ("similarity", "transition_s", "feedback", "reuse") if getattr(new, name))
        return f"prompt {new.prompt!r}, strength {new.strength}, steps {new.steps}, seed {new.seed}{controls}"

    def _run(self) -> None:
        for line in self.stream:
            try:
                changed = self.apply(line)
            except ValueError as exc:
                log.warning("%s", exc)
                continue
            if changed == "quit":
                return
            if changed:
                log.info("now: %s", changed)


def lora_words(value: str) -> tuple[int | str | None, float]:
    """/lora's words: SCALE (the only LoRA), N SCALE (its number from 1) or NAME SCALE; ValueError with a message."""
    words = value.split()
    if len(words) not in (1, 2):
        raise ValueError("/lora needs a scale, or a LoRA's number or name and a scale: /lora 0.8, /lora 2 0.8")
    try:
        scale = float(words[-1])
    except ValueError:
        raise ValueError(f"/lora needs a number for the scale, got {words[-1]!r}") from None
    if len(words) == 1:
        return None, scale
    which = words[0]
    return (int(which) if which.isdigit() else which), scale
