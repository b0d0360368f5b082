"""Latest-frame slots, one per stream, and the one inference thread that batches them into engine calls.

Every stream (a browser client, the server-side source) owns one slot holding at most its newest unprocessed frame:
a newer frame replaces an older one that has not been taken yet, and the caller counts it as dropped. The inference
thread takes the pending frame of up to `max_batch` streams (oldest first, so no stream starves), runs them through
the engine in one call with per-stream parameters, and hands each result to its stream's callback. Nothing here
queues: memory is one frame per stream, plus the batch in flight.

The engine is built (optionally), warmed up and run on this thread only: CUDA graphs replay on the thread that
captured them. An engine with per-stream state (transitions, feedback: it has release_stream) gets each frame's
stream key, and a closed stream's state is released on this thread too.

Pipelining: with an engine whose submit() only enqueues work (engine.Engine on CUDA: `pipelined`), the thread keeps
the GPU busy while it does its host work. Batch k is submitted; while it runs, the thread gathers batch k+1 until
max_batch frames are pending, or k is about to end (submit ahead: calls are timed per batch size and UNet
evaluations, and a batch is submitted its own host time before k is due, so the GPU goes from k to k+1 without
waiting for the host), or k is done; then it submits k+1, collects k, commits the frames pending by then to a later
batch, and hands k's results out. So k's copy out and delivery overlap k+1 on the GPU. The gather goes on while k
runs even if it starts with nothing pending: clients answer each result with their next frame, so that is when
frames arrive. An engine with run() only, or one that computes in submit() (the CPU), runs each batch to completion
instead. scripts/serve_sim.py measures how busy this keeps a simulated GPU.

Similarity skips (similarity.py): a frame the producer judged a repeat arrives as the reference frame marked `skip`;
if the stream's last output came from that very frame it is answered with that output (Result.skipped, no engine
call), otherwise the reference runs as usual. Results are delivered on the inference thread; callbacks must only
hand them off (for example with `loop.call_soon_threadsafe`), never encode or send there.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import StreamParams

log = logging.getLogger("turbostream.batcher")

# How long the inference thread waits for a frame that another stream is decoding right now, to batch it with
# the frames already pending; never waited when no other stream announced a frame. Waiting costs the pending frames
# that much latency and can save the awaited one a whole engine call, so the wait is a fraction of the engine's own
# recent call time, within bounds (a decode under load can take a few ms; more than 20 ms is never worth it).
GATHER_FRACTION = 0.1
GATHER_MIN_S = 0.002
GATHER_MAX_S = 0.020
GATHER_START_S = 0.004  # before the first call has been timed
CALL_TIME_SMOOTHING = 0.2  # weight of the newest call in the running mean of engine call time
POLL_S = 0.001  # while a call runs on the GPU: how often to look whether it is done (a new frame ends the wait at once)
FINE_POLL_S = 0.0002  # the same within POLL_S of when the call is due (predicted from earlier calls of its kind)
# Submit ahead: the next batch is submitted this long (plus the host time a submit takes) before the running call is
# due to end, so the device goes from one call to the next without waiting for the host. Calls are timed per kind
# (frames, UNet evaluations) to predict when one is due; a frame that arrives later goes to the batch after.
SUBMIT_AHEAD = True
SUBMIT_MARGIN_S = 0.0005
CALL_KINDS_TIMED = 64  # (batch size, UNet evaluations) pairs whose call time is kept; the oldest goes first


@dataclass
class Pending:
    """One frame waiting in a slot: uint8 RGB (H, W, 3) plus whatever the submitter wants back with the result."""

    frame: np.ndarray
    meta: Any
    skip: bool = False  # a repeat of `frame`, the stream's similarity reference: answer with its output


@dataclass
class Result:
    """What a stream's callback receives: the output frame (uint8 RGB (height, width, 3)) or an error message."""

    stream: Stream
    frame: np.ndarray | None
    meta: Any
    error: str | None = None
    batch_size: int = 0  # frames in the engine call that produced it (0: answered without one)
    skipped: bool = False  # answered with the stream's last output, without an engine call


@dataclass
class _Call:
    """One batch on its way through the engine: what was taken, what runs, and (once finished) what came out."""

    batch: list[tuple[Stream, Pending]]
    reused: list[np.ndarray | None]  # per entry of batch: the output a skip is answered with, or None (it runs)
    todo: list[tuple[Stream, Pending]]  # the entries that run
    keys: list[int] | None = None
    ticket: Any = None  # the engine's handle while the call is in flight (submit/collect engines)
    outs: list[np.ndarray | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    t0: float = 0.0
    due: float = 0.0  # when the device should finish it (pipelined; 0: no estimate yet)
    seen_done: float = 0.0  # when the inference thread first saw it done (0: not yet), which may be before collect
    submitted: float = 0.0  # when its submit returned (the device has it from then on)
    kind: tuple[int, int] = (0, 0)  # (frames, UNet evaluations over them): what its device time depends on


class Stream:
    """One stream's latest-frame slot and parameters. submit() and close() may be called from any thread."""

    def __init__(self, batcher: Batcher, key: int, on_result: Callable[[Result], None], params: StreamParams) -> None:
        self._batcher = batcher
        self.key = key
        self.on_result = on_result
        # Read by the inference thread when the frame is taken: a config change applies to the next batch.
        self.params = params
        self.closed = False
        self._expecting = 0  # frames announced (being decoded) but not submitted yet
        # The last frame run with similarity on, and its output: what a skipped frame is answered with.
        self.last_frame: np.ndarray | None = None
        self.last_output: np.ndarray | None = None

    def submit(self, frame: np.ndarray, meta: Any = None, skip: bool = False) -> Pending | None:
        """Put frame in the slot; returns the unprocessed frame it replaced (the caller counts a drop), or None.

        skip: `frame` is the similarity reference (similarity.SimilarityFilter) and `meta` a frame judged a repeat.
        """
        return self._batcher._submit(self, Pending(frame, meta, skip=skip))

    def expect(self) -> None:
        """Announce a frame that will be submitted soon (its decode started): the next batch may wait briefly for it."""
        with self._batcher._cond:
            self._expecting += 1
            self._batcher._cond.notify_all()

    def unexpect(self) -> None:
        """The announced frame will not come (its decode failed, or it was submitted)."""
        with self._batcher._cond:
            self._expecting = max(0, self._expecting - 1)
            self._batcher._cond.notify_all()

    def close(self) -> Pending | None:
        """Leave the batcher: a pending frame is discarded (returned) and results still in flight are not delivered."""
        return self._batcher._close_stream(self)


class Batcher:
    """The inference thread: builds (optionally) and warms the engine, then batches the slots' frames forever.

    Give it a built engine, or a factory that builds one on the inference thread (model loading can take minutes;
    the server answers /healthz meanwhile). `ready` is set after warmup; `failed` with `error` if building or
    warmup raised.
    """

    def __init__(
        self,
        engine: Any = None,
        *,
        engine_factory: Callable[[], Any] | None = None,
        max_batch: int | None = None,
        gather_s: float | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        on_skip: Callable[[int], None] | None = None,
        on_device: Callable[[float, float | None], None] | None = None,
        submit_ahead: bool | None = None,
    ) -> None:
        if (engine is None) == (engine_factory is None):
            raise ValueError("give either an engine or an engine_factory")
        self.engine = engine
        self._factory = engine_factory
        self._max_batch = max_batch
        self.fixed_gather_s = gather_s  # None: scaled with the engine's call time (see GATHER_FRACTION)
        self.call_s: float | None = None  # running mean of the engine's call time, seconds
        self._last_done = 0.0  # when the last call was seen done (or collected)
        # Submit ahead (pipelined engines): running means of the call time per kind of call (frames, UNet
        # evaluations) and of a submit's own host time, and when the last call submitted is due to end.
        self.submit_ahead = SUBMIT_AHEAD if submit_ahead is None else submit_ahead
        self._call_s_by_kind: dict[tuple[int, int], float] = {}
        self._submit_s = 0.0
        self._due = 0.0
        self.on_batch = on_batch  # (batch size, seconds) after every engine call, on the inference thread
        self.on_skip = on_skip  # (frames answered without the engine) after a batch that had some
        # (device seconds, idle seconds before the call or None) after every call whose engine timed it on the device
        # (Ticket.device_s, gap_s: CUDA events), on the inference thread
        self.on_device = on_device
        self.skipped = 0
        self._released: list[int] = []  # closed streams whose engine state is still to be freed
        self.ready = threading.Event()
        self.failed = threading.Event()
        self.error: str | None = None
        self.batches = 0
        self.frames = 0
        self._cond = threading.Condition()
        self._pending: OrderedDict[int, tuple[Stream, Pending]] = OrderedDict()  # oldest first
        self._streams: dict[int, Stream] = {}
        self._keys = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lora_scales: tuple[float, ...] | None = None  # asked for and not applied yet (the newest only)

    # ------------------------------------------------------------------ life cycle

    @property
    def max_batch(self) -> int:
        engine_max = self.engine.max_batch if self.engine is not None else 1
        return min(self._max_batch or engine_max, engine_max)

    @property
    def gather_s(self) -> float:
        """How long a batch may wait for a frame another stream is decoding (fixed, or scaled with call time)."""
        if self.fixed_gather_s is not None:
            return self.fixed_gather_s
        if self.call_s is None:
            return GATHER_START_S
        return min(max(GATHER_FRACTION * self.call_s, GATHER_MIN_S), GATHER_MAX_S)

    def start(self) -> Batcher:
        self._thread = threading.Thread(target=self._main, name="turbostream-inference", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to finish after its current batch and wait for it (a running warmup is not interrupted)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ streams

    def open_stream(self, on_result: Callable[[Result], None], params: StreamParams) -> Stream:
        stream = Stream(self, next(self._keys), on_result, params)
        with self._cond:
            self._streams[stream.key] = stream
        return stream

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def _submit(self, stream: Stream, item: Pending) -> Pending | None:
        with self._cond:
            if stream.closed or self._stop:
                return item  # nobody will process it: dropped
            old = self._pending.get(stream.key)
            # A replaced frame keeps its slot's place in line (a dict keeps a key's first position): the stream has
            # waited since its older frame arrived.
            self._pending[stream.key] = (stream, item)
            self._cond.notify_all()
        return old[1] if old is not None else None

    def _close_stream(self, stream: Stream) -> Pending | None:
        with self._cond:
            stream.closed = True
            stream.last_frame = stream.last_output = None
            if self._streams.pop(stream.key, None) is not None:
                self._released.append(stream.key)
            old = self._pending.pop(stream.key, None)
            self._cond.notify_all()
        return old[1] if old is not None else None

    def set_lora_scales(self, scales) -> None:
        """From any thread: the engine takes these LoRA scales (Engine.set_lora_scales) on the inference thread,
        before its next call; scales asked for before that are replaced, not queued (a fader sends dozens a second)."""
        with self._cond:
            self._lora_scales = tuple(scales)

    def _apply_lora_scales(self) -> None:
        """On the inference thread, between calls: the LoRA scales asked for last, if any."""
        with self._cond:
            scales, self._lora_scales = self._lora_scales, None
            if scales is None:
                return
            for stream in self._streams.values():
                # A still frame is answered from the stream's last output no more: it came from the old weights.
                stream.last_frame = stream.last_output = None
        try:
            self.engine.set_lora_scales(scales)
        except Exception as exc:  # noqa: BLE001 - the streams go on at the scales they had
            log.warning("LoRA scales %s not applied: %s", list(scales), exc)

    # ------------------------------------------------------------------ the inference thread

    def _main(self) -> None:
        try:
            if self.engine is None:
                self.engine = self._factory()
            self.engine.warmup()
        except BaseException as exc:  # noqa: BLE001 - reported to the server, which exits with the message
            self.error = str(exc) or type(exc).__name__
            # Its first line only: the whole message (a model that cannot be loaded says what to do, in several
            # lines) is the error that `serve` ends with, and .error here for a program that embeds the server.
            first, _, more = self.error.partition("\n")
            log.error("engine failed to start: %s%s", first, " (the whole message follows)" if more else "")
            self.failed.set()
            return
        self.ready.set()
        # Only where submit() returns before the work is done (CUDA): an engine that computes in submit() (the CPU)
        # would make every batch wait for the next one's whole computation before its results go out.
        pipelined = bool(getattr(self.engine, "pipelined", False))
        committed: list[tuple[Stream, Pending]] = []
        running: _Call | None = None
        while True:
            if running is None:
                batch, committed = self._take(committed), []
                if batch is None:
                    return
                running, following = self._launch(batch, pipelined), None
                if pipelined and running.ticket is not None:
                    continue  # gather the next batch while this one runs
            else:
                # A call runs on the device: gather the next batch meanwhile and submit it before collecting this one.
                batch, committed = self._take_while_running(running, committed), []
                if batch is None:
                    self._finish(running)
                    self._deliver(running)
                    return
                following = self._launch(batch, pipelined) if batch else None
            self._finish(running)
            # The frames pending once a call is finished are committed to a later batch before any result goes out:
            # a client answered first could otherwise send a newer frame that replaces its own committed one.
            committed = self._commit_pending()
            self._deliver(running)
            running = following

    def _take(self, batch: list[tuple[Stream, Pending]]) -> list[tuple[Stream, Pending]] | None:
        """Complete `batch` (frames committed already) to a batch to run, waiting for frames if it is empty.

        Takes up to max_batch pending frames, oldest first, one per stream; then, while another stream's frame is
        being decoded, waits up to gather_s for it. None when stopping.
        """
        limit = self.max_batch
        with self._cond:
            batch = [entry for entry in batch if not entry[0].closed]  # its client left meanwhile
            while not batch and not self._pending and not self._stop:
                if self._released:
                    # Streams closed while nothing ran (connections that never sent a frame): their engine state is
                    # freed now, not at a next batch that may never come, so the list of them stays short.
                    self._release_closed()
                    continue
                self._cond.wait()
            if self._stop:
                return None
            deadline = time.perf_counter() + self.gather_s
            while True:
                taken = self._fill(batch, limit)
                waiting_for = any(s._expecting and s.key not in taken for s in self._streams.values())
                remaining = deadline - time.perf_counter()
                if len(batch) >= limit or not waiting_for or remaining <= 0 or self._stop:
                    return batch
                self._cond.wait(remaining)

    def _take_while_running(
        self, running: _Call, committed: list[tuple[Stream, Pending]]
    ) -> list[tuple[Stream, Pending]] | None:
        """The next batch, gathered while `running` is on the device: the committed frames, then pending ones up to
        max_batch, taken once max_batch are there or the running call is done or about to be (submit ahead); [] when
        there is nothing to take by the time the call is done, or every stream's frame is in it (collect the running
        call first). None when stopping.

        Frames arrive mostly after the results of the call before went out (each client answers its result with its
        next frame), that is while `running` is on the device and not yet when this starts: so an empty start is no
        reason to stop gathering (collecting at once would make those frames wait for the whole call)."""
        limit = self.max_batch
        done = getattr(self.engine, "done", None)
        # Submit ahead: from this moment on, the next batch is taken with whatever is there (see SUBMIT_AHEAD).
        ahead = running.due - self._submit_s - SUBMIT_MARGIN_S if self.submit_ahead and running.due else None
        in_call = {stream.key for stream, _ in running.batch}  # streams with a frame in the running call
        with self._cond:
            batch = [entry for entry in committed if not entry[0].closed]  # its client left meanwhile
            taken = {stream.key for stream, _ in batch}
            while not self._stop:
                waiting = sum(k not in taken for k in self._pending)
                if len(batch) + waiting >= limit:
                    break
                if running.ticket is None or done is None:
                    break
                if self._is_done(done, running.ticket):
                    running.seen_done = time.perf_counter()
                    break
                now = time.perf_counter()
                if batch or waiting:
                    if ahead is not None and now >= ahead:
                        break
                    self._cond.wait(POLL_S if ahead is None else min(POLL_S, ahead - now))
                    continue
                # Nothing to take yet. If every stream has its frame in this call, nobody sends before its result
                # (one frame in flight per client): wait in the engine, which returns the moment the call is done.
                if all(key in in_call for key in self._streams):
                    break
                # Otherwise wait for a frame (its announce and its submit wake this), looking whether the call is
                # done every POLL_S, and every FINE_POLL_S within POLL_S of when it is due.
                near = running.due and abs(now - running.due) <= POLL_S
                self._cond.wait(FINE_POLL_S if near else POLL_S)
            if self._stop:
                return None
            self._fill(batch, limit)
            return batch

    @staticmethod
    def _is_done(done: Callable[[Any], bool], ticket: Any) -> bool:
        try:
            return done(ticket)
        except Exception:  # noqa: BLE001 - a faulted device: collect() raises it again and reports it to the streams
            return True

    def _fill(self, batch: list[tuple[Stream, Pending]], limit: int) -> set[int]:
        """Move pending frames into batch, oldest first, one per stream not in it yet, up to limit frames; returns
        the streams in batch. Call with the lock held."""
        taken = {stream.key for stream, _ in batch}
        for key in [k for k in self._pending if k not in taken][: limit - len(batch)]:
            batch.append(self._pending.pop(key))
            taken.add(key)
        return taken

    def _commit_pending(self) -> list[tuple[Stream, Pending]]:
        """Pop up to max_batch pending frames (oldest first) without waiting: the start of the next batch."""
        batch: list[tuple[Stream, Pending]] = []
        with self._cond:
            self._fill(batch, self.max_batch)
        return batch

    def _release_closed(self) -> None:
        """Free the engine state of streams closed since the last batch (on this thread: the engine's)."""
        with self._cond:
            keys, self._released = self._released, []
        release = getattr(self.engine, "release_stream", None)
        if release is not None:
            for key in keys:
                release(key)

    def _launch(self, batch: list[tuple[Stream, Pending]], pipelined: bool) -> _Call:
        """Start one batch: skips answered from their reference's output, the rest submitted to the engine (or run
        to completion by an engine without submit)."""
        self._release_closed()
        self._apply_lora_scales()
        # Frames of streams closed since they were taken (a batch waits up to gather_s for a frame being decoded, and
        # a pipelined one is gathered during a whole call) do not run: they would compute for nobody, and make engine
        # state for a key just released, which nothing would free again. A stream closing after this is released at
        # the next launch or when the thread goes idle, after the call that used it.
        with self._cond:
            batch = [entry for entry in batch if not entry[0].closed]
        # Skips whose reference already ran are answered from its output; everything else goes to the engine.
        reused = [stream.last_output if item.skip and item.frame is stream.last_frame else None
                  for stream, item in batch]
        call = _Call(batch, reused, [entry for entry, r in zip(batch, reused) if r is None])
        if not call.todo:
            return call
        frames = [item.frame for _, item in call.todo]
        params = [stream.params for stream, _ in call.todo]
        call.keys = [stream.key for stream, _ in call.todo] if hasattr(self.engine, "release_stream") else None
        kw = {} if call.keys is None else {"streams": call.keys}
        call.kind = (len(params), sum(p.unet_evals for p in params))
        call.t0 = time.perf_counter()
        try:
            if pipelined:
                call.ticket = self.engine.submit(frames, params, **kw)
                self._book(call)
            else:
                call.outs = list(self.engine.run(frames, params, **kw))
                call.errors = [None] * len(call.todo)
        except Exception as exc:  # noqa: BLE001 - one bad frame must not take the others down with it
            log.warning("engine call of %d frames failed (%s); running them one by one", len(call.todo), exc)
            call.outs, call.errors = self._run_alone(frames, params, call.keys)
        return call

    def _book(self, call: _Call) -> None:
        """After a submit: time it, and predict when the call is due (after the one before it, if that is still due)."""
        now = call.submitted = time.perf_counter()
        self._submit_s = _mean(self._submit_s or None, now - call.t0)
        expected = self._call_s_by_kind.get(call.kind)
        call.due = max(now, self._due) + expected if expected is not None else 0.0
        self._due = call.due

    def _finish(self, call: _Call) -> None:
        """Collect a call from the engine if it is in flight (waits for it), and account for it."""
        todo = call.todo
        if call.ticket is not None:
            try:
                call.outs = list(self.engine.collect(call.ticket))
                call.errors = [None] * len(todo)
            except Exception as exc:  # noqa: BLE001 - reported to each stream of the batch
                log.exception("engine call of %d frames failed", len(todo))
                call.outs, call.errors = [None] * len(todo), [f"the engine failed on this batch: {exc}"] * len(todo)
        # The call's own time: from its submit, or from the end of the call it queued behind (pipelined), to when it
        # was seen done (the next call's submit may come between that and its collect).
        end = call.seen_done or time.perf_counter()
        dt = end - max(call.t0, self._last_done)
        # Its device time, for predicting when calls of its kind are due: from when the device had it (its submit
        # returned, or the call before it ended) to when it was seen done; for a call run to completion (no submit)
        # that is all of its time, and the device's idle time before it is the pause since the call before. An engine
        # that times its calls on the device (CUDA events: Ticket.device_s, gap_s) is taken at its word. Reported
        # (on_device) only in those two cases.
        device_s, gap_s, timed = end - max(call.submitted or call.t0, self._last_done), None, False
        if call.ticket is not None and getattr(call.ticket, "device_s", None) is not None:
            device_s, gap_s, timed = call.ticket.device_s, call.ticket.gap_s, True
        elif call.ticket is None and call.todo:
            gap_s, timed = (call.t0 - self._last_done if self._last_done else None), True
        if timed and self.on_device is not None:
            self.on_device(device_s, gap_s)
        self._last_done = end
        for (stream, item), out in zip(todo, call.outs):
            keep = out is not None and stream.params.similarity > 0
            stream.last_frame, stream.last_output = (item.frame, out) if keep else (None, None)
        n_skipped = len(call.batch) - len(todo)
        if todo:
            self.batches += 1
            self.frames += len(todo)
            self.call_s = _mean(self.call_s, dt)
            times = self._call_s_by_kind
            if call.kind not in times and len(times) >= CALL_KINDS_TIMED:
                del times[next(iter(times))]
            times[call.kind] = _mean(times.get(call.kind), device_s)
            if self.on_batch is not None:
                self.on_batch(len(todo), dt)
        if n_skipped:
            self.skipped += n_skipped
            if self.on_skip is not None:
                self.on_skip(n_skipped)

    def _deliver(self, call: _Call) -> None:
        """Hand each stream of a finished call its result (on this thread; callbacks only hand off)."""
        todo, batch = call.todo, call.batch
        ran = iter(zip(call.outs, call.errors))
        answers = [(r, None, True) if r is not None else (*next(ran), False) for r in call.reused]
        for (stream, item), (out, err, skipped) in zip(batch, answers):
            if stream.closed:
                continue
            if skipped:
                result = Result(stream, out, item.meta, skipped=True)
            else:
                result = Result(stream, out, item.meta, err, len(todo))
            try:
                stream.on_result(result)
            except Exception:  # noqa: BLE001 - a broken callback is the stream's problem, not the thread's
                log.exception("result callback of stream %d failed", stream.key)

    def _run_alone(self, frames, params, keys=None) -> tuple[list[np.ndarray | None], list[str | None]]:
        outs: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for i, (frame, p) in enumerate(zip(frames, params)):
            try:
                outs.append(self.engine.run([frame], [p])[0] if keys is None
                            else self.engine.run([frame], [p], streams=[keys[i]])[0])
                errors.append(None)
            except Exception as exc:  # noqa: BLE001
                log.exception("engine failed on one frame")
                outs.append(None)
                errors.append(f"the engine failed on this frame: {exc}")
        return outs, errors


def _mean(mean: float | None, x: float) -> float:
    """A running mean that weighs the newest sample by CALL_TIME_SMOOTHING (the first sample is the mean)."""
    return x if mean is None else mean + CALL_TIME_SMOOTHING * (x - mean)
