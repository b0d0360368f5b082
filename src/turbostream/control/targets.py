"""Where external controls (OSC, playlists) send their changes: a callable taking the fields of a `config` message
({"prompt": ..., "strength": ..., "steps": ..., "seed": ...}, any subset), returning the new StreamParams, or
raising ValueError with the reason. Both targets check with StreamParams.updated/validate, the one validation every
parameter change goes through.

- RunTarget: a `turbostream run` (Pipeline.set_params; the GPU thread reads the parameters per call).
- BroadcastTarget: the `serve --source` broadcast (Broadcast.set_params on the server's event loop, which tells
  every viewer with a `config` message).

LoraTarget is apart: a LoRA's scale is the engine's (its weights), not a stream's; OSC's /turbostream/lora, a viewer's
`lora` message (with the control token) and run's /lora change it for every stream, where the engine keeps what that
takes (--lora-live).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..config import MAX_STEPS, LoraSpec, StreamParams, stream_limits

log = logging.getLogger("turbostream.control")

# The stream settings external controls change, by the name they give them (OSC's /turbostream/<name>, run's
# /<name> prompt-line command, a playlist look's <name>=VALUE): name -> (the StreamParams field, the type of its
# value). The prompt is apart: each control reads it as --prompt does (config.parse_prompt).
SETTINGS: dict[str, tuple[str, type]] = {
    "strength": ("strength", float), "steps": ("steps", int), "seed": ("seed", int),
    "similarity": ("similarity", float), "transition": ("transition_s", float), "feedback": ("feedback", float),
    "reuse": ("reuse", int),
}


def _checked(params: StreamParams, fields: dict[str, Any], limits: tuple[int, bool]) -> StreamParams:
    try:
        return params.updated(limits, **fields)
    except TypeError as exc:  # a wrong type that dataclasses.replace itself trips on
        raise ValueError(str(exc)) from None


class RunTarget:
    """Changes the stream of a `run` (a Pipeline, or anything with .params and .set_params)."""

    def __init__(self, pipeline, limits: tuple[int, bool] = (MAX_STEPS, True)) -> None:
        self.pipeline = pipeline
        self.limits = limits  # the engine's (max_steps, reuse enabled): config.stream_limits
        self._lock = threading.Lock()  # OSC and the playlist change it from their own threads

    def __call__(self, fields: dict[str, Any]) -> StreamParams:
        with self._lock:
            params = _checked(self.pipeline.params, fields, self.limits)
            self.pipeline.set_params(params)
        return params


class BroadcastTarget:
    """Changes the broadcast from any thread: checked at once, applied on the server's event loop.

    Changes that arrive faster than the loop applies them (a fader sending 60 values a second) are merged into one
    pending change, so the loop's queue holds at most one call from this target however fast they come.
    """

    def __init__(self, broadcast, loop: asyncio.AbstractEventLoop, by: str = "OSC") -> None:
        self.broadcast = broadcast
        self.loop = loop
        self.by = by
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._scheduled = False

    def __call__(self, fields: dict[str, Any]) -> StreamParams:
        stream = self.broadcast.stream
        if stream is None:
            raise ValueError("the broadcast is not running yet (the engine is still loading or warming up)")
        limits = stream_limits(self.broadcast.server.engine)
        with self._lock:
            merged = {**self._pending, **fields}
            params = _checked(stream.params, merged, limits)
            if params == stream.params and not self._pending:
                return params  # nothing changes (a controller that repeats its values): no message to viewers
            self._pending = merged
            if not self._scheduled:
                try:
                    self.loop.call_soon_threadsafe(self._apply)
                except RuntimeError:  # the loop is closed: the server is shutting down
                    raise ValueError("the server is shutting down") from None
                self._scheduled = True
        return params

    def _apply(self) -> None:
        """On the event loop: the merged change to the broadcast, and a `config` message to every viewer."""
        with self._lock:
            fields, self._pending, self._scheduled = self._pending, {}, False
        if not fields:
            return
        try:
            self.broadcast.set_params(fields, by=self.by)
        except Exception as exc:  # noqa: BLE001 - e.g. a viewer changed steps meanwhile; the old parameters stay
            log.warning("%s: change %s not applied: %s", self.by, fields, getattr(exc, "message", exc))


class LoraTarget:
    """Changes one LoRA's scale from any thread (OSC, a viewer, run's prompt line): checked here against the LoRAs
    the engine was started with, then every LoRA's scale goes to `apply` (TurboServer.set_lora_scales,
    Pipeline.set_lora_scales: applied on the inference thread before the next engine call). ValueError says why a
    change cannot be made."""

    def __init__(self, loras: Sequence[LoraSpec], apply: Callable[[tuple[float, ...]], Any], *, live: bool) -> None:
        from ..lora import display_name

        self.names = [display_name(spec.source) for spec in loras]
        self.scales = [spec.scale for spec in loras]
        self.apply, self.live = apply, live
        self._lock = threading.Lock()

    def index(self, which: int | str | None) -> int:
        """Which LoRA (0-based): None for the only one, a number from 1 (the --lora order) or a LoRA's name."""
        count = len(self.names)
        if which is None:
            if count > 1:
                raise ValueError(f"{count} LoRAs are loaded: say which, by number (1..{count}) or name "
                                 f"({', '.join(self.names)})")
            return 0
        if isinstance(which, str):
            if which not in self.names:
                raise ValueError(f"no LoRA named {which[:80]!r} (loaded: {', '.join(self.names)})")
            if self.names.count(which) > 1:
                raise ValueError(f"{self.names.count(which)} LoRAs are named {which!r}: say which by number "
                                 f"(1..{count}, in --lora order)")
            return self.names.index(which)
        if not 1 <= which <= count:
            raise ValueError(f"no LoRA number {which}: {count} loaded, numbered from 1 in --lora order")
        return which - 1

    def check(self, which: int | str | None, scale: float) -> tuple[int, float]:
        """(which LoRA, 0-based; the scale) of a change that can be made, changing nothing (a playlist's looks are
        checked before the model loads); ValueError says why it cannot."""
        if not self.names:
            raise ValueError("no LoRA is loaded (--lora FILE[:SCALE] with --lora-live)")
        if not self.live:
            raise ValueError("the LoRAs' scales are fixed: start with --lora-live to change them while it runs")
        index = self.index(which)
        return index, LoraSpec(self.names[index], scale).scale  # the range check of --lora's scale

    def __call__(self, which: int | str | None, scale: float) -> tuple[float, ...]:
        index, scale = self.check(which, scale)
        with self._lock:
            if self.scales[index] != scale:
                self.scales[index] = scale
                self.apply(tuple(self.scales))
            return tuple(self.scales)
