"""The server-side source (`serve --source`): a capture thread feeding one stream of the batcher, its results
encoded once and handed to every viewer's outbox. A live source that is lost is opened again for as long as the
server runs; viewers are told its state (starting, live, reconnecting, ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..batcher import Result, Stream
from ..codec import fit_frame
from ..config import stream_limits
from ..io.sources import redact
from ..similarity import SimilarityFilter
from . import protocol
from .protocol import FrameMeta
from .sessions import OutItem, timed_encode

if TYPE_CHECKING:
    from .server import TurboServer

log = logging.getLogger("turbostream.server")


class Broadcast:
    """The server-side source: a capture thread feeding one stream; its results are encoded once for all viewers."""

    def __init__(self, server: TurboServer, spec: str, capture_factory: Callable[[str], Any]) -> None:
        self.server = server
        self.spec = spec
        self.capture_factory = capture_factory
        self.stream: Stream | None = None
        self.error: str | None = None  # set when the source ended for good (a file's end, a failure)
        # Last state told to viewers: starting, live, reconnecting (lost; opened again soon) or ended.
        self.state: dict[str, Any] = {"type": "source", "state": "starting", "message": "opening the source",
                                      "restarts": 0}
        self._announced = "starting"  # the source thread's own copy
        self._reconnects_seen = 0  # of the current capture
        self.restarts = 0
        self.viewers_present = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._capture = None  # the capture being opened or pumped, for stop()
        self._latest: np.ndarray | None = None  # newest result waiting for the encoder
        self._encoding = False
        # Sinks fed every stylized frame on the inference thread (serve --publish): their write() never blocks. With
        # any, the source is stylized whether or not someone watches /view.
        self.outputs: list[Any] = []
        self.skipper = SimilarityFilter()  # the `similarity` control, run on the source thread

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stream = self.server.batcher.open_stream(self._on_result_threadsafe, self.server.default_params)
        self._thread = threading.Thread(target=self._feed, name="turbostream-source", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """True while the source thread runs: it ends after a stop, or when the source ended for good."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self.viewers_present.set()
        capture = self._capture
        if capture is not None:
            capture.close()  # also ends a wait for a sender to call (an SRT listener), at once
        if self.stream is not None:
            self.stream.close()
        if self._thread is not None:
            self._thread.join(5.0)

    async def end(self, message: str) -> None:
        """End the broadcast for good, from the event loop (its last device is lost): the source stops, the
        published streams end as at a source's end, and viewers are told (state "ended", with `message`)."""
        await asyncio.to_thread(self.stop)
        await asyncio.to_thread(self._end_outputs)
        self._set_state("ended", message, {})

    def _feed(self) -> None:
        """Source thread: open the capture, pump its frames; a live source that is lost is opened again, forever.

        A camera or stream URL that stops delivering is first reconnected by the capture itself (a few quick tries,
        CaptureThread's reconnect); when that gives up, a new capture is opened here after Limits.source_retry_s,
        doubling up to Limits.source_retry_max_s while it keeps failing. A file or folder that ends, or fails, stays ended.
        """
        limits = self.server.config.limits
        failures = 0  # consecutive openings that delivered no frame
        while not self._stop.is_set():
            capture, reason, delivered = None, None, False
            self._reconnects_seen = 0
            try:
                capture = self.capture_factory(self.spec)
                # stop() closes the capture, which ends a start() that waits for a sender (an SRT listener).
                self._capture = capture
                if self._stop.is_set():
                    return
                if getattr(getattr(capture, "spec", None), "listens", False):
                    self._announce("starting", f"waiting for a sender to call {capture.spec.describe()}")
                capture.start()
            except Exception as exc:  # noqa: BLE001 - reported to viewers and the log, the server keeps serving /ws
                reason = f"could not open the source: {exc}"
            else:
                try:
                    reason, delivered = self._pump(capture)
                except Exception as exc:  # noqa: BLE001
                    log.exception("source thread failed")
                    reason = f"the source failed: {exc}"
            finally:
                if capture is not None:
                    with contextlib.suppress(Exception):
                        capture.close()
                    self._count_reconnects(capture)  # the attempts it made just before giving up
            if self._stop.is_set():
                return
            live = bool(getattr(getattr(capture, "spec", None), "live", False))
            if not live or reason is None:
                self._announce("ended", reason or "the source ended", failed=reason is not None)
                self._end_outputs()
                return
            failures = 0 if delivered else failures + 1
            delay = min(limits.source_retry_s * 2 ** max(failures - 1, 0), limits.source_retry_max_s)
            self.restarts += 1
            self.server.metrics.source_restarts.inc()
            self._announce("reconnecting", f"{reason}; opening it again in {delay:.0f} s", retry_in_s=delay)
            if self._stop.wait(delay):
                return

    def _pump(self, capture) -> tuple[str | None, bool]:
        """Newest source frame -> fitted -> the broadcast stream's slot, while someone watches.

        Returns (why the capture stopped: its error, or None for an end or a stop; whether it delivered a frame).
        """
        server = self.server
        delivered = False
        while not self._stop.is_set():
            if self._count_reconnects(capture):
                self._announce("reconnecting", "the source stopped delivering frames; reconnecting "
                               f"(attempt {self._reconnects_seen})")
            if not (self.outputs or self.viewers_present.wait(0.5)):
                if capture.ended:  # noticed without viewers too, so a lost source is opened again meanwhile
                    return capture.error, delivered
                continue
            got = capture.latest(0.5)
            if got is None:
                if capture.error or capture.ended:
                    return capture.error, delivered
                continue
            if self._announced != "live":
                self._announce("live", "the source delivers frames")
            delivered = True
            index, frame = got
            fitted = fit_frame(frame, server.engine.width, server.engine.height)
            server.metrics.frames_in.inc()
            reference = self.skipper.check(fitted, self.stream.params)  # a repeat: viewers keep the last frame
            skip = reference is not None
            meta = FrameMeta(int(index), pts=getattr(capture, "latest_pts", None))
            if self.stream.submit(reference if skip else fitted, meta, skip=skip) is not None:
                server.metrics.dropped("queue")
        return None, delivered

    def _count_reconnects(self, capture) -> bool:
        """Add the capture's reconnect attempts since the last look to the metric; True if there were any."""
        seen = int(getattr(capture, "reconnects", 0) or 0)
        if seen <= self._reconnects_seen:
            return False
        self.server.metrics.source_reconnects.inc(seen - self._reconnects_seen)
        self._reconnects_seen = seen
        return True

    def _end_outputs(self) -> None:
        """The source ended for good: the published streams end too (ffmpeg ends each stream cleanly), where they
        went on sending the last frame for as long as the server ran, a media server recording a still image."""
        for output in list(self.outputs):
            with contextlib.suppress(Exception):
                output.close()
            log.info("%s: the source ended, and the stream with it", getattr(output, "shown", output))

    def _announce(self, state: str, message: str, failed: bool = False, **extra: Any) -> None:
        """From the source thread: tell the loop (and through it every viewer) the source's new state.

        Logged at ERROR only for a failure; a file that reaches its end is a normal end (INFO)."""
        self._announced = state
        level = logging.ERROR if failed else logging.WARNING if state == "reconnecting" else logging.INFO
        log.log(level, "source %s: %s", redact(self.spec), message)
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self.loop.call_soon_threadsafe(self._set_state, state, message, extra)

    def _set_state(self, state: str, message: str, extra: dict[str, Any]) -> None:
        previous = self.state["state"]
        self.state = {"type": "source", "state": state, "message": message, "restarts": self.restarts, **extra}
        self.server.metrics.source_up.set(1 if state == "live" else 0)
        if state == "ended":
            self.error = message
        for viewer in list(self.server.viewers):
            viewer.source_changed(previous)

    def _on_result_threadsafe(self, result: Result) -> None:
        if result.frame is not None:
            pts = getattr(result.meta, "pts", None)  # a file's frame: where its published sound is
            for output in self.outputs:
                output.write(result.frame, 0, pts)
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._on_result, result)

    def _on_result(self, result: Result) -> None:
        if result.frame is None:
            log.warning("broadcast frame failed: %s", result.error)
            return
        if not self.server.viewers:  # stylized for the outputs only: no JPEG for nobody
            return
        if result.skipped:  # the same picture again (similarity): every viewer already has it
            return
        if self._encoding:
            if self._latest is not None:
                self.server.metrics.dropped("encode")
            self._latest = result.frame
            return
        self._encoding = True
        asyncio.ensure_future(self._encode_loop(result.frame))

    async def _encode_loop(self, rgb: np.ndarray) -> None:
        """Encode the newest broadcast frame once, then give it to every viewer's outbox (each skips if behind)."""
        server = self.server
        try:
            while rgb is not None:
                try:
                    jpeg, dt = await self.loop.run_in_executor(server.pool, timed_encode, rgb,
                                                               server.config.jpeg_quality, server.jpeg)
                except Exception:  # noqa: BLE001 - one lost broadcast frame; the next one is encoded as usual
                    log.exception("could not encode a broadcast frame")
                    server.metrics.dropped("encode")
                    rgb, self._latest = self._latest, None
                    continue
                server.metrics.encode.observe(dt)
                for viewer in list(server.viewers):
                    viewer.outbox.image(OutItem(jpeg=jpeg))
                rgb, self._latest = self._latest, None
        finally:
            self._encoding = False

    def set_params(self, fields: dict[str, Any], by: str = "a viewer") -> None:
        """A viewer with the control token (or OSC, a playlist: `by`) changes the broadcast: checked, applied,
        announced to every viewer."""
        params = protocol.apply_config(self.stream.params, fields, *stream_limits(self.server.engine))
        self.stream.params = params
        # OSC faders send many values a second: their changes are logged at DEBUG (OSC and playlists log their own).
        level = logging.INFO if by == "a viewer" else logging.DEBUG
        log.log(level, "broadcast parameters changed by %s: %s", by, protocol.params_dict(params))
        for viewer in list(self.server.viewers):
            viewer.outbox.text(protocol.config_message(params))
