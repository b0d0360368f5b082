#!/usr/bin/env python3
"""Red-team run of `turbostream serve` (issue 9): each attack beside a well-behaved client, judged against bounds.

For every attack a well-behaved client streams beside it (send a JPEG, wait for its result, repeat) and the script
records: that client's largest gap between results (seconds, from the attack's start until the client has a result
again after the attack ended), the server's RSS before / at its peak / after (`process_resident_memory_bytes` in
/metrics, sampled every --sample-every seconds), the peak of `turbostream_send_buffer_bytes`, whether the server
answered the attack as expected, and a PASS/FAIL verdict against the bounds (--max-gap-s, --max-rss-growth-mib,
--max-send-buffer-kib, --answer-timeout-s, --max-exit-s; defaults shown by --help).

Attacks (--attacks a,b,c; all by default; each bounded in time and count):

    decode-bomb        two ~200 KiB progressive JPEGs declaring 4096x4096 with ~20,000 scans, on 2 connections that
                       then disconnect; expected: bad_image quickly
    decode-bomb-min    the same at the smallest size the pixels-per-byte check lets through (MAX_PIXELS_PER_BYTE)
    ping-flood         3 raw clients writing masked pings and never reading; expected: closed by the server
    ping-flood-token   the same on /ws?token=wrong of a server with --token
    handshake-memory   300 sockets sending ~1 MiB of headers each without finishing the handshake; expected: RSS bound
    sigterm-decode     SIGTERM while two decode bombs are decoding (only with --spawn-server); expected: exit 0 soon
    duplicate-origin   two Origin headers on /ws; expected: HTTP 403 (not 500, no traceback in the server log)
    token-plus         ?token=a+b typed as-is, server --token a+b; expected: accepted
    view-token         /view/ws without the token on a server with --token and --source; expected: refused
    text-bytes         a config of ~260 KB of emoji (under 64 Ki characters); expected: bad_message

    # a server of its own per attack (arguments after -- go to `turbostream serve`):
    python scripts/redteam.py --spawn-server -- --model tiny-random --device cpu --size 64
    # a running server on loopback (attacks needing a token or a source it lacks are skipped):
    python scripts/redteam.py --url http://127.0.0.1:8000/ --token T --attacks ping-flood,duplicate-origin
    # how long the bombs take to decode here (cv2 and PIL), no server:
    python scripts/redteam.py --measure-bombs

Loopback only: a --url whose host is not a loopback name or address is refused. Exit status 1 when an attack
FAILs. The JPEG-bomb builders and raw-socket helpers (jpeg_bomb, count_scans, handshake_request, raw_connect,
ws_frame, flood_pings, ...) are importable: `sys.path.insert(0, "scripts"); import redteam`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import itertools
import json
import os
import platform
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadtest  # make_frames, scrape, spawn_server, wait_healthy: the load test's conventions

from turbostream.codec import count_scans  # the server's own scan counter: what the bombs must trip
from turbostream.config import Limits

SERVER_MAX_PIXELS_PER_BYTE = Limits().max_pixels_per_byte

MIB = 2**20
MAX_TOTAL_S = 1800.0  # the whole run, whatever the options say
MAX_SOCKETS = 1000  # handshake-memory sockets at most
MAX_FLOOD_S = 60.0
RSS = "process_resident_memory_bytes"
SEND_BUFFER = "turbostream_send_buffer_bytes"


# ------------------------------------------------------------------------------------------------ JPEG bombs


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_bomb(width: int = 4096, height: int = 4096, scans: int = 20000, full_resolution: bool = False) -> bytes:
    """A valid progressive JPEG (SOF2) of width x height whose cost is `scans` nearly empty scans.

    YCbCr with 2x2-subsampled chroma: one interleaved DC first scan (successive approximation Al=1), then `scans`
    DC refinement scans (Ah=1, Al=0) of one component each, with no entropy-coded data at all, then EOI. libjpeg
    decodes a missing scan as zeros ("Corrupt JPEG data: premature end of data segment", a warning) but still walks
    every block of the component for each scan, and repeats of a refinement are only a warning too (bogus
    progression). Every scan costs 10 bytes. `full_resolution` scans the luma component (4x the blocks of a chroma
    scan: the most decode time per byte); otherwise Cb (a ~200 KiB file of 20,000 scans: seconds, not minutes).
    The result decodes, with cv2.imdecode and PIL, to a uniform gray width x height image.
    """
    if not (1 <= width <= 65535 and 1 <= height <= 65535 and scans >= 0):
        raise ValueError("width and height must be 1..65535 and scans >= 0")
    out = bytearray(b"\xff\xd8")
    out += _segment(0xDB, b"\x00" + bytes([1] * 64))  # quantization table 0: all ones
    components = bytes([1, 0x22, 0, 2, 0x11, 0, 3, 0x11, 0])  # Y 2x2, Cb 1x1, Cr 1x1, all with table 0
    out += _segment(0xC2, bytes([8]) + struct.pack(">HH", height, width) + bytes([3]) + components)
    out += _segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # DC table 0: one 1-bit code, category 0
    out += _segment(0xDA, bytes([3, 1, 0x00, 2, 0x00, 3, 0x00]) + bytes([0, 0, 0x01]))  # DC first scan, Al=1
    component = 1 if full_resolution else 2
    out += _segment(0xDA, bytes([1, component, 0x00]) + bytes([0, 0, 0x10])) * scans  # DC refinement Ah=1 Al=0
    out += b"\xff\xd9"
    return bytes(out)


def jpeg_bomb_within_ratio(width: int = 4096, height: int = 4096,
                           max_pixels_per_byte: int = SERVER_MAX_PIXELS_PER_BYTE, margin: int = 16) -> bytes:
    """The smallest jpeg_bomb(full_resolution=True) that a `width * height <= max_pixels_per_byte * len(data)`
    check lets through (len(data) just over width*height/max_pixels_per_byte, plus `margin` bytes)."""
    overhead = len(jpeg_bomb(width, height, 0, True))
    need = -(-width * height // max_pixels_per_byte) + margin
    scans = max(0, -(-(need - overhead) // 10))
    return jpeg_bomb(width, height, scans, True)


def measure_bombs(scans: int, with_pil: bool = True) -> list[dict]:
    """Decode each bomb once here with cv2.imdecode (and PIL): seconds, bytes, scans, declared size."""
    import cv2
    import numpy as np

    rows = []
    for name, data in (("decode-bomb", jpeg_bomb(scans=scans)), ("decode-bomb-min", jpeg_bomb_within_ratio())):
        t0 = time.perf_counter()
        n_scans = count_scans(data)
        t_count = time.perf_counter() - t0
        t0 = time.perf_counter()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        row = {"bomb": name, "bytes": len(data), "scans": n_scans, "count_scans_ms": round(t_count * 1e3, 2),
               "pixels_per_byte": round(4096 * 4096 / len(data), 1),
               "cv2_s": round(time.perf_counter() - t0, 2), "cv2_shape": None if img is None else list(img.shape)}
        if with_pil:
            import io

            from PIL import Image

            t0 = time.perf_counter()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                row["pil_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def self_test() -> None:
    """A quick check that the builders are usable (a second or so, no server): small bombs decode with cv2 to a
    gray image of their declared size, count_scans counts their scans, the edge bomb passes the ratio check by a
    hair, and ws_frame / read_frame agree. Raises AssertionError on a failure."""
    import cv2
    import numpy as np

    for full in (False, True):
        data = jpeg_bomb(320, 240, 40, full_resolution=full)
        assert len(data) == len(jpeg_bomb(320, 240, 0, full)) + 400, "10 bytes a scan"
        assert count_scans(data) == 41 and count_scans(data, limit=5) == 5
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (240, 320, 3), "the bomb must decode"
        assert int(img.min()) == int(img.max()) == 128, "to uniform gray"
    edge = jpeg_bomb_within_ratio(4096, 4096)
    assert 4096 * 4096 <= SERVER_MAX_PIXELS_PER_BYTE * len(edge) < 4096 * 4096 + SERVER_MAX_PIXELS_PER_BYTE * 64
    ok, buf = cv2.imencode(".jpg", np.zeros((64, 64, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok and count_scans(buf.tobytes()) > 1 and count_scans(b"not a jpeg") == 0
    a, b = socket.socketpair()
    with a, b:
        a.sendall(ws_frame(0x9, b"hello", mask=False) + ws_frame(0x1, b"x" * 70000, mask=False))
        opcode, payload, rest = read_frame(b, timeout=2)
        assert (opcode, payload) == (0x9, b"hello")
        opcode, payload, rest = read_frame(b, rest, timeout=2)
        assert (opcode, len(payload), rest) == (0x1, 70000, b"")
    from websockets.frames import Frame
    from websockets.streams import StreamReader

    reader = StreamReader()
    reader.feed_data(ws_frame(0x2, b"masked payload " * 500))
    parser = Frame.parse(reader.read_exact, mask=True)
    try:
        next(parser)
    except StopIteration as done:
        assert done.value.data == b"masked payload " * 500, "the masking is right"
    else:
        raise AssertionError("a whole frame was fed: the parser must finish")
    assert len(ping_frames(3, 125)) == 3 * 131


# ------------------------------------------------------------------------------------------------ raw sockets


def handshake_request(host: str, port: int, path: str = "/ws", headers: list[tuple[str, str]] | tuple = (),
                      end: bool = True) -> bytes:
    """A WebSocket opening handshake (HTTP/1.1 GET with Upgrade), extra headers as given (repeats allowed).

    end=False leaves out the blank line that ends the request: the server keeps waiting for more headers.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n" + ("\r\n" if end else "")).encode("latin-1")


def padding_headers(total_bytes: int, line_bytes: int = 8000, max_headers: int = 120) -> list[tuple[str, str]]:
    """Filler headers of about total_bytes in all, each line under websockets' 8 KiB line limit, at most
    max_headers of them (its default allows 128): ~1 MiB with the defaults."""
    count = max(1, min(max_headers, -(-total_bytes // line_bytes)))
    value = "a" * max(1, line_bytes - 14)
    return [(f"X-Pad-{i:04d}", value) for i in range(count)]


@dataclass
class RawResponse:
    status: int | None  # HTTP status of the handshake's answer; None if none came
    head: bytes  # the response's status line and headers
    rest: bytes  # bytes received after the head (the first WebSocket frames)


def read_http_head(sock: socket.socket, timeout: float = 5.0, limit: int = 65536) -> RawResponse:
    """Read an HTTP response head (up to the blank line, at most `limit` bytes, within `timeout`)."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        buf += chunk
    head, sep, rest = buf.partition(b"\r\n\r\n")
    status = None
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if m and sep:
        status = int(m.group(1))
    return RawResponse(status, head, rest)


def raw_connect(host: str, port: int, path: str = "/ws", headers: list[tuple[str, str]] | tuple = (),
                timeout: float = 5.0, rcvbuf: int | None = None) -> tuple[socket.socket, RawResponse]:
    """Open a TCP connection, send a WebSocket handshake by hand, read the answer's head; (socket, response).

    rcvbuf sets SO_RCVBUF before connecting (a small one makes a client that never reads fill up fast).
    The caller closes the socket.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(handshake_request(host, port, path, headers))
        return sock, read_http_head(sock, timeout)
    except BaseException:
        sock.close()
        raise


def ws_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True) -> bytes:
    """One WebSocket frame (client frames are masked); opcode 0x1 text, 0x2 binary, 0x8 close, 0x9 ping, 0xA pong."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask(payload, key)
    return head + key + masked


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def ping_frames(count: int, payload_bytes: int = 125) -> bytes:
    """count masked ping frames of payload_bytes each (125 at most: the largest control frame), back to back."""
    if not 0 <= payload_bytes <= 125:
        raise ValueError("a ping carries 0..125 bytes")
    return b"".join(ws_frame(0x9, bytes([0x61]) * payload_bytes) for _ in range(count))


def read_frame(sock: socket.socket, buffered: bytes = b"", timeout: float = 5.0) -> tuple[int, bytes, bytes] | None:
    """One unmasked (server) frame: (opcode, payload, bytes left over), or None if none came within timeout."""
    deadline = time.monotonic() + timeout
    buf = buffered

    def need(k: int) -> bool:
        nonlocal buf
        while len(buf) < k:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                return False
            if not chunk:
                return False
            buf += chunk
        return True

    if not need(2):
        return None
    opcode, n, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
    if n == 126:
        if not need(4):
            return None
        n, pos = struct.unpack(">H", buf[2:4])[0], 4
    elif n == 127:
        if not need(10):
            return None
        n, pos = struct.unpack(">Q", buf[2:10])[0], 10
    if not need(pos + n):
        return None
    return opcode, buf[pos : pos + n], buf[pos + n :]


def empty_messages(count: int) -> bytes:
    """count masked empty binary messages back to back: 6 bytes each, 43,690 in one 256 KiB socket read."""
    return ws_frame(0x2, b"") * count


def fragmented_message(fragments: int = 4096) -> bytes:
    """One empty binary message in `fragments` empty frames (websockets accepts up to 4,096 in one message)."""
    return ws_frame(0x2, b"", fin=False) + ws_frame(0x0, b"", fin=False) * (fragments - 2) + ws_frame(0x0, b"")


def flood_pings(host: str, port: int, path: str, seconds: float, max_bytes: int, *, reconnect: bool = True,
                max_connections: int = 50, payload_bytes: int = 125, rcvbuf: int = 4096,
                stop: threading.Event | None = None, frames: bytes | None = None) -> dict:
    """One flooding client (blocking; run it on a thread): handshake by hand, then write masked pings (or `frames`,
    over and over) as fast as the socket takes them and never read, for `seconds` or `max_bytes`, whichever comes
    first. When the server closes the connection, connect again (reconnect=True, at most max_connections in all).

    Returns connections made, handshake statuses, bytes written, and for each connection whether the server closed
    it (a send failed) and after how many seconds of flooding.
    """
    deadline = time.monotonic() + min(seconds, MAX_FLOOD_S)
    chunk = frames or ping_frames(max(1, 65536 // (payload_bytes + 6)), payload_bytes)
    info: dict[str, Any] = {"connections": 0, "statuses": [], "bytes": 0, "closed_by_server": 0,
                            "closed_after_s": [], "open_at_end": 0, "errors": []}
    while time.monotonic() < deadline and info["connections"] < max_connections and info["bytes"] < max_bytes:
        if stop is not None and stop.is_set():
            break
        try:
            sock, resp = raw_connect(host, port, path, timeout=5.0, rcvbuf=rcvbuf)
        except OSError as exc:
            info["errors"].append(f"connect: {exc!r}")
            time.sleep(0.1)
            continue
        info["connections"] += 1
        info["statuses"].append(resp.status)
        if resp.status != 101:
            sock.close()
            break
        t_conn = time.monotonic()
        view, off, closed = memoryview(chunk), 0, False
        sock.settimeout(0.2)
        try:
            while time.monotonic() < deadline and info["bytes"] < max_bytes:
                if stop is not None and stop.is_set():
                    break
                try:
                    sent = sock.send(view[off:])
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                    break
                off += sent
                info["bytes"] += sent
                if off == len(chunk):
                    off = 0
        finally:
            sock.close()
        if closed:
            info["closed_by_server"] += 1
            info["closed_after_s"].append(round(time.monotonic() - t_conn, 2))
        else:
            info["open_at_end"] += 1
        if not reconnect:
            break
    return info


# ------------------------------------------------------------------------------------------------ the good client


class GoodClient:
    """A well-behaved /ws client: send a JPEG, wait for its result (or its error), repeat; times of every result."""

    def __init__(self, url: str, frames: list[bytes]) -> None:
        self.url = url
        self.frames = frames
        self.times: list[float] = []  # loop.time() of each result
        self.errors: list[str] = []
        self.ready = asyncio.Event()
        self.ready_info: dict = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        loop = asyncio.get_running_loop()
        try:
            async with connect(self.url, max_size=2**25, compression=None, open_timeout=30, close_timeout=2) as ws:
                self.ready_info = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if self.ready_info.get("type") != "ready":
                    self.errors.append(f"not ready: {self.ready_info}")
                    return
                self.ready.set()
                seq = 0
                while True:
                    await ws.send(self.frames[seq % len(self.frames)])
                    seq += 1
                    while True:
                        msg = await ws.recv()
                        if isinstance(msg, bytes):
                            self.times.append(loop.time())
                            break
                        obj = json.loads(msg)
                        if obj.get("type") == "error":
                            self.errors.append(f"{obj.get('code')}: {obj.get('message')}")
                            if obj.get("seq") == seq:
                                self.times.append(loop.time())
                                break
        except asyncio.CancelledError:
            raise
        except InvalidStatus as exc:
            self.errors.append(f"refused: HTTP {exc.response.status_code}")
        except ConnectionClosed as exc:
            self.errors.append(f"closed: {exc}")
        except (OSError, TimeoutError, ValueError) as exc:
            self.errors.append(f"failed: {exc!r}")
        finally:
            self.ready.set()

    async def result_after(self, t: float, timeout: float) -> float | None:
        """Wait until a result arrived after loop time t (at most timeout s); its time, or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            later = [x for x in self.times if x > t]
            if later:
                return later[0]
            if self._task is not None and self._task.done():
                return None
            await asyncio.sleep(0.05)
        return None

    def max_gap(self, t0: float, t1: float) -> float:
        """Largest time without a result inside [t0, t1] (the window's edges count as results)."""
        points = [t0, *[x for x in self.times if t0 < x < t1], t1]
        return max(b - a for a, b in itertools.pairwise(points))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


# ------------------------------------------------------------------------------------------------ the attacks


@dataclass
class Target:
    """The server an attack runs against."""

    host: str
    port: int
    token: str | None  # the token the good client (and authorized attackers) use
    has_source: bool | None  # None: unknown (a --url server)
    proc: subprocess.Popen | None = None  # a spawned server
    log_path: Path | None = None
    pool: ThreadPoolExecutor | None = None
    args: argparse.Namespace | None = None

    @property
    def http_base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def ws_url(self, path: str = "/ws", token: str | None = "", raw_query: str | None = None) -> str:
        """token "" means the target's own; None none at all. raw_query is appended as typed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        url = f"ws://{host}:{self.port}{path}"
        token = self.token if token == "" else token
        if raw_query is not None:
            return url + "?" + raw_query
        if token:
            from urllib.parse import quote

            url += "?token=" + quote(token, safe="")
        return url

    async def blocking(self, fn: Callable, *a, **kw):
        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*a, **kw))


@dataclass
class Outcome:
    """What an attack returns: did the server answer as expected, in words."""

    answered_ok: bool | None  # None: skipped
    expected: str
    observed: str
    extra: dict = field(default_factory=dict)
    judge_gap: bool = True  # False where the good client cannot be judged (the server was told to exit)
    judge_rss: bool = True  # False where memory is not the question (two legitimate 4096x4096 decodes, then exit)


async def _ws_answer(url: str, send: bytes | str | None, timeout: float) -> tuple[str, float | None, dict]:
    """Connect, wait for ready, send one message, wait for the first error/frame/config answer (timeout s).

    (what came: "ready" / an error code / "frame" / "config" / "refused: HTTP n" / "closed: ..." / "no answer",
    seconds from the send to the answer, the ready message).
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    loop = asyncio.get_running_loop()
    ready: dict = {}
    try:
        async with connect(url, max_size=2**25, compression=None, open_timeout=10, close_timeout=2) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if first.get("type") != "ready":
                return (first.get("code") or first.get("type") or "?"), None, first
            ready = first
            if send is None:
                return "ready", None, ready
            t0 = loop.time()
            await ws.send(send)
            deadline = t0 + timeout
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return "no answer", None, ready
                try:
                    msg = await asyncio.wait_for(ws.recv(), left)
                except TimeoutError:
                    return "no answer", None, ready
                if isinstance(msg, bytes):
                    return "frame", loop.time() - t0, ready
                obj = json.loads(msg)
                if obj.get("type") == "error":
                    return obj.get("code", "?"), loop.time() - t0, ready
                if obj.get("type") == "config":
                    return "config", loop.time() - t0, ready
    except InvalidStatus as exc:
        return f"refused: HTTP {exc.response.status_code}", None, ready
    except ConnectionClosed as exc:
        return f"closed: {exc.rcvd.code if exc.rcvd else exc}", None, ready
    except (OSError, TimeoutError) as exc:
        return f"failed: {exc!r}", None, ready


async def _send_bombs(target: Target, bomb: bytes, connections: int, wait_s: float) -> list[tuple[str, float | None]]:
    """Send `bomb` on `connections` connections at once; each waits wait_s for an answer, then disconnects."""
    results = await asyncio.gather(*(_ws_answer(target.ws_url(), bomb, wait_s) for _ in range(connections)))
    return [(what, dt) for what, dt, _ in results]


def _bomb_outcome(bomb: bytes, answers: list[tuple[str, float | None]], timeout: float) -> Outcome:
    ok = all(what == "bad_image" and dt is not None and dt <= timeout for what, dt in answers)
    seen = ", ".join(f"{what}" + (f" in {dt:.2f} s" if dt is not None else f" within {timeout:g} s")
                     for what, dt in answers)
    return Outcome(ok, f"bad_image within {timeout:g} s on each",
                   f"{seen} ({len(bomb) // 1024} KiB, {count_scans(bomb)} scans, 4096x4096)",
                   {"bytes": len(bomb), "scans": count_scans(bomb), "answers": answers})


async def attack_decode_bomb(target: Target) -> Outcome:
    """Decode bomb: two ~200 KiB progressive JPEGs (4096x4096 declared, --bomb-scans scans, well under the
    pixels-per-byte limit) sent on 2 connections at once, which wait --answer-timeout-s for an answer and then
    disconnect. Expected: `bad_image` quickly on both, and no gap for the good client (the decode must not go on
    after the sender left, nor take the codec workers from other clients)."""
    args = target.args
    bomb = jpeg_bomb(scans=args.bomb_scans)
    answers = await _send_bombs(target, bomb, 2, args.answer_timeout_s)
    return _bomb_outcome(bomb, answers, args.answer_timeout_s)


async def attack_decode_bomb_min(target: Target) -> Outcome:
    """Decode bomb at the pixels-per-byte edge: the smallest full-resolution-scan bomb that MAX_PIXELS_PER_BYTE
    (1024 declared pixels per byte) lets through for 4096x4096 (~16 KiB, ~1,600 scans of the luma component),
    on 2 connections that then disconnect. Expected: `bad_image` quickly on both, no gap for the good client."""
    args = target.args
    bomb = jpeg_bomb_within_ratio()
    answers = await _send_bombs(target, bomb, 2, args.answer_timeout_s)
    return _bomb_outcome(bomb, answers, args.answer_timeout_s)


async def _ping_flood(target: Target, path: str, frames: bytes | None = None, what: str = "pings") -> Outcome:
    args = target.args
    infos = await asyncio.gather(*(
        target.blocking(flood_pings, target.host, target.port, path, args.flood_s, args.flood_max_mib * MIB,
                        frames=frames)
        for _ in range(args.flooders)
    ))
    conns = sum(i["connections"] for i in infos)
    closed = sum(i["closed_by_server"] for i in infos)
    after = [s for i in infos for s in i["closed_after_s"]]
    statuses = sorted({s for i in infos for s in i["statuses"]}, key=str)
    sent = sum(i["bytes"] for i in infos)
    ok = conns > 0 and closed == conns and max(after, default=0) <= args.answer_timeout_s
    observed = (f"{conns} connections (HTTP {statuses}), {sent / MIB:.0f} MiB of {what} written, "
                f"{closed} closed by the server" + (f" after {min(after):.1f}-{max(after):.1f} s" if after else "")
                + (f", {conns - closed} still open after {args.flood_s:g} s" if conns - closed else ""))
    return Outcome(ok, f"each flood connection closed by the server within {args.answer_timeout_s:g} s",
                   observed, {"flooders": infos})


async def attack_ping_flood(target: Target) -> Outcome:
    """Ping flood: --flooders raw clients (3) complete the handshake on /ws, then write masked 125-byte pings as
    fast as the socket takes them for --flood-s seconds and never read (SO_RCVBUF 4 KiB, so the server's pongs
    back up at once). A client the server closes connects again (at most 50 times). Expected: the server closes a
    connection as soon as its send buffer passes its limit; RSS and the send-buffer gauge stay bounded."""
    return await _ping_flood(target, "/ws" + (f"?token={target.token}" if target.token else ""))


async def attack_ping_flood_token(target: Target) -> Outcome:
    """Ping flood on /ws?token=wrong of a server with --token (no client place, no token): the same clients as
    ping-flood. The server answers `unauthorized` and a close frame, then waits its close timeout while the pings
    keep coming. Expected: closed as soon as the send buffer passes its limit; RSS bounded."""
    if not target.token:
        return Outcome(None, "a server with --token", "skipped: no --token given for this server")
    return await _ping_flood(target, "/ws?token=wrong")


async def attack_message_flood(target: Target) -> Outcome:
    """Message flood: --flooders raw clients write empty binary messages (6 bytes each: one 256 KiB socket read holds
    43,690 of them) as fast as the socket takes them. Before the message limit, a read's worth was queued whole and
    handled in one turn of the event loop (every other client stalled 1-2 s per read). Expected: each connection
    closed at once (`message_flood`), the good client never waits."""
    path = "/ws" + (f"?token={target.token}" if target.token else "")
    return await _ping_flood(target, path, empty_messages(43690), "empty messages")


async def attack_fragment_flood(target: Target) -> Outcome:
    """Fragment flood: as message-flood, with messages of 4,096 empty fragments each (the most websockets takes)."""
    path = "/ws" + (f"?token={target.token}" if target.token else "")
    return await _ping_flood(target, path, fragmented_message() * 16, "empty fragments")


async def attack_handshake_memory(target: Target) -> Outcome:
    """Handshake memory: --handshake-sockets sockets (300), each sending a WebSocket request with ~1 MiB of headers
    (120 lines of 8,000 bytes, inside websockets' defaults of 128 headers of 8 KiB) but never the blank line that
    ends it; held --hold-s seconds, then closed; --handshake-rounds times (RSS may ratchet from round to round).
    Expected: memory before authentication bounded by a stated cap (header size and count limits, and a cap on
    sockets not through the handshake)."""
    args = target.args
    rounds = []
    for _ in range(args.handshake_rounds):
        rounds.append(await _handshake_round(target))
    first = rounds[0]
    observed = (f"{args.handshake_rounds} x {args.handshake_sockets} sockets, {first['header_bytes'] // 1024} KiB "
                f"of headers each: " + "; ".join(
                    f"{r['sent_all']} sent it all in {r['send_s']:.1f} s, {r['refused'] + r['connect_failed']} cut, "
                    f"{r['closed_early']} closed by the server in {r['send_s'] + args.hold_s:.0f} s" for r in rounds))
    return Outcome(True, "RSS growth within the bound (no answer is due)", observed, {"rounds": rounds})


async def _handshake_round(target: Target) -> dict:
    args = target.args
    n = args.handshake_sockets
    head = handshake_request(target.host, target.port, "/ws", padding_headers(args.handshake_kib * 1024), end=False)
    socks: list[socket.socket] = []
    lock = threading.Lock()
    stats = {"sent_all": 0, "refused": 0, "connect_failed": 0}
    deadline = time.monotonic() + 30.0

    def one(_: int) -> None:
        if time.monotonic() > deadline:
            return
        try:
            s = socket.create_connection((target.host, target.port), timeout=5)
        except OSError:
            with lock:
                stats["connect_failed"] += 1
            return
        with lock:
            socks.append(s)
        try:
            s.settimeout(max(0.1, min(10.0, deadline - time.monotonic())))
            s.sendall(head)
            with lock:
                stats["sent_all"] += 1
        except OSError:
            with lock:
                stats["refused"] += 1

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="redteam-handshake") as pool:
        await asyncio.get_running_loop().run_in_executor(None, lambda: list(pool.map(one, range(n))))
    send_s = time.monotonic() - t0
    await asyncio.sleep(args.hold_s)

    def closed_by_server(s: socket.socket) -> bool:
        s.setblocking(False)
        try:
            return s.recv(1) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    early = sum(closed_by_server(s) for s in socks)
    for s in socks:
        s.close()
    await asyncio.sleep(0.5)
    return {**stats, "closed_early": early, "header_bytes": len(head), "send_s": round(send_s, 2)}


async def attack_sigterm_decode(target: Target) -> Outcome:
    """SIGTERM during a long decode (spawned server only): two decode bombs are sent on 2 connections that stay
    open; --sigterm-after-s later the server gets SIGTERM. Records the time from SIGTERM to the process's exit and
    its exit status (SIGKILL after 90 s). Expected: exit status 0 within --max-exit-s."""
    args = target.args
    proc = target.proc
    if proc is None:
        return Outcome(None, "a spawned server", "skipped: needs --spawn-server", judge_gap=False)
    bomb = jpeg_bomb(scans=args.bomb_scans)
    senders = [asyncio.create_task(_ws_answer(target.ws_url(), bomb, 120.0)) for _ in range(2)]
    await asyncio.sleep(args.sigterm_after_s)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = await target.blocking(proc.wait, 90)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = await target.blocking(proc.wait, 10)
        exit_s = None
    else:
        exit_s = time.monotonic() - t0
    answers = await asyncio.gather(*senders)
    ok = code == 0 and exit_s is not None and exit_s <= args.max_exit_s
    when = "killed after 90 s" if exit_s is None else f"after {exit_s:.1f} s"
    return Outcome(ok, f"exit status 0 within {args.max_exit_s:g} s of SIGTERM",
                   f"exit status {code} {when}; the bomb senders saw {[a[0] for a in answers]}",
                   {"exit_status": code, "exit_s": None if exit_s is None else round(exit_s, 2)}, judge_gap=False,
                   judge_rss=False)


async def attack_duplicate_origin(target: Target) -> Outcome:
    """Two Origin headers on the /ws handshake (one the server's own origin, one foreign), sent by hand.
    Expected: HTTP 403, and (spawned server) no traceback in its log."""
    origin = f"http://{target.host}:{target.port}"
    before = _log_tracebacks(target)
    path = "/ws" + (f"?token={target.token}" if target.token else "")
    sock, resp = await target.blocking(raw_connect, target.host, target.port, path,
                                       [("Origin", origin), ("Origin", "http://evil.example")])
    sock.close()
    await asyncio.sleep(0.3)  # the server's log line
    traces = _log_tracebacks(target) - before if before is not None else None
    ok = resp.status == 403 and not traces
    return Outcome(ok, "HTTP 403, no traceback in the server log",
                   f"HTTP {resp.status}" + ("" if traces is None else f", {traces} traceback(s) in the server log"),
                   {"status": resp.status, "tracebacks": traces})


async def attack_token_plus(target: Target) -> Outcome:
    """A token with '+' typed as-is in the URL: /ws?token=a+b on a server started with --token a+b (the server's
    own token with --url, when it holds a '+'). Expected: accepted (`ready`)."""
    if not target.token or "+" not in target.token:
        return Outcome(None, "a server whose --token holds '+'", "skipped: the server's token has no '+'")
    what, _, _ = await _ws_answer(target.ws_url(raw_query=f"token={target.token}"), None, 5.0)
    return Outcome(what == "ready", "ready (accepted)", what)


async def attack_view_token(target: Target) -> Outcome:
    """/view/ws without the token on a server started with --token and --source. Expected: refused (HTTP 401/403,
    or `unauthorized` and close 1008), where today's server is expected to send its broadcast to anyone."""
    if not target.token:
        return Outcome(None, "a server with --token and --source", "skipped: no --token given for this server")
    what, _, _ready = await _ws_answer(target.ws_url("/view/ws", token=None), None, 5.0)
    if what == "no_source":
        return Outcome(None, "a server with --source", "skipped: the server has no --source")
    with_token, _, _ = await _ws_answer(target.ws_url("/view/ws"), None, 5.0)
    refused = what.startswith(("refused: HTTP 40", "closed: 1008")) or what == "unauthorized"
    return Outcome(refused, "refused without the token", f"without the token: {what}; with it: {with_token}",
                   {"without_token": what, "with_token": with_token})


async def attack_text_bytes(target: Target) -> Outcome:
    """A config message of ~260 KB of UTF-8 (65,000 four-byte emoji in the prompt: under 64 Ki characters, four
    times the 64 KiB text limit in bytes). Expected: `bad_message` (the limit counts bytes)."""
    text = json.dumps({"type": "config", "prompt": "\U0001f600" * 65000}, ensure_ascii=False)
    what, _dt, _ = await _ws_answer(target.ws_url(), text, target.args.answer_timeout_s)
    return Outcome(what == "bad_message", "bad_message",
                   f"{what} ({len(text)} characters, {len(text.encode()) // 1024} KiB)",
                   {"chars": len(text), "bytes": len(text.encode()), "answer": what})


def _log_tracebacks(target: Target) -> int | None:
    if target.log_path is None:
        return None
    try:
        return target.log_path.read_text(errors="replace").count("Traceback")
    except OSError:
        return None


# name -> (function, extra `turbostream serve` options of a spawned server). "{source}" is replaced by a generated
# image folder.
ATTACKS: dict[str, tuple[Callable, list[str]]] = {
    "decode-bomb": (attack_decode_bomb, []),
    "decode-bomb-min": (attack_decode_bomb_min, []),
    "ping-flood": (attack_ping_flood, []),
    "ping-flood-token": (attack_ping_flood_token, ["--token", "rt-token"]),
    "message-flood": (attack_message_flood, []),
    "fragment-flood": (attack_fragment_flood, []),
    "handshake-memory": (attack_handshake_memory, []),
    "sigterm-decode": (attack_sigterm_decode, []),
    "duplicate-origin": (attack_duplicate_origin, []),
    "token-plus": (attack_token_plus, ["--token", "a+b"]),
    "view-token": (attack_view_token, ["--token", "rt-token", "--source", "{source}"]),
    "text-bytes": (attack_text_bytes, []),
}


# ------------------------------------------------------------------------------------------------ the run


async def _sample(target: Target, every: float, out: list[dict]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        scraped = await target.blocking(loadtest.scrape, target.http_base)
        if scraped:
            out.append({"t": loop.time(), "rss": scraped.get(RSS), "send_buffer": scraped.get(SEND_BUFFER)})
        await asyncio.sleep(every)


async def run_attack(name: str, target: Target, frames: list[bytes]) -> dict:
    """The good client, the samplers, the attack, the recovery; one row of the report."""
    args = target.args
    loop = asyncio.get_running_loop()
    before = await target.blocking(loadtest.scrape, target.http_base)
    good = GoodClient(target.ws_url(), frames)
    good.start()
    await asyncio.wait_for(good.ready.wait(), 60)
    t_ready = loop.time()
    first = await good.result_after(t_ready - 1e9, 30)  # one result before the attack
    t_base = loop.time()
    await asyncio.sleep(args.baseline_s)
    base_fps = len([x for x in good.times if x > t_base]) / args.baseline_s if first is not None else None
    samples: list[dict] = []
    sampler = asyncio.create_task(_sample(target, args.sample_every, samples))
    t0 = loop.time()
    fn = ATTACKS[name][0]
    try:
        outcome = await asyncio.wait_for(fn(target), args.attack_timeout_s)
    except TimeoutError:
        outcome = Outcome(False, "the attack ends within --attack-timeout-s", "timed out")
    t1 = loop.time()
    recovered = None
    if target.proc is None or target.proc.poll() is None:
        recovered = await good.result_after(t1, args.recover_s)
    t_end = recovered if recovered is not None else loop.time()
    gap = good.max_gap(t0, t_end)
    in_window = len([x for x in good.times if t0 <= x <= t_end])
    attack_fps = in_window / (t_end - t0) if t_end - t0 >= 2.0 else None  # too short a window says nothing
    await asyncio.sleep(args.settle_s)
    sampler.cancel()
    after = await target.blocking(loadtest.scrape, target.http_base) if target.proc is None or \
        target.proc.poll() is None else {}
    await good.stop()
    rss = [s["rss"] for s in samples if s["rss"] is not None]
    sendbuf = [s["send_buffer"] for s in samples if s["send_buffer"] is not None]
    row = {
        "attack": name, "doc": (fn.__doc__ or "").split(". ")[0].strip(),
        "answered_ok": outcome.answered_ok, "expected": outcome.expected, "observed": outcome.observed,
        "attack_s": round(t1 - t0, 2), "good_client_max_gap_s": round(gap, 2),
        "good_client_results": in_window,
        "good_client_fps_before": None if base_fps is None else round(base_fps, 1),
        "good_client_fps_during": None if attack_fps is None else round(attack_fps, 1),
        "good_client_recovered": recovered is not None, "good_client_errors": good.errors[:5],
        "rss_mib_before": _mib(before.get(RSS)), "rss_mib_peak": _mib(max(rss, default=None)),
        "rss_mib_after": _mib(after.get(RSS)),
        "send_buffer_kib_peak": None if not sendbuf else round(max(sendbuf) / 1024, 1),
        "samples": len(samples), "extra": outcome.extra, "judge_gap": outcome.judge_gap,
        "judge_rss": outcome.judge_rss,
    }
    row["verdict"], row["checks"] = _verdict(row, outcome, args)
    return row


def _mib(v: float | None) -> float | None:
    return None if v is None else round(v / MIB, 1)


def _verdict(row: dict, outcome: Outcome, args) -> tuple[str, list[dict]]:
    if outcome.answered_ok is None:
        return "SKIP", []
    checks = [{"check": "answered as expected", "value": outcome.observed, "limit": outcome.expected,
               "pass": bool(outcome.answered_ok)}]
    if outcome.judge_gap:
        checks.append({"check": "good client's largest gap (s)", "value": row["good_client_max_gap_s"],
                       "limit": args.max_gap_s, "pass": row["good_client_max_gap_s"] <= args.max_gap_s})
        base, during = row["good_client_fps_before"], row["good_client_fps_during"]
        if base and during is not None:
            fraction = round(during / base, 2)
            checks.append({"check": "good client's rate during the attack over its rate before", "value": fraction,
                           "limit": args.min_rate_fraction, "pass": fraction >= args.min_rate_fraction})
    before, peak = row["rss_mib_before"], row["rss_mib_peak"]
    if outcome.judge_rss and before is not None and peak is not None:
        growth = round(peak - before, 1)
        checks.append({"check": "RSS growth, peak over before (MiB)", "value": growth,
                       "limit": args.max_rss_growth_mib, "pass": growth <= args.max_rss_growth_mib})
    if row["send_buffer_kib_peak"] is not None:
        checks.append({"check": "send-buffer peak (KiB)", "value": row["send_buffer_kib_peak"],
                       "limit": args.max_send_buffer_kib,
                       "pass": row["send_buffer_kib_peak"] <= args.max_send_buffer_kib})
    return ("PASS" if all(c["pass"] for c in checks) else "FAIL"), checks


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _make_source(folder: Path) -> Path:
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(loadtest.make_frames(8, 64, 64, 85)):
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        cv2.imwrite(str(folder / f"frame{i:03d}.jpg"), img)
    return folder


def _spawn(serve_args: list[str], extra: list[str], host: str, log_path: Path, source: Path,
           ready_timeout: float) -> tuple[subprocess.Popen, int]:
    extra = [str(source) if x == "{source}" else x for x in extra]
    proc, port = loadtest.spawn_server([*serve_args, *extra], host, 16, log_path)
    loadtest.wait_healthy(f"http://{host}:{port}", ready_timeout, proc, log_path)
    return proc, port


async def run(args, serve_args: list[str]) -> list[dict]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="redteam")
    rows: list[dict] = []
    frames = loadtest.make_frames(8, args.frame_size, args.frame_size, 85)
    tmp = Path(tempfile.mkdtemp(prefix="redteam-"))
    source = _make_source(tmp / "source") if args.spawn_server else tmp
    try:
        for name in args.attack_list:
            if loop.time() - started > MAX_TOTAL_S:
                print(f"redteam: {MAX_TOTAL_S:.0f} s spent; {name} and the rest not run", flush=True)
                break
            proc = log_path = None
            if args.spawn_server:
                log_path = tmp / f"server-{name}.log"
                extra = ATTACKS[name][1]
                proc, port = await loop.run_in_executor(pool, _spawn, serve_args, extra, args.host, log_path,
                                                        source, args.ready_timeout)
                token = extra[extra.index("--token") + 1] if "--token" in extra else None
                target = Target(args.host, port, token, "--source" in extra, proc, log_path, pool, args)
            else:
                target = Target(args.url_host, args.url_port, args.token, None, None, None, pool, args)
            print(f"redteam: {name} ...", flush=True)
            try:
                row = await run_attack(name, target, frames)
            finally:
                stop = None
                if proc is not None:
                    t = time.monotonic()
                    code = await loop.run_in_executor(pool, loadtest.stop_server, proc)
                    stop = {"exit_status": code, "stop_s": round(time.monotonic() - t, 2),
                            "tracebacks": _log_tracebacks(target), "log": str(log_path),
                            "command": proc.command[3:]}
            row["server"] = stop
            rows.append(row)
            print(f"redteam: {name}: {row['verdict']}: {row['observed']}", flush=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(title="turbostream red team (issue 9)", show_lines=False)
    for col, justify in (("attack", "left"), ("answered as expected", "left"), ("good gap s", "right"),
                         ("good fps before/during", "right"),
                         ("RSS MiB before/peak/after", "right"), ("send buf KiB peak", "right"),
                         ("verdict", "center")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in rows:
        ans = "skip" if r["answered_ok"] is None else ("yes" if r["answered_ok"] else "NO")
        rss = "/".join("-" if v is None else f"{v:.0f}" for v in
                       (r["rss_mib_before"], r["rss_mib_peak"], r["rss_mib_after"]))
        gap = f"{r['good_client_max_gap_s']:.2f}" + ("" if r["judge_gap"] else " (n/j)")
        style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}[r["verdict"]]
        fps = "/".join("-" if v is None else f"{v:.0f}" for v in
                       (r["good_client_fps_before"], r["good_client_fps_during"]))
        table.add_row(r["attack"], f"{ans}: {r['observed']}", gap, fps, rss,
                      "-" if r["send_buffer_kib_peak"] is None else f"{r['send_buffer_kib_peak']:.0f}",
                      f"[{style}]{r['verdict']}[/{style}]")
    console.print(table)
    for r in rows:
        failed = [c for c in r["checks"] if not c["pass"]]
        if failed:
            console.print(f"{r['attack']}: failed " + "; ".join(f"{c['check']} = {c['value']} (limit {c['limit']})"
                                                              for c in failed), highlight=False)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv, serve_args = loadtest.split_serve_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Arguments after -- go to `turbostream serve` (with --spawn-server).")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000/")
    target.add_argument("--spawn-server", action="store_true",
                        help="start `turbostream serve` on a free loopback port, a fresh one per attack")
    target.add_argument("--measure-bombs", action="store_true",
                        help="decode the bombs here with cv2 and PIL and print the times; no server")
    target.add_argument("--self-test", action="store_true", help="check the builders and helpers; no server")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attack names")
    p.add_argument("--token", help="the --url server's --token (used by the good client and token attacks)")
    p.add_argument("--host", default="127.0.0.1", help="interface of a spawned server (loopback only)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--max-gap-s", type=float, default=1.0, help="bound: the good client's largest gap")
    p.add_argument("--max-rss-growth-mib", type=float, default=100.0, help="bound: server RSS peak over before")
    p.add_argument("--max-send-buffer-kib", type=float, default=1024.0,
                   help="bound: peak of turbostream_send_buffer_bytes (128 KiB a connection + one message)")
    p.add_argument("--min-rate-fraction", type=float, default=0.25,
                   help="bound: the good client's results/s during an attack (2 s or longer) over its rate before")
    p.add_argument("--answer-timeout-s", type=float, default=3.0,
                   help="bound: time for the server's answer (bad_image, a flood connection's close)")
    p.add_argument("--max-exit-s", type=float, default=5.0, help="bound: SIGTERM to exit (sigterm-decode)")
    p.add_argument("--bomb-scans", type=int, default=20000, help="scans of the decode-bomb JPEG")
    p.add_argument("--flooders", type=int, default=3, help="ping-flood clients")
    p.add_argument("--flood-s", type=float, default=15.0, help="seconds of ping flood")
    p.add_argument("--flood-max-mib", type=int, default=512, help="bytes of pings one flooder writes at most")
    p.add_argument("--handshake-sockets", type=int, default=300, help="unfinished handshakes")
    p.add_argument("--handshake-kib", type=int, default=1024, help="header bytes each unfinished handshake sends")
    p.add_argument("--hold-s", type=float, default=3.0, help="seconds the unfinished handshakes are held")
    p.add_argument("--handshake-rounds", type=int, default=2, help="rounds of unfinished handshakes")
    p.add_argument("--baseline-s", type=float, default=1.0, help="seconds the good client streams alone first")
    p.add_argument("--sigterm-after-s", type=float, default=1.5, help="seconds from the bombs to SIGTERM")
    p.add_argument("--recover-s", type=float, default=60.0,
                   help="after an attack, how long to wait for the good client's next result")
    p.add_argument("--settle-s", type=float, default=1.0, help="seconds after the recovery before RSS 'after'")
    p.add_argument("--sample-every", type=float, default=0.25, help="seconds between /metrics samples")
    p.add_argument("--attack-timeout-s", type=float, default=120.0, help="bound on one attack")
    p.add_argument("--frame-size", type=int, default=64, help="side of the good client's JPEGs")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for a spawned server")
    args = p.parse_args(argv)
    args.attack_list = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in args.attack_list if a not in ATTACKS]
    if unknown:
        p.error(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    if not 1 <= args.flooders <= 16 or not 0.5 <= args.flood_s <= MAX_FLOOD_S or not 1 <= args.flood_max_mib <= 4096:
        p.error(f"--flooders must be 1..16, --flood-s 0.5..{MAX_FLOOD_S:g}, --flood-max-mib 1..4096")
    if not 1 <= args.handshake_sockets <= MAX_SOCKETS or not 1 <= args.handshake_kib <= 1024 or \
            not 0 <= args.hold_s <= 30 or not 1 <= args.handshake_rounds <= 5 or not 0.5 <= args.baseline_s <= 10:
        p.error(f"--handshake-sockets must be 1..{MAX_SOCKETS}, --handshake-kib 1..1024, --hold-s 0..30, "
                "--handshake-rounds 1..5, --baseline-s 0.5..10")
    if not 0 <= args.bomb_scans <= 400000:
        p.error("--bomb-scans must be 0..400000 (10 bytes each; the server's message limit is 4 MiB)")
    if not 0.05 <= args.sample_every <= 5 or not 0 <= args.recover_s <= 300 or not 1 <= args.attack_timeout_s <= 600:
        p.error("--sample-every must be 0.05..5, --recover-s 0..300, --attack-timeout-s 1..600")
    if serve_args and not args.spawn_server:
        p.error("arguments after -- are for --spawn-server")
    if args.spawn_server and not _is_loopback(args.host):
        p.error(f"--host {args.host}: loopback only (127.0.0.1, ::1, localhost)")
    if args.url:
        parts = urlsplit(args.url if "//" in args.url else "//" + args.url)
        if parts.scheme not in ("", "http", "ws") or not parts.hostname or not parts.port:
            p.error("--url must look like http://127.0.0.1:PORT/ (plain http or ws, with a port)")
        if not _is_loopback(parts.hostname):
            p.error(f"--url host {parts.hostname!r} is not loopback: this script attacks only this machine")
        args.url_host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
        args.url_port = parts.port
    return args, serve_args


def main(argv: list[str] | None = None) -> int:
    args, serve_args = parse_args(argv)
    if args.measure_bombs:
        measure_bombs(args.bomb_scans)
        return 0
    if args.self_test:
        self_test()
        print("redteam: self-test passed")
        return 0
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.url:
        loadtest.wait_healthy(f"http://{args.url_host}:{args.url_port}", 30.0, None, None)
    rows = asyncio.run(run(args, serve_args))
    print_table(rows)
    if args.json:
        report = {
            "tool": "scripts/redteam.py", "started": started, "serve_args": serve_args if args.spawn_server else None,
            "url": args.url, "host": {"platform": platform.platform(), "python": platform.python_version(),
                                      "cpus": os.cpu_count()},
            "bounds": {"max_gap_s": args.max_gap_s, "max_rss_growth_mib": args.max_rss_growth_mib,
                       "max_send_buffer_kib": args.max_send_buffer_kib, "answer_timeout_s": args.answer_timeout_s,
                       "max_exit_s": args.max_exit_s},
            "attacks": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"redteam: wrote {args.json}")
    return 1 if any(r["verdict"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
