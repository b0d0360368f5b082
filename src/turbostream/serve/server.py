"""The server (`turbostream serve`): one port for the browser client, health, metrics, interactive streams and
viewers, all on the `websockets` asyncio server.

    /ws            WebSocket: one interactive stream per connection (JPEG in, stylized JPEG out): ClientSession
    /view/ws       WebSocket: a viewer of the server-side source (--source), broadcast to every viewer: ViewerSession
    anything else  plain HTTP (static files, /healthz, /metrics): http.py

TurboServer admits connections (tokens, client and viewer places), owns the devices (one engine and one batcher, the
inference thread, per device: devices.py), the codec worker pool, the broadcast and the metrics, and stops them all
cleanly. Wire protocol and error codes: protocol.py. Behind a load balancer: proxy.py and /readyz.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from .. import heap
from ..codec import CPU_JPEG, CpuJpeg
from ..config import ServerConfig, StreamParams, stream_limits
from ..control.targets import LoraTarget
from ..metrics import DeviceMetrics, Metrics
from . import protocol
from .broadcast import Broadcast
from .devices import Device, Devices
from .guard import ConnectionGuard, throttled
from .http import HttpFront, OriginPolicy, query_params, token_matches
from .proxy import TrustedProxies
from .sessions import ClientSession, ViewerSession

log = logging.getLogger("turbostream.server")

# After the shutdown grace, connections still open are aborted; their handlers then end within a loop turn or two.
# This bounds the wait for them all the same, so that a handler stuck elsewhere cannot hold the exit.
HANDLERS_AFTER_ABORT_S = 1.0


class TurboServer:
    """The server: give it an engine (or a factory building one on the inference thread) and a ServerConfig.

    Several devices: `engines=[...]` (built engines) or `engine_factories={"cuda:0": f0, "cuda:1": f1}`; each gets
    its own inference thread and new streams go to the least loaded (devices.py).
    `await start()` listens (port 0 picks one: see .port) and starts the inference threads; `await stop()` closes
    every connection with 1001 and stops the threads. An engine is used only from its inference thread.
    jpeg: the JPEG codec of the codec workers (default the CPU's; `serve --jpeg gpu` gives a codec_cuda.CudaJpeg).
    """

    def __init__(
        self,
        engine: Any = None,
        config: ServerConfig | None = None,
        *,
        engine_factory: Callable[[], Any] | None = None,
        capture_factory: Callable[[str], Any] | None = None,
        workers: int | None = None,
        engines: list[Any] | None = None,
        engine_factories: dict[str, Callable[[], Any]] | None = None,
        jpeg: CpuJpeg | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        self.jpeg = jpeg or CPU_JPEG  # decode and encode on the codec workers: CPU, or codec_cuda.CudaJpeg
        self.metrics = Metrics()
        self.devices = Devices(DeviceMetrics(self.metrics.registry), self._on_batch, engine=engine,
                               engine_factory=engine_factory, engines=engines, engine_factories=engine_factories)
        for device in self.devices.items:  # frames the similarity control answered without the engine
            device.batcher.on_skip = self.metrics.frames_skipped.inc
        self.batcher = self.devices.primary.batcher  # the broadcast's device (the only one, with one device)
        self.proxies = TrustedProxies(self.config.trusted_proxies)
        self._stopping = False
        self.pool = ThreadPoolExecutor(max_workers=workers or min(8, max(2, os.cpu_count() or 2)),
                                       thread_name_prefix="turbostream-codec")
        self.clients: set[ClientSession] = set()
        self.viewers: set[ViewerSession] = set()
        # Places taken by role (warming connections included): what max_clients and max_viewers limit.
        self.places = {"client": 0, "viewer": 0}
        self.broadcast: Broadcast | None = None
        if self.config.source is not None:
            self.broadcast = Broadcast(self, self.config.source, capture_factory or default_capture)
        self.http = HttpFront(OriginPolicy(self.config.host, self.config.allow_origins), self._health,
                              lambda: (self.metrics.render(), self.metrics.content_type),
                              readiness=self._readiness, admit=self._admit,
                              on_origin_refused=self.metrics.origins_refused.inc)
        self._server: Server | None = None
        self._ready: asyncio.Event | None = None  # created in start(), on the server's loop
        # Set by stop(), also on the server's loop: what ends every wait for the engine (a model may still be loading).
        self._stopped: asyncio.Event | None = None
        self._frozen: heap.Frozen | None = None  # the heap frozen once the engines were warm (until stop)
        self.port: int | None = None
        self.guard = ConnectionGuard(self.config.limits, on_close=self.metrics.closed_by_limit,
                                     on_wait=self.metrics.handshakes_waited.inc)
        self.metrics.watch_send_buffers(self.guard.send_buffer_bytes)
        # LoRA scales changed while serving (--lora-live: OSC, viewers): the target holds the scales asked for last
        # (made from the engine's config once it is ready); whether a `loras` message to everyone is already due on
        # the loop (changes are merged).
        self.lora_target: LoraTarget | None = None
        self._loras_due = False
        self._lora_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ properties used by the sessions

    @property
    def engine(self):
        return self.batcher.engine

    @property
    def device(self) -> str:
        """The engine's device, with the GPU's name on CUDA ("cuda:0 (NVIDIA H100 80GB HBM3)"); for clients' logs."""
        return self.devices.primary.display

    def device_for(self, stream: Any) -> str:
        """The device a stream was placed on, as device shows it (a viewer's is the broadcast's)."""
        return self.devices.device_of(stream).display

    def client_address(self, ws: ServerConnection) -> str | None:
        """The client's IP address: the peer's, or X-Forwarded-For's when the peer is a --trusted-proxy (proxy.py).
        What the log lines name (no metric label or limit is keyed on it)."""
        peer = ws.remote_address[0] if ws.remote_address else None
        return self.proxies.client_address(peer, ws.request.headers if ws.request is not None else None)

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

    def limits_dict(self) -> dict[str, Any]:
        """The limits a client should know (the ready message's "limits")."""
        max_steps, reuse = stream_limits(self.engine)
        return protocol.limits_dict(self.config.limits, max_steps=max_steps, max_batch=self.engine.max_batch,
                                    reuse=reuse)

    def _health(self) -> tuple[int, str]:
        """/healthz: 200 once every engine is warm; 503 while one loads or warms up, or after one failed (named)."""
        return self.devices.health()

    def client_limit(self) -> int:
        """--max-clients, less the share of devices lost since the start."""
        return self.devices.capacity(self.config.limits.max_clients)

    def _readiness(self) -> tuple[int, str]:
        """/readyz, for load balancers: 503 while warming up, full, failed or shutting down; 200 otherwise."""
        return self.devices.readiness(self.places["client"], self.config.limits.max_clients, self._stopping)

    def _admit(self, connection: ServerConnection, request) -> Any:
        """Before the upgrade (process_request): a /ws handshake through a trusted proxy that cannot be served now
        (full, warming, failed) gets HTTP 503 with Retry-After, which the balancer retries on another replica.
        Direct clients go on to the handshake and get the in-band answer (server_full and close 1013; or they
        wait for the warmup): a browser cannot read the status of a refused handshake, but it can read a message."""
        if not self._token_given(request.path):
            connection.discard_messages = True  # it is refused once upgraded (_authorized): nothing it sends is read
        peer = connection.remote_address[0] if connection.remote_address else None
        via_proxy = self.proxies.trusts(peer)
        self.devices.metrics.connections.labels("proxy" if via_proxy else "direct").inc()
        if not via_proxy or urlsplit(request.path).path != "/ws":
            return None
        refused = self.devices.refusal(self.places["client"], self.config.limits.max_clients, self._stopping)
        if refused is None:
            return None
        reason, text = refused
        self.devices.metrics.refused.labels(reason).inc()
        # A peer can cause this line (every handshake, before any token): one per reason every 10 s at most.
        throttled.warning(f"refused_503 {reason}", "refused a stream from %s with 503 (%s)",
                          self.proxies.client_address(peer, request.headers), text)
        response = connection.respond(503, f"Service Unavailable: {text}; try another replica\n")
        response.headers["Retry-After"] = "1"
        return response

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> TurboServer:
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self.batcher.start()
        self._watch_task = asyncio.create_task(self._watch_engine())
        try:
            self._server = await self._listen()
        except BaseException:  # the port is taken, say: the inference thread and the codec pool end too
            await self.stop()
            raise
        # A host of several addresses ("" or "localhost": IPv4 and IPv6) gets a socket each, and with port 0 each its
        # own free port: the port named is that of the socket the logged URL reaches (127.0.0.1 unless the host is
        # "::"), and every address is logged when they differ.
        sockets = self._server.sockets
        family = socket.AF_INET6 if self.config.host == "::" else socket.AF_INET
        chosen = next((s for s in sockets if s.family == family), sockets[0])
        self.port = chosen.getsockname()[1]
        if len({s.getsockname()[1] for s in sockets}) > 1:
            log.info("listening on %s", ", ".join(_address(s) for s in sockets))
        return self

    async def _listen(self) -> Server:
        limits = self.config.limits
        return await serve(
            self._handler, self.config.host, self.config.port,
            process_request=self.http,
            max_size=limits.max_message_bytes,
            compression=None,  # JPEG does not deflate; compression would only cost CPU and memory per client
            write_limit=limits.write_limit_bytes,
            max_queue=limits.max_queue_messages,
            ping_interval=limits.ping_interval_s,
            ping_timeout=limits.ping_interval_s,
            close_timeout=limits.close_timeout_s,
            open_timeout=limits.open_timeout_s,
            server_header=None,
            create_connection=self.guard.factory(),
        )

    async def _watch_engine(self) -> None:
        """Turn the inference threads' ready/failed events into the loop's (logged once), then watch for a device
        lost later: its streams are closed (devices.py)."""
        self.devices.start()  # the other devices' inference threads (start() started the first)
        while not self.devices.settled:
            await asyncio.sleep(0.02)
        if self.devices.loaded:
            engine = self.engine
            config = getattr(engine, "config", None)
            self.lora_target = LoraTarget(getattr(config, "loras", ()), self.set_lora_scales,
                                          live=getattr(config, "lora_live", False))
            self._lora_metrics()
            self.metrics.ready.set(1)
            for device in self.devices.items:
                device.gpu_reader = gpu_memory_reader(device.engine)
                self._device_metrics(device)
                log.info("engine ready: %s at %dx%d on %s (warmup %.1f s)", engine.model_name, engine.width,
                         engine.height, device.display, device.engine.stats.warmup_s)
            if any(d.gpu_reader is not None for d in self.devices.items):
                self.metrics.watch_gpu_memory(self.devices.gpu_memory)
            if self.broadcast is not None:  # its stream starts from the engine's default parameters
                self.broadcast.start(asyncio.get_running_loop())
            if engine.random_weights:
                log.warning("model %s has random weights: its output is noise, not a stylization", engine.model_name)
            if self.config.freeze_heap and not self._stopping:
                self._frozen = heap.freeze()
        self._ready.set()
        while self.devices.loaded:
            await asyncio.sleep(0.1)
            self.devices.check_threads()
            for device in self.devices.items:
                if device.lost is not None and not device.lost_handled:
                    device.lost_handled = True
                    await self._device_lost(device)

    def _device_metrics(self, device: Device) -> None:
        m, name = self.devices.metrics, device.name
        m.ready.labels(name).set_function(lambda: float(device.ready))
        m.lost.labels(name).set_function(lambda: float(device.lost is not None))
        if device.gpu_reader is not None:
            read = device.gpu_reader
            m.gpu_reserved.labels(name).set_function(lambda: read()[0])
            m.gpu_allocated.labels(name).set_function(lambda: read()[1])

    async def _device_lost(self, device: Device) -> None:
        """A device failed after it was ready: the broadcast moves to another device, and each stream placed on it
        gets engine_error and is closed with 1011 (a browser reconnects and is placed on a usable device). With no
        device left the broadcast ends: its source stops, and its viewers are told so and closed the same way."""
        device.batcher.stop(0)
        usable = self.devices.usable
        mine = [s for s in self.clients if self.devices.device_of(getattr(s, "stream", None)) is device]
        log.error("device %s failed (%s): closing its %d stream(s); %d device(s) still serve", device.name,
                  device.lost, len(mine), len(usable))
        message = (f"device {device.name} failed ({device.lost}); reconnect to continue"
                   + (" on another device" if usable else ""))
        broadcast = self.broadcast
        if broadcast is not None and broadcast.stream is not None \
                and self.devices.device_of(broadcast.stream) is device:
            if usable:
                old = broadcast.stream
                broadcast.stream = self.devices.open_stream(broadcast._on_result_threadsafe, old.params)
                old.close()
            else:  # viewers were left on a frozen picture, and the source read and decoded for nobody
                await broadcast.end(f"device {device.name} failed ({device.lost})")
                for viewer in list(self.viewers):
                    asyncio.create_task(self._refuse(viewer.ws, "engine_error", message, CloseCode.INTERNAL_ERROR,
                                                     "device failed"))
        for session in mine:
            if session.stream.close() is not None:
                session._drop("closed")
            asyncio.create_task(self._refuse(session.ws, "engine_error", message, CloseCode.INTERNAL_ERROR,
                                             "device failed"))

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """True once every engine is warm (and one still serves); False if one failed to start (or all failed), or if
        the server stops first: a model still loading cannot be interrupted, and nobody waits for it then (stop()
        waits for every connection's handler, and those of connections that came during the warmup wait here).
        TimeoutError after timeout seconds."""
        if not self._ready.is_set():
            ready = asyncio.ensure_future(self._ready.wait())
            stopped = asyncio.ensure_future(self._stopped.wait())
            try:
                done, _ = await asyncio.wait({ready, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
                stopped.cancel()
            if not done:
                raise TimeoutError(f"the engine was not ready within {timeout} s")
            if not self._ready.is_set():
                return False  # stopped while loading
        return self.devices.loaded and bool(self.devices.usable)

    @property
    def failed(self) -> bool:
        """An engine failed to load or warm up: the server cannot start (the reason: .error)."""
        return self.devices.failed

    @property
    def error(self) -> str | None:
        return self.devices.error

    async def stop(self) -> None:
        """Close every connection with 1001 (going away), stop the source and the inference threads."""
        self._stopping = True
        if self._stopped is not None:
            self._stopped.set()  # connections still waiting for the engine end now (wait_ready)
        limits = self.config.limits
        if self._server is not None:
            self._server.close(code=CloseCode.GOING_AWAY, reason="server shutting down")
            try:
                # Peers that answer the close go at once; one that does not (gone, or never reading) is not waited
                # for past the grace: it is dropped.
                await asyncio.wait_for(asyncio.shield(self._server.wait_closed()), limits.shutdown_grace_s)
            except TimeoutError:
                for conn in list(self.guard.sockets):
                    conn.transport.abort()
                # The handlers of aborted connections end within a loop turn or two; one still waiting on something
                # else is not waited for either: the promise is an exit within a few seconds, whatever runs.
                try:
                    await asyncio.wait_for(asyncio.shield(self._server.wait_closed()), HANDLERS_AFTER_ABORT_S)
                except TimeoutError:
                    log.warning("shutting down without waiting for the connection handlers still running")
        if self.broadcast is not None:  # joins the source thread: off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.broadcast.stop)
        self._watch_task.cancel()
        # A GPU batch ends in milliseconds; a CPU batch or a model still loading may take far longer, and cannot be
        # interrupted: it is not waited for past the grace (the command then exits without it, cli.entry).
        await asyncio.get_running_loop().run_in_executor(None, self.devices.stop, limits.shutdown_grace_s)
        self.pool.shutdown(wait=False, cancel_futures=True)
        throttled.flush()  # how many lines a peer caused since the last one of each kind
        if self._frozen is not None:
            self._frozen = None
            heap.thaw()

    async def __aenter__(self) -> TurboServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.gpu.observe(seconds)

    @property
    def loras(self) -> tuple[dict, ...]:
        """The engine's LoRAs (their summaries) at the scales asked for last: what clients are shown."""
        loras = self.engine.loras
        if self.lora_target is None:
            return loras
        return tuple({**lora, "scale": scale} for lora, scale in zip(loras, self.lora_target.scales))

    def change_lora(self, which: int | str | None, scale: float) -> tuple[float, ...]:
        """From any thread (OSC, a viewer with the control token): one LoRA's scale, by number from 1 or name (None:
        the only one); ValueError says why it cannot change (no --lora-live, the engine still loading, ...)."""
        if self.lora_target is None:
            raise ValueError("the engine is still loading")
        return self.lora_target(which, scale)

    def set_lora_scales(self, scales) -> None:
        """From any thread (a LoraTarget's apply): every device's engine takes these scales before its next call, and
        every client and viewer gets a `loras` message (one for any number of changes until the loop sends it)."""
        with self._lora_lock:
            for device in self.devices.items:
                device.batcher.set_lora_scales(scales)
            if self._loras_due or self._loop is None:
                return
            self._loras_due = True
        try:
            self._loop.call_soon_threadsafe(self._announce_loras)
        except RuntimeError:  # the loop is closed: shutting down, nobody to tell
            pass

    def _lora_metrics(self) -> None:
        for lora in self.loras:
            self.metrics.lora_scale.labels(lora["name"]).set(lora["scale"])

    def _announce_loras(self) -> None:
        with self._lora_lock:
            self._loras_due = False
        if not self.devices.loaded:
            return  # nobody has had a `ready` yet; theirs will carry the new scales
        self._lora_metrics()
        message = protocol.loras_message(self.loras)
        for session in (*self.clients, *self.viewers):
            session.outbox.text(message)

    # ------------------------------------------------------------------ WebSocket sessions

    async def _refuse(self, ws: ServerConnection, code: str, message: str, close_code: int, reason: str) -> None:
        self.metrics.errors.labels(code).inc()
        ws.close_timeout = self.config.limits.refused_close_timeout_s  # told why: no long wait for its close
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(protocol.error_message(code, message)))
            await ws.close(close_code, reason)

    async def _handler(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path).path
        if path == "/view/ws":
            await self._viewer_handler(ws)
        else:
            await self._client_handler(ws)

    async def _await_engine(self, ws: ServerConnection) -> bool:
        if not self._ready.is_set():
            # A peer that leaves while the engine warms up (minutes on a first start) gives its place back now, not
            # when the warmup ends: else every reload of the page in that time held a place, and the server said
            # "full" with nobody connected.
            ready = asyncio.ensure_future(self.wait_ready())
            gone = asyncio.ensure_future(ws.wait_closed())
            try:
                await asyncio.wait({ready, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not ready.done():
                ready.cancel()
                return False
        if await self.wait_ready():
            return True
        if self._stopping:  # stopped while the engine loads: going away, as stop() closes every other connection
            with contextlib.suppress(ConnectionClosed):
                await ws.close(CloseCode.GOING_AWAY, "server shutting down")
            return False
        lost = self.devices.loaded and not self.devices.usable  # every device failed after it was ready
        await self._refuse(ws, "engine_failed", f"the engine {'stopped' if lost else 'failed to start'}: "
                           f"{self.devices.error}", CloseCode.INTERNAL_ERROR, "engine failed")
        return False

    async def _client_handler(self, ws: ServerConnection) -> None:
        if await self._authorized(ws, "/ws"):
            await self._run_session(ws, "client", lambda: ClientSession(self, ws))

    async def _viewer_handler(self, ws: ServerConnection) -> None:
        if not await self._authorized(ws, "/view/ws"):
            return
        if self.broadcast is None:
            await self._refuse(ws, "no_source", "nothing to view: start the server with --source SRC",
                               CloseCode.POLICY_VIOLATION, "no source")
            return
        control_token = self.config.control_token
        control = control_token is not None and token_matches(query_params(ws.request.path).get("control"),
                                                              control_token)
        await self._run_session(ws, "viewer", lambda: ViewerSession(self, ws, control))

    def _token_given(self, request_path: str) -> bool:
        """Whether a WebSocket request may connect as far as --token goes: no token set, or ?token= matches it."""
        token = self.config.token
        return token is None or token_matches(query_params(request_path).get("token"), token)

    async def _authorized(self, ws: ServerConnection, path: str) -> bool:
        """With --token, both WebSocket endpoints need ?token=<token> (as typed); refused with 1008 otherwise."""
        if self._token_given(ws.request.path):
            return True
        await self._refuse(ws, "unauthorized", f"this server needs a token: connect to {path}?token=<token>",
                           CloseCode.POLICY_VIOLATION, "unauthorized")
        return False

    async def _run_session(self, ws: ServerConnection, role: str, make: Callable[[], Any]) -> None:
        """Take one of the role's places (or refuse: server_full), wait for the engine, run the session to its end.

        A place is held from the handshake on, also while the engine warms up, so max_clients bounds connections,
        not only running streams.
        """
        limit = self.client_limit() if role == "client" else self.config.limits.max_viewers
        if self.places[role] >= limit:
            await self._refuse(ws, "server_full", f"server full: {limit} {role}s at most; try again later",
                               CloseCode.TRY_AGAIN_LATER, "server full")
            return
        self.places[role] += 1  # no await since the check: the count cannot overshoot
        sessions = self.clients if role == "client" else self.viewers
        try:
            if not await self._await_engine(ws):
                return
            session = make()
            log.debug("%s %s connected%s", role, self.client_address(ws),
                      f" on {self.device_for(session.stream)}" if role == "client" else "")
            sessions.add(session)
            self._sessions_changed()
            try:
                await session.run()
            finally:
                sessions.discard(session)
                self._sessions_changed()
        finally:
            self.places[role] -= 1

    def _sessions_changed(self) -> None:
        self.metrics.clients.set(len(self.clients))
        self.metrics.viewers.set(len(self.viewers))
        if self.broadcast is not None:
            # No viewer, no work: the source thread stops feeding the GPU until someone watches.
            if self.viewers:
                self.broadcast.viewers_present.set()
            else:
                self.broadcast.viewers_present.clear()


def gpu_memory_reader(engine) -> Callable[[], tuple[float, float]] | None:
    """(reserved, allocated) bytes of torch's CUDA allocator on the engine's device; None off CUDA."""
    if engine is None or not getattr(engine, "is_cuda", False):
        return None
    import torch

    device = engine.device
    return lambda: (float(torch.cuda.memory_reserved(device)), float(torch.cuda.memory_allocated(device)))


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def default_capture(spec: str, loop: bool = False):
    """sources.CaptureThread in realtime mode (newest frame only), a file or folder started over at its end with
    `loop`; SourceError (a ValueError) for a bad SRC."""
    from ..io.sources import CaptureThread

    return CaptureThread(spec, realtime=True, loop=loop)


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
            raise self._error  # start() stopped what it had started
        try:
            fut = asyncio.run_coroutine_threadsafe(self.server.wait_ready(self.ready_timeout), self.loop)
            if not fut.result(self.ready_timeout + 1):
                raise RuntimeError(f"engine failed: {self.server.error}")
        except BaseException:  # no `with` body runs, so no __exit__: the listening server would outlive the error
            self.__exit__(None, None, None)
            raise
        return self.server

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
