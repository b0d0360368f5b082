"""Several engines in one server (`serve --device cuda:0,cuda:1`, `--device all`, `--device cpu,cpu`).

Each device gets its own engine and its own Batcher (one inference thread: CUDA graphs replay on the thread that
captured them, and each thread makes its device the current one before it builds or warms anything). A new stream
goes to the usable device with the fewest streams; ties go to the lowest recent engine-call time, then to the first
device. The broadcast (`--source`) is a stream of the first device. With one device this is the server as it always
was.

Failures:
- a device that fails to load or warm up fails the server's start (cli/serve.py exits with its message);
- a device whose engine later raises an error that leaves the device unusable (a CUDA error such as an illegal
  memory access or a device-side assert, `DeviceLost`), or whose inference thread dies, is lost: its streams get
  `engine_error` and are closed with 1011 (browsers reconnect and are placed on another device), the broadcast moves
  to another device, /healthz turns 503 naming it, and the server's client capacity shrinks by its share. Errors
  that do not poison the device (one stream's bad prompt, out of memory) stay per-frame `engine_error`s, as before.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..batcher import Batcher, Stream
from ..metrics import DeviceMetrics

log = logging.getLogger("turbostream.server")

# Substrings of errors after which a CUDA context is unusable (every later call fails too). Out of memory is not
# one of them: it fails a batch, not the device.
FATAL_PATTERNS = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure",
                  "CUDA driver", "ECC error", "device lost", "GPU is lost")
ENGINE_S_DECAY = 0.2  # weight of the newest engine call in a device's recent engine time


class DeviceLost(RuntimeError):
    """The engine's device cannot run anything any more (an engine may raise it; CUDA errors are recognised too)."""


def is_device_fatal(exc: BaseException) -> bool:
    """True for errors that leave the device unusable; False for ones that fail one call (bad input, OOM)."""
    if isinstance(exc, DeviceLost):
        return True
    text = str(exc)
    if "out of memory" in text.lower():
        return False
    return type(exc).__name__ == "AcceleratorError" or any(p in text for p in FATAL_PATTERNS)


def parse_devices(spec: str, cuda_count: Callable[[], int] | None = None) -> list[str]:
    """`--device` of serve: 'auto', 'cpu', 'cuda:1', a comma-separated list ('cuda:0,cuda:1', 'cpu,cpu') or 'all'
    (every CUDA GPU) -> the devices, one engine each. ValueError with a message a user can act on."""
    spec = spec.strip().lower()
    if spec == "all":
        count = _cuda_count() if cuda_count is None else cuda_count()
        if count < 1:
            raise ValueError("--device all: this machine (or this torch build) has no CUDA GPU; use --device cpu")
        return [f"cuda:{i}" for i in range(count)]
    devices = [part.strip() for part in spec.split(",")]
    if not devices or "" in devices:
        raise ValueError(f"--device {spec!r}: name one device or a comma-separated list (cuda:0,cuda:1)")
    if len(devices) > 1 and ("auto" in devices or "all" in devices):
        raise ValueError("--device: auto and all stand alone; a list names each device (cuda:0,cuda:1)")
    indexes = [int(d[5:]) for d in devices if d.startswith("cuda:") and d[5:].isdigit()]
    if indexes:
        count = _cuda_count() if cuda_count is None else cuda_count()
        missing = sorted({i for i in indexes if i >= count})
        if count and missing:  # no GPU at all: the engine's own check says so (resolve_device)
            raise ValueError(f"--device: cuda:{missing[0]} does not exist; this machine has {count} CUDA "
                             f"GPU{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    return devices


def device_labels(names: Sequence[str]) -> list[str]:
    """Unique labels for metrics and logs: a device named twice (cpu,cpu) becomes cpu#0, cpu#1."""
    return [f"{n}#{names[:i].count(n)}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _make_current(device: Any) -> None:
    """On the inference thread: make a GPU named with its index (cuda:1) the thread's current device, so the
    streams and graphs an engine creates without naming a device live on it. 'cuda' alone is the current one."""
    import torch

    device = torch.device(str(device).split("#")[0]) if isinstance(device, str) else device
    if getattr(device, "type", None) == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


class GuardedEngine:
    """An engine as the batcher sees it: every attribute is the engine's; run() also notices a lost device."""

    def __init__(self, engine: Any, device: Device) -> None:
        self._engine = engine
        self._device = device

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._engine, name)  # AttributeError if the engine has none: hasattr() stays true to it
        if name in ("submit", "collect"):  # pipelined calls: a device fault shows at collect, mostly
            return lambda *args, **kwargs: self._guarded(attr, *args, **kwargs)
        return attr

    def warmup(self, *args, **kwargs):
        _make_current(getattr(self._engine, "device", None))
        return self._engine.warmup(*args, **kwargs)

    def run(self, frames, params, **kwargs):
        return self._guarded(self._engine.run, frames, params, **kwargs)

    def _guarded(self, call: Callable[..., Any], *args, **kwargs) -> Any:
        if self._device.lost is not None:
            raise DeviceLost(f"device {self._device.name} is lost: {self._device.lost}")
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if is_device_fatal(exc):
                self._device.mark_lost(str(exc) or type(exc).__name__)
            raise


class Device:
    """One engine, its inference thread (a Batcher) and what placement and health need to know about it."""

    def __init__(self, name: str, engine: Any, factory: Callable[[], Any] | None, metrics: DeviceMetrics,
                 on_batch: Callable[[int, float], None]) -> None:
        self.name = name
        self.metrics = metrics
        self._server_on_batch = on_batch
        self.engine_s: float | None = None  # recent engine-call time (exponential average), for placement ties
        self.lost: str | None = None  # why the device became unusable after it was ready
        self.lost_handled = False
        self.started = False
        self._display: str | None = None
        self.gpu_reader: Callable[[], tuple[float, float]] | None = None  # set once ready, on CUDA
        if engine is not None:
            self.batcher = Batcher(GuardedEngine(engine, self), on_batch=self._on_batch, on_device=self._on_device)
        else:
            self.batcher = Batcher(engine_factory=lambda: self._build(factory), on_batch=self._on_batch,
                                   on_device=self._on_device)
        metrics.streams.labels(name).set_function(lambda: float(self.batcher.stream_count))

    def _build(self, factory: Callable[[], Any]) -> GuardedEngine:
        """On the inference thread: select the GPU first, so the model's tensors, streams and graphs live on it."""
        if self.name.startswith("cuda:"):
            _make_current(self.name)
        return GuardedEngine(factory(), self)

    def _on_batch(self, size: int, seconds: float) -> None:  # inference thread
        self.engine_s = seconds if self.engine_s is None else (
            (1 - ENGINE_S_DECAY) * self.engine_s + ENGINE_S_DECAY * seconds)
        self.metrics.engine.labels(self.name).observe(seconds)
        self.metrics.frames.labels(self.name).inc(size)
        self._server_on_batch(size, seconds)

    def _on_device(self, busy_s: float, gap_s: float | None) -> None:  # inference thread
        self.metrics.busy.labels(self.name).inc(busy_s)
        if gap_s is not None:
            self.metrics.gap.labels(self.name).observe(gap_s)

    def mark_lost(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.error("device %s is lost: %s", self.name, reason)

    @property
    def engine(self) -> Any:
        return self.batcher.engine

    @property
    def ready(self) -> bool:
        """Warm and not lost: new streams may be placed here."""
        return self.batcher.ready.is_set() and self.lost is None

    @property
    def display(self) -> str:
        """The device for clients' ready messages, with the GPU's name on CUDA ("cuda:1 (NVIDIA H200)")."""
        if self._display is None:
            device = getattr(self.engine, "device", "cpu")
            name = self.name
            if getattr(device, "type", None) == "cuda":
                import torch

                name = f"{self.name} ({torch.cuda.get_device_name(device)})"
            self._display = name
        return self._display

    def state(self) -> str:
        if self.lost is not None:
            return f"lost: {self.lost}"
        if self.batcher.failed.is_set():
            return f"failed to load: {self.batcher.error}"
        return "ready" if self.batcher.ready.is_set() else "warming up"


class Devices:
    """Every device of one server: start and stop, placement of new streams, /healthz and /readyz."""

    def __init__(self, metrics: DeviceMetrics, on_batch: Callable[[int, float], None], *, engine: Any = None,
                 engine_factory: Callable[[], Any] | None = None, engines: Sequence[Any] | None = None,
                 engine_factories: Mapping[str, Callable[[], Any]] | None = None) -> None:
        given = [x is not None for x in (engine, engine_factory, engines, engine_factories)]
        if sum(given) != 1:
            raise ValueError("give one of: engine, engine_factory, engines, engine_factories")
        if engine is not None or engines is not None:
            built = [engine] if engine is not None else list(engines)
            names = device_labels([str(getattr(e, "device", "cpu")) for e in built])
            pairs = [(name, e, None) for name, e in zip(names, built)]
        elif engine_factory is not None:
            pairs = [("default", None, engine_factory)]
        else:
            pairs = [(name, None, f) for name, f in engine_factories.items()]
        if not pairs:
            raise ValueError("a server needs at least one device")
        self.metrics = metrics
        self.items = [Device(name, e, f, metrics, on_batch) for name, e, f in pairs]
        self._placed: weakref.WeakKeyDictionary[Stream, Device] = weakref.WeakKeyDictionary()

    @property
    def primary(self) -> Device:
        """The first device: the broadcast's, and the one whose engine answers for the model's size and limits."""
        return self.items[0]

    # -------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Start every inference thread not started yet (TurboServer.start() starts the primary's)."""
        for device in self.items:
            if not device.started and not device.batcher.alive:
                device.batcher.start()
            device.started = True

    def stop(self, timeout: float) -> None:
        """Ask every inference thread to stop, then wait for them, timeout seconds in all (blocking)."""
        for device in self.items:
            device.batcher.stop(0)
        deadline = time.monotonic() + timeout
        for device in self.items:
            device.batcher.stop(max(0.0, deadline - time.monotonic()))

    @property
    def loaded(self) -> bool:
        """Every device became ready (some may be lost since)."""
        return all(d.batcher.ready.is_set() for d in self.items)

    @property
    def failed(self) -> bool:
        """A device failed to load or warm up: the server cannot start."""
        return any(d.batcher.failed.is_set() for d in self.items)

    @property
    def settled(self) -> bool:
        return self.loaded or self.failed

    @property
    def usable(self) -> list[Device]:
        return [d for d in self.items if d.ready]

    @property
    def error(self) -> str | None:
        """Why the server cannot serve streams: a device that failed to load, or every device lost."""
        for d in self.items:
            if d.batcher.failed.is_set():
                return d.batcher.error if len(self.items) == 1 else f"device {d.name} failed to load: " \
                                                                     f"{d.batcher.error}"
        if self.loaded and not self.usable:
            return "; ".join(f"device {d.name} is lost: {d.lost}" for d in self.items)
        return None

    def check_threads(self) -> None:
        """A ready device whose inference thread ended (it never should) is lost."""
        for d in self.items:
            if d.batcher.ready.is_set() and d.lost is None and not d.batcher.alive:
                d.mark_lost("its inference thread ended")

    # -------------------------------------------------------------- placement

    def place(self) -> Device:
        """The device for a new stream: fewest streams, then lowest recent engine time, then the first."""
        candidates = self.usable or self.items
        return min(candidates, key=lambda d: (d.batcher.stream_count, d.engine_s or 0.0, self.items.index(d)))

    def open_stream(self, on_result, params) -> Stream:
        device = self.place()
        stream = device.batcher.open_stream(on_result, params)
        self._placed[stream] = device
        return stream

    def device_of(self, stream: Stream | None) -> Device:
        return self._placed.get(stream, self.primary) if stream is not None else self.primary

    def capacity(self, limit: int) -> int:
        """Client places while some devices are lost: the limit less the lost devices' share (at least 1)."""
        lost = sum(1 for d in self.items if d.lost is not None)
        return limit if not lost else max(1, limit * (len(self.items) - lost) // len(self.items))

    # -------------------------------------------------------------- health

    def health(self) -> tuple[int, str]:
        """/healthz: 200 when every engine is warm; 503 naming each device that is not (warming, failed, lost)."""
        if all(d.ready for d in self.items):
            return 200, "ok\n"
        if len(self.items) == 1:  # the single-device wording, as before
            d = self.items[0]
            if d.batcher.failed.is_set():
                return 503, f"engine failed: {d.batcher.error}\n"
            return 503, ("warming up\n" if d.lost is None else f"engine failed: device lost: {d.lost}\n")
        lines = [f"{d.name}: {d.state()}" for d in self.items]
        bad = [d.name for d in self.items if not d.ready]
        return 503, f"not ready: {', '.join(bad)}\n" + "\n".join(lines) + "\n"

    def refusal(self, clients: int, limit: int, stopping: bool) -> tuple[str, str] | None:
        """Why a new stream would not be served at once: (reason, text) with reason stopping, failed, warming or
        full; None when it would be."""
        if stopping:
            return "stopping", "shutting down"
        if self.failed or (self.loaded and not self.usable):
            return "failed", f"engine failed: {self.error}"
        if not self.loaded:
            warming = [d.name for d in self.items if not d.batcher.ready.is_set()]
            return "warming", "warming up" + (f": {', '.join(warming)}" if len(self.items) > 1 else "")
        cap = self.capacity(limit)
        if clients >= cap:
            return "full", f"full: {clients} of {cap} clients"
        return None

    def readiness(self, clients: int, limit: int, stopping: bool) -> tuple[int, str]:
        """/readyz, for a load balancer: 200 while a new stream would be served at once; 503 while shutting down,
        warming up, failed, or full (every client place taken)."""
        refused = self.refusal(clients, limit, stopping)
        if refused is not None:
            return 503, refused[1] + "\n"
        cap = self.capacity(limit)
        return 200, f"ready: {cap - clients} of {cap} client places free\n"

    def gpu_memory(self) -> tuple[float, float]:
        """(reserved, allocated) bytes of torch's CUDA allocator, summed over the CUDA devices."""
        totals = [0.0, 0.0]
        for d in self.items:
            read = d.gpu_reader
            if read is not None:
                reserved, allocated = read()
                totals[0] += reserved
                totals[1] += allocated
        return totals[0], totals[1]

