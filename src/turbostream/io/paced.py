"""PacedSink: the base of outputs that must never hold up the engine (stream URLs, the virtual camera).

write() only puts the newest frame into one slot (a frame nobody sent yet is replaced: newest frame wins, counted
in `replaced`); a thread of the sink's own sends the slot's frame at a steady rate, repeating the last frame when no
new one came. So the output keeps real time whatever the engine's pace, a slow or stalled receiver blocks only that
thread, and memory is one frame.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger("turbostream.sinks")

BEHIND_RESET_S = 1.0  # a sender this far behind its schedule starts a new one instead of bursting to catch up


class PacedSink:
    """Subclasses implement _send_loop() (on the sink's thread) using next_frame() and wait_tick()."""

    name = "paced output"

    def __init__(self, fps: float, size: tuple[int, int]) -> None:
        if not 1.0 <= fps <= 240.0:
            raise ValueError(f"frame rate must be between 1 and 240, got {fps:g}")
        self.fps = float(fps)
        self.size = size  # (width, height)
        self.frames_in = 0  # frames handed to write()
        self.replaced = 0  # frames replaced in the slot before they were sent
        self.frames_sent = 0  # frames handed to the receiver (repeats included)
        self._slot: np.ndarray | None = None
        self._slot_t: float | None = None  # the `t` the slot's frame was written with
        self._fresh = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self, frame: np.ndarray, index: int = 0, t: float | None = None) -> None:
        """Hand over uint8 RGB (H, W, 3): never blocks, never raises (any thread)."""
        with self._lock:
            if self._stop.is_set():
                return
            if self._fresh:
                self.replaced += 1
            self._slot, self._slot_t, self._fresh = frame, t, True
            self.frames_in += 1
            if self._thread is None:  # started by the first frame: nothing is opened for a run that makes none
                self._thread = threading.Thread(target=self._guarded_loop, name=f"turbostream {self.name}",
                                                daemon=True)
                self._thread.start()

    def next_frame(self) -> tuple[np.ndarray | None, bool]:
        """(the newest frame, whether it is new since the last call)."""
        with self._lock:
            frame, fresh = self._slot, self._fresh
            self._fresh = False
        return frame, fresh

    @property
    def slot_time(self) -> float | None:
        """The `t` of the newest frame (a video file's frames: their time in the file), None before any."""
        with self._lock:
            return self._slot_t

    def wait_tick(self, deadline: float) -> float | None:
        """Sleep until `deadline` (perf_counter seconds); the next deadline, or None once the sink is closing."""
        delay = deadline - time.perf_counter()
        if delay > 0 and self._stop.wait(delay):
            return None
        if self._stop.is_set():
            return None
        deadline += 1.0 / self.fps
        now = time.perf_counter()
        return now if now - deadline > BEHIND_RESET_S else deadline

    @property
    def closing(self) -> bool:
        return self._stop.is_set()

    def _guarded_loop(self) -> None:
        try:
            self._send_loop()
        except Exception:  # noqa: BLE001 - an output's own failure must not end the run; it is logged
            log.exception("%s stopped", self.name)

    def _send_loop(self) -> None:
        raise NotImplementedError

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop sending; subclasses finalize their receiver in _finish() (idempotent)."""
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                self._abort()  # e.g. kill a child process that no longer reads
                thread.join(5.0)
        self._finish()

    def _abort(self) -> None:
        """Unblock a send that does not return (subclasses)."""

    def _finish(self) -> None:
        """Release the receiver after the thread ended (subclasses)."""
