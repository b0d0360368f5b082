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


class PipelinedEngine(FakeEngine):
    """A submit/collect engine whose calls finish only when the test says so: call k is 'on the device' until
    finish(k). Records the order of submits and collects."""

    pipelined = True

    def __init__(self, max_batch: int = 2) -> None:
        super().__init__(max_batch=max_batch)
        self.events: list[str] = []
        self.finished: list[threading.Event] = []

    def submit(self, frames, params):
        k = len(self.finished)
        self.finished.append(threading.Event())
        self.events.append(f"submit {k}")
        return k, self.run(frames, params)

    def done(self, ticket) -> bool:
        return self.finished[ticket[0]].is_set()

    def collect(self, ticket):
        assert self.finished[ticket[0]].wait(10)
        self.events.append(f"collect {ticket[0]}")
        return ticket[1]

    def finish(self, k: int) -> None:
        while len(self.finished) <= k:
            time.sleep(0.001)
        self.finished[k].set()


def test_next_batch_is_submitted_while_the_previous_runs(started):
    """Pipelining: batch 1 is gathered and submitted while batch 0 is on the device, before batch 0 is collected;
    results still reach each stream in order and match their frames."""
    engine = PipelinedEngine(max_batch=2)
    batcher = started(engine, gather_s=5.0)  # a long gather: a and b always make batch 0 together, however slow
    got = Collector()
    streams = [batcher.open_stream(got, StreamParams(seed=i)) for i in range(4)]
    for s in streams:  # all four are decoding: the thread gathers while call 0 runs instead of collecting it
        s.expect()
    for s, meta in ((streams[0], "a0"), (streams[1], "b0")):
        s.submit(frame(10), meta)
        s.unexpect()
    while engine.events[:1] != ["submit 0"]:
        time.sleep(0.001)
    for s, meta in ((streams[2], "c0"), (streams[3], "d0")):
        s.submit(frame(20), meta)
        s.unexpect()
    # max_batch pending: taken while call 0 still runs
    while "submit 1" not in engine.events:
        time.sleep(0.001)
    assert engine.events == ["submit 0", "submit 1"] and not got.results  # 0 not collected yet: still running
    engine.finish(0)
    got.wait(2)
    engine.finish(1)
    results = got.wait(4)
    assert engine.events == ["submit 0", "submit 1", "collect 0", "collect 1"]
    assert [r.meta for r in results] == ["a0", "b0", "c0", "d0"]
    assert [int(r.frame[0, 0, 0]) for r in results] == [10, 11, 22, 23]


def test_a_lone_frame_is_collected_without_waiting_for_company(started):
    """With nothing else pending, a lone frame's call is collected as soon as it is done, and a frame that arrives
    while a call runs goes into the next one."""
    engine = PipelinedEngine(max_batch=4)
    batcher = started(engine)
    got = Collector()
    a, b = batcher.open_stream(got, StreamParams(seed=1)), batcher.open_stream(got, StreamParams(seed=2))
    a.submit(frame(0), "a")
    engine.finish(0)
    got.wait(1)
    b.expect()  # b is decoding: the thread gathers while call 1 runs
    a.submit(frame(0), "a2")
    while "submit 1" not in engine.events:
        time.sleep(0.001)
    b.submit(frame(5), "b")
    b.unexpect()
    engine.finish(1)
    engine.finish(2)
    results = got.wait(3)
    assert [r.meta for r in results] == ["a", "a2", "b"]
    assert engine.events == ["submit 0", "collect 0", "submit 1", "submit 2", "collect 1", "collect 2"]


def test_frames_arriving_after_an_empty_start_still_make_the_next_call_while_this_one_runs(started):
    """The gather while a call runs starts empty as a rule (clients answer their results with their next frames, and
    those are still on their way), so an empty start is no reason to stop gathering: frames that arrive meanwhile are
    submitted while the call runs, not after it (which would leave the device idle and make them wait a call)."""
    engine = PipelinedEngine(max_batch=2)
    batcher = started(engine)
    got = Collector()
    a, b, c = (batcher.open_stream(got, StreamParams(seed=i)) for i in range(3))
    a.submit(frame(0), "a")
    while engine.events[:1] != ["submit 0"]:
        time.sleep(0.001)
    time.sleep(0.05)  # the thread is gathering for call 1 with nothing pending and nobody decoding
    b.submit(frame(1), "b")
    c.submit(frame(2), "c")
    deadline = time.monotonic() + 10
    while "submit 1" not in engine.events and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.events == ["submit 0", "submit 1"]  # call 0 is still on the device
    engine.finish(0)
    engine.finish(1)
    assert [r.meta for r in got.wait(3)] == ["a", "b", "c"]
    assert engine.events == ["submit 0", "submit 1", "collect 0", "collect 1"]


@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "at-done"])
def test_submit_ahead_queues_the_next_call_before_the_running_one_ends(started, monkeypatch, ahead):
    """Once calls of a size are timed, a batch that is not full is submitted shortly before the running call is due
    (SUBMIT_MARGIN_S plus a submit's own time), so the device goes on without waiting for the host; with the rule
    off, it is submitted when the running call is seen done. Calls take 0.6 s here and the margin is 0.3 s, so a
    loaded machine's late wake-ups cannot blur the two."""
    from turbostream import batcher as batcher_mod

    monkeypatch.setattr(batcher_mod, "SUBMIT_MARGIN_S", 0.3)
    engine = TimedPipelinedEngine(0.6, max_batch=4)
    batcher = started(engine, submit_ahead=ahead)
    got = Collector()
    a, b = batcher.open_stream(got, StreamParams(seed=1)), batcher.open_stream(got, StreamParams(seed=2))
    a.submit(frame(0), "a0")  # call 0 times the calls of one frame
    got.wait(1, timeout=10)
    a.submit(frame(0), "a1")  # call 1: due 0.6 s after its submit
    while "submit 1" not in engine.events:
        time.sleep(0.001)
    b.submit(frame(1), "b")  # one frame of four: the batch never fills
    got.wait(3, timeout=10)
    assert engine.events[:3] == ["submit 0", "collect 0", "submit 1"]
    finished_at_submit_2 = engine.done_at_submit[2][1]
    assert finished_at_submit_2 is (not ahead), engine.events


def test_when_every_stream_waits_for_the_running_call_it_is_waited_for_in_the_engine(started):
    """Nothing pending and every open stream's frame in the running call: nobody sends before its result, so the
    thread waits inside collect() (which returns the moment the call is done) instead of polling done()."""

    class Entered(PipelinedEngine):
        def __init__(self):
            super().__init__(max_batch=2)
            self.entered = threading.Event()

        def collect(self, ticket):
            self.entered.set()
            return super().collect(ticket)

    engine = Entered()
    batcher = started(engine, gather_s=5.0)  # a long gather: a and b always make call 0 together, however slow
    got = Collector()
    a, b = batcher.open_stream(got, StreamParams(seed=1)), batcher.open_stream(got, StreamParams(seed=2))
    b.expect()
    a.submit(frame(0), "a")
    b.submit(frame(0), "b")
    b.unexpect()
    while not engine.events:
        time.sleep(0.001)
    assert engine.events == ["submit 0"]  # both streams in call 0
    assert engine.entered.wait(5)  # in collect() while call 0 still runs
    engine.finish(0)
    assert [r.meta for r in got.wait(2)] == ["a", "b"]


def test_gather_wait_scales_with_engine_call_time(started):
    """Unless fixed, the wait for a decoding frame is GATHER_FRACTION of the engine's mean call time, bounded."""
    from turbostream import batcher as batcher_mod

    low, high, fraction = batcher_mod.GATHER_MIN_S, batcher_mod.GATHER_MAX_S, batcher_mod.GATHER_FRACTION
    for delay in (0.0, 0.08, 0.5):
        engine = FakeEngine(delay=delay)
        batcher = started(engine)
        assert batcher.gather_s == batcher_mod.GATHER_START_S  # nothing timed yet
        got = Collector()
        stream = batcher.open_stream(got, StreamParams())
        for i in range(3):
            stream.submit(frame(i), i)
            got.wait(i + 1)
        assert batcher.call_s >= delay  # the running mean of the calls' own time
        assert batcher.gather_s == pytest.approx(min(max(fraction * batcher.call_s, low), high))
        if delay == 0.5:
            assert batcher.gather_s == high
        if delay == 0.08:
            assert batcher.gather_s >= 0.008
    assert started(FakeEngine(), gather_s=0.5).gather_s == 0.5


class TimedPipelinedEngine(PipelinedEngine):
    """A pipelined engine whose calls finish `delay` seconds after their submit."""

    def __init__(self, delay: float, max_batch: int = 4) -> None:
        super().__init__(max_batch=max_batch)
        self.call_delay = delay
        self.done_at_submit: list[list[bool]] = []

    def submit(self, frames, params):
        self.done_at_submit.append([event.is_set() for event in self.finished])  # which calls were done by then
        ticket = super().submit(frames, params)
        threading.Timer(self.call_delay, self.finished[ticket[0]].set).start()
        return ticket


def test_pipelined_frames_pending_before_results_go_out_are_kept(started):
    """The commit rule with pipelining: a frame pending when a call is collected is committed to a later batch, so
    the client answered first cannot replace it, and no committed frame is lost."""
    engine = TimedPipelinedEngine(0.05)
    batcher = started(engine)
    replaced = []
    sent = iter(range(100, 112))

    def on_result(result: Result) -> None:
        got(result)
        meta = next(sent, None)
        if meta is not None:  # the client answers every result at once with a newer frame
            replaced.append(stream.submit(frame(3), meta))

    got = Collector()
    stream = batcher.open_stream(on_result, StreamParams())
    other = batcher.open_stream(got, StreamParams(seed=7))
    stream.submit(frame(1), "A")
    other.submit(frame(1), "X")
    while not engine.finished:
        time.sleep(0.001)
    assert stream.submit(frame(2), "B") is None  # pending while A runs: it may go into the next call or wait
    results = got.wait(15, timeout=10)
    assert replaced == [None] * 12
    metas = [r.meta for r in results if r.stream is stream]
    assert metas == ["A", "B", *range(100, 112)]
    assert all(r.error is None for r in results)


def test_the_real_engine_pipelined_hands_each_stream_its_own_frames(engine, make_engine, started):
    """The batcher's pipelined loop on the real engine's submit/collect (forced on; on the CPU submit computes): every
    frame of three streams comes back once, in order, equal (within a level) to the frame run alone."""
    from turbostream.codec import fit_frame

    class Pipelined:
        pipelined = True

        def __getattr__(self, name):
            return getattr(engine, name)

    batcher = started(Pipelined())
    got = Collector()
    rng = np.random.default_rng(5)
    params = [StreamParams("a fox", 0.5, 2, 1), StreamParams("an owl", 1.0, 2, 2), StreamParams("a cat", 0.5, 4, 3)]
    streams = [batcher.open_stream(got, p) for p in params]
    frames = {}
    for k in range(3):
        for i, s in enumerate(streams):
            frames[(i, k)] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            s.submit(frames[(i, k)], (i, k))
        got.wait(3 * (k + 1), timeout=30)
    results = got.wait(9)
    assert sorted(r.meta for r in results) == sorted(frames)
    for i in range(3):
        assert [r.meta[1] for r in results if r.meta[0] == i] == [0, 1, 2]
    reference = make_engine()  # the batcher's engine belongs to its thread
    for r in results:
        alone = reference.run([fit_frame(frames[r.meta], 64, 64)], [params[r.meta[0]]])[0]
        assert r.error is None and np.abs(r.frame.astype(int) - alone).max() <= 1


class TimelineEngine(PipelinedEngine):
    """A pipelined engine whose tickets carry the device's own timeline (like Engine's CUDA events), set at collect:
    every call took `device_s` on the device, with `gap_s` idle before it (none before the first)."""

    class Ticket(tuple):
        device_s = gap_s = None

    def __init__(self, device_s: float, gap_s: float) -> None:
        super().__init__(max_batch=1)
        self.device_s, self.gap_s = device_s, gap_s

    def submit(self, frames, params):
        ticket = self.Ticket(super().submit(frames, params))
        self.finished[ticket[0]].set()  # done at once in real time: only the timeline says it took device_s
        return ticket

    def collect(self, ticket):
        out = super().collect(ticket)
        ticket.device_s, ticket.gap_s = self.device_s, (self.gap_s if ticket[0] else None)
        return out


def test_the_engines_device_timeline_is_reported_and_predicts_its_calls(started):
    """A ticket's device time (CUDA events) goes to on_device with the idle time before the call, and it, not the
    host's view of when the call was seen done, is what the batcher predicts calls of that kind from."""
    timeline = []
    batcher = started(TimelineEngine(0.25, 0.003), on_device=lambda busy, gap: timeline.append((busy, gap)))
    got = Collector()
    stream = batcher.open_stream(got, StreamParams())
    for k in range(3):
        stream.submit(frame(k), k)
        got.wait(k + 1)
    deadline = time.monotonic() + 5
    while len(timeline) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert timeline == [(0.25, None), (0.25, 0.003), (0.25, 0.003)]
    assert batcher._call_s_by_kind == {(1, 1): 0.25}  # the calls ended within milliseconds in real time


def test_a_call_run_to_completion_counts_as_device_time(started):
    """An engine without submit (a CPU engine): the device was busy for each whole call, idle in between."""
    timeline = []
    batcher = started(FakeEngine(delay=0.05), on_device=lambda busy, gap: timeline.append((busy, gap)))
    got = Collector()
    stream = batcher.open_stream(got, StreamParams())
    stream.submit(frame(1), 1)
    got.wait(1)
    time.sleep(0.1)  # the device idles
    stream.submit(frame(2), 2)
    got.wait(2)
    deadline = time.monotonic() + 5
    while len(timeline) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    (busy0, gap0), (busy1, gap1) = timeline
    assert busy0 >= 0.05 and busy1 >= 0.05 and gap0 is None
    assert 0.09 <= gap1 < 1.0


def test_streams_closed_while_nothing_runs_are_released_at_once(started):
    """Connections that open and close without a frame (health checks, clients whose first frame was refused) left
    their stream in a list freed only at the next engine call: without end on a server that ran none. Now the
    inference thread frees their engine state when woken by the close."""

    class ReleasingEngine(FakeEngine):
        def __init__(self) -> None:
            super().__init__()
            self.released: list[int] = []
            self.release_threads: set[int] = set()

        def release_stream(self, key: int) -> None:
            self.release_threads.add(threading.get_ident())
            self.released.append(key)

    engine = ReleasingEngine()
    batcher = started(engine)
    keys = []
    for _ in range(1000):
        stream = batcher.open_stream(Collector(), StreamParams())
        keys.append(stream.key)
        stream.close()
    deadline = time.monotonic() + 5
    while len(engine.released) < len(keys) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(engine.released) == sorted(keys) and not batcher._released
    assert engine.calls == []  # no engine call was needed for it
    assert engine.release_threads == engine.threads  # on the inference thread, the engine's own


def test_a_stream_closed_while_its_batch_is_gathered_leaves_no_engine_state(engine, started):
    """A's frame is in a batch that waits (the gather) for B's frame, still being decoded; A leaves meanwhile. Its
    frame no longer runs: it computed for nobody and made engine state (a feedback latent) for a key already released,
    which nothing freed again (up to the engine's LRU of 256 states)."""
    batcher = started(engine, gather_s=5.0)
    got = Collector()
    params = StreamParams(feedback=0.5)  # a stream with state of its own in the engine
    image = np.full((64, 64, 3), 120, np.uint8)
    frames_before = engine.stats.frames
    a, b = batcher.open_stream(got, params), batcher.open_stream(got, params)
    b.expect()  # B's decode started: the batch waits up to gather_s for it
    a.submit(image, "a")
    deadline = time.monotonic() + 5
    while batcher._pending and time.monotonic() < deadline:  # A's frame taken into the batch being gathered
        time.sleep(0.005)
    assert not batcher._pending
    a.close()
    b.submit(image, "b")
    b.unexpect()
    got.wait(1)
    b.close()
    deadline = time.monotonic() + 5
    while engine.stream_states and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stream_states == 0
    assert [r.meta for r in got.results] == ["b"]
    assert engine.stats.frames == frames_before + 1  # B's frame alone ran
