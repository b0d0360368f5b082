"""External control of a running stream: OSC (osc.py), prompt playlists (playlist.py) and, in `run`, the prompt line
typed in a terminal (prompt_line.py). Each changes a stream the way a `config` message does, through one target
(targets.py): RunTarget for `turbostream run`, BroadcastTarget for the `serve --source` broadcast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .osc import OscServer
from .playlist import Look, Playlist, load_playlist, parse_playlist
from .targets import BroadcastTarget, LoraTarget, RunTarget

__all__ = ["BroadcastTarget", "Controls", "LoraTarget", "Look", "OscServer", "Playlist", "RunTarget",
           "load_playlist", "parse_playlist"]


class Controls:
    """A command's OSC server and playlist (either may be None), started against one stream and stopped together."""

    def __init__(self, osc: OscServer | None = None, playlist: Playlist | None = None) -> None:
        self.osc, self.playlist = osc, playlist

    def __bool__(self) -> bool:
        return self.osc is not None or self.playlist is not None

    def start_osc(self, apply: Callable[[dict[str, Any]], Any],
                  on_result: Callable[[str], Any] | None = None, lora: LoraTarget | None = None) -> None:
        if self.osc is not None:
            self.osc.start(apply, playlist=self.playlist, on_result=on_result, lora=lora)

    def start_playlist(self, apply: Callable[[dict[str, Any]], Any],
                       lora: Callable[[int | str | None, float], Any] | None = None) -> None:
        if self.playlist is not None:
            self.playlist.start(apply, lora=lora)

    def stop(self) -> None:
        if self.osc is not None:
            self.osc.stop()
        if self.playlist is not None:
            self.playlist.stop()
