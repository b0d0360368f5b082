"""`turbostream run`'s GPU loop with a pipelined engine (submit/collect): call k+1 goes in while call k runs.

A fake engine whose calls finish when the test says so, a capture the test feeds, and the real tiny-random engine
forced pipelined (on the CPU its submit computes the call) against its own serial run.
"""

from __future__ import annotations

import _thread
import logging
import threading
import time
from collections import deque

import numpy as np
import pytest
from test_runner import FakeEngine, index_of, make_video, parse, read_video

from turbostream.cli import run as cli_run
from turbostream.codec import fit_frame
from turbostream.config import StreamParams
from turbostream.io.sources import CapturedFrame, CaptureThread
from turbostream.pipeline import Pipeline

WAIT_S = 20.0  # for what a thread does next: generous, a loaded 2-core machine may be slow to schedule it


def frame(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


class PipelinedEngine:
    """A submit/collect engine: call k is 'on the device' until finish(k), or done at once with auto=True.

    Output = input + 100, a new array. Records submits and collects in order (`events`) and each call's frame values
    (`calls`) and seeds; like the real engine it refuses a third call in flight, frees a call whose collect fails,
    and must be driven from the thread that warmed it up. No run(): a pipelined loop must not call it.
    """

    pipelined = True

    def __init__(self, max_batch: int = 4, *, auto: bool = False, fail: tuple[str, int] | None = None) -> None:
        self.max_batch = max_batch
        self.auto = auto
        self.fail = fail  # ("submit" or "collect", k): that step of call k raises
        self.events: list[str] = []
        self.calls: list[list[int]] = []
        self.seeds: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.thread: int | None = None
        self._cond = threading.Condition()
        self._finished: dict[int, threading.Event] = {}

    def warmup(self) -> None:
        self.thread = threading.get_ident()

    def finished(self, k: int) -> threading.Event:
        with self._cond:
            return self._finished.setdefault(k, threading.Event())

    def finish(self, k: int) -> None:
        self.finished(k).set()

    def wait_for(self, event: str) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: event in self.events, WAIT_S)

    def _record(self, event: str) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def submit(self, frames, params):
        assert threading.get_ident() == self.thread, "submit() on another thread than warmup()"
        assert 0 < len(frames) == len(params) <= self.max_batch
        k = len(self.calls)
        if self.fail == ("submit", k):
            raise RuntimeError(f"submit {k} failed")
        if self.in_flight == 2:
            raise RuntimeError("two engine calls are in flight already")
        self.calls.append([int(f[0, 0, 0]) for f in frames])
        self.seeds.append(params[0].seed)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.auto:
            self.finish(k)
        self._record(f"submit {k}")
        return k, [f + 100 for f in frames]

    def done(self, ticket) -> bool:
        return self.finished(ticket[0]).is_set()

    def collect(self, ticket):
        assert threading.get_ident() == self.thread, "collect() on another thread than warmup()"
        k, outs = ticket
        try:
            assert self.finished(k).wait(WAIT_S), f"call {k} never finished"
            if self.fail == ("collect", k):
                raise RuntimeError(f"call {k} failed")
        finally:
            self.in_flight -= 1
        self._record(f"collect {k}")
        return outs


class Feed:
    """What the pipeline needs of a CaptureThread, fed by the test: frames in order, or the newest when realtime."""

    def __init__(self, frames=(), *, realtime: bool = False, end: bool = False) -> None:
        self.realtime = realtime
        self.frames_read = self.dropped = 0
        self.error = None
        self._cond = threading.Condition()
        self._pending: deque[CapturedFrame] = deque()
        self._finished = False
        for f in frames:
            self.push(f)
        if end:
            self.end()

    def push(self, image: np.ndarray) -> None:
        with self._cond:
            if self.realtime:
                self.dropped += len(self._pending)
                self._pending.clear()
            self._pending.append(CapturedFrame(self.frames_read, image, time.perf_counter()))
            self.frames_read += 1
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        self.end()

    def take(self, timeout: float) -> CapturedFrame | None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._finished, timeout)
            return self._pending.popleft() if self._pending else None

    @property
    def ended(self) -> bool:
        with self._cond:
            return self._finished and not self._pending


class ListSink:
    """A file output that keeps what it is given, in order."""

    path = "list"

    def __init__(self) -> None:
        self.written: list[tuple[int, np.ndarray]] = []
        self._cond = threading.Condition()

    def write(self, image: np.ndarray, index: int, t: float | None = None) -> None:
        with self._cond:
            self.written.append((index, image))
            self._cond.notify_all()

    def close(self) -> None:
        pass

    def wait(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.written) >= n, WAIT_S)

    @property
    def indices(self) -> list[int]:
        return [i for i, _ in self.written]

    @property
    def values(self) -> list[int]:
        return [int(image[0, 0, 0]) for _, image in self.written]


class Running:
    """Pipeline.run() on a thread of its own, so that the test can drive the engine and the capture meanwhile."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.summary = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.pipeline.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            self.error = exc

    def join(self):
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the run did not end"
        if self.error is not None:
            raise self.error
        return self.summary


# ------------------------------------------------------------------------------------------------ the fake engine


def test_the_next_call_is_submitted_before_the_previous_is_collected():
    engine = PipelinedEngine(max_batch=1)
    sink = ListSink()
    run = Running(Pipeline(engine, Feed([frame(1), frame(2), frame(3)], end=True), [sink], StreamParams()))
    assert engine.wait_for("submit 1")
    assert engine.events == ["submit 0", "submit 1"] and not sink.written  # call 0 is still on the device
    engine.finish(0)
    assert engine.wait_for("submit 2")  # call 0 went out, call 2 went in behind call 1
    engine.finish(1)
    engine.finish(2)
    summary = run.join()
    assert engine.events == ["submit 0", "submit 1", "collect 0", "submit 2", "collect 1", "collect 2"]
    assert sink.values == [101, 102, 103] and sink.indices == [0, 1, 2]
    assert summary.frames == 3 and summary.stopped == "end" and engine.max_in_flight == 2 and engine.in_flight == 0


def test_a_files_frames_come_out_once_in_order_batched():
    engine = PipelinedEngine(max_batch=4, auto=True)
    sink = ListSink()
    feed = Feed([frame(k) for k in range(10)], end=True)  # all decoded already: each call takes a full batch
    summary = Pipeline(engine, feed, [sink], StreamParams(), batch=4).run()
    assert engine.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert engine.events == ["submit 0", "submit 1", "collect 0", "submit 2", "collect 1", "collect 2"]
    assert sink.indices == list(range(10)) and sink.values == [100 + k for k in range(10)]
    assert summary.frames == 10 and summary.skipped == 0 and engine.in_flight == 0


class PipelinedFake(FakeEngine):
    """test_runner's FakeEngine (fitted frames back, calls recorded by frame index) behind submit/collect."""

    pipelined = True

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.in_flight = self.max_in_flight = 0

    def submit(self, frames, params):
        assert self.in_flight < 2, "a third call in flight"
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return super().run(frames, params)

    def collect(self, outs):
        self.in_flight -= 1
        return outs

    def run(self, frames, params):
        raise AssertionError("a pipelined engine is driven by submit/collect")


def test_a_video_file_through_the_cli_comes_out_whole_and_in_order(tmp_path):
    src = make_video(tmp_path / "in.avi", n=20)
    out = tmp_path / "out.avi"
    engine = PipelinedFake(max_batch=4)
    assert cli_run.main(parse("run", "-i", str(src), "-o", str(out)), engine=engine) == 0
    assert [i for call in engine.calls for i in call] == list(range(20))
    frames, _ = read_video(out)
    assert [index_of(f) for f in frames] == list(range(20))
    assert engine.in_flight == 0


def test_a_live_frame_is_collected_without_waiting_for_the_next():
    engine = PipelinedEngine(max_batch=1)
    feed, sink = Feed(realtime=True), ListSink()
    pipeline = Pipeline(engine, feed, [sink], StreamParams(seed=1))
    run = Running(pipeline)
    feed.push(frame(7))
    assert engine.wait_for("submit 0")
    engine.finish(0)
    assert sink.wait(1), "the result waited for a frame that is not coming"
    assert engine.events == ["submit 0", "collect 0"]
    pipeline.set_params(StreamParams(seed=5))  # from this thread: the next call runs with it
    feed.push(frame(8))
    engine.finish(1)
    assert sink.wait(2)
    feed.end()
    summary = run.join()
    assert sink.values == [107, 108] and engine.seeds == [1, 5] and summary.frames == 2


def test_repeats_of_a_frame_in_flight_get_its_output_in_order():
    """The capture transform hands back the reference frame object for a repeat: A A B B B C C arrive as three
    objects. In batches of two the repeats of B and C are taken while the call that runs them is still in flight."""
    a, b, c = frame(1), frame(2), frame(3)
    engine = PipelinedEngine(max_batch=2, auto=True)
    sink = ListSink()
    pipeline = Pipeline(engine, Feed([a, a, b, b, b, c, c], end=True), [sink], StreamParams(similarity=0.9), batch=2)
    summary = pipeline.run()
    assert engine.calls == [[1], [2], [3]]  # each picture ran once
    # [B C] went in while [B B] was in flight, and [C] (no engine call) while [B C] was.
    assert engine.events == ["submit 0", "submit 1", "collect 0", "submit 2", "collect 1", "collect 2"]
    assert sink.indices == list(range(7)) and sink.values == [101, 101, 102, 102, 102, 103, 103]
    outs = [image for _, image in sink.written]
    assert outs[1] is outs[0] and outs[3] is outs[2] and outs[4] is outs[2] and outs[6] is outs[5]
    assert summary.skipped == 4 and summary.frames == 7
    assert pipeline._last_in is c and pipeline._last_out is outs[6]


def test_stop_with_two_calls_in_flight_writes_both():
    engine = PipelinedEngine(max_batch=1)
    sink = ListSink()
    pipeline = Pipeline(engine, Feed([frame(k) for k in range(6)]), [sink], StreamParams())  # more would come
    run = Running(pipeline)
    assert engine.wait_for("submit 1")
    pipeline.stop()
    engine.finish(0)
    engine.finish(1)
    summary = run.join()
    assert summary.stopped == "quit" and summary.frames == 2
    assert sink.indices == [0, 1] and sink.values == [100, 101]
    assert engine.events == ["submit 0", "submit 1", "collect 0", "collect 1"] and engine.in_flight == 0


def run_while(pipeline: Pipeline, meanwhile) -> object:
    """pipeline.run() on this thread (where Ctrl-C lands) while `meanwhile` runs on a helper thread; the summary."""
    helper = threading.Thread(target=meanwhile, daemon=True)
    helper.start()
    summary = pipeline.run()
    helper.join(WAIT_S)
    return summary


def test_ctrl_c_with_two_calls_in_flight_writes_both():
    engine = PipelinedEngine(max_batch=1)
    sink = ListSink()
    pipeline = Pipeline(engine, Feed([frame(k) for k in range(6)]), [sink], StreamParams())

    def interrupt():
        assert engine.wait_for("submit 1")
        _thread.interrupt_main()
        assert pipeline._stop.wait(WAIT_S)  # the main thread took the interrupt and is shutting down
        engine.finish(0)
        engine.finish(1)

    summary = run_while(pipeline, interrupt)
    assert summary.stopped == "interrupt"
    assert sink.indices == [0, 1] and sink.values == [100, 101]
    assert engine.events == ["submit 0", "submit 1", "collect 0", "collect 1"] and engine.in_flight == 0


def test_interrupt_ends_the_run_as_ctrl_c_does_from_any_thread():
    """Pipeline.interrupt() (SIGTERM's handler calls it): the run ends as after Ctrl-C, with what ran written, even
    when no KeyboardInterrupt reaches the main thread."""
    engine = PipelinedEngine(max_batch=1, auto=True)
    sink = ListSink()
    feed = Feed([frame(k) for k in range(2)])  # a live source: more would come
    pipeline = Pipeline(engine, feed, [sink], StreamParams())

    def interrupt():
        assert sink.wait(2)
        pipeline.interrupt()

    summary = run_while(pipeline, interrupt)
    assert summary.stopped == "interrupt" and sink.indices == [0, 1] and engine.in_flight == 0


def test_a_sigterm_whose_keyboard_interrupt_is_lost_still_stops_the_run():
    """A KeyboardInterrupt raised inside a finalizer is printed and dropped by Python: SIGTERM's handler also tells
    the pipeline, so `docker stop` never lets the run go on (and leave an unfinished .mp4 at its kill timeout)."""
    import signal

    from turbostream.cli.run import _sigterm_as_ctrl_c

    class Told:
        interrupted = False

        def interrupt(self):
            self.interrupted = True

    with _sigterm_as_ctrl_c() as term:
        term.pipeline = Told()
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:
            pass  # what a finalizer does with it
    assert term.received and term.pipeline.interrupted


def test_ctrl_c_does_not_wait_out_a_capture_stuck_in_a_network_read(caplog):
    """A stalled stream holds its capture thread in a read until the backend's own timeout: after Ctrl-C the run
    waits for it a second (INTERRUPTED_CAPTURE_WAIT_S), not open_timeout_s + 2 s, and still writes what it ran."""
    from turbostream.io.sources import SourceSpec

    unstick = threading.Event()

    class StuckAfterOne:
        fps, frame_count, size, left = 30.0, None, (16, 16), 1

        def read(self):
            if self.left <= 0:
                unstick.wait(60)  # the stall
                return None
            self.left -= 1
            return frame(0)

        def release(self):
            pass

    spec = SourceSpec("url", "rtsp://cam.local/stream", "rtsp://cam.local/stream")
    capture = CaptureThread(spec, realtime=True, reconnect=0, open_timeout_s=20, opener=lambda s: StuckAfterOne())
    capture.start()
    engine = PipelinedEngine(max_batch=1, auto=True)
    sink = ListSink()
    pipeline = Pipeline(engine, capture, [sink], StreamParams())

    def interrupt():
        assert sink.wait(1)
        _thread.interrupt_main()

    try:
        t0 = time.perf_counter()
        summary = run_while(pipeline, interrupt)
        took = time.perf_counter() - t0
        assert summary.stopped == "interrupt" and sink.indices == [0]
        assert took < 10.0, took  # waiting out the capture would take 22 s
        assert "did not stop in time" in caplog.text
    finally:
        unstick.set()
        capture._thread.join(WAIT_S)


def test_ctrl_c_that_cuts_a_hand_out_short_leaves_no_hole(monkeypatch):
    """Ctrl-C lands while result 1 is being handed to the outputs: 2 and 3 still come from the GPU thread, but
    written after a missing 1 they would leave a hole in the file, so the output ends at 0."""
    from turbostream import pipeline as pipeline_module

    class CutAtOne(pipeline_module.SinkThread):
        def put(self, image, index, t=None):
            if index == 1:
                raise KeyboardInterrupt
            super().put(image, index, t)

    monkeypatch.setattr(pipeline_module, "SinkThread", CutAtOne)
    engine = PipelinedEngine(max_batch=1, auto=True)
    sink = ListSink()
    summary = Pipeline(engine, Feed([frame(k) for k in range(4)], end=True), [sink], StreamParams()).run()
    assert summary.stopped == "interrupt" and sink.indices == [0] and engine.in_flight == 0


@pytest.mark.parametrize("fail,message,events", [
    (("collect", 0), "call 0 failed", ["submit 0", "submit 1", "collect 1"]),
    (("submit", 1), "submit 1 failed", ["submit 0", "collect 0"]),
])
def test_an_engine_error_reaches_the_caller_and_leaves_nothing_in_flight(fail, message, events, caplog):
    engine = PipelinedEngine(max_batch=1, auto=True, fail=fail)
    sink = ListSink()
    pipeline = Pipeline(engine, Feed([frame(k) for k in range(4)], end=True), [sink], StreamParams())
    with caplog.at_level(logging.WARNING, "turbostream.run"), pytest.raises(RuntimeError, match=message):
        pipeline.run()
    # The other call in flight was collected, and its result dropped with the run.
    assert engine.events == events and engine.in_flight == 0 and not sink.written
    assert "dropping an engine call of 1 frame(s) after the error" in caplog.text


def test_max_frames_is_exact():
    engine = PipelinedEngine(max_batch=4, auto=True)
    sink = ListSink()
    feed = Feed([frame(k) for k in range(10)])  # not ended: only max_frames can end this run
    summary = Running(Pipeline(engine, feed, [sink], StreamParams(), batch=4, max_frames=6)).join()
    assert summary.stopped == "max-frames" and summary.frames == 6
    assert engine.calls == [[0, 1, 2, 3], [4, 5]] and sink.indices == list(range(6))
    assert engine.events == ["submit 0", "submit 1", "collect 0", "collect 1"]


# ------------------------------------------------------------------------------------------------ the real engine


class ForcedPipelined:
    """The real engine with pipelining forced on: on the CPU its submit computes the call, collect hands it out."""

    pipelined = True

    def __init__(self, engine) -> None:
        self.engine = engine
        self.max_in_flight = 0

    def submit(self, *args, **kw):
        ticket = self.engine.submit(*args, **kw)
        self.max_in_flight = max(self.max_in_flight, self.engine.in_flight)
        return ticket

    def __getattr__(self, name):
        return getattr(self.engine, name)


def run_video(engine, src, n: int, params: StreamParams) -> ListSink:
    """The n frames of the video at src through a Pipeline on engine, batched (all decoded first, so that every run
    batches them alike); what the sink got."""
    size = (engine.width, engine.height)
    capture = CaptureThread(str(src), realtime=False, queue_size=n, transform=lambda f: fit_frame(f, *size))
    capture.start()
    deadline = time.monotonic() + WAIT_S
    while capture.pending < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert capture.pending == n
    sink = ListSink()
    summary = Pipeline(engine, capture, [sink], params, batch=engine.max_batch).run()
    assert summary.stopped == "end" and summary.frames == n
    sink.summary = summary
    return sink


def test_the_real_engine_pipelined_writes_what_the_serial_run_writes(tmp_path, make_engine):
    """A small video through the real engine serially and pipelined (per-stream feedback, so each frame depends on
    the ones before it): the same frames, in order."""
    n = 8
    src = make_video(tmp_path / "in.avi", n=n, flat=False)
    params = StreamParams("a fox", 0.5, 2, 3, feedback=0.5)
    serial = run_video(make_engine(), src, n, params)
    pipelined = ForcedPipelined(make_engine())
    piped = run_video(pipelined, src, n, params)
    assert pipelined.max_in_flight == 2 and pipelined.in_flight == 0
    assert piped.indices == serial.indices == list(range(n))
    for (_, a), (_, b) in zip(piped.written, serial.written):
        assert np.array_equal(a, b)


def test_a_run_says_how_busy_the_device_was(tmp_path, make_engine):
    """The engine times its calls (EngineStats.device_s): the run's summary and status line give the share of the run
    the device worked; an engine that does not time its calls shows none."""
    src = make_video(tmp_path / "in.avi", n=6, flat=False)
    engine = make_engine()
    summary = run_video(engine, src, 6, StreamParams()).summary
    assert summary.device_s == pytest.approx(engine.stats.device_s) and 0 < summary.device_busy <= 1.05
    untimed = Pipeline(PipelinedEngine(max_batch=2, auto=True), Feed([frame(0)], end=True), [ListSink()],
                       StreamParams(), batch=2)
    assert untimed.run().device_busy is None
    assert untimed._status(10.0, 9.0, 0.5).endswith("device  50 % busy") and "busy" not in untimed._status(10, 9)
