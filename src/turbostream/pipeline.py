"""The headless capture loop behind `turbostream run`: frames move through four stages, each on its own thread,
joined by bounded hand-offs:

    CaptureThread (decode, fit to the engine size) -> GPU thread (warmup, engine calls)
        -> main thread (window, progress, fan-out) -> writer threads per output (io/sinks.py SinkThread: one for a
           video or stream, four for a folder of images; encode, write)

so the GPU computes frame N while frame N+1 is decoded and frame N-1 is written. Live sources (cameras, URLs, or
files with --realtime) hand over only their newest frame, one at a time: stale frames are dropped and counted, and
latency stays at about one frame's processing. Files go in order, batched up to the engine's largest bucket.

On CUDA (an engine that is `pipelined`: submit() only enqueues the work) the GPU thread keeps up to two calls in
flight: while call k runs it takes the frames the capture has ready, submits call k+1, then collects call k and
hands its results out, so its own host work (hand-off, staging, copying out) overlaps the GPU's. With no frame
ready it collects k at once: a result never waits for input that may not come. On the CPU submit() computes the
whole call, so overlapping would only hold each result back until the next call is computed: calls run one by one.

The live-video controls: the run is one stream (key 0) of an engine with per-stream state (transitions, feedback);
with `similarity` on, the capture transform (similarity.FitAndCheck) hands back the last frame it let through for a
frame it judges a repeat, and the GPU thread answers that with that frame's output (counted as skipped), once the
call that computes it is collected if it is still in flight.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import heap
from .config import RunConfig, StreamParams
from .errors import SinkError
from .io.paced import PacedSink
from .io.sinks import SinkThread, WindowSink
from .io.sources import CapturedFrame, CaptureThread

log = logging.getLogger("turbostream.run")

_END = object()  # the GPU thread's last word on the output queue
STATUS_EVERY_S = 0.25  # status line / progress refresh
LOG_EVERY_S = 10.0  # progress as a log line when stderr is not a terminal
INTERRUPTED_CAPTURE_WAIT_S = 1.0  # after Ctrl-C, how long the source's thread is waited for (_shutdown)
LATENCY_WINDOW = 512  # the latest frames whose latency the summary keeps (percentiles at the end, a run of any length)


@dataclass
class Result:
    """One stylized frame: its source index, the uint8 RGB image, when it was read, and for a video file's frame its
    presentation time (seconds)."""

    index: int
    image: np.ndarray
    t_read: float
    pts: float | None = None


@dataclass
class RunSummary:
    """How a run went; `stopped`: end, max-frames, quit (window or /quit), interrupt (Ctrl-C) or error."""

    frames: int = 0
    seconds: float = 0.0
    dropped: int = 0
    skipped: int = 0  # frames answered with the last output (similarity), without an engine call
    stopped: str = "end"
    error: str | None = None
    first_index: int | None = None
    last_index: int | None = None
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))  # seconds, read -> handed out
    device_s: float | None = None  # the engine's device time over the run (EngineStats.device_s; None: not timed)

    @property
    def device_busy(self) -> float | None:
        """The share of the run the device spent on engine calls (0..1; None if the engine does not time them)."""
        return self.device_s / self.seconds if self.device_s is not None and self.seconds > 0 else None

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Call:
    """One engine call of the GPU thread: the frames taken, the parameters it runs with, and what it runs."""

    items: list[CapturedFrame]
    params: StreamParams
    frames: list[np.ndarray]  # what the engine runs: each frame object once, none whose output is known already
    ticket: Any = None  # the engine's handle while the call is in flight (pipelined)
    outs: list[np.ndarray] = field(default_factory=list)  # the outputs of `frames`, once run or collected

    @property
    def last_in(self) -> np.ndarray | None:
        """What Pipeline._last_in becomes once this call is finished (the similarity reference, or None)."""
        return self.items[-1].frame if self.params.similarity > 0 else None


class _Rate:
    """Events per second from a running count: over the last `window` seconds, or since the last two changes.

    Only samples where the count moved are kept, so a slow run (a frame every few seconds) reads its real rate, not
    0.0 between frames; when the count stops moving the rate decays with the time since the last event.
    """

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._changes: deque[tuple[float, float]] = deque()  # (time, count) at each change

    def add(self, t: float, count: float) -> float:
        if not self._changes or count != self._changes[-1][1]:
            self._changes.append((t, count))
        while len(self._changes) > 2 and t - self._changes[1][0] >= self.window:
            self._changes.popleft()
        t0, c0 = self._changes[0]
        return (count - c0) / (t - t0) if t > t0 else 0.0


class Progress:
    """A progress bar (in-order files: frames, fps, ETA) or a status line (live: fps in/out, latency, drops).

    Drawn with rich on stderr when it is a terminal; otherwise a log line every LOG_EVERY_S seconds.
    """

    def __init__(self, *, live: bool, total: int | None, enabled: bool = True) -> None:
        self.live, self.total, self.enabled = live, total, enabled
        self._rich = None
        self._task = None
        self._last_log = 0.0
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._t0 = self._last_log = time.perf_counter()
        if not self.enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        from rich import progress as rp

        if self.live:
            columns = [rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.TextColumn("{task.fields[status]}")]
        else:
            columns = [
                rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                rp.TextColumn("{task.fields[status]}"), rp.TimeRemainingColumn(),
            ]
        self._rich = rp.Progress(*columns, console=console, refresh_per_second=4)
        self._task = self._rich.add_task("live" if self.live else "frames", total=self.total, status="")
        self._rich.start()

    def update(self, frames: int, status: str, final: bool = False) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=frames, status=status)
            return
        now = time.perf_counter()
        if self.enabled and not final and now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            of = f"/{self.total}" if self.total else ""
            log.info("frame %d%s, %s", frames, of, status)

    def stop(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


@contextmanager
def _sigint_deferred():
    """While finalizing outputs, a second Ctrl-C warns instead of abandoning half-written files; a third quits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    presses = []

    def handler(signum, frame):
        presses.append(signum)
        if len(presses) == 1:
            print("turbostream: finishing the output files; Ctrl-C again to quit without them", file=sys.stderr)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


class Pipeline:
    """capture -> GPU thread -> main thread (window, progress) -> writer threads; run() blocks until it ends.

    The GPU thread warms the engine up and then runs it (an engine belongs to one thread), up to two calls in
    flight when the engine is pipelined (see the module docstring). `batch` > 1 groups
    consecutive frames of an in-order source into one engine call (never waiting to fill a batch); live sources
    use 1, so each call gets the newest frame. The pipeline closes the capture when it ends.
    """

    def __init__(
        self,
        engine,
        capture: CaptureThread,
        sinks: list,
        params: StreamParams,
        *,
        window: WindowSink | None = None,
        max_frames: int | None = None,
        batch: int = 1,
        progress: Progress | None = None,
        queue_frames: int = RunConfig.queue_frames,
    ) -> None:
        self.engine, self.capture, self.sinks, self.window = engine, capture, list(sinks), window
        self.params = params  # replaced whole (set_params) by other threads; the GPU thread reads it per call
        self.max_frames = max_frames
        self.batch = max(1, min(int(batch), int(engine.max_batch)))
        self.progress = progress or Progress(live=capture.realtime, total=None, enabled=False)
        self.queue_frames = max(2, queue_frames)
        self.summary = RunSummary()
        self._out: queue.Queue = queue.Queue(maxsize=max(self.queue_frames, 2 * self.batch))
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._closed = threading.Event()  # the main thread takes no more results
        self._gpu_error: BaseException | None = None
        self._reached_max = False
        self._quit = False
        self._interrupted = False  # interrupt(): ends like Ctrl-C, whatever the main thread is doing
        self._last_in: np.ndarray | None = None  # with similarity on: the last frame run, and its output
        self._last_out: np.ndarray | None = None
        self._lora_scales: tuple[float, ...] | None = None  # asked for and not applied yet (the newest only)
        self._lora_lock = threading.Lock()

    def set_params(self, params: StreamParams) -> None:
        """Use these stream parameters from the next engine call on (any thread)."""
        self.params = params

    def set_lora_scales(self, scales) -> None:
        """Use these LoRA scales (Engine.set_lora_scales) from the next engine call on (any thread); scales asked for
        before that are replaced, not queued."""
        with self._lora_lock:
            self._lora_scales = tuple(scales)

    def stop(self) -> None:
        """Ask the run to end as if the user quit (any thread); the engine calls in flight are finished and written."""
        self._quit = True
        self._stop.set()

    def interrupt(self) -> None:
        """Ask the run to end as Ctrl-C ends it (any thread, a signal handler too): SIGTERM's way, which does not
        rely on a KeyboardInterrupt reaching the main thread's loop (one raised inside a finalizer is lost)."""
        self._interrupted = True
        self._stop.set()

    # -------------------------------------------------------------- main thread

    def run(self, on_ready: Callable[[], Any] | None = None) -> RunSummary:
        """Warm the engine up, then stream until the source ends, max_frames, quit or an error; on_ready is called
        (on this thread) once the engine is warm, before the first frame: what runs on a clock (a playlist) starts
        there, not before a warm-up that can take seconds."""
        writers = [SinkThread(s, maxsize=self.queue_frames) for s in self.sinks]
        gpu = threading.Thread(target=self._gpu_loop, name="turbostream gpu", daemon=True)
        s = self.summary
        try:
            gpu.start()
            self._wait_ready(gpu)
            if on_ready is not None and self._gpu_error is None:
                on_ready()
            self._dispatch(gpu, writers)
            if self._interrupted:
                s.stopped = "interrupt"
        except KeyboardInterrupt:
            s.stopped = "interrupt"
        finally:
            with _sigint_deferred():
                self._shutdown(gpu, writers, interrupted=s.stopped == "interrupt")
        if s.stopped != "interrupt":
            if self._gpu_error is not None:
                raise self._gpu_error
            if s.error is None and self.capture.error is not None:
                s.error = self.capture.error
            if s.error is not None:
                s.stopped = "error"
            elif self._quit:
                s.stopped = "quit"
            elif self._reached_max:
                s.stopped = "max-frames"
        return s

    def _wait_ready(self, gpu: threading.Thread) -> None:
        log.info("warming up the engine")
        while not self._ready.wait(0.05):
            if self.window is not None and not self.window.poll():
                self.stop()

    def _dispatch(self, gpu: threading.Thread, writers: list[SinkThread]) -> None:
        s, cap = self.summary, self.capture
        rate_in, rate_out = _Rate(), _Rate()
        drop_base = cap.dropped  # frames dropped while the model loaded and warmed up are nobody's latency
        busy_base, rate_busy = self._device_s(), _Rate()  # device seconds per second: how busy the device is
        t0 = time.perf_counter()
        last_status = 0.0
        self.progress.start()
        while True:
            try:
                item = self._out.get(timeout=0.05)
            except queue.Empty:
                item = None
                if self.window is not None and not self.window.poll():
                    self.stop()
                if not gpu.is_alive() and self._out.empty():
                    break
            if item is _END:
                break
            now = time.perf_counter()
            if item is not None:
                if not self._hand_out(item, writers, self.window):
                    break
                now = time.perf_counter()
            s.seconds = now - t0
            s.dropped = cap.dropped - drop_base
            busy = self._device_s()
            s.device_s = None if busy is None or busy_base is None else busy - busy_base
            if now - last_status >= STATUS_EVERY_S or item is None:
                last_status = now
                fps_in, fps_out = rate_in.add(now, cap.frames_read), rate_out.add(now, s.frames)
                device = None if busy is None else rate_busy.add(now, busy)
                self.progress.update(s.frames, self._status(fps_in, fps_out, device))

    def _hand_out(self, item: Result, writers: list[SinkThread], window: WindowSink | None) -> bool:
        """Give one result to the outputs and count it; False when an output failed (the run stops)."""
        s = self.summary
        try:
            for writer in writers:
                # A file's frame is placed by its time in the file (VideoSink's "pts"), a live one by when it was read.
                writer.put(item.image, item.index, item.t_read if item.pts is None else item.pts)
        except SinkError as exc:
            s.error = str(exc)
            self._stop.set()
            return False
        if window is not None and not window.show(item.image):
            self.stop()
        s.frames += 1
        s.latencies.append(time.perf_counter() - item.t_read)
        s.first_index = item.index if s.first_index is None else s.first_index
        s.last_index = item.index
        return True

    def _drain(self, gpu: threading.Thread, writers: list[SinkThread], deadline: float | None) -> None:
        """Take the GPU thread's last results (the calls it had in flight when the run stopped) until its last word,
        and write them. After an output failed they are dropped. After Ctrl-C (deadline set) the window stays as it
        is, and a file's results are written only while they follow the last one written: the interrupt may have
        cut a hand-out short, and a later frame after a missing one would leave a hole in the output."""
        s = self.summary
        while deadline is None or time.perf_counter() < deadline:
            try:
                item = self._out.get(timeout=0.05)
            except queue.Empty:
                if not gpu.is_alive() and self._out.empty():
                    return
                continue
            if item is _END:
                return
            follows = self.capture.realtime or item.index == (0 if s.last_index is None else s.last_index + 1)
            if s.error is None and (deadline is None or follows):
                self._hand_out(item, writers, None)

    def _device_s(self) -> float | None:
        """The engine's device seconds so far (EngineStats.device_s), or None for an engine that does not time them."""
        value = getattr(getattr(self.engine, "stats", None), "device_s", None)
        return float(value) if isinstance(value, (int, float)) else None

    def _status(self, fps_in: float, fps_out: float, device_busy: float | None = None) -> str:
        # Device busy near 100 %: the engine is what limits the rate; well below: the source, outputs or host are.
        busy = "" if device_busy is None else f"  device {100 * min(device_busy, 1.0):3.0f} % busy"
        if not self.capture.realtime:
            return f"{fps_out:5.1f} fps{busy}"
        recent = list(self.summary.latencies)[-30:]
        latency = 1000 * sum(recent) / len(recent) if recent else 0.0
        return (f"in {fps_in:5.1f} fps  out {fps_out:5.1f} fps  latency {latency:4.0f} ms  "
                f"dropped {self.summary.dropped}{busy}")

    def _shutdown(self, gpu: threading.Thread, writers: list[SinkThread], *, interrupted: bool) -> None:
        self._stop.set()
        # After Ctrl-C a capture stuck in a network read (a stalled stream holds it until the backend's own timeout,
        # about 10 s) is waited for a second, not open_timeout_s + 2: the outputs are finalized meanwhile, and its
        # daemon thread ends with the process.
        self.capture.close(timeout=INTERRUPTED_CAPTURE_WAIT_S if interrupted else None)
        # The GPU thread finishes the calls in flight, whose results are still written (or warmup: that can take
        # long, hence the bound after Ctrl-C); past that it drops what it would hand over, nobody takes it.
        deadline = time.perf_counter() + 3.0 if interrupted else None
        try:
            self._drain(gpu, writers, deadline)
        finally:
            self._closed.set()
        gpu.join(timeout=None if deadline is None else max(0.0, deadline - time.perf_counter()))
        # Files first: a stream output whose receiver does not answer may take its close timeout (10 s and more), and
        # a stop with a deadline (docker stop: SIGKILL 10 s after SIGTERM) must not cost an .mp4 listed after it.
        for writer in sorted(writers, key=lambda w: isinstance(w.sink, PacedSink)):
            writer.close()  # writes what is queued, then finalizes the file
            if writer.error and self.summary.error is None:
                self.summary.error = writer.error
        if self.window is not None:
            self.window.close()
        s = self.summary
        # The last state, not the last periodic refresh (a bar left at 144/150 looks like a failure).
        fps_in = (s.frames + s.dropped) / s.seconds if s.seconds else 0.0  # every frame read was processed or dropped
        self.progress.update(s.frames, self._status(fps_in, s.fps, s.device_busy), final=True)
        self.progress.stop()

    # -------------------------------------------------------------- GPU thread

    def _gpu_loop(self) -> None:
        calls: deque[_Call] = deque()  # started and not yet delivered, oldest first: at most two (the engine's limit)
        frozen = None
        try:
            self.engine.warmup()  # on this thread: the graphs it captures replay only here
            frozen = heap.freeze()  # what exists now lives as long as the run: out of the collector's reach (heap.py)
            self._ready.set()
            # Only where submit() returns before the work is done (CUDA): on the CPU submit() computes the call, and
            # each result would wait for the next call's whole computation before it went out.
            pipelined = bool(getattr(self.engine, "pipelined", False))
            taken = 0
            while True:
                # With a call in flight only the frames ready now: its result must not wait for input.
                items = self._take(taken, timeout=0.0 if calls else 0.1)
                if items:
                    taken += len(items)
                    reference = calls[-1].last_in if calls else self._last_in
                    calls.append(self._start(items, reference, pipelined))
                elif not calls:
                    if items is None:
                        break
                    continue
                # The oldest call is collected once the next one is submitted, or at once when no frame came.
                if not pipelined or len(calls) == 2 or not items:
                    self._deliver(calls.popleft())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread after the outputs are finalized
            self._gpu_error = exc
        finally:
            self._abandon(calls)
            if frozen is not None:
                heap.thaw()
            self._ready.set()
            try:
                self._out.put(_END, timeout=2.0)
            except queue.Full:
                pass  # the main thread stopped reading; it notices this thread is gone

    def _take(self, taken: int, timeout: float) -> list[CapturedFrame] | None:
        """The next frames to run, `taken` frames into the run: up to `batch`, waiting up to timeout for the first and
        never to fill a batch; [] when none came, None when no more will be taken (stop, max_frames, the end)."""
        if self._stop.is_set():
            return None
        want = self.batch if self.max_frames is None else min(self.batch, self.max_frames - taken)
        if want <= 0:
            self._reached_max = True
            return None
        first = self.capture.take(timeout)
        if first is None:
            return None if self.capture.ended else []
        items = [first]
        while len(items) < want and (more := self.capture.take(0.0)) is not None:
            items.append(more)
        return items

    def _start(self, items: list[CapturedFrame], reference: np.ndarray | None, pipelined: bool) -> _Call:
        """Submit (pipelined) or run the engine call for items with the parameters of now.

        A frame object seen before does not run again: the capture transform hands back its similarity reference for
        a repeat. `reference` is what _last_in will be once the calls before this one are delivered; a frame is
        also the same object as one earlier in items when the reference ran in this very batch.
        """
        params = self.params  # once per call: set_params may replace it from another thread
        with self._lora_lock:
            scales, self._lora_scales = self._lora_scales, None
        if scales is not None:
            try:
                self.engine.set_lora_scales(scales)
                reference = None  # a repeat of the last frame runs again: its output came from the old weights
            except Exception as exc:  # noqa: BLE001 - checked by the LoraTarget that asked; the run goes on as it was
                log.warning("LoRA scales %s not applied: %s", list(scales), exc)
        frames = list({id(it.frame): it.frame for it in items if it.frame is not reference}.values())
        call = _Call(items, params, frames)
        if frames:
            kw = {"streams": [0] * len(frames)} if hasattr(self.engine, "release_stream") else {}
            if pipelined:
                call.ticket = self.engine.submit(frames, [params] * len(frames), **kw)
            else:
                call.outs = list(self.engine.run(frames, [params] * len(frames), **kw))
        return call

    def _deliver(self, call: _Call) -> None:
        """Collect call (waits for it) and put out a result for each frame taken, in order; the calls before it are
        delivered already, so _last_in is the reference it started with and _last_out that frame's output."""
        if call.ticket is not None:
            ticket, call.ticket = call.ticket, None  # a failed collect consumes the ticket too: never collect twice
            call.outs = list(self.engine.collect(ticket))
        known = {id(self._last_in): self._last_out} if self._last_in is not None else {}
        known.update(zip(map(id, call.frames), call.outs))  # every object here is alive: ids are unique
        self.summary.skipped += len(call.items) - len(call.frames)
        self._last_in = call.last_in
        self._last_out = None if call.last_in is None else known[id(call.last_in)]
        for it in call.items:
            self._put(Result(it.index, known[id(it.frame)], it.t, it.pts))

    def _abandon(self, calls: deque[_Call]) -> None:
        """After an error, collect the calls still in flight so that none is left on the engine (the run ends with
        the first error; their results are dropped)."""
        for call in calls:
            if call.ticket is None:
                continue
            log.warning("dropping an engine call of %d frame(s) after the error", len(call.frames))
            try:
                self.engine.collect(call.ticket)
            except Exception as exc:  # noqa: BLE001 - the first error is the one reported
                log.warning("that engine call failed too: %s", exc)

    def _put(self, result: Result) -> None:
        """Hand a result to the main thread, waiting while the queue is full (also after a stop: results in flight
        are still written); dropped once the main thread takes no more."""
        while not self._closed.is_set():
            try:
                self._out.put(result, timeout=0.1)
                return
            except queue.Full:
                continue
