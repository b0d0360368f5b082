"""What `serve --source` adds around the broadcast for installations and streamers: OSC messages and a prompt
playlist that change it (viewers get the usual `config` message), OSC feedback of its settings to desks, and stream
URLs it is published to
(`--publish`: a media server or CDN fans it out to any number of viewers, not this process).

Counted in /metrics: turbostream_osc_messages_total{result}, turbostream_publish_up,
turbostream_publish_failures_total.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from ..control import BroadcastTarget, Controls
from ..control.osc import RESULTS
from ..io.stream import StreamSink

if TYPE_CHECKING:
    from ..io.audio import SourceAudio
    from .server import TurboServer

log = logging.getLogger("turbostream.server")


class Integrations:
    """start(loop) after the server started; stop() after it stopped. size: the engine's (width, height)."""

    def __init__(self, server: TurboServer, controls: Controls | None = None, publish: tuple[str, ...] = (),
                 *, size: tuple[int, int] = (512, 512), fps: float = 30.0, audio: SourceAudio | None = None) -> None:
        """audio: the sound of the --source file, which the published streams send beside its pictures."""
        if (controls or publish) and server.broadcast is None:
            raise ValueError("OSC, --prompts and --publish act on the broadcast: they need --source")
        self.server = server
        self.controls = controls or Controls()
        metrics = server.metrics
        self.publishers = [
            StreamSink(url, fps, size, on_failure=lambda reason: metrics.publish_failures.inc(), audio=audio)
            for url in publish
        ]
        self._task: asyncio.Task | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        broadcast, metrics = self.server.broadcast, self.server.metrics
        if self.publishers:
            broadcast.outputs.extend(self.publishers)
            publishers = list(self.publishers)
            metrics.publish_up.set_function(lambda: float(sum(p.up for p in publishers)))
            log.info("publishing the broadcast to %s", ", ".join(p.shown for p in publishers))
        if self.controls.osc is not None:
            for result in RESULTS:  # every result shows in /metrics from the start, at 0
                metrics.osc_messages.labels(result)
            self.controls.start_osc(BroadcastTarget(broadcast, loop, "OSC"),
                                    on_result=lambda result: metrics.osc_messages.labels(result).inc(),
                                    lora=self.server.change_lora)  # the model's LoRAs: every stream
        if self.controls.playlist is not None:
            self._task = loop.create_task(self._start_playlist(loop))
        # The broadcast's settings, whoever changed them (OSC, the playlist, a viewer with the control token), and
        # the model's LoRA scales, once the engine is loaded.
        self.controls.start_feedback(lambda: broadcast.stream.params if broadcast.stream is not None else None,
                                     lambda: self.server.lora_target)

    async def _start_playlist(self, loop: asyncio.AbstractEventLoop) -> None:
        """The playlist's clock starts once the broadcast runs (model loading can take minutes)."""
        if await self.server.wait_ready():
            self.controls.start_playlist(BroadcastTarget(self.server.broadcast, loop, "the playlist"),
                                         lora=self.server.change_lora)

    def stop(self) -> None:
        """Stop the controls, then finalize the publishers (ffmpeg sends what it has); blocks up to seconds."""
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed (it cancelled the task itself)
                task.cancel()
        self.controls.stop()
        for publisher in self.publishers:
            publisher.close()
