"""The server end to end: a real server on port 0, real websockets clients, the tiny random engine on the CPU."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_codec import oriented_jpeg
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from turbostream.codec import CpuJpeg, decode_jpeg, encode_jpeg
from turbostream.config import Limits, ServerConfig, preset
from turbostream.engine import Engine
from turbostream.serve import TurboServer
from turbostream.serve.protocol import ERROR_CODES
from turbostream.serve.sessions import Outbox, OutItem

TIMEOUT = 60  # per test, generous: a 2-core CI machine under load


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def server_config(**config) -> ServerConfig:
    """ServerConfig on port 0; keyword arguments naming a Limits field (max_clients=2, ...) go into its limits."""
    names = {f.name for f in dataclasses.fields(Limits)}
    limits = Limits(**{k: config.pop(k) for k in list(config) if k in names})
    return ServerConfig(**{"port": 0, **config}, limits=limits)


@contextlib.asynccontextmanager
async def serving(engine, **config):
    server = TurboServer(engine, server_config(**config))
    await server.start()
    assert await server.wait_ready(30)
    try:
        yield server
    finally:
        await server.stop()


def ws_url(server, path="/ws") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def open_client(server, path="/ws", **kw):
    ws = await connect(ws_url(server, path), max_size=2**23, compression=None, **kw)
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ws, ready


def jpeg(seed: int = 0, size=(96, 128)) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth content (gradients + a block), so results differ by parameters, not by JPEG noise.
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, rng.integers(0, 255))], -1).astype(np.uint8)
    img[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(0, 255, 3)
    return encode_jpeg(img, 90)


async def next_result(ws, timeout=20.0):
    """Read until a result: (frame header, decoded RGB, other text messages seen on the way)."""
    others, header = [], None
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                assert header is not None, "a result must follow its frame header"
                return header, decode_jpeg(msg), others
            obj = json.loads(msg)
            if obj["type"] == "frame":
                header = obj
            else:
                others.append(obj)


async def next_of_type(ws, type_, timeout=20.0):
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.recv()
            if isinstance(msg, str) and json.loads(msg)["type"] == type_:
                return json.loads(msg)


def http_get(server, path, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read()


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ------------------------------------------------------------------------------------------------ streams


def test_round_trip(engine):
    async def main():
        async with serving(engine) as server:
            ws, ready = await open_client(server)
            assert ready["role"] == "client" and ready["model"] == "tiny-random" and ready["random_weights"]
            assert (ready["width"], ready["height"]) == (64, 64)
            assert ready["params"]["steps"] == 2 and ready["limits"]["max_message_bytes"] == 4 * 2**20
            for seq in (1, 2, 3):
                await ws.send(jpeg(seq))
                header, rgb, others = await next_result(ws)
                assert header["seq"] == seq and header["batch"] >= 1 and header["server_ms"] > 0
                assert rgb.shape == (64, 64, 3) and rgb.std() > 5
                assert not [m for m in others if m["type"] == "error"]
            stats = await next_of_type(ws, "stats", timeout=5)
            assert stats["frames_in"] == 3 and stats["frames_out"] == 3 and stats["clients"] == 1
            await ws.close()

    run(main())


class SlowEncodeJpeg(CpuJpeg):
    """The CPU codec with an encode that takes ENCODE_S longer, noting when each decode began and encode ended."""

    ENCODE_S = 0.2

    def __init__(self) -> None:
        self.decode_began: list[float] = []
        self.encode_ended: list[float] = []

    def decode(self, data, *args, **kw):
        self.decode_began.append(time.perf_counter())
        return super().decode(data, *args, **kw)

    def encode(self, rgb, quality=85):
        time.sleep(self.ENCODE_S)  # a slow encode, so that leaving it out of server_ms shows
        data = super().encode(rgb, quality)
        self.encode_ended.append(time.perf_counter())
        return data


def test_server_ms_runs_from_arrival_to_the_result_encoded(engine):
    codec = SlowEncodeJpeg()

    async def main():
        server = TurboServer(engine, server_config(), jpeg=codec)
        await server.start()
        try:
            assert await server.wait_ready(30)
            ws, _ = await open_client(server)
            for seq in (1, 2):
                sent = time.perf_counter()
                await ws.send(jpeg(seq))
                header, _, _ = await next_result(ws)
                answered = time.perf_counter()
                # The same clock as the server's (one process): the frame arrived after `sent` and before its decode
                # began; its result was encoded before its header went out, and that was before `answered`.
                assert header["seq"] == seq
                encoded = codec.encode_ended[-1] - codec.decode_began[-1]
                assert encoded * 1e3 - 0.01 <= header["server_ms"] <= (answered - sent) * 1e3 + 0.01, header
                assert header["server_ms"] >= SlowEncodeJpeg.ENCODE_S * 1e3
            await ws.close()
        finally:
            await server.stop()

    run(main())


def test_large_and_turned_camera_frames_come_back_at_the_engines_size(engine):
    # A 1080p frame (decoded at 1/8 for the 64x64 engine: codec.decode_reduction) and a phone's portrait frame stored
    # sideways (EXIF orientation 6, then reduced along its turned sides).
    async def main():
        async with serving(engine) as server:
            ws, _ = await open_client(server)
            for data in (jpeg(5, (1080, 1920)), oriented_jpeg(decode_jpeg(jpeg(7, (720, 1280))), 6)):
                await ws.send(data)
                header, rgb, others = await next_result(ws)
                assert rgb.shape == (64, 64, 3) and rgb.std() > 5
                assert not [m for m in others if m["type"] == "error"], others
            await ws.close()

    run(main())


def test_config_applies_from_the_next_frame(engine):
    async def main():
        async with serving(engine) as server:
            ws, ready = await open_client(server)
            frame = jpeg(7)
            await ws.send(frame)
            _, before, _ = await next_result(ws)
            await ws.send(json.dumps({"type": "config", "prompt": "a watercolor of a harbor", "seed": 42}))
            echo = await next_of_type(ws, "config")
            assert echo["prompt"] == "a watercolor of a harbor" and echo["seed"] == 42
            assert echo["steps"] == ready["params"]["steps"]  # a subset leaves the rest as it was
            await ws.send(frame)
            _, after, _ = await next_result(ws)
            assert diff(before, after) > 2
            # The same parameters again give the same picture: the difference came from the config.
            await ws.send(json.dumps({"type": "config", **ready["params"]}))
            await next_of_type(ws, "config")
            await ws.send(frame)
            _, again, _ = await next_result(ws)
            assert diff(before, again) < 1.5

    run(main())


def test_two_clients_with_different_prompts_get_different_pictures(engine):
    async def main():
        async with serving(engine) as server:
            (a, _), (b, _) = await open_client(server), await open_client(server)
            await a.send(json.dumps({"type": "config", "prompt": "a red fox in snow", "seed": 1}))
            await b.send(json.dumps({"type": "config", "prompt": "a neon city at night", "seed": 2}))
            await next_of_type(a, "config")
            await next_of_type(b, "config")
            frame = jpeg(3)
            await asyncio.gather(a.send(frame), b.send(frame))
            (_, ra, _), (_, rb, _) = await asyncio.gather(next_result(a), next_result(b))
            assert diff(ra, rb) > 2

    run(main())


def test_flooding_client_keeps_memory_bounded_and_gets_the_newest(engine):
    async def main():
        async with serving(engine) as server:
            ws, _ = await open_client(server)
            for i in range(100):  # as fast as the socket takes them, without reading anything
                await ws.send(jpeg(i))
            seqs = []
            while not seqs or seqs[-1] < 100:
                header, _, _ = await next_result(ws)
                seqs.append(header["seq"])
            assert seqs == sorted(set(seqs))  # in order, each frame at most once
            assert seqs[-1] == 100  # the newest frame is always processed
            assert len(seqs) < 100  # older ones were replaced, not queued
            session = next(iter(server.clients))
            # Every frame is accounted for: answered or dropped; nothing waits anywhere.
            assert session.counts.frames_in == 100
            assert session.counts.frames_out + session.counts.dropped == 100
            assert server.batcher._pending == {} and session._raw is None

    run(main())


# ------------------------------------------------------------------------------------------------ bad input


def _sof_jpeg(width: int, height: int) -> bytes:
    """A JPEG header that declares width x height (and nothing decodable after it)."""
    sof = b"\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + b"\xff\xc0" + (len(sof) + 2).to_bytes(2, "big") + sof + b"\xff\xd9"


BAD_INPUTS = [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('{"prompt": "no type"}', "bad_message"),
    ('{"type": 3}', "bad_message"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": "config", "colour": "red"}', "bad_config"),
    ('{"type": "config", "steps": "2"}', "bad_config"),
    ('{"type": "config", "strength": 2.5}', "bad_config"),
    ('{"type": "config", "steps": 1, "strength": 0.5}', "bad_config"),
    ('{"type": "config", "seed": -1}', "bad_config"),
    ('{"type": "config", "prompt": 5}', "bad_config"),
    ("[" * 50000, "bad_json"),
    ('{"type": "config", "prompt": "' + "x" * 70000 + '"}', "bad_message"),
    (b"GIF89a not a jpeg", "bad_image"),
    (b"\xff\xd8", "bad_image"),
    (None, "bad_image"),  # a real JPEG cut right after its headers
    (_sof_jpeg(5000, 300), "image_too_large"),
]


def test_each_bad_input_gets_its_error_while_another_client_streams(engine):
    async def main():
        async with serving(engine) as server:
            bad, _ = await open_client(server)
            good, _ = await open_client(server)
            stop = asyncio.Event()
            good_results, good_errors = [], []

            async def stream_good():
                i = 0
                while not stop.is_set():
                    i += 1
                    await good.send(jpeg(i))
                    header, _, others = await next_result(good)
                    good_results.append(header["seq"])
                    good_errors.extend(m for m in others if m["type"] == "error")

            task = asyncio.create_task(stream_good())
            real = jpeg(5)
            for message, code in BAD_INPUTS:
                if message is None:
                    message = real[: real.find(b"\xff\xda")]
                await bad.send(message)
                err = await next_of_type(bad, "error")
                assert err["code"] == code, (message[:40], err)
                assert code in ERROR_CODES and len(err["message"]) > 10
            # The bad client's stream still works, with its parameters untouched by the rejected configs.
            await bad.send(real)
            header, rgb, _ = await next_result(bad)
            assert rgb.shape == (64, 64, 3)
            n = len(good_results)
            async with asyncio.timeout(20):
                while len(good_results) < n + 3:
                    await asyncio.sleep(0.01)
            stop.set()
            await task
            assert good_errors == []
            assert len(good_results) >= 3

    run(main())


def test_message_over_the_size_limit_closes_with_1009(engine):
    async def main():
        async with serving(engine, max_message_bytes=8192) as server:
            other, _ = await open_client(server)
            ws, ready = await open_client(server)
            assert ready["limits"]["max_message_bytes"] == 8192
            await ws.send(b"\xff\xd8\xff" + bytes(9000))
            with pytest.raises(ConnectionClosed) as info:
                await next_result(ws)
            assert info.value.rcvd.code == 1009 and "8192" in info.value.rcvd.reason
            await other.send(jpeg(1))
            assert (await next_result(other))[0]["seq"] == 1

    run(main())


def test_disconnect_mid_frame(engine):
    async def main():
        async with serving(engine) as server:
            other, _ = await open_client(server)
            # Half of a masked binary frame, then the socket goes away.
            ws, _ = await open_client(server)
            payload = jpeg(2)
            header = bytes([0x82, 0xFE]) + len(payload).to_bytes(2, "big") + b"\x00\x00\x00\x00"
            ws.transport.write(header + payload[: len(payload) // 2])
            ws.transport.abort()
            # A frame sent, then gone before its result.
            ws2, _ = await open_client(server)
            await ws2.send(jpeg(3))
            ws2.transport.abort()
            for seq in (1, 2):
                await other.send(jpeg(seq))
                assert (await next_result(other))[0]["seq"] == seq
            async with asyncio.timeout(10):
                while len(server.clients) > 1:
                    await asyncio.sleep(0.02)
            assert server.batcher.stream_count == 1

    run(main())


# ------------------------------------------------------------------------------------------------ security and limits


def test_foreign_origin_is_refused_with_403(engine):
    async def main():
        async with serving(engine, allow_origins=("https://studio.example",)) as server:
            with pytest.raises(InvalidStatus) as info:
                await connect(ws_url(server), origin="http://evil.example")
            assert info.value.response.status_code == 403
            same = f"http://127.0.0.1:{server.port}"
            (await open_client(server, origin=same))[0].transport.abort()
            (await open_client(server, origin="https://studio.example"))[0].transport.abort()
            (await open_client(server))[0].transport.abort()  # no Origin: not a browser

    run(main())


def test_same_origin_needs_a_loopback_host_on_a_loopback_bind(engine):
    from websockets.datastructures import Headers
    from websockets.http11 import Request

    server = TurboServer(engine, ServerConfig(port=0))

    def allowed(origin, host):
        return server.http.origins.allows(Request("/ws", Headers([("Host", host), ("Origin", origin)])))

    assert allowed("http://localhost:8000", "localhost:8000")
    assert allowed("http://[::1]:8000", "[::1]:8000")
    # A DNS-rebinding page: same origin by name, but the name is not this machine's loopback.
    assert not allowed("http://evil.example:8000", "evil.example:8000")
    assert not allowed("http://localhost:9999", "localhost:8000")
    lan = TurboServer(engine, ServerConfig(host="0.0.0.0", port=0))
    assert lan.http.origins.allows(Request("/ws", Headers([("Host", "box.lan:8000"), ("Origin", "http://box.lan:8000")])))
    server.pool.shutdown()
    lan.pool.shutdown()


def test_token(engine):
    async def main():
        async with serving(engine, token="s3cret") as server:
            for suffix in ("", "?token=wrong"):
                ws = await connect(ws_url(server, "/ws" + suffix))
                err = json.loads(await ws.recv())
                assert err["type"] == "error" and err["code"] == "unauthorized"
                with pytest.raises(ConnectionClosed) as info:
                    await ws.recv()
                assert info.value.rcvd.code == 1008
            ws, ready = await open_client(server, "/ws?token=s3cret")
            await ws.send(jpeg(1))
            assert (await next_result(ws))[0]["seq"] == 1

    run(main())


def test_server_full(engine):
    async def main():
        async with serving(engine, max_clients=2) as server:
            a, _ = await open_client(server)
            b, _ = await open_client(server)
            ws = await connect(ws_url(server))
            err = json.loads(await ws.recv())
            assert err["code"] == "server_full" and "2 clients" in err["message"]
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1013
            await a.close()
            async with asyncio.timeout(10):
                while len(server.clients) > 1:
                    await asyncio.sleep(0.02)
            (await open_client(server))[0].transport.abort()  # a place is free again

    run(main())


def test_the_warm_heap_is_frozen_while_serving_and_given_back_on_stop(engine, make_engine):
    """Once the engine is warm the server freezes the process's objects (heap.py: no full garbage collection walks
    them while clients stream) and thaws them when it stops; ServerConfig.freeze_heap=False leaves the collector be."""
    import gc

    from turbostream import heap

    held = heap._holders

    async def main():
        async with serving(engine) as server:
            assert heap._holders == held + 1 and gc.get_freeze_count() > 10_000
            assert server._frozen is not None and server._frozen.objects > 10_000
            ws, _ = await open_client(server)
            await ws.send(encode_jpeg(np.zeros((64, 64, 3), np.uint8)))
            assert (await next_result(ws))[1].shape == (64, 64, 3)  # a frozen heap serves as before
            await ws.close()
        assert heap._holders == held
        async with serving(make_engine(), freeze_heap=False) as server:  # an engine serves one thread
            assert server._frozen is None and heap._holders == held

    run(main())


# ------------------------------------------------------------------------------------------------ HTTP routes


def test_healthz_is_503_while_warming_then_200(engine):
    release = threading.Event()

    def slow_factory():
        release.wait(20)
        return engine

    async def main():
        server = TurboServer(config=ServerConfig(port=0), engine_factory=slow_factory)
        await server.start()
        try:
            status, _, body = await asyncio.to_thread(http_get, server, "/healthz")
            assert status == 503 and b"warming" in body
            # A client connecting now waits for the engine, then gets its ready message.
            pending = asyncio.create_task(open_client(server))
            await asyncio.sleep(0.1)
            assert not pending.done()
            release.set()
            assert await server.wait_ready(20)
            status, _, body = await asyncio.to_thread(http_get, server, "/healthz")
            assert status == 200 and body == b"ok\n"
            ws, _ = await pending
            await ws.close()
        finally:
            release.set()
            await server.stop()

    run(main())


def test_stop_while_the_model_loads_closes_waiting_clients_and_viewers_with_1001():
    release = threading.Event()

    def loading_factory():
        release.wait(30)  # a model still loading when Ctrl-C comes
        raise RuntimeError("loading given up")  # then the inference thread ends without touching any engine

    async def main():
        config = server_config(source="fake:0", shutdown_grace_s=0.5)
        server = TurboServer(config=config, engine_factory=loading_factory, capture_factory=FakeCapture)
        await server.start()
        try:
            client = await connect(ws_url(server))
            viewer = await connect(ws_url(server, "/view/ws"))
            async with asyncio.timeout(10):  # both handlers now wait for the engine
                while server.places != {"client": 1, "viewer": 1}:
                    await asyncio.sleep(0.01)
            # Before, stop() waited for those handlers, which waited for the engine: it never returned.
            await asyncio.wait_for(server.stop(), 10)
            for ws in (client, viewer):
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 10)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1001, info.value
            assert server.places == {"client": 0, "viewer": 0}
        finally:
            release.set()
            # Its last words ("engine failed to start: loading given up") belong to this test's log, not to a later
            # test's closed capture ("--- Logging error ---" in CI's output).
            await asyncio.to_thread(server.batcher.stop, 10)
        assert not await server.wait_ready(1)  # stopped before the engine was ready: no waiting for it either

    run(main())


def test_a_start_that_fails_leaves_nothing_running(engine):
    """A port already taken made start() raise with the inference thread (a model loading on a GPU) and the watch
    task still running; a ServerThread whose engine failed kept its loop and listening socket for the process's
    life. Embedders (scripts, tests) got the error and kept the leftovers."""
    from turbostream.serve import ServerThread

    def ours() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("turbostream-") and t.is_alive()]

    before = ours()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()

    async def main():
        server = TurboServer(engine, ServerConfig(port=taken.getsockname()[1]))
        with pytest.raises(OSError):
            await server.start()
        return server

    try:
        server = run(main())
    finally:
        taken.close()
    assert not server.batcher.alive and server.pool._shutdown

    def fail():
        raise RuntimeError("no such model")

    thread = ServerThread(TurboServer(config=ServerConfig(port=0), engine_factory=fail))
    with pytest.raises(RuntimeError, match="no such model"):
        with thread:
            pass
    port = thread.server.port
    assert not thread._thread.is_alive() and ours() == before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_stop_does_not_wait_past_the_grace_for_a_handler_that_ignores_the_close(engine, caplog):
    async def main():
        server = TurboServer(engine, server_config(shutdown_grace_s=0.3))
        await server.start()
        assert await server.wait_ready(30)
        entered = asyncio.Event()

        async def deaf_handler(ws):  # waits on something other than its connection, as no handler here should
            entered.set()
            await asyncio.Event().wait()

        server._client_handler = deaf_handler
        ws = await connect(ws_url(server))
        await asyncio.wait_for(entered.wait(), 10)
        await asyncio.wait_for(server.stop(), 10)  # before: waited for that handler forever
        await ws.close()

    run(main())
    assert "without waiting for the connection handlers still running" in caplog.text


def test_metrics(engine):
    async def main():
        async with serving(engine) as server:
            ws, _ = await open_client(server)
            for i in range(3):
                await ws.send(jpeg(i))
                await next_result(ws)
            await ws.send("oops")
            await next_of_type(ws, "error")
            # The third result's end-to-end time is recorded right after its send completes on the server.
            async with asyncio.timeout(10):
                while b'turbostream_stage_seconds_count{stage="end_to_end"} 3.0' not in server.metrics.render():
                    await asyncio.sleep(0.01)
            status, ctype, body = await asyncio.to_thread(http_get, server, "/metrics")
            text = body.decode()
            assert status == 200 and ctype.startswith("text/plain")
            values = {}
            for line in text.splitlines():
                if line and not line.startswith("#"):
                    name, value = line.rsplit(" ", 1)
                    values[name] = float(value)
            assert values["turbostream_frames_in_total"] == 3
            assert values["turbostream_frames_out_total"] == 3
            assert "# TYPE turbostream_frames_dropped_total counter" in text
            assert sum(v for k, v in values.items() if k.startswith("turbostream_frames_dropped_total")) == 0
            assert values["turbostream_clients"] == 1 and values["turbostream_ready"] == 1
            for stage in ("decode", "gpu", "encode", "end_to_end"):
                assert values[f'turbostream_stage_seconds_count{{stage="{stage}"}}'] == 3
            assert values["turbostream_batch_size_count"] == 3
            assert values['turbostream_errors_total{code="bad_json"}'] == 1
            assert values["process_resident_memory_bytes"] > 0

    run(main())


def test_static_files(engine):
    async def main():
        async with serving(engine) as server:
            status, ctype, body = await asyncio.to_thread(http_get, server, "/")
            assert status == 200 and ctype.startswith("text/html") and b'src="/app.js"' in body
            status, ctype, body = await asyncio.to_thread(http_get, server, "/app.js")
            assert status == 200 and ctype.startswith("text/javascript") and b"new WebSocket" in body
            status, ctype, _ = await asyncio.to_thread(http_get, server, "/style.css")
            assert status == 200 and ctype.startswith("text/css")
            status, _, body = await asyncio.to_thread(http_get, server, "/view?control=x")
            assert status == 200 and b"/view.js" in body
            status, _, _ = await asyncio.to_thread(http_get, server, "/../pyproject.toml")
            assert status == 404
            # A plain GET on the WebSocket path is not an upgrade.
            status, _, _ = await asyncio.to_thread(http_get, server, "/ws")
            assert status == 426

    run(main())


# ------------------------------------------------------------------------------------------------ viewers


class FakeCapture:
    """The shape of sources.CaptureThread: start(), latest(timeout), ended, error, close()."""

    instances: list[FakeCapture] = []

    def __init__(self, spec: str, realtime: bool = True, frames: int | None = None) -> None:
        self.spec, self.frames = spec, frames
        self.index = 0
        self.ended = False
        self.error: str | None = None
        self.closed = False
        FakeCapture.instances.append(self)

    def start(self) -> None:
        pass

    def latest(self, timeout: float):
        time.sleep(0.01)  # a 100 frames/s source
        if self.frames is not None and self.index >= self.frames:
            self.ended = True
            return None
        self.index += 1
        y, x = np.mgrid[0:48, 0:64]
        return self.index, np.stack([x * 4, y * 5, np.full_like(x, self.index % 255)], -1).astype(np.uint8)

    def close(self) -> None:
        self.closed = True


def _viewer_server(engine, capture=FakeCapture, **config):
    return TurboServer(engine, server_config(source="fake:0", **config), capture_factory=capture)


async def _frames(ws, n, timeout=20.0):
    got = 0
    async with asyncio.timeout(timeout):
        while got < n:
            if isinstance(await ws.recv(), bytes):
                got += 1
    return got


def test_viewers_get_the_broadcast_and_a_slow_one_delays_no_one(engine):
    async def main():
        server = _viewer_server(engine, write_limit_bytes=8192)  # so a stalled reader shows within a few frames
        await server.start()
        try:
            fast, ready = await open_client(server, "/view/ws")
            assert ready["role"] == "viewer" and ready["control"] is False
            # The slow viewer: tiny socket buffers on both ends, and it stops reading after three frames.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            slow = await connect(ws_url(server, "/view/ws"), sock=sock)
            await _frames(fast, 3)
            await _frames(slow, 3)
            slow.transport.pause_reading()
            stalled = next(s for s in server.viewers if s.ws.remote_address[1] == sock.getsockname()[1])
            stalled.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            fast_frames = 0
            async with asyncio.timeout(30):
                while stalled.counts.dropped < 5:
                    fast_frames += await _frames(fast, 1)
            fast_frames += await _frames(fast, 10)  # and the others go on
            # Skipped, never queued: one frame waits in its outbox and its socket buffer stays near the limit.
            stalled_sent = stalled.counts.frames_out
            assert stalled.ws.transport.get_write_buffer_size() < 8192 + 64 * 1024
            slow.transport.resume_reading()
            await _frames(slow, 1)
            assert fast_frames > stalled_sent
        finally:
            await server.stop()
        assert FakeCapture.instances[-1].closed

    run(main())


def test_outbox_skips_frames_while_a_send_waits():
    class StuckSocket:
        def __init__(self):
            self.sent, self.unblock = [], asyncio.Event()

        async def send(self, message):
            await self.unblock.wait()
            self.sent.append(message)

    class Metric:
        def inc(self, *a):
            pass

        def observe(self, *a):
            pass

    class FakeServer:
        metrics = type("M", (), {"frames_out": Metric(), "encode": Metric()})()

    async def main():
        drops = []
        ws = StuckSocket()
        box = Outbox(FakeServer(), ws, drops.append)
        task = asyncio.create_task(box.run())
        for i in range(50):
            box.image(OutItem(jpeg=bytes([i])))
            await asyncio.sleep(0)
        # One send waits on the socket, one result waits behind it, the other 48 were skipped.
        assert drops == ["send"] * 48
        ws.unblock.set()
        await asyncio.sleep(0.01)
        assert ws.sent == [bytes([0]), bytes([49])]
        task.cancel()

    run(main())


def test_viewer_control_token(engine):
    async def main():
        server = _viewer_server(engine, control_token="ctl")
        await server.start()
        try:
            plain, ready = await open_client(server, "/view/ws")
            assert ready["control"] is False
            await plain.send(json.dumps({"type": "config", "prompt": "a storm"}))
            err = await next_of_type(plain, "error")
            assert err["code"] == "forbidden"
            await plain.send(b"\xff\xd8\xff")
            assert (await next_of_type(plain, "error"))["code"] == "not_supported"
            admin, ready = await open_client(server, "/view/ws?control=ctl")
            assert ready["control"] is True
            await admin.send(json.dumps({"type": "config", "prompt": "a storm", "seed": 9}))
            for ws in (admin, plain):  # every viewer hears about the change
                echo = await next_of_type(ws, "config")
                assert echo["prompt"] == "a storm" and echo["seed"] == 9
            assert server.broadcast.stream.params.prompt == "a storm"
            await admin.send(json.dumps({"type": "config", "strength": 7}))
            assert (await next_of_type(admin, "error"))["code"] == "bad_config"
        finally:
            await server.stop()

    run(main())


def test_source_end_is_reported_and_no_source_refuses_viewers(engine, tiny_components):
    async def main():
        server = _viewer_server(engine, capture=lambda spec: FakeCapture(spec, frames=5))
        await server.start()
        try:
            ws, _ = await open_client(server, "/view/ws")
            err = await next_of_type(ws, "error")
            assert err["code"] == "source_ended"
            client, _ = await open_client(server)  # /ws is not affected
            await client.send(jpeg(1))
            await next_result(client)
        finally:
            await server.stop()
        # An engine belongs to its server's inference thread: a second server gets its own.
        async with serving(Engine(preset("test"), tiny_components)) as plain:
            ws = await connect(ws_url(plain, "/view/ws"))
            assert json.loads(await ws.recv())["code"] == "no_source"
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1008

    run(main())


# ------------------------------------------------------------------------------------------------ the command


# The command as users run it (`python -m turbostream` is the console script's entry()).
TURBOSTREAM = [sys.executable, "-m", "turbostream"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `turbostream serve` on an event loop without add_signal_handler, as Windows' are (NotImplementedError).
WINDOWS_LIKE_LOOP = [sys.executable, "-c", (
    "import asyncio, sys\n"
    "def refuse(self, *args): raise NotImplementedError\n"
    "asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler = refuse\n"
    "from turbostream.cli import main\n"
    "sys.exit(main(sys.argv[1:]))")]


def metrics_until(port: int, done, timeout: float) -> str:
    """Poll a spawned server's /metrics until done(text) holds; the text (an AssertionError with its end if not)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        if done(text):
            return text
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.05)


def spawn_serve(*extra: str, ready_s: float = 90, command: list[str] = TURBOSTREAM) -> tuple[subprocess.Popen, int]:
    """A real `turbostream serve` (tiny-random, CPU, 64 px, a free port) returned once /healthz says 200.

    The caller stops it (and reads its stdout); if it never becomes ready, it is killed here and the test fails.
    """
    port = _free_port()
    proc = subprocess.Popen(
        [*command, "serve", "--model", "tiny-random", "--size", "64", "--device", "cpu", "--port", str(port),
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
    )
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return proc, port
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not become ready in {ready_s} s:\n{proc.stdout.read()}")
        time.sleep(0.2)


def test_serve_command_rejects_bad_options_quickly():
    result = subprocess.run(
        [*TURBOSTREAM, "serve", "--model", "tiny-random", "--jpeg-quality", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "JPEG quality" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig, command", [(signal.SIGTERM, TURBOSTREAM), (signal.SIGHUP, TURBOSTREAM),
                                          (signal.SIGINT, WINDOWS_LIKE_LOOP)],
                         ids=["SIGTERM", "SIGHUP", "Ctrl-C-without-add_signal_handler"])
def test_serve_command_closes_clients_with_1001_on_sigterm(sig, command):
    """SIGHUP too: the terminal or ssh session that started it closed (its default ended the process at once). And
    Ctrl-C where the event loop cannot take signal handlers (Windows): it cancelled the main task, skipping the
    graceful shutdown (clients got 1011, the process exit status 130)."""
    proc, port = spawn_serve(command=command)
    try:

        async def main():
            ws = await connect(f"ws://127.0.0.1:{port}/ws")
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(jpeg(1))
            while not isinstance(await ws.recv(), bytes):
                pass
            proc.send_signal(sig)
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await ws.recv()
            return info.value.rcvd.code

        assert run(main()) == 1001
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stdout.read()
    assert "serving on" in output and "viewer page" not in output  # no --source: nothing to view there


@pytest.mark.slow
def test_serve_with_a_camera_not_there_yet_says_so_without_opencvs_own_lines():
    """`serve --source 7` without that camera retries (it may be plugged in later); OpenCV's own console lines
    ("[ WARN:0@3.7] global cap_v4l.cpp:914 open VIDEOIO(V4L2:/dev/video7): can't open camera by index") filled the
    log at every retry, as they no longer do in `run` unless -v."""
    proc, port = spawn_serve("--source", "7")
    try:
        # until the source thread has tried, failed and planned a retry
        metrics_until(port, lambda text: "turbostream_source_restarts_total 0.0" not in text, 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stdout.read()
    assert "viewer page: http://127.0.0.1" in output and "source 7: " in output, output
    assert "[ WARN" not in output and "VIDEOIO" not in output, output


def test_the_port_named_on_every_interface_is_the_one_the_url_reaches(engine):
    """--host "" binds IPv4 and IPv6, and with port 0 each socket got its own free port: the port named (and the URL
    logged) was the first socket's, the IPv6 one in about half the starts, and http://127.0.0.1:PORT was refused."""
    import socket as sockets_

    async def main():
        async with serving(engine, host="") as server:
            families = {s.family: s.getsockname()[1] for s in server._server.sockets}
            assert families.get(sockets_.AF_INET) == server.port
            assert server.url == f"http://127.0.0.1:{server.port}/"
            status, _, _ = await asyncio.to_thread(http_get, server, "/healthz")
            return status

    assert run(main()) == 200
