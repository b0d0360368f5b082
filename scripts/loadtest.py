#!/usr/bin/env python3
"""Load test of `turbostream serve`: N WebSocket clients on loopback stream JPEGs; latency, frames/s, drops, memory.

Each step of the sweep (--clients 1,4,8) runs that many clients at once for --duration seconds (the first --warmup
seconds are not measured). Every client sets its own prompt and seed, then streams pre-encoded JPEGs (the engine's
size unless --size says otherwise) with at most --inflight frames unanswered, at most --rate frames/s (0: as fast as
the window allows). The server answers each frame with {"type": "frame", "seq": n} and the JPEG, so every reply is
matched to its own send time; frames skipped by the server (a newer frame replaced them) count as dropped.

Reported per client and in total: frames/s, send-to-reply latency p50/p95/p99, dropped frames and errors; per step,
from the server's /metrics: resident memory (and CUDA memory), open file descriptors and threads before the clients
connect, after the warmup and after they left, a sample of them every --sample-every seconds, mean engine-call time
and batch size. Every report carries a verdict against the soak criteria (no errors, every client answered, RSS and
CUDA memory growth after the warmup under --max-rss-growth-mib / --max-gpu-growth-mib, file descriptors back to
where they were once the clients left, no thread growth after the warmup, a spawned server exiting 0 on SIGTERM);
with --soak a failed verdict is exit status 1. The run is bounded (at most 64 clients a step, 600 s a step, one
hour in all) and stops by itself.

    # start a server of its own (arguments after -- go to `turbostream serve`):
    python scripts/loadtest.py --clients 1,4,8 --duration 20 --json benchmarks/serve.json \\
        --spawn-server -- --model random --size 512
    # or load a running one:
    python scripts/loadtest.py --url ws://127.0.0.1:8000/ws --clients 4 --duration 10
    # the CPU soak (benchmarks/soak-cpu-*.json):
    python scripts/loadtest.py --soak --clients 8 --duration 600 --warmup 30 --json soak.json \
        --spawn-server -- --model tiny-random --size 64 --device cpu

Needs only websockets, numpy and OpenCV (it does not import turbostream unless it spawns the server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import cv2
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

MAX_CLIENTS = 64
MAX_STEP_S = 600.0
MAX_TOTAL_S = 3600.0
DRAIN_S = 3.0  # after a step, how long to wait for replies to frames still in flight
SETTLE_S = 10.0  # after a step, how long the server may take to close the clients' sockets before fds are judged
# Soak criteria that have no option: descriptors the server may hold beyond its count before the step (a scrape's
# own socket racing the count), and threads beyond its count after the warmup (a pool thread started late).
FD_MARGIN = 2
THREAD_MARGIN = 2
PROMPTS = [
    "an oil painting, thick brush strokes, vivid colors",
    "a watercolor sketch, soft edges",
    "a pencil drawing, cross hatching",
    "a neon cyberpunk scene at night",
    "a mosaic of small colored tiles",
    "a ukiyo-e woodblock print",
    "a claymation still, soft lighting",
    "a pop art poster, bold outlines",
]
# `python -m turbostream.cli` would load cli.py twice; start the server the way its console script does.
SERVE = [sys.executable, "-c", "import sys; from turbostream.cli import main; sys.exit(main())", "serve"]


# ------------------------------------------------------------------------------------------------ frames


def make_frames(count: int, width: int, height: int, quality: int, seed: int = 0) -> list[bytes]:
    """count JPEGs of width x height at quality 1..100: moving gradients, shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(count):
        phase = 2 * np.pi * i / max(count, 1)
        r = 128 + 100 * np.sin(x / width * 6 + phase)
        g = 128 + 100 * np.sin(y / height * 5 - phase)
        b = 128 + 90 * np.sin((x + y) / (width + height) * 9 + 2 * phase)
        img = np.stack([b, g, r], -1)
        cx, cy = int(width * (0.3 + 0.4 * (i % 7) / 7)), int(height * 0.5)
        cv2.circle(img, (cx, cy), max(4, min(width, height) // 6), (40, 200, 240), -1)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        ok, buf = cv2.imencode(".jpg", img.clip(0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        frames.append(buf.tobytes())
    return frames


# ------------------------------------------------------------------------------------------------ statistics


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Milliseconds: p50, p95, p99, mean, max of latencies given in seconds (None when there are none)."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    arr = np.asarray(values) * 1e3
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
            "mean": round(float(arr.mean()), 2), "max": round(float(arr.max()), 2)}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


def scrape(http_base: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(http_base + "/metrics", timeout=10) as resp:
            return parse_metrics(resp.read().decode())
    except (OSError, urllib.error.URLError):
        return {}


# What a sample and the start / warm / end snapshots keep of a scrape: report key -> metric name.
RESOURCES = {
    "rss_bytes": "process_resident_memory_bytes",
    "open_fds": "process_open_fds",
    "threads": "turbostream_process_threads",
    "gpu_reserved_bytes": "turbostream_gpu_memory_reserved_bytes",
    "gpu_allocated_bytes": "turbostream_gpu_memory_allocated_bytes",
    "send_buffer_bytes": "turbostream_send_buffer_bytes",
    "clients": "turbostream_clients",
}


def resources(scraped: dict[str, float]) -> dict[str, float | None]:
    return {key: scraped.get(name) for key, name in RESOURCES.items()}


def server_numbers(before: dict[str, float], after: dict[str, float], warm: dict[str, float] | None = None) -> dict:
    """Memory, descriptors and threads at start, after the warmup and at the end of a step; the step's engine calls,
    batch sizes and drops from the counters."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    calls = delta('turbostream_stage_seconds_count{stage="gpu"}')
    warm = warm or {}
    out = {
        "rss_bytes_start": before.get("process_resident_memory_bytes"),
        "rss_bytes_warm": warm.get("process_resident_memory_bytes"),
        "rss_bytes_end": after.get("process_resident_memory_bytes"),
        "gpu_reserved_bytes_start": before.get("turbostream_gpu_memory_reserved_bytes"),
        "gpu_reserved_bytes_warm": warm.get("turbostream_gpu_memory_reserved_bytes"),
        "gpu_reserved_bytes_end": after.get("turbostream_gpu_memory_reserved_bytes"),
        "gpu_allocated_bytes_start": before.get("turbostream_gpu_memory_allocated_bytes"),
        "gpu_allocated_bytes_end": after.get("turbostream_gpu_memory_allocated_bytes"),
        "open_fds_start": before.get("process_open_fds"),
        "open_fds_warm": warm.get("process_open_fds"),
        "open_fds_end": after.get("process_open_fds"),
        "threads_start": before.get("turbostream_process_threads"),
        "threads_warm": warm.get("turbostream_process_threads"),
        "threads_end": after.get("turbostream_process_threads"),
        "engine_calls": int(calls),
        "engine_call_ms_mean": round(delta('turbostream_stage_seconds_sum{stage="gpu"}') / calls * 1e3, 3)
        if calls else None,
        "batch_size_mean": round(delta("turbostream_batch_size_sum") / calls, 3) if calls else None,
        "frames_dropped": 0,
        "frames_dropped_by_stage": {},
    }
    prefix = 'turbostream_frames_dropped_total{stage="'
    for name in sorted(set(before) | set(after)):
        if name.startswith(prefix):
            n = int(delta(name))
            out["frames_dropped"] += n
            if n:
                out["frames_dropped_by_stage"][name[len(prefix) : -2]] = n
    for stage in ("decode", "encode", "end_to_end"):
        n = delta(f'turbostream_stage_seconds_count{{stage="{stage}"}}')
        out[f"{stage}_ms_mean"] = (
            round(delta(f'turbostream_stage_seconds_sum{{stage="{stage}"}}') / n * 1e3, 3) if n else None
        )
    return out


# ------------------------------------------------------------------------------------------------ one client


@dataclass
class ClientResult:
    client: int
    sent: int = 0
    replies: int = 0  # all replies, warmup included
    measured: int = 0  # replies inside the measured window
    dropped: int = 0  # frames the server skipped (a later frame was answered first)
    unanswered: int = 0  # still in flight when the step ended
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self, window_s: float) -> dict:
        return {
            "client": self.client, "fps": round(self.measured / window_s, 2) if window_s > 0 else None,
            "frames": self.measured, "sent": self.sent, "replies": self.replies, "dropped": self.dropped,
            "unanswered": self.unanswered, "latency_ms": percentiles(self.latencies),
            "error_count": len(self.errors), "errors": self.errors[:5],
        }


async def run_client(index: int, url: str, frames: list[bytes], args, t_measure: float, t_end: float,
                     result: ClientResult, ready_info: dict) -> None:
    loop = asyncio.get_running_loop()
    sent: dict[int, float] = {}  # seq -> send time, frames not answered yet
    room = asyncio.Event()
    room.set()
    try:
        async with connect(url, max_size=2**25, compression=None, open_timeout=60, close_timeout=5) as ws:
            ready = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if ready.get("type") != "ready":
                result.errors.append(f"{ready.get('code')}: {ready.get('message')}")
                return
            ready_info.update(ready)
            await ws.send(json.dumps({"type": "config", "prompt": PROMPTS[index % len(PROMPTS)], "seed": index}))

            async def receive() -> None:
                header = None
                async for message in ws:
                    now = loop.time()
                    if isinstance(message, str):
                        msg = json.loads(message)
                        if msg["type"] == "frame":
                            header = msg
                        elif msg["type"] == "error":
                            result.errors.append(f"{msg['code']}: {msg['message']}")
                            if "seq" in msg:
                                sent.pop(msg["seq"], None)
                                room.set()
                        continue
                    if header is None:
                        result.errors.append("a JPEG arrived without its frame header")
                        continue
                    seq, header = header["seq"], None
                    t_send = sent.pop(seq, None)
                    for older in [s for s in sent if s < seq]:
                        del sent[older]
                        result.dropped += 1
                    result.replies += 1
                    if t_send is not None and t_measure <= now <= t_end:
                        result.measured += 1
                        result.latencies.append(now - t_send)
                    room.set()

            receiver = asyncio.create_task(receive())
            period = 1.0 / args.rate if args.rate > 0 else 0.0
            next_due = loop.time()
            seq = 0
            while loop.time() < t_end and not receiver.done():
                if len(sent) >= args.inflight:
                    room.clear()
                    try:
                        await asyncio.wait_for(room.wait(), max(0.0, t_end - loop.time()))
                    except TimeoutError:
                        break
                    continue
                if period:
                    delay = next_due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    # Behind schedule (the window held us back): start over from now, no catch-up burst.
                    next_due = max(next_due + period, loop.time())
                if loop.time() >= t_end:
                    break
                seq += 1
                sent[seq] = loop.time()
                await ws.send(frames[(seq + index) % len(frames)])
                result.sent += 1
            drain_until = loop.time() + DRAIN_S
            while sent and loop.time() < drain_until and not receiver.done():
                await asyncio.sleep(0.01)
            result.unanswered = len(sent)
            receiver.cancel()
    except InvalidStatus as exc:
        result.errors.append(f"connection refused: HTTP {exc.response.status_code}")
    except ConnectionClosed as exc:
        if exc.rcvd is None or exc.rcvd.code not in (1000, 1001):
            result.errors.append(f"connection closed: {exc}")
    except (OSError, TimeoutError) as exc:
        result.errors.append(f"connection failed: {exc!r}")


async def settle(http_base: str, max_fds: float | None, timeout: float = SETTLE_S) -> dict[str, float]:
    """Scrape until no client is connected (and open fds are at most max_fds) or timeout; the last scrape."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        scraped = await asyncio.to_thread(scrape, http_base)
        fds = scraped.get("process_open_fds")
        if scraped.get("turbostream_clients", 0) == 0 and (max_fds is None or fds is None or fds <= max_fds):
            return scraped
        if loop.time() >= deadline:
            return scraped
        await asyncio.sleep(0.25)


async def sample_resources(http_base: str, every: float, t0: float, samples: list[dict]) -> None:
    """Append the server's resources to samples every `every` seconds (t: seconds since the step started)."""
    loop = asyncio.get_running_loop()
    while True:
        scraped = await asyncio.to_thread(scrape, http_base)
        if scraped:
            samples.append({"t": round(loop.time() - t0, 1), **resources(scraped)})
        await asyncio.sleep(every)


async def run_step(n: int, url: str, frames: list[bytes], args, http_base: str, ready_info: dict) -> dict:
    loop = asyncio.get_running_loop()
    before = await settle(http_base, None)  # the previous step's (or the probe's) clients are gone
    t0 = loop.time()
    t_measure, t_end = t0 + args.warmup, t0 + args.warmup + args.duration
    results = [ClientResult(i) for i in range(n)]
    samples: list[dict] = []
    sampler = asyncio.create_task(sample_resources(http_base, args.sample_every, t0, samples))

    async def scrape_warm() -> dict[str, float]:
        await asyncio.sleep(max(0.0, t_measure - loop.time()))
        return await asyncio.to_thread(scrape, http_base)

    warm_task = asyncio.create_task(scrape_warm())
    await asyncio.gather(*(run_client(i, url, frames, args, t_measure, t_end, results[i], ready_info)
                           for i in range(n)))
    warm = await warm_task
    after = await settle(http_base, before.get("process_open_fds"))
    sampler.cancel()
    if after:
        samples.append({"t": round(loop.time() - t0, 1), **resources(after)})
    window = args.duration
    per_client = [r.summary(window) for r in results]
    all_latencies = [x for r in results for x in r.latencies]
    fps = [c["fps"] or 0.0 for c in per_client]
    return {
        "clients": n,
        "measured_s": window,
        "total": {
            "fps": round(sum(fps), 2), "fps_per_client_min": round(min(fps), 2), "fps_per_client_mean":
            round(sum(fps) / n, 2), "frames": sum(r.measured for r in results),
            "latency_ms": percentiles(all_latencies), "dropped": sum(r.dropped for r in results),
            "unanswered": sum(r.unanswered for r in results), "errors": sum(len(r.errors) for r in results),
        },
        "per_client": per_client,
        "server": server_numbers(before, after, warm),
        "samples": samples,
    }


# ------------------------------------------------------------------------------------------------ verdict


def _check(name: str, value, limit, ok: bool | None, unit: str = "") -> dict:
    """One soak criterion; ok None (no data: the server did not export the metric) counts as a failure."""
    return {"check": name, "value": value, "limit": limit, "unit": unit, "pass": bool(ok)}


def verdict(steps: list[dict], args, exit_status: int | None, spawned: bool) -> dict:
    """Pass/fail of the run against the soak criteria, check by check and step by step."""
    checks = []
    mib = 2**20
    for s in steps:
        n, srv, total = s["clients"], s["server"], s["total"]
        prefix = f"{n} clients: "
        checks.append(_check(prefix + "errors", total["errors"], 0, total["errors"] == 0))
        silent = sum(1 for c in s["per_client"] if c["replies"] == 0)
        checks.append(_check(prefix + "clients never answered", silent, 0, silent == 0))
        warm, end = srv.get("rss_bytes_warm"), srv.get("rss_bytes_end")
        growth = None if warm is None or end is None else round((end - warm) / mib, 1)
        checks.append(_check(prefix + "RSS growth after the warmup", growth, args.max_rss_growth_mib,
                             growth is not None and growth < args.max_rss_growth_mib, "MiB"))
        warm, end = srv.get("gpu_reserved_bytes_warm"), srv.get("gpu_reserved_bytes_end")
        if warm is not None or end is not None:
            growth = None if warm is None or end is None else round((end - warm) / mib, 1)
            checks.append(_check(prefix + "CUDA memory (reserved) growth after the warmup", growth,
                                 args.max_gpu_growth_mib, growth is not None and growth < args.max_gpu_growth_mib,
                                 "MiB"))
        start, end = srv.get("open_fds_start"), srv.get("open_fds_end")
        growth = None if start is None or end is None else int(end - start)
        checks.append(_check(prefix + "open file descriptors after the clients left, over the count before",
                             growth, FD_MARGIN, growth is not None and growth <= FD_MARGIN))
        warm, end = srv.get("threads_warm"), srv.get("threads_end")
        growth = None if warm is None or end is None else int(end - warm)
        checks.append(_check(prefix + "threads at the end over the count after the warmup", growth, THREAD_MARGIN,
                             growth is not None and growth <= THREAD_MARGIN))
    if spawned:
        checks.append(_check("server exit status after SIGTERM", exit_status, 0, exit_status == 0))
    return {"pass": all(c["pass"] for c in checks), "checks": checks}


# ------------------------------------------------------------------------------------------------ the server


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(http_base: str, timeout: float, proc: subprocess.Popen | None, log_path: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise SystemExit(f"loadtest: the server exited with status {proc.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(http_base + "/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"loadtest: {http_base}/healthz was not ready after {timeout:.0f} s")
        time.sleep(0.25)


def spawn_server(serve_args: list[str], host: str, max_clients: int, log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port(host)
    # Ours first so the user's own options win; the port last, because we need to know it.
    command = [*SERVE, "--host", host, "--max-clients", str(max_clients), *serve_args, "--port", str(port)]
    log = log_path.open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "160"},
                            start_new_session=True)
    proc.command = command  # type: ignore[attr-defined]
    return proc, port


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# ------------------------------------------------------------------------------------------------ main


def split_serve_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(this script's arguments, the ones after -- that go to `turbostream serve`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv, serve_args = split_serve_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Arguments after -- go to "
                                "`turbostream serve` (with --spawn-server).")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="WebSocket URL of a running server, e.g. ws://127.0.0.1:8000/ws")
    target.add_argument("--spawn-server", action="store_true", help="start `turbostream serve` on a free port")
    target.add_argument("--markdown", metavar="JSON", help="print a Markdown table of an earlier run's JSON; no run")
    p.add_argument("--clients", default="1,4,8", help="client counts, one step each (default: %(default)s)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per step (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds at the start of each step "
                   "(default: %(default)s)")
    p.add_argument("--rate", type=float, default=0.0, help="frames/s each client sends at most; 0: as fast as "
                   "replies allow (default)")
    p.add_argument("--inflight", type=int, default=1, help="frames a client may have unanswered (default: 1)")
    p.add_argument("--size", default=None, metavar="N|WxH", help="JPEG size sent (default: the engine's size)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality of the frames sent (default: 85)")
    p.add_argument("--frames", type=int, default=16, help="distinct frames cycled through (default: 16)")
    p.add_argument("--token", help="the server's --token")
    p.add_argument("--host", default="127.0.0.1", help="interface of a spawned server (default: %(default)s)")
    p.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds to wait for a spawned server's /healthz (model download, graph capture; default 900)")
    p.add_argument("--server-log", help="file for a spawned server's output (default: a temporary file)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--sample-every", type=float, default=10.0, metavar="S",
                   help="seconds between samples of the server's memory, descriptors and threads (default: 10)")
    p.add_argument("--soak", action="store_true", help="exit status 1 when the verdict fails (not only on errors)")
    p.add_argument("--max-rss-growth-mib", type=float, default=50.0, metavar="MIB",
                   help="soak criterion: server RSS growth from the end of the warmup (default: %(default)s)")
    p.add_argument("--max-gpu-growth-mib", type=float, default=50.0, metavar="MIB",
                   help="soak criterion: CUDA memory (reserved) growth from the end of the warmup "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    try:
        args.client_counts = [int(x) for x in args.clients.split(",") if x.strip()]
    except ValueError:
        p.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if not args.client_counts or min(args.client_counts) < 1 or max(args.client_counts) > MAX_CLIENTS:
        p.error(f"--clients: each count must be between 1 and {MAX_CLIENTS}")
    if not 0.1 <= args.duration <= MAX_STEP_S or not 0 <= args.warmup <= MAX_STEP_S:
        p.error(f"--duration must be 0.1..{MAX_STEP_S:.0f} s and --warmup 0..{MAX_STEP_S:.0f} s")
    if len(args.client_counts) * (args.duration + args.warmup + DRAIN_S) > MAX_TOTAL_S:
        p.error(f"the sweep would run longer than {MAX_TOTAL_S:.0f} s; fewer steps or a shorter --duration")
    if not 1 <= args.inflight <= 8 or args.rate < 0 or not 1 <= args.quality <= 100 or not 1 <= args.frames <= 256:
        p.error("--inflight must be 1..8, --rate >= 0, --quality 1..100, --frames 1..256")
    if not 0.5 <= args.sample_every <= MAX_STEP_S:
        p.error(f"--sample-every must be 0.5..{MAX_STEP_S:.0f} s")
    if serve_args and not args.spawn_server:
        p.error("arguments after -- are for --spawn-server")
    return args, serve_args


def table(steps: list[dict]) -> str:
    head = (f"{'clients':>7} {'fps/client':>11} {'total fps':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
            f"{'dropped':>7} {'errors':>6} {'call ms':>8} {'batch':>6} {'RSS MiB':>13}")
    lines = [head, "-" * len(head)]
    for s in steps:
        t, srv, lat = s["total"], s["server"], s["total"]["latency_ms"]
        rss = "-"
        if srv["rss_bytes_start"] and srv["rss_bytes_end"]:
            rss = f"{srv['rss_bytes_start'] / 2**20:.0f}->{srv['rss_bytes_end'] / 2**20:.0f}"

        def f(v, spec=".1f"):
            return "-" if v is None else format(v, spec)

        lines.append(
            f"{s['clients']:>7} {f(t['fps_per_client_min']):>5}-{f(t['fps_per_client_mean']):<5} {f(t['fps']):>9} "
            f"{f(lat['p50']):>8} {f(lat['p95']):>8} {f(lat['p99']):>8} {t['dropped']:>7} {t['errors']:>6} "
            f"{f(srv['engine_call_ms_mean'], '.2f'):>8} {f(srv['batch_size_mean'], '.2f'):>6} {rss:>13}"
        )
    return "\n".join(lines)


async def sweep(args, url: str, http_base: str) -> tuple[list[dict], dict]:
    ready_info: dict = {}
    # One connection first: the engine's size (for the frames) and a warm server.
    probe = ClientResult(-1)
    loop = asyncio.get_running_loop()
    t = loop.time()
    await run_client(0, url, make_frames(1, 64, 64, 80), argparse.Namespace(inflight=1, rate=0.0), t, t + 0.5,
                     probe, ready_info)
    if not ready_info:
        raise SystemExit(f"loadtest: could not stream to {url}: {'; '.join(probe.errors) or 'no ready message'}")
    if args.size:
        parts = [int(x) for x in args.size.lower().split("x")]
        width, height = (parts[0], parts[0]) if len(parts) == 1 else parts
    else:
        width, height = ready_info["width"], ready_info["height"]
    frames = make_frames(args.frames, width, height, args.quality)
    args.frame_size = (width, height)
    args.jpeg_bytes_mean = int(np.mean([len(f) for f in frames]))
    steps = []
    for n in args.client_counts:
        step = await run_step(n, url, frames, args, http_base, ready_info)
        steps.append(step)
        print(table([step]).splitlines()[-1] if steps[1:] else table([step]), flush=True)
    return steps, ready_info


def markdown(report: dict) -> str:
    """A README table of a report: one row per step."""
    srv, st = report["server"], report["settings"]
    lines = [
        f"`{report['server'].get('model')}` at {srv.get('width')}x{srv.get('height')} on {srv.get('device')}; "
        f"{st['frame_size'][0]}x{st['frame_size'][1]} JPEGs (~{st['jpeg_bytes_mean'] // 1024} KiB), "
        f"{st['inflight']} in flight per client, {st['duration_s']:g} s per step, {report['started']}",
        "",
        "| clients | frames/s per client (min / mean) | total frames/s | p50 ms | p95 ms | p99 ms | dropped | errors "
        "| engine call ms | mean batch | server RSS MiB (start -> end) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in report["steps"]:
        t, sv, lat = s["total"], s["server"], s["total"]["latency_ms"]
        rss = (f"{sv['rss_bytes_start'] / 2**20:.0f} -> {sv['rss_bytes_end'] / 2**20:.0f}"
               if sv.get("rss_bytes_start") and sv.get("rss_bytes_end") else "-")
        lines.append(
            f"| {s['clients']} | {t['fps_per_client_min']:.1f} / {t['fps_per_client_mean']:.1f} | {t['fps']:.1f} "
            f"| {lat['p50']} | {lat['p95']} | {lat['p99']} | {t['dropped']} | {t['errors']} "
            f"| {sv['engine_call_ms_mean']} | {sv['batch_size_mean']} | {rss} |"
        )
    if report.get("verdict"):  # reports from before the verdict existed have none
        lines += ["", verdict_text(report["verdict"], "- ")]
    return "\n".join(lines)


def verdict_text(v: dict, bullet: str = "  ") -> str:
    lines = [f"soak verdict: {'PASS' if v['pass'] else 'FAIL'}"]
    for c in v["checks"]:
        limit = "" if c["limit"] is None else f" (limit {c['limit']}{' ' + c['unit'] if c['unit'] else ''})"
        lines.append(f"{bullet}{'ok  ' if c['pass'] else 'FAIL'} {c['check']}: {c['value']}{limit}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, serve_args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    proc = None
    log_path = None
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.spawn_server:
        log_path = Path(args.server_log) if args.server_log else Path(tempfile.mkstemp(".log", "turbostream-")[1])
        proc, port = spawn_server(serve_args, args.host, max(args.client_counts), log_path)
        host = f"[{args.host}]" if ":" in args.host else args.host
        http_base, url = f"http://{host}:{port}", f"ws://{host}:{port}/ws"
        print(f"loadtest: started `{' '.join(proc.command[3:])}` (log: {log_path}); waiting for /healthz",
              flush=True)
    else:
        parts = urlsplit(args.url)
        http_base = urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, "", "", ""))
        url = args.url
    if args.token:
        parts = urlsplit(url)
        url = urlunsplit(parts._replace(query=urlencode({"token": args.token})))
    try:
        wait_healthy(http_base, args.ready_timeout if proc else 30.0, proc, log_path)
        at_start = scrape(http_base)
        steps, ready = asyncio.run(sweep(args, url, http_base))
        at_end = scrape(http_base)
    finally:
        exit_status = stop_server(proc) if proc is not None else None
    report = {
        "tool": "scripts/loadtest.py",
        "started": started,
        "url": url.split("?")[0],
        "server": {
            "model": ready.get("model"), "random_weights": ready.get("random_weights"), "device": ready.get("device"),
            "width": ready.get("width"), "height": ready.get("height"), "params": ready.get("params"),
            "command": proc.command[3:] if proc else None, "exit_status": exit_status,
            "rss_bytes_start": at_start.get("process_resident_memory_bytes"),
            "rss_bytes_end": at_end.get("process_resident_memory_bytes"),
            "open_fds_start": at_start.get("process_open_fds"), "open_fds_end": at_end.get("process_open_fds"),
            "threads_start": at_start.get("turbostream_process_threads"),
            "threads_end": at_end.get("turbostream_process_threads"),
            "gpu_reserved_bytes_start": at_start.get("turbostream_gpu_memory_reserved_bytes"),
            "gpu_reserved_bytes_end": at_end.get("turbostream_gpu_memory_reserved_bytes"),
        },
        "settings": {
            "clients": args.client_counts, "duration_s": args.duration, "warmup_s": args.warmup,
            "rate": args.rate or None, "inflight": args.inflight, "frame_size": list(args.frame_size),
            "jpeg_quality": args.quality, "jpeg_bytes_mean": args.jpeg_bytes_mean, "distinct_frames": args.frames,
            "sample_every_s": args.sample_every, "max_rss_growth_mib": args.max_rss_growth_mib,
            "max_gpu_growth_mib": args.max_gpu_growth_mib, "fd_margin": FD_MARGIN, "thread_margin": THREAD_MARGIN,
        },
        "host": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "steps": steps,
        "errors": sum(s["total"]["errors"] for s in steps),
        "verdict": verdict(steps, args, exit_status, proc is not None),
    }
    print(verdict_text(report["verdict"]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"loadtest: wrote {args.json}")
    if report["errors"]:
        return 1
    return 1 if args.soak and not report["verdict"]["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
