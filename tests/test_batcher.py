"""The batcher with a fake engine: latest-frame slots, batching across streams, one inference thread, isolation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from turbostream.batcher import Batcher, Result
from turbostream.config import StreamParams


class FakeEngine:
    """Records every call; output frame = input frame + stream seed (so results can be told apart)."""

    def __init__(self, max_batch: int = 4, fail_prompt: str | None = None, delay: float = 0.0) -> None:
        self.max_batch = max_batch
        self.fail_prompt = fail_prompt
        self.delay = delay
        self.calls: list[list[StreamParams]] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.in_call = threading.Event()  # set once the inference thread is inside run()

    def warmup(self) -> None:
        self.threads.add(threading.get_ident())

    def run(self, frames, params):
        self.threads.add(threading.get_ident())
        self.in_call.set()
        self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        self.calls.append(list(params))
        if any(p.prompt == self.fail_prompt for p in params):
            raise RuntimeError("bad prompt in this batch")
        return [(f.astype(np.int32) + p.seed).clip(0, 255).astype(np.uint8) for f, p in zip(frames, params)]


class Collector:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.event = threading.Event()

    def __call__(self, result: Result) -> None:
        self.results.append(result)
        self.event.set()

    def wait(self, n: int, timeout: float = 5.0) -> list[Result]:
        deadline = time.monotonic() + timeout
        while len(self.results) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(self.results) >= n, f"got {len(self.results)} results, wanted {n}"
        return self.results


def frame(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, np.uint8)


@pytest.fixture
def started():
    batchers = []

    def start(engine, **kw) -> Batcher:
        b = Batcher(engine, **kw)
        batchers.append(b)
        b.start()
        assert b.ready.wait(5)
        return b

    yield start
    for b in batchers:
        b.stop()


def test_pending_frames_of_four_streams_run_as_one_batch(started):
    engine = FakeEngine(max_batch=4)
    engine.gate.clear()  # hold the thread in its first call so four frames pile up meanwhile
    batcher = started(engine)
    got = Collector()
    first = batcher.open_stream(got, StreamParams(seed=0))
    first.submit(frame(10), "warm")
    assert engine.in_call.wait(5)  # the thread holds that frame; the next ones wait in their slots
    streams = [batcher.open_stream(got, StreamParams(prompt=f"p{i}", seed=i + 1)) for i in range(4)]
    for i, s in enumerate(streams):
        assert s.submit(frame(100), i) is None
    engine.gate.set()
    results = got.wait(5)
    assert [len(c) for c in engine.calls] == [1, 4]
    # Per-stream parameters travel with their frames.
    assert [p.prompt for p in engine.calls[1]] == ["p0", "p1", "p2", "p3"]
    by_meta = {r.meta: r for r in results}
    for i in range(4):
        assert by_meta[i].batch_size == 4 and by_meta[i].error is None
        assert int(by_meta[i].frame[0, 0, 0]) == 100 + i + 1


def test_newer_frame_replaces_unprocessed_one(started):
    engine = FakeEngine()
    engine.gate.clear()
    batcher = started(engine)
    got = Collector()
    busy = batcher.open_stream(got, StreamParams())
    busy.submit(frame(0), "busy")
    assert engine.in_call.wait(5)  # the thread holds that frame; the next ones wait in their slots
    stream = batcher.open_stream(got, StreamParams())
    assert stream.submit(frame(1), "a") is None
    replaced = stream.submit(frame(2), "b")
    assert replaced is not None and replaced.meta == "a"
    replaced = stream.submit(frame(3), "c")
    assert replaced is not None and replaced.meta == "b"
    engine.gate.set()
    results = got.wait(2)
    assert [r.meta for r in results] == ["busy", "c"]


def test_max_batch_and_oldest_first(started):
    engine = FakeEngine(max_batch=2)
    engine.gate.clear()
    batcher = started(engine)
    got = Collector()
    blocker = batcher.open_stream(got, StreamParams())
    blocker.submit(frame(0), "blocker")
    assert engine.in_call.wait(5)  # the thread holds that frame; the next ones wait in their slots
    streams = [batcher.open_stream(got, StreamParams(seed=i)) for i in range(5)]
    for i, s in enumerate(streams):
        s.submit(frame(0), i)
        time.sleep(0.002)
    streams[0].submit(frame(0), "0-newer")  # replacing keeps the slot's place in line
    engine.gate.set()
    results = got.wait(6)
    assert [len(c) for c in engine.calls] == [1, 2, 2, 1]
    assert [r.meta for r in results[1:]] == ["0-newer", 1, 2, 3, 4]


def test_one_failing_frame_does_not_fail_the_batch(started):
    engine = FakeEngine(fail_prompt="boom")
    engine.gate.clear()
    batcher = started(engine)
    got = Collector()
    batcher.open_stream(got, StreamParams()).submit(frame(0), "first")
    assert engine.in_call.wait(5)  # the thread holds that frame; the next ones wait in their slots
    good = batcher.open_stream(got, StreamParams(prompt="fine"))
    bad = batcher.open_stream(got, StreamParams(prompt="boom"))
    good.submit(frame(5), "good")
    bad.submit(frame(5), "bad")
    engine.gate.set()
    results = {r.meta: r for r in got.wait(3)}
    assert results["good"].error is None and results["good"].frame is not None
    assert results["bad"].frame is None and "bad prompt" in results["bad"].error
    assert batcher.alive  # and the thread goes on
    good.submit(frame(1), "again")
    assert got.wait(4)[-1].meta == "again"


def test_closed_stream_gets_nothing(started):
    engine = FakeEngine()
    engine.gate.clear()
    batcher = started(engine)
    got = Collector()
    batcher.open_stream(got, StreamParams()).submit(frame(0), "busy")
    assert engine.in_call.wait(5)  # the thread holds that frame; the next ones wait in their slots
    stream = batcher.open_stream(got, StreamParams())
    stream.submit(frame(1), "gone")
    assert stream.close() is not None  # its pending frame comes back (a drop)
    assert stream.submit(frame(2), "late") is not None  # submitting after close is a drop too
    engine.gate.set()
    # A frame submitted after the close on another stream: "gone" would have run before it (oldest first).
    batcher.open_stream(got, StreamParams()).submit(frame(3), "probe")
    got.wait(2)
    assert [r.meta for r in got.results] == ["busy", "probe"]
    assert batcher.stream_count == 2


def test_expected_frame_joins_the_batch(started):
    engine = FakeEngine()
    batcher = started(engine, gather_s=2.0)
    got = Collector()
    a = batcher.open_stream(got, StreamParams())
    b = batcher.open_stream(got, StreamParams())
    b.expect()  # b's frame is being decoded
    a.submit(frame(0), "a")
    time.sleep(0.05)
    b.submit(frame(0), "b")
    b.unexpect()
    got.wait(2)
    assert [len(c) for c in engine.calls] == [2]


def test_gather_wait_is_bounded(started):
    engine = FakeEngine()
    batcher = started(engine, gather_s=1.0)
    got = Collector()
    a = batcher.open_stream(got, StreamParams())
    b = batcher.open_stream(got, StreamParams())
    b.expect()  # announced, never comes
    t0 = time.perf_counter()
    a.submit(frame(0), "a")
    got.wait(1, timeout=10)
    # It waited for b (the gather), but only as long as gather_s: the frame ran alone after about 1 s.
    assert 0.9 <= time.perf_counter() - t0 < 1.9
    assert [len(c) for c in engine.calls] == [1]


def test_engine_built_warmed_and_run_on_one_thread():
    engine = FakeEngine()
    built_on = []

    def factory():
        built_on.append(threading.get_ident())
        return engine

    batcher = Batcher(engine_factory=factory).start()
    try:
        assert batcher.ready.wait(5)
        got = Collector()
        for i in range(3):
            batcher.open_stream(got, StreamParams()).submit(frame(i), i)
        got.wait(3)
        assert engine.threads == set(built_on) and threading.get_ident() not in engine.threads
    finally:
        batcher.stop()
    assert not batcher.alive


def test_factory_failure_is_reported():
    def factory():
        raise ValueError("no such model: nope")

    batcher = Batcher(engine_factory=factory).start()
    assert batcher.failed.wait(5)
    assert not batcher.ready.is_set()
    assert batcher.error == "no such model: nope"


def test_frames_pending_at_the_end_of_a_call_are_committed_before_results_go_out(started):
    """A client that sends its next frame as soon as a result arrives must not replace its own frame in line."""
    engine = FakeEngine(delay=0.05)
    batcher = started(engine)
    replaced = []

    def on_result(result: Result) -> None:
        got(result)
        if result.meta == "A":  # the client answers at once with a newer frame
            replaced.append(stream.submit(frame(3), "C"))

    got = Collector()
    stream = batcher.open_stream(on_result, StreamParams())
    stream.submit(frame(1), "A")
    assert engine.in_call.wait(5)  # A is in the engine
    assert stream.submit(frame(2), "B") is None
    results = got.wait(3)
    assert replaced == [None]
    assert [r.meta for r in results] == ["A", "B", "C"]
