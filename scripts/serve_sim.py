#!/usr/bin/env python3
"""The server's scheduling against a simulated GPU: how much of the device's time the batcher keeps busy.

`turbostream serve` runs here with a stand-in engine whose device is a timeline, not a GPU. submit() does the host
work of a call (by default the real engine's own submit, with its frame math made a no-op: checks, staging into
pinned slots, caches, stream state; or, with --host-ms MS, a stand-in that fits and copies the frames and holds the
GIL, busy, for MS) and books the call on the device: it starts when the previous call ends (or at once) and lasts
--device-ms FIXED,PER_FRAME (FIXED + PER_FRAME x frames). done() and collect() read that timeline; collect() sleeps
until the call's end with the GIL released, as a CUDA event wait does, then hands the frames out (the engine's own
collect by default). Everything else is the real server: WebSockets, JPEG decode and encode on its worker threads,
the batcher and its gather rules.

scripts/loadtest.py then drives it with N clients (a process of its own), and the timeline says, per step, what the
clients cannot see: the device's utilization, its idle time between calls and the batch sizes. The capacity is the
device's frames/s at the largest batch, so `efficiency` (the clients' total frames/s over it) is the share the server
delivers of what the GPU could do: what issue 11's "16 clients at least 90 % of the engine's batch-8 frames/s" asks,
with the GPU taken out. Run it on the GPU machine (its CPUs) or anywhere; the defaults model the H200's measured
`random` 512x512 engine (batch 8 in 42 ms: 190 frames/s; batch 1 in 7 ms).

    python scripts/serve_sim.py --clients 1,8,16 --duration 8 --json sim.json
    python scripts/serve_sim.py --device-ms 2,5 --host-ms 1.5 --size 512 --clients 16   # a stand-in host cost

The outputs are the inputs, copied (no network runs): this measures the plumbing, never a picture.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from turbostream.codec import fit_frame  # noqa: E402
from turbostream.config import Limits, ServerConfig, parse_size, preset  # noqa: E402


@dataclass
class SimTicket:
    """A call booked on the timeline; collect() sets device_s and gap_s from it, as the engine does from CUDA events."""

    start: float
    end: float
    previous_end: float | None  # the end of the call booked before it (None for the first)
    work: Any  # the engine's ticket, or the output frames
    device_s: float | None = None
    gap_s: float | None = None


class SimulatedDevice:
    """An engine (attributes from a real CPU Engine) whose calls run on a simulated device timeline.

    host_ms None: the real engine's own submit() and collect() do the host work (staging into its pinned slots,
    caches, schedules, stream state, copying the outputs out), with its frame math made a no-op; so this is one
    engine per server (an engine belongs to one thread). On a CPU its device buffers are host memory too, so two
    copies that are transfers on CUDA count as host work here: a pessimistic stand-in.
    """

    pipelined = True
    # No model runs: the outputs are the inputs (so no weights, random or not, to warn about).
    model_name = "simulated device"
    random_weights = False
    loras = ()

    def __init__(self, engine, fixed_ms: float, per_frame_ms: float, host_ms: float | None) -> None:
        self._engine = engine
        self.fixed_s, self.per_frame_s = fixed_ms / 1e3, per_frame_ms / 1e3
        self.host_s = None if host_ms is None else host_ms / 1e3
        if host_ms is None:
            engine._frame_path = lambda b, *args, **kw: engine._out[:b]  # the GPU's part: on the timeline instead
        self._free_at = 0.0  # when the device finishes the last call booked
        self._lock = threading.Lock()
        self.calls: list[tuple[float, float, float, int]] = []  # (submitted, start, end, frames) per call

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def warmup(self):
        return self._engine.stats  # nothing to compile or capture on a timeline

    def submit(self, frames, params, **kw):
        """Host work, then book the call: (end time, the engine's ticket or the output frames)."""
        if self.host_s is None:
            outs = self._engine.submit(frames, params, **kw)
        else:
            params = [self._engine.validate(p) for p in params]
            outs = [fit_frame(f, self._engine.width, self._engine.height).copy() for f in frames]
            t_host = time.perf_counter() + self.host_s
            while time.perf_counter() < t_host:  # busy: a CUDA engine's submit holds the GIL (Python, launches)
                pass
        now = time.perf_counter()
        with self._lock:
            previous = self._free_at if self.calls else None
            start = max(now, self._free_at)
            self._free_at = end = start + self.fixed_s + self.per_frame_s * len(frames)
            self.calls.append((now, start, end, len(frames)))
        return SimTicket(start, end, previous, outs)

    def done(self, ticket: SimTicket) -> bool:
        return time.perf_counter() >= ticket.end

    def collect(self, ticket: SimTicket):
        wait = ticket.end - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        outs = ticket.work if self.host_s is not None else self._engine.collect(ticket.work)
        # The device's own timeline, as the engine's CUDA events give it: the server's metrics read it.
        ticket.device_s = ticket.end - ticket.start
        ticket.gap_s = None if ticket.previous_end is None else ticket.start - ticket.previous_end
        return outs

    def run(self, frames, params, **kw):
        return self.collect(self.submit(frames, params, **kw))


def device_stats(calls: list[tuple[float, float, float, int]], t0: float, t1: float, capacity_fps: float) -> dict:
    """What the device did between t0 and t1: calls that started then, its busy share, idle gaps, batch sizes."""
    window = [c for c in calls if t0 <= c[1] < t1]
    if len(window) < 2:
        return {"calls": len(window)}
    span = window[-1][2] - window[0][1]
    busy = sum(end - start for _, start, end, _ in window)
    # Idle before each call: from the previous call's end to this one's start (0 when it was queued in time).
    idle = [max(0.0, b[1] - a[2]) * 1e3 for a, b in zip(window, window[1:])]
    ahead = [(a[2] - b[0]) * 1e3 for a, b in zip(window, window[1:])]  # > 0: submitted before the previous ended
    frames = sum(c[3] for c in window)
    return {
        "calls": len(window),
        "frames": frames,
        "utilization": round(busy / span, 4),
        "device_fps": round(frames / span, 1),
        "efficiency": round(frames / span / capacity_fps, 4),
        "batch_mean": round(frames / len(window), 3),
        "batch_sizes": {str(n): sum(1 for c in window if c[3] == n) for n in sorted({c[3] for c in window})},
        "idle_ms_mean": round(statistics.fmean(idle), 3),
        "idle_ms_p95": round(sorted(idle)[int(0.95 * (len(idle) - 1))], 3),
        "submitted_ahead_share": round(sum(a > 0 for a in ahead) / len(ahead), 3),
    }


def _ms(value: float | None) -> str:
    """A latency for the progress line: a step without a frame (every client failed) has none."""
    return "n/a (no frame)" if value is None else f"{value:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,8,16", help="client counts, one step each (default: %(default)s)")
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per step (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per step (default: %(default)s)")
    ap.add_argument("--size", default="512", help="the engine's frame size (default: %(default)s)")
    ap.add_argument("--max-batch", type=int, default=8, help="largest batch (default: %(default)s)")
    ap.add_argument("--device-ms", default="2,5", metavar="FIXED,PER_FRAME",
                    help="simulated device time per call: FIXED + PER_FRAME x frames, in ms (default: %(default)s)")
    ap.add_argument("--host-ms", default="engine", metavar="MS|engine",
                    help="host work of a call: 'engine', the real engine's submit and collect with its frame math "
                         "a no-op, or MS milliseconds of a submit holding the GIL besides the frame copies "
                         "(default: %(default)s)")
    ap.add_argument("--inflight", type=int, default=1, help="frames a client may have unanswered (default: 1)")
    ap.add_argument("--submit-ahead", choices=("on", "off", "both"), default="both",
                    help="the batcher's submit-ahead rule (batcher.SUBMIT_AHEAD): on, off, or each client count with "
                         "both, side by side (default: %(default)s)")
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    args = ap.parse_args(argv)
    try:
        clients = [int(c) for c in args.clients.split(",")]
        fixed_ms, per_frame_ms = (float(x) for x in args.device_ms.split(","))
        width, height = parse_size(args.size)
        host_ms = None if args.host_ms == "engine" else float(args.host_ms)
    except ValueError as exc:
        ap.error(f"bad value: {exc}")
    if min(clients) < 1 or fixed_ms < 0 or per_frame_ms <= 0 or (host_ms or 0) < 0 or args.duration <= 0:
        ap.error("clients must be at least 1, device and host times positive, the duration positive")
    buckets = tuple(b for b in (1, 2, 4, 8, 16, 32) if b < args.max_batch) + (args.max_batch,)

    from turbostream import batcher
    from turbostream.engine import Engine
    from turbostream.models import load_components
    from turbostream.serve.server import ServerThread, TurboServer

    components = load_components("tiny-random", device="cpu", vae="tiny")  # shared: each engine is its own thread's
    capacity = args.max_batch / (fixed_ms + per_frame_ms * args.max_batch) * 1e3
    policies = {"on": [True], "off": [False], "both": [False, True]}[args.submit_ahead]
    results: dict = {
        "tool": "scripts/serve_sim.py", "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"size": f"{width}x{height}", "max_batch": args.max_batch, "device_ms": [fixed_ms, per_frame_ms],
                     "host_ms": args.host_ms, "inflight": args.inflight, "duration_s": args.duration,
                     "capacity_fps": round(capacity, 1)},
        "steps": [],
    }
    host = "the engine's own" if host_ms is None else f"{host_ms:g} ms a submit"
    print(f"simulated device: {fixed_ms:g} + {per_frame_ms:g} ms x frames a call, host work {host}; "
          f"capacity {capacity:.1f} frames/s at batch {args.max_batch}", flush=True)
    for n, ahead in ((n, ahead) for n in clients for ahead in policies):
        # A server of its own for each step: the batcher's timing means start afresh.
        batcher.SUBMIT_AHEAD = ahead
        engine = Engine(preset("test", device="cpu", width=width, height=height, buckets=buckets, cuda_graphs=False),
                        components)
        device = SimulatedDevice(engine, fixed_ms, per_frame_ms, host_ms)
        server = TurboServer(device, ServerConfig(port=0, limits=Limits(max_clients=n)))
        with ServerThread(server), tempfile.TemporaryDirectory() as tmp:
            url = f"ws://127.0.0.1:{server.port}/ws"
            out = Path(tmp) / f"load-{n}.json"
            t0 = time.perf_counter()
            clock = (time.time(), t0)  # the wall clock against this timeline's, to place the load test's window
            proc = subprocess.run(
                [sys.executable, str(HERE / "loadtest.py"), "--url", url, "--clients", str(n), "--duration",
                 str(args.duration), "--warmup", str(args.warmup), "--inflight", str(args.inflight), "--json",
                 str(out)], capture_output=True, text=True, timeout=args.duration + args.warmup + 120, check=False)
            t1 = time.perf_counter()
            if proc.returncode not in (0, 1) or not out.exists():  # 1: the soak verdict failed; the numbers stand
                print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"serve_sim: the load test of {n} clients failed (exit {proc.returncode})")
            step = json.loads(out.read_text())["steps"][0]
            total = step["total"]
            # The device's steady state: calls that started inside the load test's measured stretch (after its probe
            # connection and its warmup; on the wall clock in its JSON), its last fifth left out too.
            w0 = step["measured_unix"][0] - clock[0] + clock[1]
            dev = device_stats(device.calls, w0, w0 + 0.8 * args.duration, capacity)
            row = {"clients": n, "submit_ahead": ahead, "fps": total["fps"],
                   "p50_ms": total["latency_ms"]["p50"], "p95_ms": total["latency_ms"]["p95"],
                   "errors": total["errors"], "efficiency": round(total["fps"] / capacity, 4), "device": dev,
                   "server_device": step.get("device"),  # the same timeline as the server's /metrics report it
                   # When the window opened after the first call (the load test's probe): its 0.5 s, the settling
                   # and the warmup.
                   "window_after_first_call_s": round(w0 - device.calls[0][1], 3) if device.calls else None,
                   "wall_s": round(t1 - t0, 1)}
            results["steps"].append(row)
            print(f"{n:3d} clients, submit ahead {'on ' if ahead else 'off'}: {total['fps']:7.1f} frames/s "
                  f"({100 * row['efficiency']:5.1f} % of capacity), "
                  f"p50 {_ms(row['p50_ms'])}; device busy {100 * dev.get('utilization', 0):5.1f} %, "
                  f"batch {dev.get('batch_mean')}, idle {dev.get('idle_ms_mean')} ms a call", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
