"""`turbostream run` (the headless capture loop) and `turbostream generate` (single pictures).

run moves frames through four stages, each on its own thread, joined by bounded hand-offs:

    CaptureThread (decode, fit to the engine size) -> GPU thread (warmup, engine.run)
        -> main thread (window, progress, fan-out) -> one writer thread per file output (encode, write)

so the GPU computes frame N while frame N+1 is decoded and frame N-1 is written. Live sources (cameras, URLs, or
files with --realtime) hand over only their newest frame, one at a time: stale frames are dropped and counted, and
latency stays at about one frame's processing. Files go in order, batched up to the engine's largest bucket.

Inputs and outputs are checked, and the source opened, before the model loads (that can take minutes). Ctrl-C stops
the stages, and the writers finalize their files before the command exits (status 130).
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from .cli import UserError, build_engine, engine_config
from .codec import fit_frame
from .config import MAX_SEED, RunConfig, StreamParams
from .sources import (
    CaptureThread,
    FolderSink,
    SinkError,
    ensure_writable_folder,
    SinkThread,
    SourceError,
    VideoSink,
    WindowSink,
    check_outputs,
    parse_output,
    parse_source,
    quiet_opencv,
)

log = logging.getLogger("turbostream.run")

_END = object()  # the GPU thread's last word on the output queue
STATUS_EVERY_S = 0.25  # status line / progress refresh
LOG_EVERY_S = 10.0  # progress as a log line when stderr is not a terminal


@dataclass
class Result:
    """One stylized frame: its source index, the uint8 RGB image, when it was read and when the engine finished."""

    index: int
    image: np.ndarray
    t_read: float
    t_done: float


@dataclass
class RunSummary:
    """How a run went; `stopped`: end, max-frames, quit (window or /quit), interrupt (Ctrl-C) or error."""

    frames: int = 0
    seconds: float = 0.0
    dropped: int = 0
    stopped: str = "end"
    error: str | None = None
    first_index: int | None = None
    last_index: int | None = None
    latencies: deque = field(default_factory=lambda: deque(maxlen=512))  # seconds, read -> handed to outputs

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class _Rate:
    """Events per second over the last `window` seconds, from a running count."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, t: float, count: int) -> float:
        self._samples.append((t, count))
        while len(self._samples) > 2 and t - self._samples[0][0] > self.window:
            self._samples.popleft()
        t0, c0 = self._samples[0]
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

    The GPU thread warms the engine up and then runs it (an engine belongs to one thread). `batch` > 1 groups
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
        self._gpu_error: BaseException | None = None
        self._reached_max = False
        self._quit = False

    def set_params(self, params: StreamParams) -> None:
        """Use these stream parameters from the next engine call on (any thread)."""
        self.params = params

    def stop(self) -> None:
        """Ask the run to end as if the user quit (any thread); frames already processed are still written."""
        self._quit = True
        self._stop.set()

    # -------------------------------------------------------------- main thread

    def run(self) -> RunSummary:
        writers = [SinkThread(s, maxsize=self.queue_frames) for s in self.sinks]
        gpu = threading.Thread(target=self._gpu_loop, name="turbostream gpu", daemon=True)
        s = self.summary
        try:
            gpu.start()
            self._wait_ready(gpu)
            self._dispatch(gpu, writers)
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
                try:
                    for writer in writers:
                        writer.put(item.image, item.index)
                except SinkError as exc:
                    s.error = str(exc)
                    self._stop.set()
                    break
                if self.window is not None and not self.window.show(item.image):
                    self.stop()
                now = time.perf_counter()
                s.frames += 1
                s.latencies.append(now - item.t_read)
                s.first_index = item.index if s.first_index is None else s.first_index
                s.last_index = item.index
            s.seconds = now - t0
            s.dropped = cap.dropped - drop_base
            if now - last_status >= STATUS_EVERY_S or item is None:
                last_status = now
                fps_in, fps_out = rate_in.add(now, cap.frames_read), rate_out.add(now, s.frames)
                self.progress.update(s.frames, self._status(fps_in, fps_out))

    def _status(self, fps_in: float, fps_out: float) -> str:
        if not self.capture.realtime:
            return f"{fps_out:5.1f} fps"
        recent = list(self.summary.latencies)[-30:]
        latency = 1000 * sum(recent) / len(recent) if recent else 0.0
        return (f"in {fps_in:5.1f} fps  out {fps_out:5.1f} fps  latency {latency:4.0f} ms  "
                f"dropped {self.summary.dropped}")

    def _shutdown(self, gpu: threading.Thread, writers: list[SinkThread], *, interrupted: bool) -> None:
        self._stop.set()
        self.capture.close()
        # The GPU thread finishes its current call (a frame, or warmup: that can take long, hence the bound).
        gpu.join(timeout=10.0 if interrupted else None)
        for writer in writers:
            writer.close()  # writes what is queued, then finalizes the file
            if writer.error and self.summary.error is None:
                self.summary.error = writer.error
        if self.window is not None:
            self.window.close()
        s = self.summary
        # The last state, not the last periodic refresh (a bar left at 144/150 looks like a failure).
        fps_in = (s.frames + s.dropped) / s.seconds if s.seconds else 0.0  # every frame read was processed or dropped
        self.progress.update(s.frames, self._status(fps_in, s.fps), final=True)
        self.progress.stop()

    # -------------------------------------------------------------- GPU thread

    def _gpu_loop(self) -> None:
        try:
            self.engine.warmup()  # on this thread: the graphs it captures replay only here
            self._ready.set()
            done = 0
            while not self._stop.is_set():
                want = self.batch
                if self.max_frames is not None:
                    want = min(want, self.max_frames - done)
                    if want <= 0:
                        self._reached_max = True
                        break
                first = self.capture.take(0.1)
                if first is None:
                    if self.capture.ended:
                        break
                    continue
                items = [first]
                while len(items) < want:  # only frames already decoded: never wait to fill a batch
                    more = self.capture.take(0.0)
                    if more is None:
                        break
                    items.append(more)
                params = self.params
                outs = self.engine.run([it.frame for it in items], [params] * len(items))
                t_done = time.perf_counter()
                for it, out in zip(items, outs):
                    self._put(Result(it.index, out, it.t, t_done))
                done += len(items)
        except BaseException as exc:  # re-raised on the main thread after the outputs are finalized
            self._gpu_error = exc
        finally:
            self._ready.set()
            try:
                self._out.put(_END, timeout=2.0)
            except queue.Full:
                pass  # the main thread stopped reading; it notices this thread is gone

    def _put(self, result: Result) -> None:
        while not self._stop.is_set():
            try:
                self._out.put(result, timeout=0.1)
                return
            except queue.Full:
                continue


class PromptLine:
    """Reads stdin lines while a run goes on: text changes the prompt; /strength X, /steps N, /seed N; /quit."""

    def __init__(self, pipeline: Pipeline, stream=None) -> None:
        self.pipeline = pipeline
        self.stream = stream if stream is not None else sys.stdin
        self._thread = threading.Thread(target=self._run, name="prompt line", daemon=True)

    def start(self) -> PromptLine:
        log.info("type a new prompt and press Enter to change it (also /strength X, /steps N, /seed N, /quit)")
        self._thread.start()
        return self

    def apply(self, line: str) -> str | None:
        """Apply one line; returns what changed (for the log), or raises ValueError with a message."""
        line = line.strip()
        if not line:
            return None
        p = self.pipeline.params
        if line.startswith("/"):
            cmd, _, value = line[1:].partition(" ")
            cmd, value = cmd.lower(), value.strip()
            if cmd in ("quit", "q", "exit"):
                self.pipeline.stop()
                return "quit"
            try:
                if cmd == "strength":
                    new = p.updated(strength=float(value))
                elif cmd in ("steps", "seed"):
                    new = p.updated(**{cmd: int(value)})
                elif cmd == "prompt":
                    new = p.updated(prompt=value)
                else:
                    raise ValueError(f"unknown command /{cmd}: use /strength X, /steps N, /seed N, /prompt TEXT, /quit")
            except (TypeError, ValueError) as exc:
                if "could not convert" in str(exc) or "invalid literal" in str(exc):
                    raise ValueError(f"/{cmd} needs a number, got {value!r}") from None
                raise
        else:
            new = p.updated(prompt=line)
        self.pipeline.set_params(new)
        return f"prompt {new.prompt!r}, strength {new.strength}, steps {new.steps}, seed {new.seed}"

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


# ------------------------------------------------------------------------------------------------ run


def run_main(args: argparse.Namespace, engine=None) -> int:
    """`turbostream run`; engine: a ready Engine (or stand-in) instead of loading one from args (tests)."""
    cfg = RunConfig()
    if not getattr(args, "verbose", False):
        quiet_opencv()
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {args.max_frames}")
    # Everything that can be checked without the model first: loading it can take minutes.
    try:
        source = parse_source(args.input)
        outputs = [parse_output(text) for text in args.outputs]
        check_outputs(outputs, source)
    except (SourceError, SinkError) as exc:
        raise UserError(str(exc)) from None
    try:
        params = StreamParams(args.prompt, args.strength, args.steps, args.seed).validate()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if engine is None:
        ecfg = engine_config(args)
        width, height, max_batch = ecfg.width, ecfg.height, ecfg.max_batch
    else:
        width, height, max_batch = engine.width, engine.height, engine.max_batch
    realtime = source.live or bool(args.realtime)
    batch = 1 if realtime else max_batch
    capture = CaptureThread(
        source, realtime=realtime, queue_size=max(cfg.queue_frames, 2 * batch),
        reconnect=cfg.reconnect_attempts if source.live else 0, open_timeout_s=cfg.open_timeout_s,
        transform=partial(fit_frame, width=width, height=height),  # resized on the capture thread, not the GPU's
    )
    try:
        capture.start()
    except SourceError as exc:
        raise UserError(str(exc)) from None
    try:
        _log_source(capture)
        if engine is None:
            engine = build_engine(args)
        if engine.random_weights:
            log.warning("model %r has random weights: the output is noise, not a stylization", engine.model_name)
        window = None
        if any(o.kind == "window" for o in outputs):
            try:
                window = WindowSink(f"turbostream: {source.describe()}")
            except SinkError as exc:
                raise UserError(str(exc)) from None
        fps = capture.fps or cfg.fallback_fps
        if capture.fps is None and any(o.kind == "video" for o in outputs):
            log.info("the source reports no frame rate; video output is written at %g fps", fps)
        sinks = [
            VideoSink(o.path, fps, (width, height), fill_gaps=realtime) if o.kind == "video" else FolderSink(o.path)
            for o in outputs if o.kind != "window"
        ]
        total = None
        if not realtime:
            total = capture.frame_count
            if args.max_frames is not None:
                total = min(total, args.max_frames) if total else args.max_frames
        pipeline = Pipeline(
            engine, capture, sinks, params, window=window, max_frames=args.max_frames, batch=batch,
            progress=Progress(live=realtime, total=total), queue_frames=cfg.queue_frames,
        )
        if _stdin_is_terminal():
            PromptLine(pipeline).start()
        summary = pipeline.run()
    finally:
        capture.close()
    _log_summary(summary, realtime, [*sinks, *([window] if window else [])])
    if summary.stopped == "interrupt":
        return 130
    if summary.stopped == "error":
        print(f"turbostream: error: {summary.error}", file=sys.stderr)
        return 1
    return 0


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _log_source(capture: CaptureThread) -> None:
    w, h = capture.size or (0, 0)
    facts = [f"{w}x{h}"]
    if capture.fps:
        facts.append(f"{capture.fps:g} fps")
    if capture.frame_count:
        facts.append(f"{capture.frame_count} frames")
    facts.append("live: newest frame only" if capture.realtime else "every frame, in order")
    log.info("input %s (%s)", capture.spec.describe(), ", ".join(facts))


def _log_summary(s: RunSummary, realtime: bool, sinks: list) -> None:
    how = {
        "end": "done", "max-frames": "reached --max-frames", "quit": "stopped", "interrupt": "stopped by Ctrl-C",
        "error": "stopped by an error",
    }[s.stopped]
    line = f"{how}: {s.frames} frames in {s.seconds:.1f} s ({s.fps:.1f} fps)"
    if realtime:
        lat = sorted(s.latencies)
        if lat:
            line += f", latency {1000 * lat[len(lat) // 2]:.0f} ms median, {1000 * lat[-1]:.0f} ms max"
        line += f", {s.dropped} stale frames dropped"
    log.info("%s", line)
    for sink in sinks:
        log.info("  %s", sink.describe())


# ------------------------------------------------------------------------------------------------ generate

IMAGE_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _read_image(path_text: str) -> np.ndarray:
    """An input image file -> uint8 RGB; UserError for a missing or unreadable file."""
    path = Path(path_text).expanduser()
    if not path.exists():
        raise UserError(f"no such image file: {path_text}")
    if not path.is_file():
        raise UserError(f"--image {path_text} is not a file")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"could not read {path_text}: not an image OpenCV can read (png, jpg, webp, bmp...)")
    if min(image.shape[:2]) < 8:
        raise UserError(f"{path_text} is {image.shape[1]}x{image.shape[0]}; images need at least 8 pixels a side")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def output_paths(output: str, count: int) -> list[Path]:
    """OUT.png for one picture; OUT-0.png ... OUT-(count-1).png for several."""
    path = Path(output).expanduser()
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(count)]


def generate_main(args: argparse.Namespace, engine=None) -> int:
    """`turbostream generate`: text-to-image (no --image) or image-to-image, --count pictures with seeds seed, seed+1..."""
    out = Path(args.output).expanduser()
    if out.suffix.lower() not in IMAGE_OUTPUT_SUFFIXES:
        raise UserError(f"output {args.output!r} must end in one of {', '.join(IMAGE_OUTPUT_SUFFIXES)}")
    if args.count < 1:
        raise UserError(f"--count must be at least 1, got {args.count}")
    if args.seed < 0 or args.seed + args.count - 1 > MAX_SEED:
        raise UserError(f"seeds must lie between 0 and {MAX_SEED}: --seed {args.seed} with --count {args.count}")
    image = _read_image(args.image) if args.image else None
    steps = args.steps if args.steps is not None else (1 if image is None else 2)
    # Text-to-image runs the whole schedule from pure noise: strength 1 by definition.
    strength = args.strength if image is not None else 1.0
    try:
        StreamParams(args.prompt, strength, steps, args.seed).validate()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        ensure_writable_folder(out.parent if str(out.parent) else Path("."), args.output)
    except SinkError as exc:
        raise UserError(str(exc)) from None
    if engine is None:
        engine = build_engine(args)
    if engine.random_weights:
        log.warning("model %r has random weights: the pictures are noise", engine.model_name)
    kind = "image-to-image" if image is not None else "text-to-image"
    for k, path in enumerate(output_paths(args.output, args.count)):
        seed = args.seed + k
        t0 = time.perf_counter()
        picture = engine.generate(args.prompt, steps=steps, seed=seed, image=image, strength=strength)
        seconds = time.perf_counter() - t0
        if not cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
            raise UserError(f"could not write {path} (disk full, or not permitted?)")
        log.info("wrote %s (%s, %dx%d, seed %d, %d steps, %.2f s)",
                 path, kind, picture.shape[1], picture.shape[0], seed, steps, seconds)
    return 0
