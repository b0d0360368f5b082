"""Latest-frame slots, one per stream, and the one inference thread that batches them into engine calls.

Every stream (a browser client, the server-side source) owns one slot holding at most its newest unprocessed frame:
a newer frame replaces an older one that has not been taken yet, and the caller counts it as dropped. The inference
thread takes the pending frame of up to `max_batch` streams (oldest first, so no stream starves), runs them through
the engine in one call with per-stream parameters, and hands each result to its stream's callback. Nothing here
queues: memory is one frame per stream, plus the batch in flight.

The engine is built (optionally), warmed up and run on this thread only: CUDA graphs replay on the thread that
captured them. An engine with per-stream state (transitions, feedback: it has release_stream) gets each frame's
stream key, and a closed stream's state is released on this thread too.

Similarity skips (similarity.py): a frame the producer judged a repeat arrives as the reference frame marked `skip`;
if the stream's last output came from that very frame it is answered with that output (Result.skipped, no engine
call), otherwise the reference runs as usual. Results are delivered on the inference thread; callbacks must only hand them off (for example with
`loop.call_soon_threadsafe`), never encode or send there.
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
# the frames already pending. Bounded by one JPEG decode; never waited when no other stream announced a frame.
DEFAULT_GATHER_S = 0.004


@dataclass
class Pending:
    """One frame waiting in a slot: uint8 RGB (H, W, 3) plus whatever the submitter wants back with the result."""

    frame: np.ndarray
    meta: Any
    t_submit: float = field(default_factory=time.perf_counter)
    skip: bool = False  # a repeat of `frame`, the stream's similarity reference: answer with its output


@dataclass
class Result:
    """What a stream's callback receives: the output frame (uint8 RGB (height, width, 3)) or an error message."""

    stream: Stream
    frame: np.ndarray | None
    meta: Any
    error: str | None = None
    batch_size: int = 0
    gpu_s: float = 0.0  # wall time of the engine call that produced it (shared by the whole batch)
    t_submit: float = 0.0
    t_done: float = 0.0
    skipped: bool = False  # answered with the stream's last output, without an engine call


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
        gather_s: float = DEFAULT_GATHER_S,
        on_batch: Callable[[int, float], None] | None = None,
        on_skip: Callable[[int], None] | None = None,
    ) -> None:
        if (engine is None) == (engine_factory is None):
            raise ValueError("give either an engine or an engine_factory")
        self.engine = engine
        self._factory = engine_factory
        self._max_batch = max_batch
        self.gather_s = gather_s
        self.on_batch = on_batch  # (batch size, seconds) after every engine call, on the inference thread
        self.on_skip = on_skip  # (frames answered without the engine) after a batch that had some
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

    # ------------------------------------------------------------------ life cycle

    @property
    def max_batch(self) -> int:
        engine_max = self.engine.max_batch if self.engine is not None else 1
        return min(self._max_batch or engine_max, engine_max)

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
            if old is not None:
                # Keep the slot's place in line: the stream waited since its older frame arrived.
                item.t_submit = old[1].t_submit
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

    # ------------------------------------------------------------------ the inference thread

    def _main(self) -> None:
        try:
            if self.engine is None:
                self.engine = self._factory()
            self.engine.warmup()
        except BaseException as exc:  # noqa: BLE001 - reported to the server, which exits with the message
            self.error = str(exc) or type(exc).__name__
            log.error("engine failed to start: %s", self.error)
            self.failed.set()
            return
        self.ready.set()
        batch: list[tuple[Stream, Pending]] = []
        while True:
            batch = self._take(batch)
            if batch is None:
                return
            # The frames pending when this call ends are committed to the next batch before any result goes out:
            # a client answered first could otherwise send a newer frame that replaces its own committed one.
            batch = self._run(batch)

    def _take(self, batch: list[tuple[Stream, Pending]]) -> list[tuple[Stream, Pending]] | None:
        """Complete `batch` (frames committed already) to a batch to run, waiting for frames if it is empty.

        Takes up to max_batch pending frames, oldest first, one per stream; then, while another stream's frame is
        being decoded, waits up to gather_s for it. None when stopping.
        """
        limit = self.max_batch
        with self._cond:
            batch = [entry for entry in batch if not entry[0].closed]  # its client left meanwhile
            while not batch and not self._pending and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            deadline = time.perf_counter() + self.gather_s
            taken = {stream.key for stream, _ in batch}
            while True:
                for key in [k for k in self._pending if k not in taken][: limit - len(batch)]:
                    batch.append(self._pending.pop(key))
                    taken.add(key)
                waiting_for = any(s._expecting and s.key not in taken for s in self._streams.values())
                remaining = deadline - time.perf_counter()
                if len(batch) >= limit or not waiting_for or remaining <= 0 or self._stop:
                    return batch
                self._cond.wait(remaining)

    def _commit_pending(self) -> list[tuple[Stream, Pending]]:
        """Pop up to max_batch pending frames (oldest first) without waiting: the start of the next batch."""
        with self._cond:
            keys = list(itertools.islice(self._pending, self.max_batch))
            return [self._pending.pop(k) for k in keys]

    def _release_closed(self) -> None:
        """Free the engine state of streams closed since the last batch (on this thread: the engine's)."""
        with self._cond:
            keys, self._released = self._released, []
        release = getattr(self.engine, "release_stream", None)
        if release is not None:
            for key in keys:
                release(key)

    def _run(self, batch: list[tuple[Stream, Pending]]) -> list[tuple[Stream, Pending]]:
        """Run one batch, deliver its results; returns the frames committed to the next batch."""
        self._release_closed()
        # Skips whose reference already ran are answered from its output; everything else goes to the engine.
        reused = [stream.last_output if item.skip and item.frame is stream.last_frame else None
                  for stream, item in batch]
        todo = [entry for entry, r in zip(batch, reused) if r is None]
        frames = [item.frame for _, item in todo]
        params = [stream.params for stream, _ in todo]
        keys = [stream.key for stream, _ in todo] if hasattr(self.engine, "release_stream") else None
        t0 = time.perf_counter()
        outs: list[np.ndarray | None] = []
        errors: list[str | None] = []
        if todo:
            try:
                outs = list(self.engine.run(frames, params) if keys is None
                            else self.engine.run(frames, params, streams=keys))
                errors = [None] * len(todo)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not take the others down with it
                log.warning("engine call of %d frames failed (%s); running them one by one", len(todo), exc)
                outs, errors = self._run_alone(frames, params, keys)
        dt = time.perf_counter() - t0
        for (stream, item), out in zip(todo, outs):
            keep = out is not None and stream.params.similarity > 0
            stream.last_frame, stream.last_output = (item.frame, out) if keep else (None, None)
        n_skipped = len(batch) - len(todo)
        if todo:
            self.batches += 1
            self.frames += len(todo)
            if self.on_batch is not None:
                self.on_batch(len(todo), dt)
        if n_skipped:
            self.skipped += n_skipped
            if self.on_skip is not None:
                self.on_skip(n_skipped)
        following = self._commit_pending()
        t_done = time.perf_counter()
        ran = iter(zip(outs, errors))
        answers = [(r, None, True) if r is not None else (*next(ran), False) for r in reused]
        for (stream, item), (out, err, skipped) in zip(batch, answers):
            if stream.closed:
                continue
            if skipped:
                result = Result(stream, out, item.meta, None, 0, 0.0, item.t_submit, t_done, skipped=True)
            else:
                result = Result(stream, out, item.meta, err, len(todo), dt, item.t_submit, t_done)
            try:
                stream.on_result(result)
            except Exception:  # noqa: BLE001 - a broken callback is the stream's problem, not the thread's
                log.exception("result callback of stream %d failed", stream.key)
        return following

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
