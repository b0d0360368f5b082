"""External control of a running stream: OSC (osc.py), prompt playlists (playlist.py) and, in `run`, the prompt line
typed in a terminal (prompt_line.py). Each changes a stream the way a `config` message does, through one target
(targets.py): RunTarget for `turbostream run`, BroadcastTarget for the `serve --source` broadcast. OSC feedback
(osc_feedback.py) goes the other way: the stream's settings, however they changed, to the desks that show them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import StreamParams
from .osc import OscServer
from .osc_feedback import OscFeedback, feedback_state
from .playlist import Look, Playlist, load_playlist, parse_playlist
from .targets import BroadcastTarget, LoraTarget, RunTarget

__all__ = ["BroadcastTarget", "Controls", "LoraTarget", "Look", "OscFeedback", "OscServer", "Playlist", "RunTarget",
           "load_playlist", "parse_playlist"]


class Controls:
    """A command's OSC server, playlist and OSC feedback (any may be None), started against one stream and stopped
    together."""

    def __init__(self, osc: OscServer | None = None, playlist: Playlist | None = None,
                 feedback: OscFeedback | None = None) -> None:
        self.osc, self.playlist, self.feedback = osc, playlist, feedback

    def __bool__(self) -> bool:
        return self.osc is not None or self.playlist is not None or self.feedback is not None

    def start_osc(self, apply: Callable[[dict[str, Any]], Any],
                  on_result: Callable[[str], Any] | None = None, lora: LoraTarget | None = None) -> None:
        if self.osc is not None:
            self.osc.start(apply, playlist=self.playlist, on_result=on_result, lora=lora, feedback=self.feedback)

    def start_playlist(self, apply: Callable[[dict[str, Any]], Any],
                       lora: Callable[[int | str | None, float], Any] | None = None) -> None:
        if self.playlist is not None:
            self.playlist.start(apply, lora=lora)

    def start_feedback(self, params: Callable[[], StreamParams | None],
                       lora: Callable[[], LoraTarget | None] = lambda: None) -> None:
        """Feedback of the stream's `params()` (None: no stream yet), the LoRAs' scales of `lora()` and the
        playlist's look."""
        if self.feedback is None:
            return
        playlist = self.playlist

        def state():
            target = lora()
            return feedback_state(params(), tuple(target.scales) if target is not None else (),
                                  playlist.index + 1 if playlist is not None else None)

        self.feedback.start(state)

    def stop(self) -> None:
        if self.osc is not None:
            self.osc.stop()
        if self.playlist is not None:
            self.playlist.stop()
        if self.feedback is not None:
            self.feedback.stop()
