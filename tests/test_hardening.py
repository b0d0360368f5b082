"""Cheap messages must not buy expensive work or memory, and security headers and tokens are checked exactly: each
attack over real sockets against a real server on port 0 (tiny-random on the CPU)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
from test_server import (
    _viewer_server,
    jpeg,
    next_of_type,
    next_result,
    open_client,
    run,
    server_config,
    serving,
    spawn_serve,
    ws_url,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from turbostream.config import Limits
from turbostream.serve.http import query_params, token_matches


def raw_request(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send a hand-written HTTP request and return the server's whole answer (until it closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"Content-Length" not in b"".join(chunks):
                break
    return b"".join(chunks)


def upgrade(path: str, *extra_headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13", *extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ------------------------------------------------------------------------------------------------ tokens


def test_query_params_keep_plus_signs_and_decode_escapes():
    assert query_params("/ws?token=a+b/c==&x=1") == {"token": "a+b/c==", "x": "1"}
    assert query_params("/ws?token=a%2Bb%20c") == {"token": "a+b c"}
    assert query_params("/ws?token=&token=second") == {"token": "second"}
    assert query_params("/ws") == {}
    assert token_matches("a+b", "a+b") and not token_matches("a b", "a+b") and not token_matches(None, "a+b")


def test_a_token_with_plus_signs_typed_as_is_is_accepted(engine):
    token = "Zm9v+YmFy/+w=="  # base64 is full of '+'

    async def main():
        async with serving(engine, token=token) as server:
            ws, ready = await open_client(server, f"/ws?token={token}")  # as a user types it in the address bar
            await ws.send(jpeg(1))
            assert (await next_result(ws))[0]["seq"] == 1
            ws2, _ = await open_client(server, "/ws?token=Zm9v%2BYmFy%2F%2Bw%3D%3D")  # as encodeURIComponent writes it
            await ws2.close()
            # The form-decoded reading of the same URL ("+" as a space) is not the token.
            bad = await connect(ws_url(server, "/ws?token=Zm9v YmFy/ w==".replace(" ", "%20")))
            assert json.loads(await bad.recv())["code"] == "unauthorized"
            with pytest.raises(ConnectionClosed) as info:
                await bad.recv()
            assert info.value.rcvd.code == 1008

    run(main())


def _raw_websocket(port: int, path: str) -> tuple[socket.socket, bytes]:
    """A socket that made a WebSocket handshake on path by hand (so it can then misbehave), and the server's answer."""
    import base64
    import os

    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    return sock, received


def _refused_peer_that_never_answers(port: int, path: str, messages: int) -> tuple[bytes, float]:
    """A WebSocket handshake on path, then `messages` binary messages of 1 MiB at once, and no answer to anything:
    (what the server sent, seconds from its handshake answer to its closing the socket)."""
    from websockets.frames import Frame, Opcode

    sock, received = _raw_websocket(port, path)
    with sock:
        t0 = time.monotonic()
        frame = Frame(Opcode.BINARY, bytes(1 << 20)).serialize(mask=True)
        with contextlib.suppress(OSError):  # the server may close while these are still being sent
            for _ in range(messages):
                sock.sendall(frame)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
        return received, time.monotonic() - t0


def test_a_peer_without_the_token_holds_no_socket_and_no_memory(engine, monkeypatch):
    """Refused for its token, a peer that never answers the close held its socket for the whole close timeout (5 s),
    counted against the server's socket cap (140 such peers locked out the clients with the token), and every
    message it sent meanwhile was parsed and queued (up to 4 x 4 MiB a socket; 130 peers: +1.3 GiB)."""
    from websockets.asyncio.connection import Connection

    delivered = []
    real = Connection.process_event

    def counting(self, event):
        if getattr(event, "opcode", None) is not None and event.opcode.name in ("BINARY", "TEXT", "CONT"):
            delivered.append(len(event.data))
        return real(self, event)

    monkeypatch.setattr(Connection, "process_event", counting)

    async def main():
        async with serving(engine, token="s3cret") as server:
            received, seconds = await asyncio.to_thread(_refused_peer_that_never_answers, server.port,
                                                        "/ws?token=wrong", 4)
            assert b" 101 " in received and b"unauthorized" in received
            assert seconds < 3.0, seconds  # the refused close waits 0.5 s, not close_timeout_s (5 s)
            assert delivered == []  # its messages were dropped as they were parsed
            ws, _ = await open_client(server, "/ws?token=s3cret")  # the token's holders: served as ever
            await ws.send(jpeg(1))
            assert (await next_result(ws))[0]["seq"] == 1
            assert delivered and max(delivered) > 1000  # a client with the token: its frames are read

    run(main())


def test_viewers_need_the_token_too(engine):
    async def main():
        server = _viewer_server(engine, token="s3cret", control_token="ctl")
        await server.start()
        try:
            assert await server.wait_ready(30)
            for path in ("/view/ws", "/view/ws?token=wrong", "/view/ws?control=ctl"):
                ws = await connect(ws_url(server, path))
                assert json.loads(await ws.recv())["code"] == "unauthorized", path
                with pytest.raises(ConnectionClosed) as info:
                    await ws.recv()
                assert info.value.rcvd.code == 1008
            assert server.places["viewer"] == 0
            viewer, ready = await open_client(server, "/view/ws?token=s3cret")
            assert ready["role"] == "viewer" and ready["control"] is False
            controller, ready = await open_client(server, "/view/ws?token=s3cret&control=ctl")
            assert ready["control"] is True
            await controller.send(json.dumps({"type": "config", "prompt": "a charcoal drawing"}))
            assert (await next_of_type(viewer, "config"))["prompt"] == "a charcoal drawing"
        finally:
            await server.stop()

    run(main())


# ------------------------------------------------------------------------------------------------ headers


@pytest.mark.parametrize("headers", [
    ("Origin: http://127.0.0.1", "Origin: http://evil.example"),
    ("Origin: http://127.0.0.1", "Origin: http://127.0.0.1"),
])
def test_repeated_origin_headers_are_refused_with_403_not_500(engine, headers, caplog):
    async def main():
        async with serving(engine) as server:
            answer = await asyncio.to_thread(raw_request, server.port, upgrade("/ws", *headers))
            assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
            # The server goes on: a well-behaved client still streams.
            ws, _ = await open_client(server)
            await ws.send(jpeg(1))
            assert (await next_result(ws))[0]["seq"] == 1

    with caplog.at_level("WARNING"):
        run(main())
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


def test_repeated_host_headers_are_refused(engine):
    async def main():
        async with serving(engine) as server:
            answer = await asyncio.to_thread(
                raw_request, server.port, upgrade("/ws", "Host: evil.example", "Origin: http://evil.example"))
            assert answer.startswith(b"HTTP/1.1 403"), answer[:200]

    run(main())


# ------------------------------------------------------------------------------------------------ text size


def test_the_text_limit_counts_utf8_bytes_not_characters(engine):
    async def main():
        async with serving(engine) as server:
            ws, ready = await open_client(server)
            limit = ready["limits"]["max_text_bytes"]
            emoji = "\N{GRINNING FACE}" * (limit // 4 + 100)  # fewer characters than the limit, 4 bytes each
            assert len(emoji) < limit < len(emoji.encode())
            await ws.send(json.dumps({"type": "config", "prompt": emoji}, ensure_ascii=False))
            err = await next_of_type(ws, "error")
            assert err["code"] == "bad_message" and "bytes" in err["message"]
            # Just under the limit in bytes is parsed (and refused for what it says, not for its size).
            await ws.send(json.dumps({"type": "config", "prompt": "\N{GRINNING FACE}" * 2000}, ensure_ascii=False))
            assert (await next_of_type(ws, "error"))["code"] == "bad_config"
            await ws.send(jpeg(1))
            assert (await next_result(ws))[0]["seq"] == 1

    run(main())


def test_invalid_status_is_what_a_refused_origin_gets_from_a_client_library(engine):
    async def main():
        async with serving(engine) as server:
            with pytest.raises(InvalidStatus) as info:
                await connect(ws_url(server), origin="http://evil.example")
            assert info.value.response.status_code == 403

    run(main())


# ------------------------------------------------------------------------------------------------ cheap messages,
# expensive work: each attack runs beside a well-behaved client that must keep getting frames.

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import redteam  # noqa: E402 - the red-team script's attack builders (scripts/redteam.py)

MAX_GAP_S = 1.5  # the good client's longest wait for a result during an attack (a frame takes ~20 ms here)
MAX_RSS_GROWTH = 150 * 2**20  # this whole test process, server and attackers together


def rss() -> int:
    return psutil.Process().memory_info().rss


@contextlib.asynccontextmanager
async def good_client(server):
    """A client streaming beside the attack (send, wait for the result, repeat); yields it, checks it kept up."""
    client = redteam.GoodClient(ws_url(server), [jpeg(k) for k in range(4)])
    client.start()
    await client.ready.wait()
    loop = asyncio.get_running_loop()
    assert await client.result_after(loop.time(), 20) is not None, client.errors
    t0 = loop.time()
    try:
        yield client
        assert await client.result_after(loop.time(), 10) is not None, client.errors  # still streaming after
        gap = client.max_gap(t0, loop.time())
        assert gap < MAX_GAP_S, f"the good client waited {gap:.2f} s for a frame"
        assert not client.errors, client.errors
    finally:
        await client.stop()


def metric_value(server, sample: str) -> float:
    for line in server.metrics.render().decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_scan_counting_sees_every_scan_and_nothing_else():
    from turbostream.codec import count_scans, encode_jpeg

    assert count_scans(redteam.jpeg_bomb(64, 64, scans=100)) == 101
    assert count_scans(redteam.jpeg_bomb(64, 64, scans=100), limit=10) == 10
    assert count_scans(jpeg(1)) == 1  # baseline: one scan
    progressive = cv2.imencode(".jpg", np.zeros((64, 64, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
    assert 2 <= count_scans(progressive.tobytes()) <= 12
    assert count_scans(b"not a jpeg") == 0
    # Bytes that look like markers inside an APP segment (an EXIF thumbnail, say) are skipped with the segment.
    plain = encode_jpeg(np.zeros((16, 16, 3), np.uint8))
    app = b"\xff\xe1" + (2 + 40).to_bytes(2, "big") + b"\xff\xda" * 20
    assert count_scans(plain[:2] + app + plain[2:]) == 1


def test_decode_bombs_are_refused_before_decoding_and_nobody_waits(engine):
    bombs = [redteam.jpeg_bomb(4096, 4096, scans=20000), redteam.jpeg_bomb_within_ratio(4096, 4096)]

    async def main():
        async with serving(engine) as server, good_client(server):
            for bomb in bombs:
                attackers = [await connect(ws_url(server), max_size=None) for _ in range(2)]
                for ws in attackers:
                    await ws.recv()  # ready
                    await ws.send(bomb)
                for ws in attackers:
                    err = await asyncio.wait_for(next_of_type(ws, "error"), 2)
                    assert err["code"] == "bad_image" and "scans" in err["message"], err
                    await ws.close()
            await asyncio.sleep(1.0)  # the good client streams on for a while after the attackers left
            assert metric_value(server, 'turbostream_errors_total{code="bad_image"}') == 4
            assert metric_value(server, 'turbostream_stage_seconds_count{stage="decode"}') > 0

    run(main())


def segment_walk(size: int = Limits().max_message_bytes) -> bytes:
    """A message of the largest size of 4-byte comment segments (a million) before a valid 64x64 frame header: every
    pre-decode check passed it, and walking its segments took the event loop 2.5 s a message."""
    sof = bytes.fromhex("ffc0 0011 08 0040 0040 03 012200 021100 031100".replace(" ", ""))
    return b"\xff\xd8" + b"\xff\xfe\x00\x02" * ((size - len(sof) - 4) // 4) + sof + b"\xff\xd9"


def test_the_header_check_of_a_segment_walk_costs_the_event_loop_about_a_millisecond():
    from turbostream.codec import MAX_SEGMENTS
    from turbostream.serve.protocol import ProtocolError, check_jpeg_header

    data = segment_walk()
    assert len(data) <= Limits().max_message_bytes
    t0 = time.thread_time()  # this thread's CPU time, whatever else the machine runs
    with pytest.raises(ProtocolError, match=f"more than {MAX_SEGMENTS} segments") as info:
        check_jpeg_header(data, Limits())
    spent = time.thread_time() - t0
    assert info.value.code == "bad_image"
    assert spent < 0.1, f"{spent:.3f} s of the event loop for one message (2.5 s before the segment limit)"


def test_segment_walks_are_refused_at_once_and_nobody_waits(engine):
    data = segment_walk()

    async def main():
        async with serving(engine) as server, good_client(server):
            attackers = [await connect(ws_url(server), max_size=None) for _ in range(2)]
            for ws in attackers:
                await ws.recv()  # ready
                for _ in range(2):
                    await ws.send(data)
            for ws in attackers:
                for seq in (1, 2):
                    err = await asyncio.wait_for(next_of_type(ws, "error"), 5)
                    assert (err["code"], err["seq"]) == ("bad_image", seq) and "segments" in err["message"], err
                await ws.close()
            assert metric_value(server, 'turbostream_errors_total{code="bad_image"}') == 4

    run(main())


def ff_run(size: int = Limits().max_message_bytes) -> bytes:
    """A valid 2048x2048 frame header, then the largest message's worth of 0xFF bytes: the scan walk searches such
    data for markers slowly (0.16 s for 4 MiB until its fill bytes were skipped in one match), so it runs on a codec
    worker, not on the event loop."""
    sof = bytes.fromhex("ffc0 0011 08 0800 0800 03 012200 021100 031100".replace(" ", ""))
    head = b"\xff\xd8" + sof
    return head + b"\xff" * (size - len(head) - 3) + b"\x00\xff\xd9"


def test_the_header_check_on_the_event_loop_leaves_the_scan_walk_to_the_codec_worker():
    from turbostream.serve.protocol import check_jpeg_header

    data = ff_run()
    assert len(data) <= Limits().max_message_bytes
    t0 = time.thread_time()
    check_jpeg_header(data, Limits())  # a frame header within the limits: passes here
    spent = time.thread_time() - t0
    assert spent < 0.02, f"{spent:.3f} s of the event loop for one message (0.16 s when it counted the scans)"
    # On the worker, the walk skips the run of fill bytes in one match: milliseconds (0.11 s when it backtracked),
    # which matters as the regular expressions hold the GIL the event loop needs.
    from turbostream.codec import count_scans

    t0 = time.thread_time()
    assert count_scans(data, Limits().max_jpeg_scans + 1) == 0
    spent = time.thread_time() - t0
    assert spent < 0.03, f"{spent:.3f} s of a codec worker holding the GIL"


def test_a_message_of_ff_bytes_is_answered_and_nobody_waits(engine):
    data = ff_run()

    async def main():
        async with serving(engine) as server, good_client(server):
            ws = await connect(ws_url(server), max_size=None)
            await ws.recv()  # ready
            for _ in range(3):
                await ws.send(data)
            errors = [await asyncio.wait_for(next_of_type(ws, "error"), 10) for _ in range(2)]
            assert all(err["code"] == "bad_image" for err in errors), errors  # the worker: corrupt, never decoded
            await ws.close()

    run(main())


@pytest.mark.parametrize("path", ["/ws", "/ws?token=wrong"])
def test_ping_floods_are_cut_off_and_memory_stays_bounded(engine, path):
    async def main():
        config = {"token": "right"} if "token" in path else {}
        async with serving(engine, **config) as server:
            url = ws_url(server) + ("?token=right" if config else "")
            client = redteam.GoodClient(url, [jpeg(k) for k in range(4)])
            client.start()
            await client.ready.wait()
            loop = asyncio.get_running_loop()
            assert await client.result_after(loop.time(), 20) is not None, client.errors
            rss0, t0 = rss(), loop.time()
            floods = await asyncio.gather(*[
                asyncio.to_thread(redteam.flood_pings, "127.0.0.1", server.port, path, 4.0, 200 * 2**20,
                                  max_connections=20) for _ in range(3)])
            peak = rss()
            assert await client.result_after(loop.time(), 10) is not None, client.errors
            gap = client.max_gap(t0, loop.time())
            await client.stop()
            for flood in floods:
                assert flood["connections"] >= 1 and set(flood["statuses"]) == {101}, flood
                # Every flooding connection was closed by the server, within a fraction of a second.
                assert flood["closed_by_server"] == flood["connections"], flood
                assert max(flood["closed_after_s"]) < 1.0, flood
            assert metric_value(server, 'turbostream_connections_closed_by_limit_total{reason="ping_flood"}') >= 3
            assert peak - rss0 < MAX_RSS_GROWTH, f"RSS grew {(peak - rss0) / 2**20:.0f} MiB"
            assert gap < MAX_GAP_S, f"the good client waited {gap:.2f} s for a frame"
            assert not client.errors, client.errors

    run(main())


def test_a_peer_that_never_reads_its_pongs_is_closed_at_the_send_buffer_limit(engine):
    """Pings within the rate limit, but answered pongs never read: the socket is closed once its buffer passes."""

    async def main():
        async with serving(engine, max_send_buffer_bytes=256 * 1024, max_ping_burst=10**6,
                           max_pings_per_s=10**6) as server, good_client(server):
            flood = await asyncio.to_thread(redteam.flood_pings, "127.0.0.1", server.port, "/ws", 10.0, 400 * 2**20,
                                            reconnect=False)
            assert flood["closed_by_server"] == 1, flood
            assert metric_value(server, 'turbostream_connections_closed_by_limit_total{reason="send_buffer"}') == 1
            assert metric_value(server, "turbostream_send_buffer_bytes") < 256 * 1024

    run(main())


def test_unfinished_handshakes_are_capped_and_hold_bounded_memory(engine):
    """Hundreds of sockets each sending ~1 MiB of headers and never finishing: a few are served at a time."""
    n_sockets = 300
    headers = redteam.padding_headers(2**20)

    def attack(port: int) -> tuple[int, int]:
        """(sockets opened, sockets the server closed): each sends its headers, none finishes its request."""
        socks = []
        try:
            for _ in range(n_sockets):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                socks.append(sock)
                with contextlib.suppress(OSError):  # closed while we were still writing
                    sock.sendall(redteam.handshake_request("127.0.0.1", port, "/ws", headers, end=False))
            closed = 0
            for sock in socks:  # the server ends every one of them (431 past the header limit, or at once)
                sock.settimeout(10)
                try:
                    while sock.recv(65536):
                        pass
                    closed += 1
                except ConnectionResetError:
                    closed += 1
                except TimeoutError:
                    pass
            return len(socks), closed
        finally:
            for sock in socks:
                sock.close()

    async def main():
        async with serving(engine, open_timeout_s=3.0) as server, good_client(server):
            rss0 = rss()
            most = 0

            async def watch():  # the guard's count of handshakes in flight, sampled on the loop that changes it
                nonlocal most
                while True:
                    most = max(most, server.guard.handshaking)
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            opened, closed = await asyncio.to_thread(attack, server.port)
            watcher.cancel()
            peak = rss()
            assert opened == closed == n_sockets, (opened, closed)
            assert 0 < most <= server.config.limits.max_pending_handshakes, most
            assert peak - rss0 < MAX_RSS_GROWTH, f"RSS grew {(peak - rss0) / 2**20:.0f} MiB"
            # Past every place and every handshake slot, a new socket is closed at once.
            assert metric_value(server, 'turbostream_connections_closed_by_limit_total{reason="too_many_sockets"}') > 0
            # The caps are on sockets in flight: once the attack ends, new clients connect as usual.
            ws, _ = await open_client(server)
            await ws.send(jpeg(1))
            assert (await next_result(ws))[0]["seq"] == 1

    run(main())


def test_a_burst_of_connections_past_the_handshake_limit_waits_its_turn(engine):
    """Twelve sockets connected before any sends its request, against max_pending_handshakes 4: the first four are
    read, the other eight wait unread for their turn instead of being cut off, and all twelve are upgraded; no more
    than four requests are parsed at once. A thirteenth that leaves while waiting leaves the line too."""
    n = 12

    def burst(port: int) -> list[bytes]:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
        leaver = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            time.sleep(0.3)  # the server has accepted them all: four handshaking, the rest waiting
            leaver.close()
            for sock in socks:
                sock.sendall(upgrade("/ws"))
            answers = []
            for sock in socks:
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data and (chunk := sock.recv(4096)):
                        data += chunk
                answers.append(data)
            return answers
        finally:
            for sock in socks:
                sock.close()

    async def main():
        async with serving(engine, max_clients=n, max_pending_handshakes=4, open_timeout_s=5.0) as server:
            most, waited_most = 0, 0

            async def watch():
                nonlocal most, waited_most
                while True:
                    most = max(most, server.guard.handshaking)
                    waited_most = max(waited_most, len(server.guard.waiting))
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            answers = await asyncio.to_thread(burst, server.port)
            async with asyncio.timeout(10):  # the leaver is read at its turn, finds its end and is gone
                while server.guard.sockets or server.guard.waiting:
                    await asyncio.sleep(0.05)
            watcher.cancel()
            assert all(a.startswith(b"HTTP/1.1 101") for a in answers), [a[:40] for a in answers]
            assert most == 4 and waited_most == n + 1 - 4, (most, waited_most)
            assert metric_value(server, "turbostream_handshakes_waited_total") == n + 1 - 4
            assert server.guard.handshaking == 0
            assert metric_value(server, 'turbostream_connections_closed_by_limit_total{reason="too_many_sockets"}') == 0

    run(main())


def test_header_limits_are_the_ones_the_readme_states(engine):
    import websockets.http11

    async def main():
        async with serving(engine) as server:
            assert websockets.http11.MAX_NUM_HEADERS == 32 and websockets.http11.MAX_LINE_LENGTH == 8192
            many = "".join(f"X-Pad-{i}: a\r\n" for i in range(40))
            answer = await asyncio.to_thread(raw_request, server.port, upgrade("/ws", many.rstrip("\r\n")))
            assert answer.startswith(b"HTTP/1.1 431"), answer[:100]

    run(main())


@pytest.mark.slow
def test_sigterm_while_codec_workers_decode_the_costliest_allowed_jpegs_exits_0_at_once():
    heavy = redteam.jpeg_bomb(4096, 4096, scans=Limits().max_jpeg_scans - 1, full_resolution=True)  # the most allowed
    proc, port = spawn_serve()
    try:

        async def main():
            senders = [await connect(f"ws://127.0.0.1:{port}/ws", max_size=None) for _ in range(4)]
            for ws in senders:
                await ws.recv()
                for _ in range(3):
                    await ws.send(heavy)
            await asyncio.sleep(0.3)  # the codec workers are busy with them now
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            return t0

        t0 = asyncio.run(main())
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert time.monotonic() - t0 < 5, out
        assert "Traceback" not in out and "terminate called" not in out
    finally:
        proc.kill()


# ------------------------------------------------------------------------------------------------ message floods


@pytest.mark.parametrize("frames", [
    pytest.param(redteam.empty_messages(43690), id="empty-messages"),
    pytest.param(redteam.fragmented_message() * 16, id="empty-fragments"),
])
def test_a_flood_of_tiny_messages_is_cut_off_and_nobody_waits(engine, frames):
    """One 256 KiB write of 43,690 empty messages (or of messages of 4,096 empty fragments) was queued whole and
    handled in one turn of the event loop: every other client stalled 1-2 s per write. Each flooding connection is
    now closed after its first piece of parsing, and the good client streams on."""

    async def main():
        async with serving(engine) as server, good_client(server):
            t0 = time.monotonic()
            floods = await asyncio.gather(*[
                asyncio.to_thread(redteam.flood_pings, "127.0.0.1", server.port, "/ws", 4.0, 64 * 2**20,
                                  max_connections=4, frames=frames) for _ in range(2)])
            for flood in floods:
                assert flood["connections"] >= 1 and set(flood["statuses"]) == {101}, flood
                assert flood["closed_by_server"] == flood["connections"], flood
                assert max(flood["closed_after_s"]) < 1.0, flood
            assert time.monotonic() - t0 < 10
            closed = metric_value(server, 'turbostream_connections_closed_by_limit_total{reason="message_flood"}')
            assert closed == sum(f["connections"] for f in floods)

    run(main())


def test_a_burst_within_the_message_limit_is_served_and_fragments_of_a_kib_are_not_counted(engine):
    """What a real client sends stays within the limit: a burst of 150 configs, and a frame sent in 1 KiB fragments
    (as some client libraries split large messages), each answered on a connection that stays open."""

    async def main():
        async with serving(engine) as server:
            ws, _ = await open_client(server)
            for k in range(150):
                await ws.send(json.dumps({"type": "config", "seed": k}))
            data = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8))[1]
            data = data.tobytes()
            assert len(data) > 64 * 1024  # more than 64 fragments
            await ws.send([data[i:i + 1024] for i in range(0, len(data), 1024)])
            header, image, others = await next_result(ws)
            assert header["seq"] == 1 and image.shape == (64, 64, 3)
            assert not [m for m in others if m["type"] == "error"], others
            # Frames are not counted: 400 at once (a load test with many in flight on a fast engine) pass, the
            # newest is answered.
            frame = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8))[1]
            assert len(frame) >= 1024
            for _ in range(400):
                await ws.send(frame.tobytes())
            while (await next_result(ws))[0]["seq"] != 401:
                pass
            assert metric_value(server, 'turbostream_connections_closed_by_limit_total{reason="message_flood"}') == 0
            await ws.close()

    run(main())


def test_the_message_limit_is_a_token_bucket(engine):
    """Limits.max_message_burst messages at once, then Limits.max_messages_per_s: a client past it is closed."""

    async def main():
        async with serving(engine, max_message_burst=50, max_messages_per_s=10.0) as server:
            ws, _ = await open_client(server)
            for k in range(40):
                await ws.send(json.dumps({"type": "config", "seed": k}))
            await asyncio.sleep(0.5)
            await ws.send(jpeg(1))
            assert (await next_result(ws))[0]["seq"] == 1  # 41 messages: within the burst
            with pytest.raises(ConnectionClosed):
                for k in range(100):
                    await ws.send(json.dumps({"type": "config", "seed": k}))
                    await asyncio.sleep(0.001)
                await asyncio.wait_for(ws.recv(), 5)
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert metric_value(server, 'turbostream_connections_closed_by_limit_total{reason="message_flood"}') == 1

    run(main())


def test_refused_origins_are_logged_once_in_a_while_and_cut_short(engine, caplog):
    """Every refused Origin was a WARNING with the whole header (8 KiB each: 4 MB/s of log from one attacker): each
    Origin is named at most once per 10 s, cut to 100 characters, and counted in /metrics. Another Origin refused
    meanwhile (an operator's own page left out of --allow-origin) is still named, and what was held back is said
    when the server stops."""
    from turbostream.serve import guard

    guard.throttled._last.clear()
    guard.throttled._held.clear()

    async def main():
        async with serving(engine) as server:
            origin = "http://evil.example/" + "x" * 7000
            for _ in range(20):
                answer = await asyncio.to_thread(raw_request, server.port, upgrade("/ws", f"Origin: {origin}"))
                assert answer.startswith(b"HTTP/1.1 403"), answer[:100]
            answer = await asyncio.to_thread(raw_request, server.port, upgrade("/ws", "Origin: https://studio.example"))
            assert answer.startswith(b"HTTP/1.1 403"), answer[:100]
            assert metric_value(server, "turbostream_origins_refused_total") == 21

    with caplog.at_level("WARNING", logger="turbostream"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if "WebSocket from Origin" in r.getMessage()]
    assert len(lines) == 3 and all(len(line) < 250 for line in lines), lines
    assert "evil.example" in lines[0] and "studio.example" in lines[1]
    assert "evil.example" in lines[2] and "(the last of 19 like it, not logged)" in lines[2]  # at the stop
    guard.throttled.warning("origin x", "rejected a WebSocket from Origin %r", "x")
    for _ in range(4):
        guard.throttled.warning("origin x", "rejected a WebSocket from Origin %r", "x")
    guard.throttled._last["origin x"] -= guard.throttled.interval_s  # as if 10 s had passed
    guard.throttled.warning("origin x", "rejected a WebSocket from Origin %r", "x")
    assert "(and 4 more like it in the last 10 s, not logged)" in caplog.records[-1].getMessage()


def test_the_throttled_log_remembers_a_bounded_number_of_keys():
    import logging

    from turbostream.serve.guard import ThrottledLog

    log = ThrottledLog(logging.getLogger("turbostream.test"), max_keys=8)
    for k in range(1000):
        log.warning(f"origin http://o{k}.example", "refused %s", k)
        log.warning(f"origin http://o{k}.example", "refused %s", k)  # held back
    assert len(log._last) <= 9 and len(log._held) <= 9


def test_a_malformed_request_target_or_host_is_a_400_or_403_and_logs_nothing(engine, caplog):
    """urlsplit raises on "//[" and "http://[::1/ws" (and on a Host of "[::1"): the exception left the request hook,
    so websockets answered 500 and logged a traceback for each request, a log any peer could grow at a megabyte a
    second. The peer's error now gets 400 (a malformed Host is no loopback name: 403), and the log stays quiet."""
    import logging

    async def main():
        async with serving(engine) as server:
            requests = [f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
                        for target in ("//[", "http://[::1/ws", "//a]b")]
            requests.append(upgrade("/ws", "Origin: http://[::1").replace(b"Host: 127.0.0.1", b"Host: [::1"))
            return [await asyncio.to_thread(raw_request, server.port, request) for request in requests]

    caplog.set_level(logging.ERROR)
    answers = run(main())
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 400 Bad Request"] * 3 + [b"HTTP/1.1 403 Forbidden"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_loopback_server_s_pages_and_metrics_answer_loopback_names_only(engine):
    """A DNS-rebinding page (its own domain resolved to 127.0.0.1) read /metrics of a server on a laptop as its own
    origin's: clients, memory. The pages and /metrics of a loopback-bound server now answer loopback names only (and
    the hosts of --allow-origin, for a proxy on the same machine); the health probes answer any Host (a proxy's
    check names the service it likes)."""
    from websockets.datastructures import Headers
    from websockets.http11 import Request

    from turbostream.serve.http import OriginPolicy

    async def main():
        async with serving(engine) as server:
            def status(path: str, *hosts: str) -> int:
                headers = "".join(f"Host: {h}\r\n" for h in hosts)
                answer = raw_request(server.port, f"GET {path} HTTP/1.1\r\n{headers}\r\n".encode(), timeout=3)
                return int(answer.split(b" ", 2)[1])

            evil = f"evil.example:{server.port}"
            return {(path, host): await asyncio.to_thread(status, path, host)
                    for path in ("/", "/view", "/metrics", "/healthz", "/readyz", "/nothing")
                    for host in (evil, f"127.0.0.1:{server.port}", f"localhost:{server.port}", "[::1")}, \
                await asyncio.to_thread(status, "/metrics", f"127.0.0.1:{server.port}", evil)

    statuses, twice = run(main())
    # A proxy on the same machine that passes the public Host on: the --allow-origin page's host is answered too.
    behind = OriginPolicy("127.0.0.1", ("https://stylize.example",))
    assert behind.host_allowed(Request("/", Headers([("Host", "stylize.example")])))
    assert not behind.host_allowed(Request("/", Headers([("Host", "evil.example")])))
    assert OriginPolicy("127.0.0.1", ("*",)).host_allowed(Request("/", Headers([("Host", "evil.example")])))
    for (path, host), code in statuses.items():
        loopback = host.startswith(("127.0.0.1", "localhost"))
        if path in ("/healthz", "/readyz"):
            assert code == 200, (path, host, code)  # ready (serving() waits for it), whatever the Host
        else:
            assert code == (404 if path == "/nothing" else 200) if loopback else code == 403, (path, host, code)
    assert twice == 403


def test_head_gets_the_headers_without_the_body_and_other_methods_get_405(engine):
    """Every route answered any method as GET: HEAD got the body (HTTP forbids it), POST and DELETE got 200."""

    async def main():
        async with serving(engine) as server:
            def ask(method: str, path: str) -> bytes:
                return raw_request(server.port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
                                   timeout=3)

            get = await asyncio.to_thread(ask, "GET", "/metrics")
            head = await asyncio.to_thread(ask, "HEAD", "/metrics")
            others = [await asyncio.to_thread(ask, method, "/") for method in ("POST", "DELETE", "BREW")]
            return get, head, others

    get, head, others = run(main())
    get_head, get_body = get.split(b"\r\n\r\n", 1)
    head_head, head_body = head.split(b"\r\n\r\n", 1)
    assert head_head.startswith(b"HTTP/1.1 200") and head_body == b"" and len(get_body) > 1000
    length = [line for line in head_head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    assert length and int(length[0].split(b":")[1]) > 1000  # what a GET would send
    for answer in others:
        assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed") and b"Allow: GET, HEAD" in answer


def test_a_client_that_leaves_while_the_engine_warms_up_gives_its_place_back_at_once():
    """A place was held until the warmup ended, also for a peer that had gone: every page reload during a first
    start's minutes of loading used up a place, and the next visitor got server_full with nobody connected."""
    import threading

    from turbostream.serve import TurboServer

    release = threading.Event()

    def loading_factory():
        release.wait(30)
        raise RuntimeError("loading given up")

    async def main():
        server = TurboServer(config=server_config(max_clients=2), engine_factory=loading_factory)
        await server.start()
        try:
            for _ in range(3):  # three reloads of the page
                ws = await connect(ws_url(server))
                async with asyncio.timeout(10):
                    while server.places["client"] != 1:
                        await asyncio.sleep(0.01)
                await ws.close()
                async with asyncio.timeout(10):
                    while server.places["client"] != 0:
                        await asyncio.sleep(0.01)
            waiting = await connect(ws_url(server))  # not refused as full: it waits for the engine
            async with asyncio.timeout(10):
                while server.places["client"] != 1:
                    await asyncio.sleep(0.01)
            await waiting.close()
        finally:
            release.set()
            await server.stop()

    run(main())


def test_a_connections_latency_window_is_bounded():
    """Each connection keeps its recent latencies for its stats: a client streaming for days keeps LATENCY_WINDOW
    of them, not every frame's, and the stats' percentiles are of those."""
    from turbostream.serve.sessions import LATENCY_WINDOW, Counters

    counts = Counters()
    for k in range(10 * LATENCY_WINDOW):
        counts.latencies.append(k / 1000)
    assert len(counts.latencies) == LATENCY_WINDOW
    # The percentiles are those of the recent window (latencies 2304..2559 ms), each exactly where it falls.
    first = 9 * LATENCY_WINDOW
    assert counts.snapshot()["latency_ms"] == {"p50": first + LATENCY_WINDOW // 2,
                                               "p95": first + int(0.95 * LATENCY_WINDOW)}


def test_a_reader_that_is_behind_gets_the_newest_text_messages_only():
    """Stats and errors for a connection whose send is stuck are kept at Outbox.TEXT_LIMIT, oldest dropped first
    (README's limits table): a peer that stops reading cannot grow them."""
    from turbostream.serve.sessions import Outbox

    sent: list[str] = []

    class StuckThenFree:
        def __init__(self) -> None:
            self.free = asyncio.Event()

        async def send(self, message) -> None:
            await self.free.wait()
            sent.append(message)

    async def main():
        ws = StuckThenFree()
        outbox = Outbox(server=None, ws=ws, on_drop=lambda why: None)
        task = asyncio.create_task(outbox.run())
        outbox.text({"n": -1})  # taken by the sender, which then waits on the socket
        await asyncio.sleep(0.05)
        for n in range(100):
            outbox.text({"n": n})
        ws.free.set()
        while len(sent) < 1 + Outbox.TEXT_LIMIT:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        return [json.loads(m)["n"] for m in sent]

    assert asyncio.run(main()) == [-1, *range(100 - Outbox.TEXT_LIMIT, 100)]


def test_frames_sent_while_the_engine_warms_up_are_buffered_within_max_queue():
    """Nothing reads a client's messages until the engine is ready (minutes with --compile), and frames are too big
    for the message-rate limit: websockets' max_queue (Limits.max_queue_messages) is all that bounds what the server
    takes from it meanwhile. Without it one client pushed 200 MiB into the server in seconds."""
    import threading

    from websockets.frames import Frame, Opcode

    from turbostream.serve import TurboServer

    release = threading.Event()

    def loading_factory():
        release.wait(60)
        raise RuntimeError("loading given up")

    def flood(port: int, messages: int, size: int, seconds: float) -> int:
        """Handshake on /ws, then send `messages` binary messages of `size` bytes; bytes the server took."""
        sock, answer = _raw_websocket(port, "/ws")
        with sock:
            assert answer.startswith(b"HTTP/1.1 101"), answer[:80]
            frame = Frame(Opcode.BINARY, b"\xff\xd8\xff" + bytes(size - 3)).serialize(mask=True)
            sock.setblocking(False)
            sent, deadline = 0, time.monotonic() + seconds
            while sent < len(frame) * messages and time.monotonic() < deadline:
                try:
                    sent += sock.send(memoryview(frame)[sent % len(frame):])
                except BlockingIOError:
                    time.sleep(0.01)
            return sent

    async def main():
        server = TurboServer(config=server_config(), engine_factory=loading_factory)
        await server.start()
        try:
            return await asyncio.to_thread(flood, server.port, 200, 2**20, 4.0)
        finally:
            release.set()
            await server.stop()
            await asyncio.to_thread(server.batcher.stop, 10)

    taken = run(main())
    queue = Limits().max_queue_messages
    assert taken < (queue + 24) * 2**20, f"{taken / 2**20:.0f} MiB taken"  # the queue, plus the sockets' buffers

