"""Prometheus metrics of one server, in a registry of its own (several servers may live in one process: tests).

Latencies are in seconds, as Prometheus wants them. Stages: decode (JPEG -> frame fitted to the engine size, worker
thread), gpu (one engine call, per batch), encode (frame -> JPEG, worker thread), end_to_end (a client's message
received -> its result written to the socket).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# 0.5 ms .. 5 s: a JPEG codec call sits at the bottom, a CPU engine call or a stalled client near the top.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.030, 0.050, 0.075, 0.1,
                    0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """Counters, gauges and histograms of one server; render() gives the Prometheus text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # Resident memory, CPU time, open files of this process: the load script reads RSS from here.
        ProcessCollector(registry=r)
        self.frames_in = Counter("turbostream_frames_in", "Frames received (client JPEGs and source frames)",
                                 registry=r)
        self.frames_out = Counter("turbostream_frames_out", "Stylized frames sent (to clients and viewers)",
                                  registry=r)
        # stage: decode (replaced while the previous frame was decoding), queue (replaced in the batcher's slot
        # before the engine took it), encode / send (a newer result replaced one waiting for a slow reader), closed
        # (pending when its client left).
        self.frames_dropped = Counter(
            "turbostream_frames_dropped",
            "Frames never processed or never sent: replaced by a newer one in a slot, or skipped for a slow reader",
            ["stage"], registry=r,
        )
        # The `similarity` control: frames answered with the stream's last output, without an engine call.
        self.frames_skipped = Counter("turbostream_frames_skipped",
                                      "Frames similar enough to the last one run to skip the engine", registry=r)
        self.errors = Counter("turbostream_errors", "Error messages sent to clients, by code", ["code"], registry=r)
        self.stage = Histogram(
            "turbostream_stage_seconds",
            "Latency of one pipeline stage: decode, gpu (per engine call), encode, end_to_end (message received -> "
            "result written to the socket)",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram("turbostream_batch_size", "Frames per engine call", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.clients = Gauge("turbostream_clients", "Interactive /ws streams connected", registry=r)
        self.viewers = Gauge("turbostream_viewers", "Viewer connections", registry=r)
        self.ready = Gauge("turbostream_ready", "1 once the engine is warmed up", registry=r)
        # Threads, read at scrape time: a soak checks that they do not grow with connections that come and go.
        Gauge("turbostream_process_threads", "OS threads of this process (Python, torch and OpenCV pools)",
              registry=r).set_function(_os_threads)
        Gauge("turbostream_python_threads", "Python threads alive (threading.active_count)",
              registry=r).set_function(threading.active_count)
        # The server-side source (--source): restarts are new captures of a lost live source; reconnects are the
        # capture's own quick retries before that.
        self.source_up = Gauge("turbostream_source_up", "1 while the server-side source delivers frames", registry=r)
        self.source_restarts = Counter("turbostream_source_restarts",
                                       "Times the server opened a lost live source again", registry=r)
        self.source_reconnects = Counter("turbostream_source_reconnects",
                                         "Reconnect attempts of the capture of the server-side source", registry=r)
        # External control and outputs (serve --osc-port, --prompts, --publish).
        # By LoRA name (at most config.MAX_LORAS): the scale asked for last (--lora-live), or as started.
        self.lora_scale = Gauge("turbostream_lora_scale", "Each LoRA's scale (changes with --lora-live)", ["lora"],
                                registry=r)
        self.osc_messages = Counter(
            "turbostream_osc_messages",
            "OSC messages received, by result: applied, ignored, rejected (out of range), bad_arguments, "
            "unknown_address, malformed", ["result"], registry=r,
        )
        self.publish_up = Gauge("turbostream_publish_up", "--publish targets currently streaming", registry=r)
        self.publish_failures = Counter("turbostream_publish_failures",
                                        "Failed attempts to stream to a --publish target (each is retried)",
                                        registry=r)
        self.send_buffer = Gauge(
            "turbostream_send_buffer_bytes",
            "Bytes written to connections' sockets but not yet taken by the kernel, all connections together",
            registry=r,
        )
        # reason: send_buffer (a peer that sends pings and never reads), ping_flood and message_flood (pings or small
        # messages past their token bucket), too_many_sockets (every place and every handshake slot taken).
        self.limit_closes = Counter("turbostream_connections_closed_by_limit", "Sockets closed at once because they "
                                    "passed a limit", ["reason"], registry=r)
        self.handshakes_waited = Counter("turbostream_handshakes_waited", "Sockets that arrived while "
                                         "max_pending_handshakes requests were being read, and waited, unread, for "
                                         "their turn", registry=r)
        self.origins_refused = Counter("turbostream_origins_refused", "WebSocket handshakes refused with 403 for "
                                       "their Origin (see --allow-origin; the log names each at most every 10 s)",
                                       registry=r)
        self.decode = self.stage.labels("decode")
        self.gpu = self.stage.labels("gpu")
        self.encode = self.stage.labels("encode")
        self.end_to_end = self.stage.labels("end_to_end")

    def watch_gpu_memory(self, read: Callable[[], tuple[float, float]]) -> None:
        """Add gauges read at scrape time: read() -> (reserved, allocated) bytes of the CUDA allocator."""
        r = self.registry
        reserved = Gauge("turbostream_gpu_memory_reserved_bytes", "CUDA memory held by torch's allocator", registry=r)
        allocated = Gauge("turbostream_gpu_memory_allocated_bytes", "CUDA memory in live tensors", registry=r)
        reserved.set_function(lambda: read()[0])
        allocated.set_function(lambda: read()[1])

    def watch_send_buffers(self, read: Callable[[], float]) -> None:
        """read() -> bytes buffered in user space for every connection; called at scrape time (on the event loop)."""
        self.send_buffer.set_function(read)

    def dropped(self, stage: str) -> None:
        self.frames_dropped.labels(stage).inc()

    def closed_by_limit(self, reason: str) -> None:
        self.limit_closes.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _os_threads() -> float:
    """OS threads of this process: /proc on Linux (torch's and OpenCV's native threads too), else Python's own."""
    try:
        return float(len(os.listdir("/proc/self/task")))
    except OSError:
        return float(threading.active_count())


class DeviceMetrics:
    """What scaling out needs, on a server's registry: the engine figures by device (`serve --device cuda:0,cuda:1`),
    how connections arrive (directly or through a trusted proxy) and handshakes refused before the upgrade."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.engine = Histogram("turbostream_device_engine_seconds", "One engine call (a batch) on this device",
                                ["device"], buckets=_LATENCY_BUCKETS, registry=r)
        self.frames = Counter("turbostream_device_frames", "Frames run by this device's engine", ["device"],
                              registry=r)
        # The device's own timeline (CUDA events around each call; on a CPU, the call's compute): busy seconds over
        # wall seconds is its utilization, and the gaps say whether it waited for the host between calls.
        self.busy = Counter("turbostream_device_busy_seconds", "Time this device spent on engine calls (CUDA "
                            "events: a call's first copy in to its last copy out)", ["device"], registry=r)
        self.gap = Histogram("turbostream_device_gap_seconds", "This device's idle time before an engine call: "
                             "from the end of the call before it to its start (~0: it was queued in time)",
                             ["device"], buckets=(0.0001, 0.00025, *_LATENCY_BUCKETS), registry=r)
        self.streams = Gauge("turbostream_device_streams", "Streams placed on this device (the broadcast's too)",
                             ["device"], registry=r)
        self.ready = Gauge("turbostream_device_ready", "1 while this device's engine is warm and usable", ["device"],
                           registry=r)
        self.lost = Gauge("turbostream_device_lost", "1 once this device failed after it was ready", ["device"],
                          registry=r)
        self.gpu_reserved = Gauge("turbostream_device_gpu_memory_reserved_bytes", "CUDA memory held by torch's "
                                  "allocator on this device", ["device"], registry=r)
        self.gpu_allocated = Gauge("turbostream_device_gpu_memory_allocated_bytes", "CUDA memory in live tensors on "
                                   "this device", ["device"], registry=r)
        self.connections = Counter("turbostream_connections", "WebSocket handshakes by how they arrived: via=proxy "
                                   "(from a --trusted-proxy) or direct", ["via"], registry=r)
        self.refused = Counter("turbostream_handshakes_refused", "Handshakes answered with HTTP 503 before the "
                               "upgrade (through a trusted proxy), by reason: full, warming, failed, stopping",
                               ["reason"], registry=r)
