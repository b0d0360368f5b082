"""One session per WebSocket connection: a ClientSession streams its own frames (/ws), a ViewerSession watches the
broadcast (/view/ws). Both share Session: the ready message, the outbox (the connection's one sender), stats,
error reporting and the receive loop.

One frame's way through a /ws connection, and why nothing queues:

    message -> header check (protocol.py, microseconds) -> newest-undecoded slot -> decode + fit (worker thread,
    one per connection at a time), straight into the stream's latest-frame slot (batcher.py) -> the inference
    thread batches every stream's pending frame into one engine call -> result handed to the event loop -> the
    connection's outbox (newest result only) -> encode (worker thread) -> send

Each stage holds at most one frame per connection; a newer frame replaces an older unprocessed one and the older one
counts as dropped. The worker pool's queue is therefore bounded by connections x 2. Every connection has its own
sender task, so a slow reader only ever delays itself: while its send waits on the socket (the write limit), newer
results replace the one waiting and are counted as dropped.

Each hand-off between threads costs a frame a wake-up (0.1-0.5 ms on a busy 2-core machine:
scripts/latency_breakdown.py). The decode worker puts its frame into the batcher's slot itself rather than through
the event loop (0.13 -> 0.04 ms for that step there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..batcher import Pending, Result, Stream
from ..codec import CPU_JPEG, CpuJpeg, fit_frame
from ..config import Limits, StreamParams, stream_limits
from ..errors import CodecError
from ..similarity import SimilarityFilter
from . import protocol
from .protocol import FrameMeta, ProtocolError

if TYPE_CHECKING:
    from .server import TurboServer

log = logging.getLogger("turbostream.server")

LATENCY_WINDOW = 256  # recent end-to-end latencies kept per connection for its stats


def timed_decode(data: bytes, limits: Limits, width: int, height: int,
                 jpeg: CpuJpeg = CPU_JPEG) -> tuple[np.ndarray, float]:
    """JPEG bytes -> uint8 RGB (height, width, 3) fitted to the engine, and the seconds it took (worker thread).
    jpeg: the server's codec (CPU, or codec_cuda.CudaJpeg with `--jpeg gpu`)."""
    t0 = time.perf_counter()
    frame = fit_frame(jpeg.decode(data, limits.max_image_side, limits.max_jpeg_scans, fit=(width, height)), width,
                      height)
    return frame, time.perf_counter() - t0


def timed_encode(rgb: np.ndarray, quality: int, jpeg: CpuJpeg = CPU_JPEG) -> tuple[bytes, float]:
    """uint8 RGB (H, W, 3) -> JPEG bytes at quality 1..100, and the seconds it took (worker thread)."""
    t0 = time.perf_counter()
    data = jpeg.encode(rgb, quality)
    return data, time.perf_counter() - t0


def _percentile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class OutItem:
    """A result waiting for its connection's sender: uint8 RGB to encode, or JPEG bytes already encoded."""

    rgb: np.ndarray | None = None
    jpeg: bytes | None = None
    header: dict[str, Any] | None = None  # sent as text right before the JPEG (its server_ms set once encoded)
    t_recv: float | None = None  # for the end-to-end latency of interactive frames


class Outbox:
    """One connection's sender task: a short queue of text messages plus its newest result only.

    Results that arrive while a send is still waiting on a slow socket replace the waiting one (on_drop is called
    for it), so a slow reader never grows a queue and never delays any other connection.
    """

    TEXT_LIMIT = 32  # error and stats messages kept for a reader that is behind; the oldest go first

    def __init__(self, server: TurboServer, ws: ServerConnection, on_drop: Callable[[str], None],
                 on_sent: Callable[[OutItem, float], None] | None = None) -> None:
        self.server = server
        self.ws = ws
        self.on_drop = on_drop
        self.on_sent = on_sent
        self._texts: deque[str] = deque(maxlen=self.TEXT_LIMIT)
        self._image: OutItem | None = None
        self._wake = asyncio.Event()
        self.closed = False

    def text(self, obj: dict[str, Any]) -> None:
        if not self.closed:
            self._texts.append(json.dumps(obj))
            self._wake.set()

    def image(self, item: OutItem) -> None:
        if self.closed:
            return
        if self._image is not None:
            self.on_drop("send")
        self._image = item
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._texts:
                    await self.ws.send(self._texts.popleft())
                item, self._image = self._image, None
                if item is None:
                    continue
                if item.jpeg is None and not await self._encode(item):
                    continue
                if item.header is not None:
                    if item.t_recv is not None:  # "server_ms": from the frame's arrival to its result encoded, now
                        item.header["server_ms"] = round((time.perf_counter() - item.t_recv) * 1e3, 2)
                    await self.ws.send(json.dumps(item.header))
                await self.ws.send(item.jpeg)
                self.server.metrics.frames_out.inc()
                if self.on_sent is not None:
                    self.on_sent(item, time.perf_counter())
        except ConnectionClosed:
            pass
        finally:
            self.closed = True

    async def _encode(self, item: OutItem) -> bool:
        """item.rgb -> item.jpeg on a codec worker; False (frame answered with server_error) if encoding failed."""
        server = self.server
        try:
            item.jpeg, dt = await asyncio.get_running_loop().run_in_executor(
                server.pool, timed_encode, item.rgb, server.config.jpeg_quality, server.jpeg
            )
        except Exception as exc:  # noqa: BLE001 - a codec failure or no memory: this frame only
            log.exception("could not encode a result")
            self.on_drop("encode")
            if item.header is not None:
                # The client waits for an answer to this frame before it sends more (flow control).
                seq = item.header["seq"]
                server.metrics.errors.labels("server_error").inc()
                self.text(protocol.error_message("server_error", f"frame {seq}: the result could not be encoded: "
                                                 f"{exc}", seq=seq))
            return False
        item.rgb = None
        server.metrics.encode.observe(dt)
        return True


class Counters:
    """Per-connection numbers for its stats messages."""

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.dropped = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._last_out = 0
        self._last_t = time.perf_counter()

    def snapshot(self) -> dict[str, Any]:
        now = time.perf_counter()
        fps = (self.frames_out - self._last_out) / max(now - self._last_t, 1e-6)
        self._last_out, self._last_t = self.frames_out, now
        p50, p95 = _percentile(self.latencies, 0.5), _percentile(self.latencies, 0.95)
        return {
            "type": "stats", "fps": round(fps, 2),
            "latency_ms": {"p50": None if p50 is None else round(p50 * 1e3, 2),
                           "p95": None if p95 is None else round(p95 * 1e3, 2)},
            "frames_in": self.frames_in, "frames_out": self.frames_out, "dropped": self.dropped,
        }


class Session:
    """What every connection does: greet with ready, send through one outbox, report stats and errors, read."""

    role = ""

    def __init__(self, server: TurboServer, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.counts = Counters()
        self.outbox = Outbox(server, ws, self._drop, self._sent)
        self._tasks: set[asyncio.Task] = set()

    # -------------------------------------------------------------- what subclasses fill in

    @property
    def params(self) -> StreamParams:
        """The parameters this connection sees (its own stream's, or the broadcast's)."""
        raise NotImplementedError

    @property
    def device_stream(self):
        """The batcher stream whose device this connection's `ready` names (None: the primary device)."""
        return getattr(self, "stream", None)

    def ready_extra(self) -> dict[str, Any]:
        return {}

    def stats_extra(self) -> dict[str, Any]:
        return {}

    def on_text(self, obj: dict[str, Any]) -> None:
        """A parsed text message; raise ProtocolError for bad input."""
        raise NotImplementedError

    def on_binary(self, data: bytes) -> None:
        raise NotImplementedError

    def on_close(self) -> None:
        pass

    # -------------------------------------------------------------- shared

    def _drop(self, stage: str) -> None:
        self.counts.dropped += 1
        self.server.metrics.dropped(stage)

    def _sent(self, item: OutItem, now: float) -> None:
        self.counts.frames_out += 1

    def error(self, code: str, message: str, **extra: Any) -> None:
        self.server.metrics.errors.labels(code).inc()
        self.outbox.text(protocol.error_message(code, message, **extra))

    async def run(self) -> None:
        server, engine = self.server, self.server.engine
        self.outbox.text(protocol.ready_message(
            self.role, **self.ready_extra(), model=engine.model_name, random_weights=engine.random_weights,
            loras=server.loras, lora_live=server.lora_target is not None and server.lora_target.live,
            device=server.device_for(self.device_stream), width=engine.width, height=engine.height,
            params=self.params, limits=server.limits_dict(), stats_interval_s=server.config.stats_interval_s,
        ))
        self.after_ready()
        self._spawn(self.outbox.run())
        self._spawn(self._stats_loop())
        try:
            async for message in self.ws:
                if getattr(self.ws, "refused", False):
                    break  # closed by a limit (a flood): what it queued before is not worth an answer it cannot get
                try:
                    if isinstance(message, str):
                        self.on_text(protocol.parse_text(message, server.config.limits))
                    else:
                        self.on_binary(message)
                except ProtocolError as exc:
                    self.error(exc.code, exc.message, **exc.extra)
                # Messages already queued come back from the iterator without a pause: yield to the event loop after
                # each one, so a burst from this client (up to Limits.max_message_burst) never holds up the others.
                await asyncio.sleep(0)
        except ConnectionClosed:
            pass  # gone mid-message, or a message over max_size (websockets closed it with 1009)
        finally:
            self.on_close()
            for task in self._tasks:
                task.cancel()

    def after_ready(self) -> None:
        pass

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.server.config.stats_interval_s)
            stats = self.counts.snapshot()
            stats.update(self.stats_extra())
            self.outbox.text(stats)


class ClientSession(Session):
    """One /ws connection: its stream in the batcher, its decode slot, its outbox and its stats."""

    role = "client"

    def __init__(self, server: TurboServer, ws: ServerConnection) -> None:
        super().__init__(server, ws)
        self.loop = asyncio.get_running_loop()
        # On the least loaded device (devices.py); its batcher is the stream's own from here on.
        self.stream: Stream = server.devices.open_stream(self._on_result_threadsafe, server.default_params)
        self.seq = 0
        self._raw: tuple[bytes, FrameMeta] | None = None  # the newest message waiting for the decoder
        self._decoding = False
        self.skipper = SimilarityFilter()  # the `similarity` control, run on the decode worker

    @property
    def params(self) -> StreamParams:
        return self.stream.params

    def stats_extra(self) -> dict[str, Any]:
        return {"clients": len(self.server.clients), "viewers": len(self.server.viewers)}

    def _sent(self, item: OutItem, now: float) -> None:
        super()._sent(item, now)
        if item.t_recv is not None:
            latency = now - item.t_recv
            self.counts.latencies.append(latency)
            self.server.metrics.end_to_end.observe(latency)

    def on_close(self) -> None:
        if self.stream.close() is not None:
            self._drop("closed")
        if self._raw is not None:
            self._raw = None
            self._drop("closed")

    # -------------------------------------------------------------- input

    def on_text(self, obj: dict[str, Any]) -> None:
        fields = protocol.expect_config(obj)
        self.stream.params = protocol.apply_config(self.stream.params, fields, *stream_limits(self.server.engine))
        self.outbox.text(protocol.config_message(self.stream.params))

    def on_binary(self, data: bytes) -> None:
        self.seq += 1
        self.counts.frames_in += 1
        self.server.metrics.frames_in.inc()
        meta = FrameMeta(self.seq)
        # The header check reads up to the frame header (codec.MAX_SEGMENTS segments at most): it runs here so every
        # frame with a bad header gets its error, even one that a newer frame would have replaced before its decode.
        # The scans are counted by the codec worker, before it decodes (a crafted message costs that walk 0.05 s).
        try:
            protocol.check_jpeg_header(data, self.server.config.limits)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, exc.message, seq=meta.seq) from None
        if self._decoding:
            if self._raw is not None:
                self._drop("decode")
            self._raw = (data, meta)
        else:
            self._decoding = True
            # The worker gets the JPEG now, not once a new task first runs (one event-loop turn later).
            self._spawn(self._decode_loop(self._start_decode(data, meta), meta))

    def _start_decode(self, data: bytes, meta: FrameMeta) -> asyncio.Future:
        """Hand a JPEG to a codec worker (_decode_into_slot) now; the future gives (seconds, frame replaced)."""
        server, engine = self.server, self.server.engine
        self.stream.expect()
        future = self.loop.run_in_executor(server.pool, self._decode_into_slot, data, meta, server.config.limits,
                                           engine.width, engine.height)
        # The connection may close before its decode loop awaits this: its outcome is then not wanted.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def _decode_loop(self, decoding: asyncio.Future, meta: FrameMeta) -> None:
        """Account for each decode as it ends (the frame is in the slot already) and start the next one waiting."""
        server = self.server
        try:
            while True:
                try:
                    dt, replaced = await decoding
                except CodecError as exc:
                    self.error("bad_image", f"frame {meta.seq}: {exc}", seq=meta.seq)
                except Exception as exc:  # noqa: BLE001 - not the client's fault, but its frame is answered all the same
                    log.exception("decoding frame %d failed", meta.seq)
                    self.error("server_error", f"frame {meta.seq}: the server could not decode it: {exc}",
                               seq=meta.seq)
                else:
                    server.metrics.decode.observe(dt)
                    if replaced is not None:
                        self._drop("queue")
                finally:
                    self.stream.unexpect()
                if self._raw is None:
                    return
                (data, meta), self._raw = self._raw, None
                decoding = self._start_decode(data, meta)
        finally:
            self._decoding = False

    def _decode_into_slot(self, data: bytes, meta: FrameMeta, *fit) -> tuple[float, Pending | None]:
        """Worker thread: decode and fit, the similarity check against this stream's last frame let through, and into
        the stream's batcher slot (Stream.submit is thread-safe), so the inference thread can take the frame without
        waiting for the event loop. (seconds decoding, the unprocessed frame it replaced or None)."""
        frame, dt = timed_decode(data, *fit, self.server.jpeg)
        reference = self.skipper.check(frame, self.stream.params)
        skip = reference is not None  # a repeat: the reference's output answers it
        return dt, self.stream.submit(reference if skip else frame, meta, skip=skip)

    # -------------------------------------------------------------- output

    def _on_result_threadsafe(self, result: Result) -> None:
        """Called on the inference thread: hand the result to the event loop and return at once."""
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody to send it to
            self.loop.call_soon_threadsafe(self._on_result, result)

    def _on_result(self, result: Result) -> None:
        meta: FrameMeta = result.meta
        if result.error is not None or result.frame is None:
            self.error("engine_error", f"frame {meta.seq}: {result.error}", seq=meta.seq)
            return
        header = protocol.frame_header(meta, result.batch_size, skipped=result.skipped)
        self.outbox.image(OutItem(rgb=result.frame, header=header, t_recv=meta.t_recv))


class ViewerSession(Session):
    """One /view/ws connection: receives the broadcast; may change its parameters with the control token."""

    role = "viewer"

    def __init__(self, server: TurboServer, ws: ServerConnection, control: bool) -> None:
        super().__init__(server, ws)
        self.control = control

    @property
    def params(self) -> StreamParams:
        return self.server.broadcast.stream.params

    @property
    def device_stream(self):
        """The broadcast's stream: the device a viewer's `ready` names is the one that runs it (it moves when its
        device is lost)."""
        return self.server.broadcast.stream

    def ready_extra(self) -> dict[str, Any]:
        return {"control": self.control}

    def after_ready(self) -> None:
        self.source_changed(None)

    def stats_extra(self) -> dict[str, Any]:
        return {"viewers": len(self.server.viewers)}

    def source_changed(self, previous: str | None) -> None:
        """Tell this viewer the source's state; a loss or an end also as an error, which pages show as such."""
        state = self.server.broadcast.state
        self.outbox.text(state)
        if state["state"] == "ended":
            self.error("source_ended", state["message"])
        elif state["state"] == "reconnecting" and previous != "reconnecting":
            self.error("source_lost", state["message"])

    def on_binary(self, data: bytes) -> None:
        raise ProtocolError("not_supported", "viewers receive frames; send frames to /ws instead")

    def on_text(self, obj: dict[str, Any]) -> None:
        lora = obj["type"] == "lora"  # a LoRA's scale (--lora-live): the model's, so every stream's
        fields = protocol.expect_lora(obj) if lora else protocol.expect_config(obj)
        if not self.control:
            why = ("connect with ?control=<token> to change the broadcast" if self.server.config.control_token
                   else "this server was started without --control-token: viewers cannot change the broadcast")
            raise ProtocolError("forbidden", why)
        if lora:
            try:
                self.server.change_lora(*fields)
            except ValueError as exc:
                raise ProtocolError("bad_config", str(exc)) from None
            return
        self.server.broadcast.set_params(fields)
