"""`turbostream serve`: one port for the browser client, health, metrics, interactive streams and viewers.

Routes (all on the `websockets` asyncio server; plain HTTP GETs are answered in process_request):

    /              the browser client (web/index.html, app.js, style.css)
    /view          the viewer page (web/view.html, view.js)
    /healthz       200 "ok" once the engine is warmed up; 503 while loading/warming (or if it failed)
    /metrics       Prometheus text (a registry per server)
    /ws            WebSocket: one interactive stream per connection (JPEG in, stylized JPEG out)
    /view/ws       WebSocket: a viewer of the server-side source (--source), broadcast to every viewer

One frame's way through a /ws connection, and why nothing queues:

    message -> header check (event loop, microseconds) -> newest-undecoded slot -> decode + fit (worker thread,
    one per connection at a time) -> the stream's latest-frame slot (batcher.py) -> the inference thread batches
    every stream's pending frame into one engine call -> result handed to the event loop -> the connection's
    outbox (newest result only) -> encode (worker thread) -> send

Each stage holds at most one frame per connection; a newer frame replaces an older unprocessed one and the older one
counts as dropped. The worker pool's queue is therefore bounded by connections x 2. Every connection has its own
sender task, so a slow reader only ever delays itself: while its send waits on the socket (websockets' write_limit),
newer results replace the one waiting and are counted as dropped.

Wire protocol and error codes: WIRE_PROTOCOL and ERROR_CODES below.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from .batcher import Batcher, Result, Stream
from .codec import CodecError, decode_jpeg, encode_jpeg, fit_frame, jpeg_size
from .config import MAX_PROMPT_CHARS, MAX_SEED, ServerConfig, StreamParams
from .metrics import Metrics

log = logging.getLogger("turbostream.server")

PROTOCOL_VERSION = 1

WIRE_PROTOCOL = """\
Binary message, either way: one JPEG image and nothing else.
Text message, either way: one JSON object with a "type".

client -> server (/ws)
  {"type": "config", "prompt"?: str, "strength"?: float, "steps"?: int, "seed"?: int}
      any subset; applies from the next frame; answered with {"type": "config", ...all four...}
  binary JPEG: a frame to stylize (any size; center-cropped to the engine's aspect). Frames are numbered 1, 2, ...
      in the order the server receives them.

server -> client (/ws)
  {"type": "ready", "role": "client", "model", "random_weights", "width", "height", "params": {...},
   "limits": {...}, "protocol": 1}                     once, when the engine is warm
  {"type": "frame", "seq": n, "batch": b, "server_ms": t}   right before each result: which input frame it answers
      (frames numbered below n with no result were dropped: a newer frame replaced them)
  binary JPEG of the engine's size: the result of frame n
  {"type": "stats", "fps", "latency_ms": {"p50", "p95"}, "frames_in", "frames_out", "dropped", "clients", ...}
      every stats interval
  {"type": "error", "code": str, "message": str}        bad input; the connection stays open unless closed after it

viewer -> server (/view/ws)
  {"type": "config", ...}   changes the broadcast's parameters; needs ?control=<control token> on the URL
server -> viewer
  {"type": "ready", "role": "viewer", "control": bool, ...}, {"type": "config", ...} after every change,
  binary JPEG frames of the broadcast, {"type": "stats", ...}, {"type": "error", ...}
  {"type": "source", "state": "starting" | "live" | "reconnecting" | "ended", "message": str, "restarts": n,
   "retry_in_s"?: s}   right after ready and at every change of the source (a loss also comes as error source_lost,
   the end as error source_ended)
"""

# Error codes sent as {"type": "error", "code": ..., "message": ...}. The connection stays open unless noted.
ERROR_CODES = {
    "bad_json": "a text message that is not one JSON object",
    "bad_message": "a JSON object without a string 'type', or a text message over 64 KiB",
    "unknown_type": "a 'type' this endpoint does not know",
    "bad_config": "an unknown parameter, a wrong type or a value out of range; the old parameters stay",
    "bad_image": "a binary message that is not a decodable JPEG (magic bytes, corrupt or truncated data, far too few "
                 "bytes for its declared size, smaller than 8 pixels a side)",
    "image_too_large": "a JPEG whose declared width or height is over the server's limit (checked before decoding)",
    "engine_error": "the engine failed on this frame; the stream goes on",
    "server_error": "the server could not decode this frame or encode its result (a codec failure, out of memory); "
                    "the stream goes on",
    "forbidden": "a viewer tried to change the broadcast without the control token",
    "not_supported": "a binary message sent to the viewer endpoint",
    "no_source": "the viewer endpoint on a server started without --source (connection closed, 1008)",
    "source_ended": "the server-side source ended (a file) or failed for good; no more frames",
    "source_lost": "the server-side live source stopped delivering; it is being opened again (a 'source' message "
                   "with state 'live' follows when it is back)",
    "unauthorized": "/ws without the right ?token= (connection closed, 1008)",
    "server_full": "the client or viewer limit is reached (connection closed, 1013: try again later)",
    "engine_failed": "the engine could not be loaded or warmed up (connection closed, 1011)",
}

MAX_TEXT_BYTES = 64 * 1024  # a config message is a few hundred bytes; the prompt limit is 1000 characters
# Declared pixels per byte of JPEG data beyond which the data cannot hold the image: Huffman coding spends at least
# one bit per 8x8 block (512 pixels a byte; cv2's flattest progressive grayscale reaches 255). A forged header on a
# few hundred bytes would otherwise be "decoded" at its full declared size (libjpeg fills missing data with gray):
# 48 MiB and a quarter second of a codec worker for 4096x4096, per message.
MAX_PIXELS_PER_BYTE = 1024
# Bytes buffered for a socket before a send waits for it: about two 512x512 JPEGs. Past it, the reader is slow and
# its newer results replace the one waiting (dropped) instead of piling up here.
WRITE_LIMIT = 128 * 1024
# websockets' receive buffer in frames (high-water mark): with 4 MiB messages, 4 keeps a flooding client to 16 MiB
# before TCP flow control pushes back on it.
MAX_QUEUE = 4
# Keepalive: a ping every PING_INTERVAL_S; no pong within as long again and the connection is closed. This is what
# frees the place of a peer that vanished without a FIN or RST (a pulled cable, a sleeping laptop).
PING_INTERVAL_S = 20.0
# A lost live source (--source camera or URL) is opened again after SOURCE_RETRY_S, doubling while it keeps failing,
# up to SOURCE_RETRY_MAX_S between attempts, for as long as the server runs.
SOURCE_RETRY_S = 1.0
SOURCE_RETRY_MAX_S = 30.0
# How long a closing handshake may take before the socket is dropped (a peer that no longer reads never finishes it).
CLOSE_TIMEOUT_S = 5.0
# How long a new connection may take to complete its HTTP request / WebSocket handshake; a socket that connects and
# says nothing (or half a request) holds a descriptor until then, and no client place.
OPEN_TIMEOUT_S = 10.0
_LATENCY_WINDOW = 256  # recent end-to-end latencies kept per connection for its stats

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/view": ("view.html", "text/html; charset=utf-8"),
    "/view.js": ("view.js", "text/javascript; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
_WS_PATHS = ("/ws", "/view/ws")


def _web_files() -> dict[str, bytes]:
    """The browser client's files, read once: from the installed package turbostream.web, else the source tree."""
    names = {name for name, _ in _STATIC.values()}
    roots: list[Any] = []
    with contextlib.suppress(ModuleNotFoundError, TypeError):
        roots.append(importlib.resources.files("turbostream.web"))
    roots.append(Path(__file__).resolve().parents[2] / "web")
    for root in roots:
        files = {}
        for name in names:
            entry = root / name
            if entry.is_file():
                files[name] = entry.read_bytes()
        if "index.html" in files:
            return files
    log.warning("browser client files (web/) not found; / will answer 404")
    return {}


def _is_loopback_host(host: str) -> bool:
    """True for names and addresses that only this machine can reach (localhost, 127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _redact(spec: str) -> str:
    """A source spec fit for logs: a URL's password replaced by ***."""
    with contextlib.suppress(ValueError):
        parts = urlsplit(spec)
        if parts.password:
            return spec.replace(f":{parts.password}@", ":***@", 1)
    return spec


def _percentile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed_decode(data: bytes, max_side: int, width: int, height: int) -> tuple[np.ndarray, float]:
    """JPEG bytes -> uint8 RGB (height, width, 3) fitted to the engine, and the seconds it took (worker thread)."""
    t0 = time.perf_counter()
    frame = fit_frame(decode_jpeg(data, max_side), width, height)
    return frame, time.perf_counter() - t0


def _timed_encode(rgb: np.ndarray, quality: int) -> tuple[bytes, float]:
    """uint8 RGB (H, W, 3) -> JPEG bytes at quality 1..100, and the seconds it took (worker thread)."""
    t0 = time.perf_counter()
    data = encode_jpeg(rgb, quality)
    return data, time.perf_counter() - t0


def _params_dict(p: StreamParams) -> dict[str, Any]:
    return {"prompt": p.prompt, "strength": p.strength, "steps": p.steps, "seed": p.seed}


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


@dataclass
class _FrameMeta:
    seq: int  # 1, 2, ... per connection, in the order messages arrived
    t_recv: float  # perf_counter when the message arrived


@dataclass
class _OutItem:
    """A result waiting for its connection's sender: uint8 RGB to encode, or JPEG bytes already encoded."""

    rgb: np.ndarray | None = None
    jpeg: bytes | None = None
    header: dict[str, Any] | None = None  # sent as text right before the JPEG
    t_recv: float | None = None  # for the end-to-end latency of interactive frames


class _Outbox:
    """One connection's sender task: a short queue of text messages plus its newest result only.

    Results that arrive while a send is still waiting on a slow socket replace the waiting one (on_drop is called
    for it), so a slow reader never grows a queue and never delays any other connection.
    """

    TEXT_LIMIT = 32  # error and stats messages kept for a reader that is behind; the oldest go first

    def __init__(self, server: TurboServer, ws: ServerConnection, on_drop: Callable[[str], None],
                 on_sent: Callable[[_OutItem, float], None] | None = None) -> None:
        self.server = server
        self.ws = ws
        self.on_drop = on_drop
        self.on_sent = on_sent
        self._texts: deque[str] = deque(maxlen=self.TEXT_LIMIT)
        self._image: _OutItem | None = None
        self._wake = asyncio.Event()
        self.closed = False

    def text(self, obj: dict[str, Any]) -> None:
        if not self.closed:
            self._texts.append(json.dumps(obj))
            self._wake.set()

    def image(self, item: _OutItem) -> None:
        if self.closed:
            return
        if self._image is not None:
            self.on_drop("send")
        self._image = item
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._texts:
                    await self.ws.send(self._texts.popleft())
                item, self._image = self._image, None
                if item is None:
                    continue
                if item.jpeg is None:
                    try:
                        item.jpeg, dt = await loop.run_in_executor(
                            self.server.pool, _timed_encode, item.rgb, self.server.config.jpeg_quality
                        )
                    except Exception as exc:  # noqa: BLE001 - a codec failure or no memory: this frame only
                        log.exception("could not encode a result")
                        self.on_drop("encode")
                        if item.header is not None:
                            # The client waits for an answer to this frame before it sends more (flow control).
                            self.server.metrics.errors.labels("server_error").inc()
                            self.text(_error("server_error", f"frame {item.header['seq']}: the result could not "
                                             f"be encoded: {exc}", seq=item.header["seq"]))
                        continue
                    item.rgb = None
                    self.server.metrics.encode.observe(dt)
                if item.header is not None:
                    await self.ws.send(json.dumps(item.header))
                await self.ws.send(item.jpeg)
                self.server.metrics.frames_out.inc()
                if self.on_sent is not None:
                    self.on_sent(item, time.perf_counter())
        except ConnectionClosed:
            pass
        finally:
            self.closed = True


class _Counters:
    """Per-connection numbers for its stats messages."""

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.dropped = 0
        self.latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
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


class _ClientSession:
    """One /ws connection: its stream in the batcher, its decode slot, its outbox and its stats."""

    def __init__(self, server: TurboServer, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.loop = asyncio.get_running_loop()
        self.counts = _Counters()
        self.outbox = _Outbox(server, ws, self._drop, self._sent)
        self.stream: Stream = server.batcher.open_stream(self._on_result_threadsafe, server.default_params)
        self.seq = 0
        self._raw: tuple[bytes, _FrameMeta] | None = None  # the newest message waiting for the decoder
        self._decoding = False
        self._tasks: set[asyncio.Task] = set()

    def _drop(self, stage: str) -> None:
        self.counts.dropped += 1
        self.server.metrics.dropped(stage)

    def _sent(self, item: _OutItem, now: float) -> None:
        self.counts.frames_out += 1
        if item.t_recv is not None:
            latency = now - item.t_recv
            self.counts.latencies.append(latency)
            self.server.metrics.end_to_end.observe(latency)

    def error(self, code: str, message: str, **extra: Any) -> None:
        self.server.metrics.errors.labels(code).inc()
        self.outbox.text(_error(code, message, **extra))

    async def run(self) -> None:
        engine = self.server.engine
        self.outbox.text({
            "type": "ready", "role": "client", "protocol": PROTOCOL_VERSION,
            "model": engine.model_name, "random_weights": bool(engine.random_weights), "device": self.server.device,
            "width": engine.width, "height": engine.height, "params": _params_dict(self.stream.params),
            "limits": self.server.limits(), "stats_interval_s": self.server.config.stats_interval_s,
        })
        self._spawn(self.outbox.run())
        self._spawn(self._stats_loop())
        try:
            async for message in self.ws:
                if isinstance(message, str):
                    self._on_text(message)
                else:
                    self._on_binary(message)
        except ConnectionClosed:
            pass  # gone mid-message, or a message over max_size (websockets closed it with 1009)
        finally:
            if self.stream.close() is not None:
                self._drop("closed")
            if self._raw is not None:
                self._raw = None
                self._drop("closed")
            for task in self._tasks:
                task.cancel()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.server.config.stats_interval_s)
            stats = self.counts.snapshot()
            stats["clients"] = len(self.server.clients)
            stats["viewers"] = len(self.server.viewers)
            self.outbox.text(stats)

    # ------------------------------------------------------------------ input

    def _on_text(self, text: str) -> None:
        obj = self.server.parse_text(text, self.error)
        if obj is None:
            return
        if obj["type"] == "config":
            fields = {k: v for k, v in obj.items() if k != "type"}
            params = self.server.updated_params(self.stream.params, fields, self.error)
            if params is not None:
                self.stream.params = params
                self.outbox.text({"type": "config", **_params_dict(params)})
        else:
            self.error("unknown_type", f"unknown message type {obj['type']!r} (this endpoint knows: config)")

    def _on_binary(self, data: bytes) -> None:
        self.seq += 1
        self.counts.frames_in += 1
        self.server.metrics.frames_in.inc()
        meta = _FrameMeta(self.seq, time.perf_counter())
        # The header check is microseconds: it runs here so every bad frame gets its error, even one that a newer
        # frame would have replaced before its decode.
        problem = self.server.check_jpeg_header(data)
        if problem is not None:
            self.error(*problem, seq=meta.seq)
            return
        if self._decoding:
            if self._raw is not None:
                self._drop("decode")
            self._raw = (data, meta)
        else:
            self._decoding = True
            self._spawn(self._decode_loop(data, meta))

    async def _decode_loop(self, data: bytes, meta: _FrameMeta) -> None:
        server, engine = self.server, self.server.engine
        try:
            while True:
                self.stream.expect()
                try:
                    frame, dt = await self.loop.run_in_executor(
                        server.pool, _timed_decode, data, server.config.max_image_side, engine.width, engine.height
                    )
                except CodecError as exc:
                    self.error("bad_image", f"frame {meta.seq}: {exc}", seq=meta.seq)
                except Exception as exc:  # noqa: BLE001 - not the client's fault, but its frame is answered all the same
                    log.exception("decoding frame %d failed", meta.seq)
                    self.error("server_error", f"frame {meta.seq}: the server could not decode it: {exc}",
                               seq=meta.seq)
                else:
                    server.metrics.decode.observe(dt)
                    if self.stream.submit(frame, meta) is not None:
                        self._drop("queue")
                finally:
                    self.stream.unexpect()
                if self._raw is None:
                    return
                (data, meta), self._raw = self._raw, None
        finally:
            self._decoding = False

    # ------------------------------------------------------------------ output

    def _on_result_threadsafe(self, result: Result) -> None:
        """Called on the inference thread: hand the result to the event loop and return at once."""
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody to send it to
            self.loop.call_soon_threadsafe(self._on_result, result)

    def _on_result(self, result: Result) -> None:
        meta: _FrameMeta = result.meta
        if result.error is not None or result.frame is None:
            self.error("engine_error", f"frame {meta.seq}: {result.error}", seq=meta.seq)
            return
        server_ms = (time.perf_counter() - meta.t_recv) * 1e3
        header = {"type": "frame", "seq": meta.seq, "batch": result.batch_size, "server_ms": round(server_ms, 2)}
        self.outbox.image(_OutItem(rgb=result.frame, header=header, t_recv=meta.t_recv))


class _Broadcast:
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
        self._latest: np.ndarray | None = None  # newest result waiting for the encoder
        self._encoding = False
        self.frames_encoded = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stream = self.server.batcher.open_stream(self._on_result_threadsafe, self.server.default_params)
        self._thread = threading.Thread(target=self._feed, name="turbostream-source", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.viewers_present.set()
        if self.stream is not None:
            self.stream.close()
        if self._thread is not None:
            self._thread.join(5.0)

    def _feed(self) -> None:
        """Source thread: open the capture, pump its frames; a live source that is lost is opened again, forever.

        A camera or stream URL that stops delivering is first reconnected by the capture itself (a few quick tries,
        CaptureThread's reconnect); when that gives up, a new capture is opened here after SOURCE_RETRY_S, doubling
        up to SOURCE_RETRY_MAX_S while it keeps failing. A file or folder that ends, or fails, stays ended.
        """
        failures = 0  # consecutive openings that delivered no frame
        while not self._stop.is_set():
            capture, reason, delivered = None, None, False
            self._reconnects_seen = 0
            try:
                capture = self.capture_factory(self.spec)
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
                self._announce("ended", reason or "the source ended")
                return
            failures = 0 if delivered else failures + 1
            delay = min(SOURCE_RETRY_S * 2 ** max(failures - 1, 0), SOURCE_RETRY_MAX_S)
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
            if not self.viewers_present.wait(0.5):
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
            if self.stream.submit(fitted, _FrameMeta(int(index), time.perf_counter())) is not None:
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

    def _announce(self, state: str, message: str, **extra: Any) -> None:
        """From the source thread: tell the loop (and through it every viewer) the source's new state."""
        self._announced = state
        level = logging.INFO if state == "live" else logging.WARNING if state == "reconnecting" else logging.ERROR
        log.log(level, "source %s: %s", _redact(self.spec), message)
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
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._on_result, result)

    def _on_result(self, result: Result) -> None:
        if result.frame is None:
            log.warning("broadcast frame failed: %s", result.error)
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
                    jpeg, dt = await self.loop.run_in_executor(server.pool, _timed_encode, rgb,
                                                               server.config.jpeg_quality)
                except Exception:  # noqa: BLE001 - one lost broadcast frame; the next one is encoded as usual
                    log.exception("could not encode a broadcast frame")
                    server.metrics.dropped("encode")
                    rgb, self._latest = self._latest, None
                    continue
                server.metrics.encode.observe(dt)
                self.frames_encoded += 1
                for viewer in list(server.viewers):
                    viewer.outbox.image(_OutItem(jpeg=jpeg))
                rgb, self._latest = self._latest, None
        finally:
            self._encoding = False


class _ViewerSession:
    """One /view/ws connection: receives the broadcast; may change its parameters with the control token."""

    def __init__(self, server: TurboServer, ws: ServerConnection, control: bool) -> None:
        self.server = server
        self.ws = ws
        self.control = control
        self.counts = _Counters()
        self.outbox = _Outbox(server, ws, self._drop, self._sent)

    def _drop(self, stage: str) -> None:
        self.counts.dropped += 1
        self.server.metrics.dropped(stage)

    def _sent(self, item: _OutItem, now: float) -> None:
        self.counts.frames_out += 1

    def error(self, code: str, message: str) -> None:
        self.server.metrics.errors.labels(code).inc()
        self.outbox.text(_error(code, message))

    async def run(self) -> None:
        server, engine, broadcast = self.server, self.server.engine, self.server.broadcast
        self.outbox.text({
            "type": "ready", "role": "viewer", "protocol": PROTOCOL_VERSION, "control": self.control,
            "model": engine.model_name, "random_weights": bool(engine.random_weights), "device": server.device,
            "width": engine.width, "height": engine.height, "params": _params_dict(broadcast.stream.params),
            "limits": server.limits(), "stats_interval_s": server.config.stats_interval_s,
        })
        self.source_changed(None)
        outbox_task = asyncio.create_task(self.outbox.run())
        stats_task = asyncio.create_task(self._stats_loop())
        try:
            async for message in self.ws:
                if isinstance(message, str):
                    self._on_text(message)
                else:
                    self.error("not_supported", "viewers receive frames; send frames to /ws instead")
        except ConnectionClosed:
            pass
        finally:
            outbox_task.cancel()
            stats_task.cancel()

    def source_changed(self, previous: str | None) -> None:
        """Tell this viewer the source's state; a loss or an end also as an error, which pages show as such."""
        state = self.server.broadcast.state
        self.outbox.text(state)
        if state["state"] == "ended":
            self.error("source_ended", state["message"])
        elif state["state"] == "reconnecting" and previous != "reconnecting":
            self.error("source_lost", state["message"])

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.server.config.stats_interval_s)
            stats = self.counts.snapshot()
            stats["viewers"] = len(self.server.viewers)
            self.outbox.text(stats)

    def _on_text(self, text: str) -> None:
        obj = self.server.parse_text(text, self.error)
        if obj is None:
            return
        if obj["type"] != "config":
            self.error("unknown_type", f"unknown message type {obj['type']!r} (this endpoint knows: config)")
            return
        if not self.control:
            why = ("connect with ?control=<token> to change the broadcast" if self.server.config.control_token
                   else "this server was started without --control-token: viewers cannot change the broadcast")
            self.error("forbidden", why)
            return
        stream = self.server.broadcast.stream
        params = self.server.updated_params(stream.params, {k: v for k, v in obj.items() if k != "type"}, self.error)
        if params is not None:
            stream.params = params
            log.info("broadcast parameters changed by a viewer: %s", _params_dict(params))
            for viewer in list(self.server.viewers):
                viewer.outbox.text({"type": "config", **_params_dict(params)})


class TurboServer:
    """The server: give it an engine (or a factory building one on the inference thread) and a ServerConfig.

    `await start()` listens (port 0 picks one: see .port) and starts the inference thread; `await stop()` closes
    every connection with 1001 and stops the threads. The engine is used only from the inference thread.
    """

    def __init__(
        self,
        engine: Any = None,
        config: ServerConfig | None = None,
        *,
        engine_factory: Callable[[], Any] | None = None,
        capture_factory: Callable[[str], Any] | None = None,
        workers: int | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        self.metrics = Metrics()
        self.batcher = Batcher(engine, engine_factory=engine_factory, on_batch=self._on_batch)
        self.pool = ThreadPoolExecutor(max_workers=workers or min(8, max(2, os.cpu_count() or 2)),
                                       thread_name_prefix="turbostream-codec")
        self.clients: set[_ClientSession] = set()
        self.viewers: set[_ViewerSession] = set()
        self._slots = 0  # /ws connections admitted (warming ones included): what max_clients limits
        self._viewer_slots = 0
        self.broadcast: _Broadcast | None = None
        if self.config.source is not None:
            self.broadcast = _Broadcast(self, self.config.source, capture_factory or _default_capture)
        self._files = _web_files()
        self._server: Server | None = None
        self._ready: asyncio.Event | None = None  # created in start(), on the server's loop
        self.port: int | None = None
        self._device_name: str | None = None
        self._loopback_only = _is_loopback_host(self.config.host)
        self._allowed_origins = {o.rstrip("/") for o in self.config.allow_origins}
        self.metrics.watch_send_buffers(self._send_buffer_bytes)

    # ------------------------------------------------------------------ properties used by the sessions

    @property
    def engine(self):
        return self.batcher.engine

    @property
    def device(self) -> str:
        """The engine's device, with the GPU's name on CUDA ("cuda:0 (NVIDIA H100 80GB HBM3)"); for clients' logs."""
        if self._device_name is None:
            device = getattr(self.engine, "device", "cpu")
            name = str(device)
            if getattr(device, "type", None) == "cuda":
                import torch

                name = f"{device} ({torch.cuda.get_device_name(device)})"
            self._device_name = name
        return self._device_name

    @property
    def default_params(self) -> StreamParams:
        return self.engine.config.default_params

    @property
    def url(self) -> str:
        host = self.config.host
        host = "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def _send_buffer_bytes(self) -> float:
        """Bytes waiting in every connection's transport (bounded by WRITE_LIMIT plus one message each)."""
        total = 0
        # A scrape runs on the event loop, but render() may be called from another thread (tests): a set that
        # changes meanwhile is read again rather than failing the scrape.
        for _ in range(3):
            try:
                sessions = [*self.clients, *self.viewers]
                break
            except RuntimeError:
                continue
        else:
            return float("nan")
        for session in sessions:
            transport = session.ws.transport
            if transport is not None:
                total += transport.get_write_buffer_size()
        return float(total)

    def limits(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "max_message_bytes": self.config.max_message_bytes, "max_image_side": self.config.max_image_side,
            "max_text_bytes": MAX_TEXT_BYTES, "max_steps": engine.config.max_steps,
            "max_prompt_chars": MAX_PROMPT_CHARS, "max_seed": MAX_SEED, "max_batch": engine.max_batch,
            "max_clients": self.config.max_clients,
        }

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> TurboServer:
        self._ready = asyncio.Event()
        self.batcher.start()
        self._watch_task = asyncio.create_task(self._watch_engine())
        self._server = await serve(
            self._handler, self.config.host, self.config.port,
            process_request=self._process_request,
            max_size=self.config.max_message_bytes,
            compression=None,  # JPEG does not deflate; compression would only cost CPU and memory per client
            write_limit=WRITE_LIMIT,
            max_queue=MAX_QUEUE,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_INTERVAL_S,
            close_timeout=CLOSE_TIMEOUT_S,
            open_timeout=OPEN_TIMEOUT_S,
            server_header=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _watch_engine(self) -> None:
        """Turn the inference thread's ready/failed events into the loop's; logs the outcome once."""
        while not (self.batcher.ready.is_set() or self.batcher.failed.is_set()):
            await asyncio.sleep(0.02)
        if self.batcher.ready.is_set():
            engine = self.engine
            self.metrics.ready.set(1)
            reader = _gpu_memory_reader(engine)
            if reader is not None:
                self.metrics.watch_gpu_memory(reader)
            if self.broadcast is not None:  # its stream starts from the engine's default parameters
                self.broadcast.start(asyncio.get_running_loop())
            log.info("engine ready: %s at %dx%d on %s (warmup %.1f s)", engine.model_name, engine.width,
                     engine.height, getattr(engine, "device", "?"), engine.stats.warmup_s)
            if engine.random_weights:
                log.warning("model %s has random weights: its output is noise, not a stylization", engine.model_name)
        self._ready.set()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the engine is warm; False if it failed."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        return self.batcher.ready.is_set()

    async def stop(self) -> None:
        """Close every connection with 1001 (going away), stop the source and the inference thread."""
        if self._server is not None:
            self._server.close(code=CloseCode.GOING_AWAY, reason="server shutting down")
            await self._server.wait_closed()
        if self.broadcast is not None:  # joins the source thread: off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.broadcast.stop)
        self._watch_task.cancel()
        # A batch ends in milliseconds; a model still loading may take minutes, so it is not waited for long (the
        # inference thread is a daemon).
        wait_s = 10.0 if self.batcher.ready.is_set() else 2.0
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop, wait_s)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> TurboServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.gpu.observe(seconds)

    # ------------------------------------------------------------------ HTTP

    def _origin_allowed(self, request: Request) -> bool:
        """Cross-site WebSocket hijacking defence: same origin (by Host), or an --allow-origin; no Origin = no browser.

        websockets' own `origins=` needs the list up front; "same origin" depends on the Host the browser used (a
        LAN address, a hostname, port 0), so the check is made here, per request. On a loopback bind the Host must
        name loopback too, which keeps DNS-rebinding pages out.
        """
        try:
            origin = request.headers.get("Origin")
            host = request.headers.get("Host")
        except MultipleValuesError:
            return False
        if origin is None:
            return True
        origin = origin.rstrip("/")
        if "*" in self._allowed_origins or origin in self._allowed_origins:
            return True
        if not host or origin not in (f"http://{host}", f"https://{host}"):
            return False
        if self._loopback_only:
            return _is_loopback_host(urlsplit(f"//{host}").hostname or "")
        return True

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in _WS_PATHS:
            if not self._origin_allowed(request):
                log.warning("rejected a WebSocket from Origin %r", request.headers.get("Origin"))
                return connection.respond(403, "Forbidden: this Origin may not connect (see --allow-origin)\n")
            return None  # the WebSocket handshake goes on
        if path == "/healthz":
            if self.batcher.ready.is_set():
                return connection.respond(200, "ok\n")
            if self.batcher.failed.is_set():
                return connection.respond(503, f"engine failed: {self.batcher.error}\n")
            return connection.respond(503, "warming up\n")
        if path == "/metrics":
            return self._response(200, self.metrics.render(), self.metrics.content_type)
        if path in _STATIC and _STATIC[path][0] in self._files:
            name, content_type = _STATIC[path]
            return self._response(200, self._files[name], content_type)
        return connection.respond(404, "Not Found\n")

    @staticmethod
    def _response(status: int, body: bytes, content_type: str) -> Response:
        headers = Headers([
            ("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close"),
            ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff"),
            # The page URL may carry ?token=: keep it out of Referer headers.
            ("Referrer-Policy", "no-referrer"),
        ])
        return Response(status, "OK" if status == 200 else "Error", headers, body)

    # ------------------------------------------------------------------ WebSocket sessions

    def _query(self, connection: ServerConnection) -> dict[str, str]:
        query = parse_qs(urlsplit(connection.request.path).query)
        return {k: v[-1] for k, v in query.items()}

    async def _refuse(self, ws: ServerConnection, code: str, message: str, close_code: int, reason: str) -> None:
        self.metrics.errors.labels(code).inc()
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(_error(code, message)))
            await ws.close(close_code, reason)

    async def _handler(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path).path
        if path == "/view/ws":
            await self._viewer_handler(ws)
        else:
            await self._client_handler(ws)

    async def _await_engine(self, ws: ServerConnection) -> bool:
        if await self.wait_ready():
            return True
        await self._refuse(ws, "engine_failed", f"the engine failed to start: {self.batcher.error}",
                           CloseCode.INTERNAL_ERROR, "engine failed")
        return False

    async def _client_handler(self, ws: ServerConnection) -> None:
        token = self.config.token
        if token is not None and not hmac.compare_digest(
            self._query(ws).get("token", "").encode(), token.encode()
        ):
            await self._refuse(ws, "unauthorized", "this server needs a token: connect to /ws?token=<token>",
                               CloseCode.POLICY_VIOLATION, "unauthorized")
            return
        if self._slots >= self.config.max_clients:
            await self._refuse(ws, "server_full", f"server full: {self.config.max_clients} clients at most; "
                               "try again later", CloseCode.TRY_AGAIN_LATER, "server full")
            return
        self._slots += 1  # no await since the check: the count cannot overshoot
        try:
            if not await self._await_engine(ws):
                return
            session = _ClientSession(self, ws)
            self.clients.add(session)
            self.metrics.clients.set(len(self.clients))
            try:
                await session.run()
            finally:
                self.clients.discard(session)
                self.metrics.clients.set(len(self.clients))
        finally:
            self._slots -= 1

    async def _viewer_handler(self, ws: ServerConnection) -> None:
        if self.broadcast is None:
            await self._refuse(ws, "no_source", "nothing to view: start the server with --source SRC",
                               CloseCode.POLICY_VIOLATION, "no source")
            return
        if self._viewer_slots >= self.config.max_viewers:
            await self._refuse(ws, "server_full", f"server full: {self.config.max_viewers} viewers at most; "
                               "try again later", CloseCode.TRY_AGAIN_LATER, "server full")
            return
        self._viewer_slots += 1
        try:
            if not await self._await_engine(ws):
                return
            control_token = self.config.control_token
            given = self._query(ws).get("control")
            control = bool(control_token) and given is not None and hmac.compare_digest(
                given.encode(), control_token.encode()
            )
            session = _ViewerSession(self, ws, control)
            self.viewers.add(session)
            self._viewers_changed()
            try:
                await session.run()
            finally:
                self.viewers.discard(session)
                self._viewers_changed()
        finally:
            self._viewer_slots -= 1

    def _viewers_changed(self) -> None:
        self.metrics.viewers.set(len(self.viewers))
        if self.broadcast is not None:
            # No viewer, no work: the source thread stops feeding the GPU until someone watches.
            if self.viewers:
                self.broadcast.viewers_present.set()
            else:
                self.broadcast.viewers_present.clear()

    # ------------------------------------------------------------------ message helpers shared by the sessions

    def parse_text(self, text: str, error: Callable[[str, str], None]) -> dict[str, Any] | None:
        """A text message -> its JSON object with a string "type", or None after reporting the error."""
        if len(text) > MAX_TEXT_BYTES:
            error("bad_message", f"text message of {len(text)} characters; the limit is {MAX_TEXT_BYTES}")
            return None
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            error("bad_json", f"text messages must be one JSON object: {exc}")
            return None
        if not isinstance(obj, dict):
            error("bad_json", f"text messages must be one JSON object, got {type(obj).__name__}")
            return None
        if not isinstance(obj.get("type"), str):
            error("bad_message", 'a message needs a "type" string, for example {"type": "config", "prompt": "..."}')
            return None
        return obj

    def updated_params(self, params: StreamParams, fields: dict[str, Any],
                       error: Callable[[str, str], None]) -> StreamParams | None:
        """params with fields applied and checked against the engine, or None after reporting why not."""
        try:
            return self.engine.validate(params.updated(**fields))
        except (ValueError, TypeError) as exc:
            error("bad_config", str(exc))
            return None

    def check_jpeg_header(self, data: bytes) -> tuple[str, str] | None:
        """(code, message) if data is not a JPEG within the size limit (header only, no decode); None if fine."""
        try:
            width, height = jpeg_size(data)
        except CodecError as exc:
            return "bad_image", str(exc)
        side = self.config.max_image_side
        if width > side or height > side:
            return "image_too_large", f"image is {width}x{height}; the limit is {side} pixels a side"
        if width * height > MAX_PIXELS_PER_BYTE * len(data):
            return "bad_image", (f"a JPEG of {len(data)} bytes cannot hold {width}x{height} pixels (truncated, or a "
                                 "forged header)")
        return None


def _gpu_memory_reader(engine) -> Callable[[], tuple[float, float]] | None:
    """(reserved, allocated) bytes of torch's CUDA allocator on the engine's device; None off CUDA."""
    if engine is None or not getattr(engine, "is_cuda", False):
        return None
    import torch

    device = engine.device
    return lambda: (float(torch.cuda.memory_reserved(device)), float(torch.cuda.memory_allocated(device)))


def _default_capture(spec: str):
    """sources.CaptureThread in realtime mode (newest frame only); ValueError with the reason for a bad SRC."""
    try:
        from .sources import CaptureThread
    except ImportError as exc:
        raise ValueError(f"server-side capture is not available: {exc}") from None
    return CaptureThread(spec, realtime=True)


# ------------------------------------------------------------------------------------------------ in a thread


class ServerThread:
    """Run a TurboServer on an event loop of its own thread (tests, embedding): `with ServerThread(s) as server:`."""

    def __init__(self, server: TurboServer, ready_timeout: float = 60.0) -> None:
        self.server = server
        self.ready_timeout = ready_timeout
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="turbostream-server", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                raise
            self._started.set()
            await self._stop.wait()
            await self.server.stop()

        with contextlib.suppress(BaseException):
            asyncio.run(main())

    def __enter__(self) -> TurboServer:
        self._thread.start()
        self._started.wait(self.ready_timeout)
        if self._error is not None:
            raise self._error
        fut = asyncio.run_coroutine_threadsafe(self.server.wait_ready(self.ready_timeout), self.loop)
        if not fut.result(self.ready_timeout + 1):
            raise RuntimeError(f"engine failed: {self.server.batcher.error}")
        return self.server

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


# ------------------------------------------------------------------------------------------------ the command


def server_config(args) -> ServerConfig:
    """ServerConfig from `turbostream serve` options; ValueError with the reason if one is out of range."""
    return ServerConfig(
        host=args.host, port=args.port, token=args.token or None, control_token=args.control_token or None,
        allow_origins=tuple(args.allow_origins), max_clients=args.max_clients, max_viewers=args.max_viewers,
        max_message_bytes=args.max_message_bytes, jpeg_quality=args.jpeg_quality, source=args.source,
    )


def serve_main(args) -> int:
    """`turbostream serve`: listen at once (/healthz says 503), load and warm the engine, serve until SIGINT/SIGTERM."""
    from . import cli

    cli.engine_config(args)  # option mistakes are reported now, before minutes of model loading
    capture_factory = None
    try:
        config = server_config(args)
        if config.source is not None:
            # Parsing the source now turns a missing file or a bad URL into one message and exit status 2; opening
            # it (which can take seconds for a network source) happens on the source thread, which makes a new
            # capture each time a lost live source is opened again.
            _default_capture(config.source)
            capture_factory = _default_capture
    except ValueError as exc:
        raise cli.UserError(str(exc)) from None
    server = TurboServer(config=config, engine_factory=lambda: cli.build_engine(args), capture_factory=capture_factory)
    if not _is_loopback_host(config.host) and config.token is None:
        log.warning("listening on %s without --token: anyone who can reach this port can use the GPU", config.host)
    return asyncio.run(_serve_until_signal(server))


async def _serve_until_signal(server: TurboServer) -> int:
    from .cli import UserError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl+C still raises KeyboardInterrupt
            loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except OSError as exc:
        server.batcher.stop(0)
        raise UserError(f"cannot listen on {server.config.host}:{server.config.port}: {exc.strerror or exc}") from None
    log.info("serving on %s (viewer page: %sview); loading the engine...", server.url, server.url)
    failed = asyncio.create_task(_wait_failed(server))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({failed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    failed.cancel()
    stopped.cancel()
    log.info("shutting down: closing connections")
    await server.stop()
    if server.batcher.failed.is_set():
        raise UserError(f"the engine failed to start: {server.batcher.error}")
    return 0


async def _wait_failed(server: TurboServer) -> None:
    while not server.batcher.failed.is_set():
        await asyncio.sleep(0.1)
