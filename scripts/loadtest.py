#!/usr/bin/env python3
"""Load test of `turbostream serve`: N WebSocket clients on loopback stream JPEGs; latency, frames/s, drops, memory.

Each step of the sweep (--clients 1,4,8) runs that many clients at once for --duration seconds (the first --warmup
seconds are not measured). Every client sets its own prompt and seed, then streams pre-encoded JPEGs (the engine's
size unless --size says otherwise) with at most --inflight frames unanswered, at most --rate frames/s (0: as fast as
the window allows). The server answers each frame with {"type": "frame", "seq": n} and the JPEG, so every reply is
matched to its own send time; frames skipped by the server (a newer frame replaced them) count as dropped, and
frames it answered with its last output without an engine call (the `similarity` control: "skipped" in the header)
as skipped, apart from frames/s and latency.

Reported per client and in total: frames/s, send-to-reply latency p50/p95/p99, dropped, skipped and errors; per step,
from the server's /metrics: resident memory (and CUDA memory), open file descriptors and threads before the clients
connect, after the warmup and after they left, a sample of them every --sample-every seconds, mean engine-call time
and batch size. Every report carries a verdict against the soak criteria (no errors, every client answered, RSS and
CUDA memory growth after the warmup under --max-rss-growth-mib / --max-gpu-growth-mib, file descriptors back to
where they were once the clients left, no thread growth after the warmup, a spawned server exiting 0 on SIGTERM);
with --soak a failed verdict is exit status 1. The run is bounded (at most 64 clients a step, 600 s a step, one
hour in all) and stops by itself.

Viewers (--viewers, against a server started with --source): each step also runs that many viewers of the
broadcast (/view/ws), which only watch. A viewer's frames carry no header, so there is no latency to take: reported
are its frames/s, the gaps between consecutive frames (a stall shows as a long gap), the bytes sent to all viewers,
errors (a refused or lost connection, source_ended) and viewers that got no frame in the window; the verdict checks
the last two. `--clients 1 --viewers 0,16,64` is a sweep of viewers beside one client; `--clients 0 --viewers 64`
watches only. At most 256 viewers a step. --churn S makes every client and viewer close its connection after S
seconds and open a new one at once, all through each step: the verdict then judges what thousands of connections
leave behind.

Behind a load balancer (--url of the balancer): --reconnect makes a client whose connection is lost or refused
connect again, as the browser page does, and --replica-header X-Served-By records which replica took each connection
(deploy/haproxy.cfg sets that header); each step then reports its connections by replica and by device, and how many
were lost or refused. The server numbers then come from whichever replica answered the scrape: read each replica's
/metrics for those.

    # start a server of its own (arguments after -- go to `turbostream serve`):
    python scripts/loadtest.py --clients 1,4,8 --duration 20 --json benchmarks/serve.json \\
        --spawn-server -- --model random --size 512
    # or load a running one:
    python scripts/loadtest.py --url ws://127.0.0.1:8000/ws --clients 4 --duration 10
    # a broadcast to 1, 16 and 64 viewers beside 2 clients:
    python scripts/loadtest.py --clients 2 --viewers 1,16,64 --spawn-server -- --source clip.mp4 --model random
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
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

# The numbers and tables: scripts/loadtest_report.py, next to this file (also when this file is imported by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadtest_report import (  # noqa: E402
    FD_MARGIN,
    THREAD_MARGIN,
    count_by,
    device_numbers,
    markdown,
    percentiles,
    resources,
    scrape,
    server_numbers,
    table,
    verdict,
    verdict_text,
    viewer_line,
)

MAX_CLIENTS = 64
MAX_VIEWERS = 256
MAX_STEP_S = 600.0
MAX_TOTAL_S = 3600.0
DRAIN_S = 3.0  # after a step, how long to wait for replies to frames still in flight
CHURNED = "churned"  # _connection's outcome when --churn ended it: connect again at once
SETTLE_S = 10.0  # after a step, how long the server may take to close the clients' sockets before fds are judged
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
# `python -m turbostream.cli` would load cli.py twice; start the server the way its console script does: entry()
# leaves with os._exit, so a SIGTERM while the model loads (a load test's time limit) exits 0 as `turbostream serve`
# does, not with an abort from a thread inside torch at interpreter exit.
SERVE = [sys.executable, "-c", "from turbostream.cli import entry; entry()", "serve"]


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


# ------------------------------------------------------------------------------------------------ one client


@dataclass
class ClientResult:
    client: int
    sent: int = 0
    replies: int = 0  # all replies, warmup included
    measured: int = 0  # replies inside the measured window that the engine ran
    skipped: int = 0  # replies inside the window answered with the last output (similarity): apart from frames/s
    dropped: int = 0  # frames the server skipped (a later frame was answered first)
    unanswered: int = 0  # still in flight when the step ended (or when a connection was lost)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # --reconnect: every connection (which replica, when, how it ended), and the ones lost or refused.
    connections: list[dict] = field(default_factory=list)
    lost: int = 0  # connections that ended abnormally (1006, 1011, ...): the client connected again
    refused: int = 0  # handshakes refused (HTTP 503, server_full): the client tried again
    churned: int = 0  # connections it closed itself after --churn seconds, to open a new one at once

    def summary(self, window_s: float) -> dict:
        return {
            "client": self.client, "fps": round(self.measured / window_s, 2) if window_s > 0 else None,
            "frames": self.measured, "skipped": self.skipped, "sent": self.sent, "replies": self.replies,
            "dropped": self.dropped,
            "unanswered": self.unanswered, "latency_ms": percentiles(self.latencies),
            "error_count": len(self.errors), "errors": self.errors[:5],
            # With --churn a client opens hundreds: the count, and the last few.
            "connection_count": len(self.connections), "connections": self.connections[-20:], "lost": self.lost,
            "refused": self.refused, "churned": self.churned,
        }


RECONNECT_S = (0.25, 2.0)  # --reconnect: first wait before connecting again, doubling up to the second


async def run_client(index: int, url: str, frames: list[bytes], args, t_measure: float, t_end: float,
                     result: ClientResult, ready_info: dict) -> None:
    """One client for the step; with --reconnect it connects again (0.25 s, doubling to 2 s) after its connection
    is lost or refused, as the browser page does, until the step ends."""
    loop = asyncio.get_running_loop()
    wait = RECONNECT_S[0]
    while True:
        outcome = await _connection(index, url, frames, args, t_measure, t_end, result, ready_info)
        if outcome == CHURNED:
            result.churned += 1
            if loop.time() < t_end:
                continue
            return
        if outcome is None or not getattr(args, "reconnect", False) or loop.time() >= t_end:
            if outcome is not None:
                result.errors.append(outcome)
            return
        if outcome.startswith("refused"):
            result.refused += 1
        else:
            result.lost += 1
            wait = RECONNECT_S[0]  # it had a place: connect again soon
        await asyncio.sleep(min(wait, max(0.0, t_end - loop.time())))
        wait = min(wait * 2, RECONNECT_S[1])


async def _connection(index: int, url: str, frames: list[bytes], args, t_measure: float, t_end: float,
                      result: ClientResult, ready_info: dict) -> str | None:
    """One connection until the step ends, or for --churn seconds; None, CHURNED, or what ended it early
    ('refused: ...', 'lost: ...')."""
    loop = asyncio.get_running_loop()
    sent: dict[int, float] = {}  # seq -> send time, frames not answered yet
    room = asyncio.Event()
    room.set()
    record: dict = {"replica": None, "device": None, "opened_s": None, "replies": 0, "end": None}
    t_start = t_measure - getattr(args, "warmup", 0.0)
    try:
        async with connect(url, max_size=2**25, compression=None, open_timeout=60, close_timeout=5) as ws:
            header_name = getattr(args, "replica_header", None)
            record["replica"] = ws.response.headers.get(header_name) if header_name else None
            ready = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if ready.get("type") != "ready":
                if ready.get("code") == "server_full":
                    return f"refused: {ready.get('message')}"
                result.errors.append(f"{ready.get('code')}: {ready.get('message')}")
                return None
            record.update(device=ready.get("device"), opened_s=round(loop.time() - t_start, 2))
            result.connections.append(record)
            churn = getattr(args, "churn", 0.0)
            t_stop = min(t_end, loop.time() + churn) if churn else t_end  # when this connection stops sending
            ready_info.update(ready)
            await ws.send(json.dumps({"type": "config", "prompt": PROMPTS[index % len(PROMPTS)], "seed": index}))

            async def receive() -> None:
                try:
                    await receive_all()
                finally:
                    room.set()  # a lost connection wakes the sender at once

            async def receive_all() -> None:
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
                    seq, skipped, header = header["seq"], bool(header.get("skipped")), None
                    t_send = sent.pop(seq, None)
                    for older in [s for s in sent if s < seq]:
                        del sent[older]
                        result.dropped += 1
                    result.replies += 1
                    record["replies"] += 1
                    if t_send is not None and t_measure <= now <= t_end:
                        # A frame the server answered with its last output (the similarity skip) took no engine
                        # call: counted apart, or frames/s and latency would mix both.
                        if skipped:
                            result.skipped += 1
                        else:
                            result.measured += 1
                            result.latencies.append(now - t_send)
                    room.set()

            receiver = asyncio.create_task(receive())
            period = 1.0 / args.rate if args.rate > 0 else 0.0
            next_due = loop.time()
            seq = 0
            while loop.time() < t_stop and not receiver.done():
                if len(sent) >= args.inflight:
                    room.clear()
                    try:
                        await asyncio.wait_for(room.wait(), max(0.0, t_stop - loop.time()))
                    except TimeoutError:
                        break
                    continue
                if period:
                    delay = next_due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    # Behind schedule (the window held us back): start over from now, no catch-up burst.
                    next_due = max(next_due + period, loop.time())
                if loop.time() >= t_stop:
                    break
                seq += 1
                sent[seq] = loop.time()
                await ws.send(frames[(seq + index) % len(frames)])
                result.sent += 1
            drain_until = loop.time() + DRAIN_S
            while sent and loop.time() < drain_until and not receiver.done():
                await asyncio.sleep(0.01)
            result.unanswered += len(sent)
            if receiver.done() and not receiver.cancelled() and isinstance(receiver.exception(), ConnectionClosed):
                raise receiver.exception()
            receiver.cancel()
            if loop.time() < t_end and receiver.done():  # the server closed it (1000, 1001) before the step ended
                raise ConnectionClosed(ws.close_rcvd, ws.close_sent)
            if t_stop < t_end:  # leaving the block closes it (1000); the caller opens the next
                record["end"] = CHURNED
                return CHURNED
            record["end"] = "step ended"
    except InvalidStatus as exc:
        return f"refused: HTTP {exc.response.status_code}"
    except InvalidHandshake as exc:  # closed before an answer (a server past its socket limit), a bad answer
        return f"lost: the handshake failed: {exc}"
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        record["end"] = f"closed {code}"
        record["closed_s"] = round(loop.time() - t_start, 2)
        result.unanswered += len(sent)
        sent.clear()
        if code not in (1000, 1001) or (getattr(args, "reconnect", False) and loop.time() < t_end):
            return f"lost: connection closed: {exc}"
    except (OSError, TimeoutError) as exc:
        return f"lost: connection failed: {exc!r}"
    return None


# ------------------------------------------------------------------------------------------------ one viewer


@dataclass
class ViewerResult:
    viewer: int
    received: int = 0  # all frames, warmup included
    frames: int = 0  # frames that arrived inside the measured window
    bytes: int = 0  # their JPEG bytes
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive frames, both inside the window
    states: list[str] = field(default_factory=list)  # the source's states as announced (starting, live, ...)
    errors: list[str] = field(default_factory=list)
    connections: int = 0  # connections that got `ready`
    churned: int = 0  # closed by the viewer itself after --churn seconds, and opened again

    def summary(self, window_s: float) -> dict:
        return {
            "viewer": self.viewer, "fps": round(self.frames / window_s, 2) if window_s > 0 else None,
            "frames": self.frames, "received": self.received, "bytes": self.bytes,
            "gap_ms": percentiles(self.gaps), "states": self.states[-8:], "connections": self.connections,
            "churned": self.churned, "error_count": len(self.errors), "errors": self.errors[:5],
        }


def viewer_url(client_url: str) -> str:
    """The broadcast's /view/ws next to a server's /ws (its ?token= kept)."""
    parts = urlsplit(client_url)
    path = parts.path[: -len("/ws")] if parts.path.endswith("/ws") else parts.path.rstrip("/")
    return urlunsplit(parts._replace(path=path + "/view/ws"))


async def run_viewer(index: int, url: str, t_measure: float, t_end: float, result: ViewerResult,
                     churn: float = 0.0) -> None:
    """One viewer of the broadcast until the step ends: every JPEG counted and timed (no frame headers: a viewer
    only watches), errors and the source's states kept. A refused or lost connection is an error. With churn, it
    closes its connection every `churn` seconds and opens a new one at once."""
    loop = asyncio.get_running_loop()
    while await _view_once(url, t_measure, t_end, result, churn) and loop.time() < t_end:
        result.churned += 1


async def _view_once(url: str, t_measure: float, t_end: float, result: ViewerResult, churn: float) -> bool:
    """One viewer connection until the step ends or for `churn` seconds; True when churn ended it."""
    loop = asyncio.get_running_loop()
    last = None  # arrival of the previous frame inside the window (gaps are taken within a connection)
    try:
        async with connect(url, max_size=2**25, compression=None, open_timeout=60, close_timeout=5) as ws:
            ready = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if ready.get("type") != "ready":
                result.errors.append(f"{ready.get('code')}: {ready.get('message')}")
                return False
            result.connections += 1
            t_stop = min(t_end, loop.time() + churn) if churn else t_end
            while (left := t_stop - loop.time()) > 0:
                try:
                    message = await asyncio.wait_for(ws.recv(), left)
                except TimeoutError:
                    break
                now = loop.time()
                if isinstance(message, str):
                    msg = json.loads(message)
                    if msg.get("type") == "error":
                        result.errors.append(f"{msg.get('code')}: {msg.get('message')}")
                    elif msg.get("type") == "source":
                        result.states.append(msg.get("state"))
                    continue
                result.received += 1
                if t_measure <= now <= t_end:
                    result.frames += 1
                    result.bytes += len(message)
                    if last is not None:
                        result.gaps.append(now - last)
                    last = now
            return t_stop < t_end
    except InvalidStatus as exc:
        result.errors.append(f"refused: HTTP {exc.response.status_code}")
    except InvalidHandshake as exc:
        result.errors.append(f"lost: the handshake failed: {exc}")
    except ConnectionClosed as exc:
        result.errors.append(f"lost: connection closed: {exc}")
    except (OSError, TimeoutError) as exc:
        result.errors.append(f"lost: connection failed: {exc!r}")
    return False


def viewer_totals(results: list[ViewerResult], window_s: float) -> dict:
    """A step's viewers together: frames/s (the slowest, mean and fastest viewer), the gaps between frames over all
    of them, bytes a second sent to all, errors, and viewers that got no frame in the window."""
    fps = [r.frames / window_s for r in results] if window_s > 0 else []
    return {
        "count": len(results), "frames": sum(r.frames for r in results),
        "fps_min": round(min(fps), 2) if fps else None, "fps_mean": round(sum(fps) / len(fps), 2) if fps else None,
        "fps_max": round(max(fps), 2) if fps else None,
        "gap_ms": percentiles([g for r in results for g in r.gaps]),
        "mbytes_per_s": round(sum(r.bytes for r in results) / window_s / 1e6, 3) if window_s > 0 else None,
        "errors": sum(len(r.errors) for r in results), "silent": sum(1 for r in results if r.frames == 0),
    }


async def settle(http_base: str, max_fds: float | None, timeout: float = SETTLE_S) -> dict[str, float]:
    """Scrape until no client or viewer is connected (and open fds are at most max_fds) or timeout; the last
    scrape."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        scraped = await asyncio.to_thread(scrape, http_base)
        fds = scraped.get("process_open_fds")
        gone = scraped.get("turbostream_clients", 0) == 0 and scraped.get("turbostream_viewers", 0) == 0
        if gone and (max_fds is None or fds is None or fds <= max_fds):
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


async def run_step(n: int, url: str, frames: list[bytes], args, http_base: str, ready_info: dict,
                   viewers: int = 0) -> dict:
    """One step: n clients streaming to /ws and `viewers` viewers of the broadcast (/view/ws), all at once."""
    loop = asyncio.get_running_loop()
    before = await settle(http_base, None)  # the previous step's (or the probe's) clients are gone
    t0 = loop.time()
    t_measure, t_end = t0 + args.warmup, t0 + args.warmup + args.duration
    results = [ClientResult(i) for i in range(n)]
    watching = [ViewerResult(i) for i in range(viewers)]
    samples: list[dict] = []
    sampler = asyncio.create_task(sample_resources(http_base, args.sample_every, t0, samples))

    async def scrape_at(t: float) -> tuple[float, dict[str, float]]:
        await asyncio.sleep(max(0.0, t - loop.time()))
        scraped = await asyncio.to_thread(scrape, http_base)
        return loop.time(), scraped

    # The measured window's ends: resources after the warmup, and the device's timeline over the window itself.
    warm_task, end_task = asyncio.create_task(scrape_at(t_measure)), asyncio.create_task(scrape_at(t_end))
    view_url = viewer_url(url)
    await asyncio.gather(*(run_client(i, url, frames, args, t_measure, t_end, results[i], ready_info)
                           for i in range(n)),
                         *(run_viewer(i, view_url, t_measure, t_end, watching[i], args.churn)
                           for i in range(viewers)))
    (t_warm, warm), (t_window_end, window_end) = await warm_task, await end_task
    after = await settle(http_base, before.get("process_open_fds"))
    sampler.cancel()
    if after:
        samples.append({"t": round(loop.time() - t0, 1), **resources(after)})
    window = args.duration
    # The measured window on the wall clock, for whoever keeps a timeline of its own (serve_sim.py's device).
    unix_now, loop_now = time.time(), loop.time()
    measured_unix = [round(unix_now - (loop_now - t), 4) for t in (t_measure, t_end)]
    per_client = [r.summary(window) for r in results]
    all_latencies = [x for r in results for x in r.latencies]
    fps = [c["fps"] or 0.0 for c in per_client]
    return {
        "clients": n,
        "viewers": viewers,
        "measured_s": window,
        "measured_unix": measured_unix,
        "total": {
            "fps": round(sum(fps), 2), "fps_per_client_min": round(min(fps), 2) if fps else None,
            "fps_per_client_mean": round(sum(fps) / n, 2) if fps else None, "frames": sum(r.measured for r in results),
            "skipped": sum(r.skipped for r in results),
            "latency_ms": percentiles(all_latencies), "dropped": sum(r.dropped for r in results),
            "unanswered": sum(r.unanswered for r in results), "errors": sum(len(r.errors) for r in results),
            "lost": sum(r.lost for r in results), "refused": sum(r.refused for r in results),
            "connections": sum(len(r.connections) for r in results) + sum(v.connections for v in watching),
            "connections_by_replica": count_by(c["replica"] for r in results for c in r.connections),
            "connections_by_device": count_by(c["device"] for r in results for c in r.connections),
        },
        "per_client": per_client,
        "viewer_total": viewer_totals(watching, window),
        "per_viewer": [v.summary(window) for v in watching],
        "server": server_numbers(before, after, warm, window_end),
        "device": device_numbers(warm, window_end, t_window_end - t_warm),
        "samples": samples,
    }


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


def spawn_server(serve_args: list[str], host: str, max_clients: int, log_path: Path,
                 max_viewers: int = 0) -> tuple[subprocess.Popen, int]:
    port = free_port(host)
    # Ours first so the user's own options win; the port last, because we need to know it. The sweep's first
    # connection is a client, so there is a client place even in a run of viewers only.
    ours = ["--host", host, "--max-clients", str(max(1, max_clients))]
    if max_viewers:
        ours += ["--max-viewers", str(max_viewers)]
    command = [*SERVE, *ours, *serve_args, "--port", str(port)]
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
    p.add_argument("--viewers", default="0", help="viewers of the broadcast (/view/ws; the server needs --source) "
                   "in every step, or counts, one step each, with one --clients count (default: %(default)s)")
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
    p.add_argument("--reconnect", action="store_true", help="a client whose connection is lost or refused connects "
                   "again (0.25 s, doubling to 2 s), as the browser page does; counted as lost / refused, not errors")
    p.add_argument("--churn", type=float, default=0.0, metavar="S", help="every client and viewer closes its "
                   "connection after S seconds and opens a new one at once, all through each step: what a "
                   "connection's life leaves behind shows in the verdict (default 0: one connection each)")
    p.add_argument("--replica-header", metavar="NAME", help="response header naming the replica that took each "
                   "connection behind a load balancer (deploy/haproxy.cfg sets X-Served-By)")
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
    counts = {}
    for name, limit in (("clients", MAX_CLIENTS), ("viewers", MAX_VIEWERS)):
        try:
            counts[name] = [int(x) for x in getattr(args, name).split(",") if x.strip()]
        except ValueError:
            p.error(f"--{name} must be comma-separated integers, got {getattr(args, name)!r}")
        if not counts[name] or min(counts[name]) < 0 or max(counts[name]) > limit:
            p.error(f"--{name}: each count must be between 0 and {limit}")
    clients, viewers = counts["clients"], counts["viewers"]
    if len(clients) > 1 and len(viewers) > 1:
        p.error("--clients and --viewers cannot both list several counts: one of them gives the steps")
    # One step per count of the list that has several; the single count of the other is in every step.
    args.steps = [(c, v) for c in clients for v in viewers]
    if any(c + v == 0 for c, v in args.steps):
        p.error("--clients: each step needs at least one client or viewer")
    args.client_counts = [c for c, _ in args.steps]
    args.viewer_counts = [v for _, v in args.steps]
    if not 0.1 <= args.duration <= MAX_STEP_S or not 0 <= args.warmup <= MAX_STEP_S:
        p.error(f"--duration must be 0.1..{MAX_STEP_S:.0f} s and --warmup 0..{MAX_STEP_S:.0f} s")
    if len(args.steps) * (args.duration + args.warmup + DRAIN_S) > MAX_TOTAL_S:
        p.error(f"the sweep would run longer than {MAX_TOTAL_S:.0f} s; fewer steps or a shorter --duration")
    if not 1 <= args.inflight <= 8 or args.rate < 0 or not 1 <= args.quality <= 100 or not 1 <= args.frames <= 256:
        p.error("--inflight must be 1..8, --rate >= 0, --quality 1..100, --frames 1..256")
    if args.churn and not 0.2 <= args.churn <= MAX_STEP_S:
        p.error(f"--churn must be 0.2..{MAX_STEP_S:.0f} s (or 0: no churn)")
    if not 0.5 <= args.sample_every <= MAX_STEP_S:
        p.error(f"--sample-every must be 0.5..{MAX_STEP_S:.0f} s")
    if serve_args and not args.spawn_server:
        p.error("arguments after -- are for --spawn-server")
    return args, serve_args


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
    for n, viewers in args.steps:
        step = await run_step(n, url, frames, args, http_base, ready_info, viewers)
        steps.append(step)
        if args.json:  # the client counts done so far, in case the run is cut off (a device's time limit)
            partial = Path(args.json + ".partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"tool": "scripts/loadtest.py", "partial": True, "url": url.split("?")[0],
                                           "ready": ready_info, "steps": steps}, indent=2) + "\n")
        print(table([step]).splitlines()[-1] if steps[1:] else table([step]), flush=True)
        if viewers:
            print("        " + viewer_line(step), flush=True)
        t = step["total"]
        if args.churn:
            print(f"        {t['connections']} connections opened and closed ({args.churn:g} s each)", flush=True)
        if args.reconnect or args.replica_header:
            print(f"        connections by replica {t['connections_by_replica']}, by device "
                  f"{t['connections_by_device']}; lost {t['lost']}, refused {t['refused']}", flush=True)
    return steps, ready_info


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
        proc, port = spawn_server(serve_args, args.host, max(args.client_counts), log_path, max(args.viewer_counts))
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
            "clients": args.client_counts, "viewers": args.viewer_counts, "duration_s": args.duration,
            "warmup_s": args.warmup, "rate": args.rate or None, "inflight": args.inflight,
            "churn_s": args.churn or None, "frame_size": list(args.frame_size),
            "jpeg_quality": args.quality, "jpeg_bytes_mean": args.jpeg_bytes_mean, "distinct_frames": args.frames,
            "sample_every_s": args.sample_every, "max_rss_growth_mib": args.max_rss_growth_mib,
            "max_gpu_growth_mib": args.max_gpu_growth_mib, "fd_margin": FD_MARGIN, "thread_margin": THREAD_MARGIN,
        },
        "host": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "steps": steps,
        "errors": sum(s["total"]["errors"] + s["viewer_total"]["errors"] for s in steps),
        "verdict": verdict(steps, args, exit_status, proc is not None),
    }
    print(verdict_text(report["verdict"]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        Path(args.json + ".partial").unlink(missing_ok=True)
        print(f"loadtest: wrote {args.json}")
    if report["errors"]:
        return 1
    return 1 if args.soak and not report["verdict"]["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
