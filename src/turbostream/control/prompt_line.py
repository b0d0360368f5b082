"""The prompt line of `turbostream run` in a terminal: each line typed changes the run's stream, through the same
target (RunTarget: one check, one lock) as OSC and the playlist, so a typed change and an OSC one never overwrite
each other's fields."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from ..config import parse_prompt, stream_limits
from .targets import RunTarget

log = logging.getLogger("turbostream.run")

# command -> (field, type of its value)
COMMANDS = {"strength": ("strength", float), "similarity": ("similarity", float), "feedback": ("feedback", float),
            "transition": ("transition_s", float), "steps": ("steps", int), "seed": ("seed", int),
            "reuse": ("reuse", int), "prompt": ("prompt", parse_prompt)}
USAGE = ("/strength X, /steps N, /seed N, /prompt TEXT, /similarity S, /transition SECONDS, /feedback F, /reuse N, "
         "/quit")


class PromptLine:
    """Reads stdin lines while a run goes on: text changes the prompt; /strength X, /steps N, /seed N,
    /similarity S, /transition SECONDS, /feedback F, /reuse N; /quit. A prompt starting with '[' is a JSON blend.

    pipeline: the run (its .stop() for /quit); target: what applies the fields (the run's RunTarget, shared with OSC
    and the playlist; one of its own by default)."""

    def __init__(self, pipeline, stream=None, target: RunTarget | None = None) -> None:
        self.pipeline = pipeline
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
