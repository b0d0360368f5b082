"""Faults, each against a real server on port 0 with real websockets clients (tiny random engine on the CPU).

Clients that vanish without closing, half-open connections, a client that never reads, the engine raising in the
middle of a batch, a prompt-change storm, the server-side source disappearing, SIGTERM under load. Every wait is
bounded; timed assertions carry wide margins (a busy 2-core CI machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
from test_server import (
    http_get,
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
from websockets.exceptions import ConnectionClosed

import turbostream.serve.sessions as sessions_module
from turbostream.config import Limits, preset
from turbostream.engine import Engine
from turbostream.serve import TurboServer


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


async def eventually(condition, timeout: float, what: str, every: float = 0.02) -> None:
    """Wait until condition() is true; fail with `what` after timeout seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(every)
    assert condition(), what


def metric(server, name: str) -> float:
    for line in server.metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------ vanishing clients


async def _vanish(server, kind: int, payload: bytes) -> bool:
    """One client that goes away without a close frame, in one of six ways; False if it was refused a place."""
    if kind == 0:  # TCP only: connect and reset
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.transport.abort()
    elif kind == 1:  # half an HTTP upgrade request, then gone
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        await writer.drain()
        writer.transport.abort()
    else:
        ws = await connect(ws_url(server), open_timeout=10, ping_interval=None)
        if kind >= 3:
            ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if ready["type"] != "ready":  # a refused one (server_full) has vanished all the same
                ws.transport.abort()
                return False
        if kind == 3:  # a frame sent, gone before its result
            await ws.send(payload)
        elif kind == 4:  # half of a masked binary frame, then gone
            header = bytes([0x82, 0xFE]) + len(payload).to_bytes(2, "big") + b"\x00\x00\x00\x00"
            ws.transport.write(header + payload[: len(payload) // 2])
        if kind == 5:  # FIN without a close frame
            await ws.send(payload)
            ws.transport.close()
        else:  # kind 2 (right after the handshake), 3, 4: RST
            ws.transport.abort()
    return True


def test_hundreds_of_clients_that_vanish_without_closing(engine):
    async def main():
        # Few places: a slot that leaked would soon refuse everyone.
        async with serving(engine, max_clients=3) as server:
            good, _ = await open_client(server)
            await good.send(jpeg(0))
            await next_result(good)
            fds, threads = open_fds(), os_threads()
            payload = jpeg(1)
            answered = admitted = 0
            for i in range(300):
                admitted += await _vanish(server, i % 6, payload)
                if i % 30 == 29:  # the remaining client is served all along
                    await good.send(payload)
                    answered += (await next_result(good))[0]["seq"] > 0
            assert answered == 10
            assert admitted >= 270  # places free up as fast as clients vanish (a few may still be closing)
            await eventually(lambda: len(server.clients) == 1 and server.places["client"] == 1, 15, "sessions not released")
            await eventually(lambda: server.batcher.stream_count == 1, 5, "batcher streams not released")
            # Every vanished socket is closed (a few may linger for close_timeout after a FIN).
            await eventually(lambda: open_fds() <= fds + 2, 15, f"descriptors: {open_fds()} now, {fds} before")
            assert os_threads() <= threads + 4  # the codec pool may still start a worker or two, no more
            assert metric(server, "turbostream_clients") == 1
            assert server.batcher._pending == {}
            # A new client still gets a place and a picture.
            other, _ = await open_client(server)
            await other.send(payload)
            assert (await next_result(other))[0]["seq"] == 1

    run(main())


def test_half_open_connections_are_closed_by_the_ping_timeout(engine):
    # A peer that vanished without a FIN or RST (cable pulled, laptop lid shut) only shows as missing pongs.
    async def main():
        async with serving(engine, max_clients=2, ping_interval_s=0.3, close_timeout_s=0.5) as server:
            silent = []
            for _ in range(2):
                ws = await connect(ws_url(server), ping_interval=None)
                json.loads(await ws.recv())
                ws.transport.pause_reading()  # never reads again: pings go unanswered
                silent.append(ws)
            assert len(server.clients) == 2
            t0 = time.monotonic()
            await eventually(lambda: not server.clients and server.places["client"] == 0, 20, "silent clients not reaped")
            assert time.monotonic() - t0 < 15
            # Their places are free again.
            ws, _ = await open_client(server)
            await ws.send(jpeg(1))
            assert (await next_result(ws))[0]["seq"] == 1
            for dead in silent:
                dead.transport.abort()

    run(main())


def test_connections_that_never_finish_the_handshake_are_closed_by_the_open_timeout(engine):
    async def main():
        async with serving(engine, max_clients=1, open_timeout_s=0.5) as server:
            fds = open_fds()
            writers = []
            for i in range(40):  # silent sockets, and half an upgrade request
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                if i % 2:
                    writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                writers.append((reader, writer))
            assert open_fds() >= fds + 40
            # They hold no client place meanwhile (max_clients is 1).
            ws, _ = await open_client(server)
            await ws.send(jpeg(1))
            assert (await next_result(ws))[0]["seq"] == 1
            async with asyncio.timeout(15):  # the server hangs up on each of them
                for reader, _ in writers:
                    await reader.read()
            for _, writer in writers:
                writer.close()
            await eventually(lambda: open_fds() <= fds + 3, 10, f"descriptors: {open_fds()} now, {fds} before")

    run(main())


# ------------------------------------------------------------------------------------------------ a client that never reads


def test_client_that_never_reads_is_skipped_and_bounded_and_delays_no_one(engine):
    async def main():
        async with serving(engine) as server:
            good, _ = await open_client(server)

            async def stream(ws, seconds: float) -> list[float]:
                """Send, wait for the result, repeat: the times results arrived."""
                times, deadline = [], time.monotonic() + seconds
                i = 0
                while time.monotonic() < deadline:
                    i += 1
                    await ws.send(jpeg(i))
                    header, _, others = await next_result(ws)
                    assert not [m for m in others if m["type"] == "error"], others
                    times.append(time.monotonic())
                return times

            alone = await stream(good, 2.0)
            # The stalled client: tiny socket buffers on both ends, reads its ready message, then never again.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            stalled_ws = await connect(ws_url(server), sock=sock, ping_interval=None, max_size=2**23)
            json.loads(await stalled_ws.recv())
            stalled_ws.transport.pause_reading()
            session = next(s for s in server.clients if s.ws.remote_address[1] == sock.getsockname()[1])
            session.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            flooding = True

            async def flood():
                i = 0
                while flooding:
                    i += 1
                    await stalled_ws.send(jpeg(i))
                    await asyncio.sleep(0.005)

            flooder = asyncio.create_task(flood())
            together = await stream(good, 3.0)
            # Skipped, never queued: the socket's user-space buffer stays at the write limit plus one message,
            # the outbox holds one result, and the skipped ones are counted as dropped at the send stage.
            # (Its frames are also dropped before the engine, at decode and queue, while the engine is busy: wait
            # for the send stage itself.)
            await eventually(lambda: b'turbostream_frames_dropped_total{stage="send"}' in server.metrics.render()
                             and metric(server, 'turbostream_frames_dropped_total{stage="send"}') > 5, 20,
                             "the stalled client's results were not skipped")
            buffered = session.ws.transport.get_write_buffer_size()
            assert buffered <= Limits().write_limit_bytes + 64 * 1024
            assert metric(server, "turbostream_send_buffer_bytes") <= Limits().write_limit_bytes + 64 * 1024
            assert metric(server, 'turbostream_frames_dropped_total{stage="send"}') > 5
            assert session.counts.frames_in > session.counts.frames_out
            flooding = False
            await flooder
            # The other client kept its pace: a share of its rate alone (generous: the engine is shared now) and
            # no stall longer than a second.
            rate_alone, rate_together = len(alone) / 2.0, len(together) / 3.0
            assert rate_together >= 0.25 * rate_alone, (rate_alone, rate_together)
            gaps = [b - a for a, b in zip(together, together[1:])]
            assert max(gaps) < 1.0, max(gaps)
            # Reading again, the stalled client gets its newest result; nothing piled up for it meanwhile.
            stalled_ws.transport.resume_reading()
            seqs = []
            async with asyncio.timeout(20):
                while not seqs or seqs[-1] < session.seq:
                    seqs.append((await next_result(stalled_ws))[0]["seq"])
            assert seqs == sorted(set(seqs)) and len(seqs) < session.seq

    run(main())


# ------------------------------------------------------------------------------------------------ engine failures


FAIL_PROMPT = "this prompt makes the engine fail"


class FlakyEngine:
    """The real engine behind a switch: raises while `broken`, or for any batch holding a FAIL_PROMPT stream.

    `gate` holds the inference thread inside a call, so frames pile up into the next batch.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.broken = False
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[int] = []  # batch size of every call, failed ones included

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, frames, params, **kw):  # the batcher's way in (pipelined calls); run() is collect(submit())
        self.calls.append(len(frames))
        self.gate.wait(20)
        if self.broken or any(p.prompt == FAIL_PROMPT for p in params):
            raise RuntimeError("simulated device failure")
        return self._engine.submit(frames, params, **kw)

    def run(self, frames, params, **kw):
        return self._engine.collect(self.submit(frames, params, **kw))


async def _answer(ws, seq: int, timeout: float = 20.0) -> str:
    """'image' or the error code that answers frame seq (other messages are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                continue
            obj = json.loads(msg)
            if obj["type"] == "frame" and obj["seq"] == seq:
                assert isinstance(await ws.recv(), bytes)
                return "image"
            if obj["type"] == "error" and obj.get("seq") == seq:
                return obj["code"]


def test_engine_failing_mid_batch_answers_every_affected_client_with_an_error(engine):
    flaky = FlakyEngine(engine)

    async def main():
        async with serving(flaky) as server:
            clients = [(await open_client(server))[0] for _ in range(4)]
            first, rest = clients[0], clients[1:]
            # The first client's frame holds the inference thread; the others' frames gather into one batch.
            flaky.gate.clear()
            await first.send(jpeg(0))
            await eventually(lambda: flaky.calls, 10, "the first frame did not reach the engine")
            for i, ws in enumerate(rest):
                await ws.send(jpeg(i + 1))
            await eventually(lambda: len(server.batcher._pending) == 3, 10, "frames did not gather")
            flaky.broken = True
            n_before = len(flaky.calls)  # the held call is counted already
            flaky.gate.set()
            answers = await asyncio.gather(*(_answer(ws, 1) for ws in clients))
            assert answers == ["engine_error"] * 4
            # The batch of three failed, then each of its frames was tried alone before giving up.
            assert 3 in flaky.calls[n_before - 1 :]
            # The engine recovers; every stream goes on from its next frame.
            flaky.broken = False
            for ws in clients:
                await ws.send(jpeg(9))
            assert await asyncio.gather(*(_answer(ws, 2) for ws in clients)) == ["image"] * 4
            status, _, _ = await asyncio.to_thread(http_get, server, "/healthz")
            assert status == 200 and server.batcher.alive
            assert metric(server, 'turbostream_errors_total{code="engine_error"}') == 4

    run(main())


def test_one_stream_that_breaks_the_engine_does_not_break_the_others(engine):
    flaky = FlakyEngine(engine)

    async def main():
        async with serving(flaky) as server:
            (bad, _), (good, _) = await open_client(server), await open_client(server)
            await bad.send(json.dumps({"type": "config", "prompt": FAIL_PROMPT}))
            await next_of_type(bad, "config")
            for seq in range(1, 11):
                await asyncio.gather(bad.send(jpeg(seq)), good.send(jpeg(seq)))
                assert await asyncio.gather(_answer(bad, seq), _answer(good, seq)) == ["engine_error", "image"]
            await bad.send(json.dumps({"type": "config", "prompt": "a quiet lake"}))
            await next_of_type(bad, "config")
            await bad.send(jpeg(11))
            assert await _answer(bad, 11) == "image"

    run(main())


# ------------------------------------------------------------------------------------------------ prompt storm


def test_prompt_change_storm_keeps_the_text_encoder_and_caches_bounded(tiny_components):
    engine = Engine(preset("test", prompt_cache_size=8, noise_cache_size=8), tiny_components)

    async def main():
        # The message limit (a burst of 200) would close a client sending 1000 configs at once: raised here, so the
        # storm reaches the server and what it may cost the engine is what is measured.
        async with serving(engine, max_message_burst=2000) as server:
            (storm, _), (calm, _) = await open_client(server), await open_client(server)
            await calm.send(jpeg(0))
            await next_result(calm)
            await storm.send(jpeg(0))
            await next_result(storm)
            runs0, frames0 = engine.stats.text_encoder_runs, engine.stats.frames
            # 1000 changes without a frame: the text encoder runs only for prompts that reach a batch.
            for i in range(1000):
                await storm.send(json.dumps({"type": "config", "prompt": f"storm prompt {i}", "seed": i}))
            await storm.send(jpeg(1))
            header, _, others = await next_result(storm)
            assert header["seq"] == 2
            echoes = [m for m in others if m["type"] == "config"]
            assert not [m for m in others if m["type"] == "error"]
            # Echoes of a reader that is behind are skipped oldest first; the newest always arrives.
            indexes = [int(m["prompt"].rsplit(" ", 1)[1]) for m in echoes]
            assert indexes and indexes[-1] == 999 and indexes == sorted(set(indexes)), indexes[:20]
            assert engine.stats.text_encoder_runs - runs0 <= engine.stats.frames - frames0
            assert engine.stats.text_encoder_runs - runs0 <= 3
            # A change before every frame, while another client streams: one encoder run per frame at most, and
            # the caches stay at their limits.
            calm_results = 0
            for i in range(40):
                await storm.send(json.dumps({"type": "config", "prompt": f"frame prompt {i}", "seed": 10_000 + i}))
                await asyncio.gather(storm.send(jpeg(i)), calm.send(jpeg(i)))
                await next_result(storm)
                await next_result(calm)
                calm_results += 1
            assert engine.prompt_cache_len <= 8 and len(engine._noise) <= 8
            assert engine.stats.prompt_cache_evictions >= 30
            assert engine.stats.text_encoder_runs - runs0 <= 3 + 40
            assert calm_results == 40

    run(main())


# ------------------------------------------------------------------------------------------------ SIGTERM under load


@pytest.mark.slow
def test_sigterm_under_load_closes_every_client_with_1001_and_exits_0(tmp_path):
    import cv2

    # The command's own --source path too: a folder of three frames, which ends (and is not opened again).
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"f{i}.png"), np.full((48, 64, 3), 60 * i, np.uint8))
    proc, port = spawn_serve("--source", str(folder))
    try:

        async def main():
            results = [0] * 6
            started = asyncio.Event()

            async def client(k: int) -> int:
                async with connect(f"ws://127.0.0.1:{port}/ws", max_size=2**23) as ws:
                    assert json.loads(await ws.recv())["type"] == "ready"
                    try:
                        while True:
                            await ws.send(jpeg(k))  # two in flight: the server is never idle
                            await ws.send(jpeg(k + 1))
                            while True:
                                msg = await ws.recv()
                                if isinstance(msg, bytes):
                                    results[k] += 1
                                    if min(results) >= 3:
                                        started.set()
                                    break
                    except ConnectionClosed as exc:
                        return exc.rcvd.code if exc.rcvd else -1

            viewer = await connect(f"ws://127.0.0.1:{port}/view/ws")
            states, viewer_frames = [], 0
            async with asyncio.timeout(30):
                while "ended" not in states:
                    msg = await viewer.recv()
                    if isinstance(msg, bytes):
                        viewer_frames += 1
                    elif json.loads(msg)["type"] == "source":
                        states.append(json.loads(msg)["state"])
            assert viewer_frames >= 1 and "live" in states
            tasks = [asyncio.create_task(client(k)) for k in range(6)]
            await asyncio.wait_for(started.wait(), 60)
            proc.send_signal(signal.SIGTERM)
            codes = await asyncio.gather(*tasks)
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await viewer.recv()
            return [*codes, info.value.rcvd.code]

        assert run(main()) == [1001] * 7
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stdout.read()
    assert "shutting down" in output and "Traceback" not in output


# ------------------------------------------------------------------------------------------------ the source disappears


class Camera:
    """A network camera that can be unplugged: readers deliver frames while `up`, opening fails while it is down."""

    def __init__(self) -> None:
        self.up = True
        self.opens = 0

    def open(self, spec):
        from turbostream.io.sources import SourceError

        self.opens += 1
        if not self.up:
            raise SourceError(f"could not open {spec.describe()}: connection refused")
        camera = self

        class Reader:
            fps, frame_count, size = 50.0, None, (64, 48)

            def read(self):
                time.sleep(0.02)
                if not camera.up:
                    return None
                return np.full((48, 64, 3), 90, np.uint8)

            def release(self):
                pass

        return Reader()


def _viewer_messages(ws):
    """Everything a viewer receives, as ('frame', None) or (type, message), collected by a task."""
    seen: list[tuple[str, dict | None]] = []

    async def collect():
        async for msg in ws:
            seen.append(("frame", None) if isinstance(msg, bytes) else (json.loads(msg)["type"], json.loads(msg)))

    return seen, asyncio.create_task(collect())


def test_a_long_lost_source_is_opened_again_at_the_capped_interval(engine):
    """A source lost for long is retried every source_retry_max_s at most (the doubling stops there): without the
    cap a camera lost overnight came back minutes to hours after it was plugged in again."""
    from turbostream.io.sources import CaptureThread, SourceSpec

    camera = Camera()
    camera.up = False  # lost from the start, and for long
    spec = SourceSpec("url", "rtsp://camera.invalid/stream", "rtsp://camera.invalid/stream")

    def factory(text):
        return CaptureThread(spec, realtime=True, reconnect=0, reconnect_delay_s=0.01, opener=camera.open)

    async def main():
        server = TurboServer(engine, server_config(source=spec.text, source_retry_s=0.02, source_retry_max_s=0.1),
                             capture_factory=factory)
        await server.start()
        try:
            await open_client(server, "/view/ws")  # the source runs while someone watches
            delays = []
            async with asyncio.timeout(30):
                while server.broadcast.restarts < 8:
                    delay = server.broadcast.state.get("retry_in_s")
                    if delay is not None and (not delays or delay != delays[-1]):
                        delays.append(delay)
                    await asyncio.sleep(0.005)
            camera.up = True
            t0 = time.monotonic()
            await eventually(lambda: server.broadcast.state["state"] == "live", 30, "never live again")
            return delays, time.monotonic() - t0
        finally:
            await server.stop()

    delays, back_after = run(main())
    assert max(delays) == pytest.approx(0.1) and back_after < 1.0, (delays, back_after)


def test_a_slow_broadcast_encoder_drops_old_results_instead_of_queueing_them(engine, monkeypatch):
    """The broadcast's results wait for the encoder in one slot: when encoding is slower than the engine, the older
    result is dropped (frames_dropped{stage="encode"}); queued, viewers fell minutes behind and memory grew."""
    import turbostream.serve.broadcast as broadcast_module
    from turbostream.io.sources import CaptureThread, SourceSpec

    encode = broadcast_module.timed_encode

    def slow_encode(*args):
        time.sleep(0.3)  # a busy codec pool, or a large frame
        return encode(*args)

    monkeypatch.setattr(broadcast_module, "timed_encode", slow_encode)
    camera = Camera()
    spec = SourceSpec("url", "rtsp://camera.invalid/stream", "rtsp://camera.invalid/stream")

    async def main():
        server = TurboServer(engine, server_config(source=spec.text),
                             capture_factory=lambda text: CaptureThread(spec, realtime=True, opener=camera.open))
        await server.start()
        try:
            await open_client(server, "/view/ws")
            # A queue drops nothing and grows by about a frame each 0.3 s encode: this waits out 30 s then.
            encode_drops = server.metrics.frames_dropped.labels("encode")
            await eventually(lambda: encode_drops._value.get() >= 5, 30, "no result dropped for the encoder")
            assert server.broadcast._latest is None or isinstance(server.broadcast._latest, np.ndarray)
        finally:
            await server.stop()

    run(main())


def test_lost_live_source_is_reported_and_opened_again_while_clients_go_on(engine):
    from turbostream.io.sources import CaptureThread, SourceSpec

    camera = Camera()
    spec = SourceSpec("url", "rtsp://camera.invalid/stream", "rtsp://camera.invalid/stream")
    captures = []

    def factory(text):
        captures.append(CaptureThread(spec, realtime=True, reconnect=2, reconnect_delay_s=0.05, opener=camera.open))
        return captures[-1]

    async def main():
        server = TurboServer(engine, server_config(source=spec.text, source_retry_s=0.1), capture_factory=factory)
        await server.start()
        try:
            viewer, ready = await open_client(server, "/view/ws")
            seen, collector = _viewer_messages(viewer)
            client, _ = await open_client(server)
            frames = lambda: sum(1 for kind, _ in seen if kind == "frame")  # noqa: E731
            await eventually(lambda: frames() >= 3, 20, "no broadcast frames")
            camera.up = False  # unplugged: reads stop, and so does every reopen
            await eventually(lambda: server.broadcast.restarts >= 2, 20, "the lost source was not opened again")
            assert frames() >= 3 and server.broadcast.state["state"] == "reconnecting"
            # The interactive stream never noticed.
            for seq in (1, 2):
                await client.send(jpeg(seq))
                assert (await next_result(client))[0]["seq"] == seq
            n_lost = frames()
            camera.up = True  # plugged back in
            await eventually(lambda: frames() >= n_lost + 3, 20, "frames did not come back")
            codes = [m["code"] for kind, m in seen if kind == "error"]
            states = [m["state"] for kind, m in seen if kind == "source"]
            assert codes and set(codes) == {"source_lost"}  # told once per loss, not at every attempt
            assert states[0] == "starting" and "live" in states and states[-1] == "live"
            assert states.index("reconnecting") > states.index("live")
            # The capture's own quick reconnects came first, then the server's reopenings; all counted.
            assert captures[0].reconnects == 2 and len(captures) >= 3
            assert metric(server, "turbostream_source_reconnects_total") >= 2
            assert metric(server, "turbostream_source_restarts_total") == server.broadcast.restarts >= 2
            assert metric(server, "turbostream_source_up") == 1
            # A viewer arriving now hears the state in its first messages.
            late, _ = await open_client(server, "/view/ws")
            assert (await next_of_type(late, "source"))["state"] == "live"
            collector.cancel()
        finally:
            await server.stop()
        assert all(not c._thread.is_alive() for c in captures if c._thread is not None)

    run(main())


def test_a_file_source_that_ends_stays_ended(engine, tmp_path, caplog):
    import cv2

    from turbostream.io.sources import CaptureThread

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"f{i}.png"), np.full((48, 64, 3), 40 * i, np.uint8))
    opened = []

    def factory(text):
        opened.append(CaptureThread(text, realtime=True))
        return opened[-1]

    async def main():
        server = TurboServer(engine, server_config(source=str(folder)), capture_factory=factory)
        await server.start()
        try:
            viewer, _ = await open_client(server, "/view/ws")
            err = await next_of_type(viewer, "error")
            assert err["code"] == "source_ended"
            assert server.broadcast.state["state"] == "ended" and server.broadcast.restarts == 0
            await eventually(lambda: not server.broadcast.running, 10, "the source thread did not end")
            assert len(opened) == 1  # a file that ended is not opened again
        finally:
            await server.stop()

    with caplog.at_level("INFO", logger="turbostream"):
        run(main())
    # A file's normal end is news, not an error: logged at INFO.
    ends = [r for r in caplog.records if "source" in r.getMessage() and "ended" in r.getMessage()]
    assert ends and all(r.levelname == "INFO" for r in ends), [(r.levelname, r.getMessage()) for r in ends]


# ------------------------------------------------------------------------------------------------ codec failures


def test_a_codec_failure_answers_its_frame_and_the_stream_goes_on(engine, monkeypatch):
    # Not the client's fault (memory, a codec bug), but its frame must still be answered: a client that keeps one
    # or two frames in flight waits for exactly that answer before it sends again.
    real_decode, real_encode = sessions_module.timed_decode, sessions_module.timed_encode
    poison = jpeg(99)
    encoder_failures = [RuntimeError("simulated encoder failure")]

    def decode(data, *args):
        if data == poison:
            raise MemoryError("simulated: no memory for this decode")
        return real_decode(data, *args)

    def encode(rgb, quality, *args):
        if encoder_failures:
            raise encoder_failures.pop()
        return real_encode(rgb, quality, *args)

    monkeypatch.setattr(sessions_module, "timed_decode", decode)
    monkeypatch.setattr(sessions_module, "timed_encode", encode)

    async def main():
        async with serving(engine) as server:
            ws, _ = await open_client(server)
            await ws.send(jpeg(1))
            assert await _answer(ws, 1) == "server_error"  # its result could not be encoded
            await ws.send(poison)
            assert await _answer(ws, 2) == "server_error"  # it could not be decoded
            for seq in (3, 4):
                await ws.send(jpeg(seq))
                assert await _answer(ws, seq) == "image"
            assert metric(server, 'turbostream_errors_total{code="server_error"}') == 2

    run(main())
