"""Several engines in one server (`serve --device cpu,cpu`: the code path of cuda:0,cuda:1), readiness for a load
balancer, and X-Forwarded-For from trusted proxies only. Real servers on port 0, real websockets clients, tiny
random engines on the CPU."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from test_server import http_get, jpeg, next_result, open_client, run, server_config, ws_url
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus

from turbostream.config import ServerConfig, preset
from turbostream.engine import Engine
from turbostream.metrics import DeviceMetrics
from turbostream.serve import TurboServer
from turbostream.serve.devices import DeviceLost, Devices, device_labels, is_device_fatal, parse_devices
from turbostream.serve.proxy import TrustedProxies

CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


@pytest.fixture
def two_engines(tiny_components):
    return [Engine(preset("test"), tiny_components), Engine(preset("test"), tiny_components)]


class Breakable:
    """An engine that, once `broken`, raises what a GPU that fell over raises: every call, for good."""

    def __init__(self, engine, error: Exception | None = None) -> None:
        self._engine = engine
        self.error = error
        self.broken = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def run(self, frames, params, **kw):
        if self.broken.is_set():
            raise self.error or RuntimeError(CUDA_FAULT)
        return self._engine.run(frames, params, **kw)

    def collect(self, ticket):  # a pipelined call: the fault shows when the call is waited for
        out = self._engine.collect(ticket)
        if self.broken.is_set():
            raise self.error or RuntimeError(CUDA_FAULT)
        return out


def metrics_of(server) -> dict[str, float]:
    values = {}
    for line in server.metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def start(server: TurboServer) -> TurboServer:
    await server.start()
    assert await server.wait_ready(60)
    return server


async def until_closed(ws, timeout: float = 20.0) -> tuple[list[str], int | None]:
    """Read until the server closes: (error codes seen, close code)."""
    codes = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await ws.recv()
                if isinstance(msg, str) and json.loads(msg)["type"] == "error":
                    codes.append(json.loads(msg)["code"])
    except ConnectionClosed as exc:
        return codes, exc.rcvd.code if exc.rcvd else None


# ------------------------------------------------------------------------------------------------ units


def test_device_lists():
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices(" cuda:0 , cuda:1 ", cuda_count=lambda: 2) == ["cuda:0", "cuda:1"]
    assert parse_devices("all", cuda_count=lambda: 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices("auto") == ["auto"]
    for spec, words in [("all", "no CUDA GPU"), ("cpu,,cpu", "comma-separated"), ("auto,cpu", "stand alone")]:
        with pytest.raises(ValueError, match=words):
            parse_devices(spec, cuda_count=lambda: 0)
    with pytest.raises(ValueError, match="cuda:2 does not exist; this machine has 2 CUDA GPUs"):
        parse_devices("cuda:0,cuda:2", cuda_count=lambda: 2)
    assert device_labels(["cpu", "cpu"]) == ["cpu#0", "cpu#1"]
    assert device_labels(["cuda:0", "cuda:1", "cuda:1"]) == ["cuda:0", "cuda:1#0", "cuda:1#1"]
    # Errors that poison a device, and errors that fail one call only.
    assert is_device_fatal(RuntimeError(CUDA_FAULT)) and is_device_fatal(DeviceLost("gone"))
    assert is_device_fatal(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_device_fatal(RuntimeError("CUDA error: out of memory"))
    assert not is_device_fatal(RuntimeError("simulated device failure")) and not is_device_fatal(ValueError("x"))


def test_placement_fewest_streams_then_lowest_recent_engine_time():
    engines = [SimpleNamespace(device="cuda:0", max_batch=4), SimpleNamespace(device="cuda:1", max_batch=4),
               SimpleNamespace(device="cuda:2", max_batch=4)]
    devices = Devices(DeviceMetrics(CollectorRegistry()), lambda n, s: None, engines=engines)
    for d in devices.items:
        d.batcher.ready.set()  # as if warm (no threads here)
    a, b, c = devices.items
    a.engine_s, b.engine_s, c.engine_s = 0.030, 0.010, 0.020
    assert devices.place() is b  # all empty: the fastest recently
    s1 = devices.open_stream(lambda r: None, None)
    assert devices.device_of(s1) is b
    assert devices.place() is c  # b has one stream; c is faster than a
    devices.open_stream(lambda r: None, None)
    assert devices.place() is a
    devices.open_stream(lambda r: None, None)
    assert devices.place() is b  # one each again: the fastest
    s1.close()
    assert devices.place() is b  # the stream that left made b the emptiest
    b.mark_lost("gone")
    assert devices.place() in (a, c) and b not in devices.usable
    assert devices.capacity(9) == 6 and devices.capacity(1) == 1  # the lost device's share of places is gone


def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy():
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])
    xff = Headers([("X-Forwarded-For", "6.6.6.6, 203.0.113.9"), ("X-Forwarded-For", "10.1.2.3")])
    assert proxies.client_address("127.0.0.1", xff) == "203.0.113.9"  # right to left, past the trusted hops
    assert proxies.client_address("192.0.2.1", xff) == "192.0.2.1"  # not a proxy: its header means nothing
    assert proxies.client_address("127.0.0.1", Headers()) == "127.0.0.1"
    assert proxies.client_address("127.0.0.1", Headers([("X-Forwarded-For", "junk, 203.0.113.9")])) == "203.0.113.9"
    assert proxies.client_address("127.0.0.1", Headers([("X-Forwarded-For", "203.0.113.9, junk")])) == "127.0.0.1"
    assert proxies.client_address("127.0.0.1", Headers([("X-Forwarded-For", "[2001:db8::7]:5555")])) == "2001:db8::7"
    assert proxies.client_address("::ffff:127.0.0.1", xff) == "203.0.113.9"  # a v4 peer on a dual-stack socket
    assert TrustedProxies().client_address("127.0.0.1", xff) == "127.0.0.1"  # no --trusted-proxy: never
    with pytest.raises(ValueError, match="not an IP address"):
        ServerConfig(trusted_proxies=("haproxy.local",))


# ------------------------------------------------------------------------------------------------ two engines


def test_streams_spread_over_two_engines_and_a_leaving_stream_frees_its_device(two_engines):
    async def main():
        server = await start(TurboServer(engines=two_engines, config=server_config()))
        try:
            clients = [await open_client(server) for _ in range(4)]
            assert [ready["device"] for _, ready in clients] == ["cpu#0", "cpu#1", "cpu#0", "cpu#1"]
            for rnd in range(3):
                await asyncio.gather(*(ws.send(jpeg(rnd)) for ws, _ in clients))
                results = await asyncio.gather(*(next_result(ws) for ws, _ in clients))
                assert all(rgb.shape == (64, 64, 3) for _, rgb, _ in results)
            values = metrics_of(server)
            for name in ("cpu#0", "cpu#1"):
                assert values[f'turbostream_device_streams{{device="{name}"}}'] == 2
                assert values[f'turbostream_device_frames_total{{device="{name}"}}'] == 6
                assert values[f'turbostream_device_engine_seconds_count{{device="{name}"}}'] >= 1
                assert values[f'turbostream_device_ready{{device="{name}"}}'] == 1
                # The device's timeline: busy for each whole call on a CPU engine, an idle gap before all but its first.
                calls = values[f'turbostream_device_engine_seconds_count{{device="{name}"}}']
                busy = values[f'turbostream_device_busy_seconds_total{{device="{name}"}}']
                assert 0 < busy <= values[f'turbostream_device_engine_seconds_sum{{device="{name}"}}'] + 1e-6
                assert values[f'turbostream_device_gap_seconds_count{{device="{name}"}}'] == calls - 1
            assert values['turbostream_stage_seconds_count{stage="gpu"}'] == sum(
                values[f'turbostream_device_engine_seconds_count{{device="{n}"}}'] for n in ("cpu#0", "cpu#1"))
            # A client of cpu#1 leaves: the next stream goes there.
            await clients[1][0].close()
            async with asyncio.timeout(10):
                while server.devices.items[1].batcher.stream_count != 1:
                    await asyncio.sleep(0.02)
            ws, ready = await open_client(server)
            assert ready["device"] == "cpu#1"
            await ws.send(jpeg(7))
            assert (await next_result(ws))[1].shape == (64, 64, 3)
            status, _, body = await asyncio.to_thread(http_get, server, "/healthz")
            assert status == 200 and body == b"ok\n"
        finally:
            await server.stop()
        assert not any(d.batcher.alive for d in server.devices.items)

    run(main())


def test_one_engine_failing_closes_only_its_streams_and_the_other_keeps_serving(two_engines, caplog):
    breakable = Breakable(two_engines[1])

    async def main():
        server = await start(TurboServer(engines=[two_engines[0], breakable], config=server_config(max_clients=8)))
        try:
            clients = [await open_client(server) for _ in range(4)]
            on = {name: [ws for ws, ready in clients if ready["device"] == name] for name in ("cpu#0", "cpu#1")}
            assert len(on["cpu#0"]) == len(on["cpu#1"]) == 2
            breakable.broken.set()
            for ws, _ in clients:
                await ws.send(jpeg(1))
            # The broken device's streams: engine_error, then closed with 1011 (a browser reconnects).
            for ws in on["cpu#1"]:
                codes, close_code = await until_closed(ws)
                assert "engine_error" in codes and close_code == 1011
            # The other device's streams go on as if nothing happened.
            for seq in (1, 2, 3):
                if seq > 1:
                    await asyncio.gather(*(ws.send(jpeg(seq)) for ws in on["cpu#0"]))
                for ws in on["cpu#0"]:
                    header, _, others = await next_result(ws)
                    assert header["seq"] == seq and not [m for m in others if m["type"] == "error"]
            status, _, body = await asyncio.to_thread(http_get, server, "/healthz")
            assert status == 503 and b"cpu#1: lost: CUDA error" in body and b"cpu#0: ready" in body
            # Still ready for a balancer, with the lost device's share of places gone (8 -> 4, 2 taken).
            async with asyncio.timeout(10):
                while server.places["client"] != 2:  # the closed streams' sessions end
                    await asyncio.sleep(0.02)
            status, _, body = await asyncio.to_thread(http_get, server, "/readyz")
            assert status == 200 and body == b"ready: 2 of 4 client places free\n"
            ws, ready = await open_client(server)
            assert ready["device"] == "cpu#0"
            await ws.send(jpeg(5))
            assert (await next_result(ws))[1].shape == (64, 64, 3)
            values = metrics_of(server)
            assert values['turbostream_device_lost{device="cpu#1"}'] == 1
            assert values['turbostream_device_ready{device="cpu#1"}'] == 0
            assert values['turbostream_device_ready{device="cpu#0"}'] == 1
        finally:
            await server.stop()

    with caplog.at_level(logging.ERROR, "turbostream.server"):
        run(main())
    assert any("device cpu#1 failed" in r.getMessage() and "closing its 2 stream(s)" in r.getMessage()
               for r in caplog.records)


def test_the_broadcast_moves_when_its_device_is_lost(two_engines):
    from test_server import FakeCapture, _frames

    breakable = Breakable(two_engines[0])  # the first device: the broadcast's

    async def main():
        server = TurboServer(engines=[breakable, two_engines[1]], config=server_config(source="fake:0"),
                             capture_factory=FakeCapture)
        await start(server)
        try:
            viewer, ready = await open_client(server, "/view/ws")
            assert ready["device"] == "cpu#0"
            await _frames(viewer, 3)
            breakable.broken.set()
            async with asyncio.timeout(20):
                while server.devices.device_of(server.broadcast.stream).name != "cpu#1":
                    await asyncio.sleep(0.02)
            await _frames(viewer, 5)  # the viewer stays connected and the broadcast goes on from cpu#1
            assert server.devices.items[0].lost is not None
            _, later = await open_client(server, "/view/ws")
            assert later["device"] == "cpu#1"  # it named the lost cpu#0, where the broadcast no longer runs
        finally:
            await server.stop()

    run(main())


def test_the_broadcast_ends_and_its_viewers_are_told_when_the_only_device_is_lost(engine):
    """With no device left the viewers sat on a frozen picture with no word, and the source went on reading and
    decoding frames for nobody. The source stops, viewers get engine_error and 1011, a new one hears why."""
    from test_server import FakeCapture, _frames

    breakable = Breakable(engine)

    async def main():
        server = TurboServer(breakable, server_config(source="fake:0"), capture_factory=FakeCapture)
        await start(server)
        try:
            viewer, _ = await open_client(server, "/view/ws")
            await _frames(viewer, 3)
            breakable.broken.set()
            texts = []
            async with asyncio.timeout(20):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        message = await viewer.recv()
                        if isinstance(message, str):
                            texts.append(json.loads(message))
            assert closed.value.rcvd.code == 1011
            errors = [t for t in texts if t["type"] == "error"]
            assert errors and errors[-1]["code"] == "engine_error" and "device cpu failed" in errors[-1]["message"]
            async with asyncio.timeout(10):
                while server.broadcast.running:
                    await asyncio.sleep(0.02)
            assert server.broadcast.state["state"] == "ended"
            with pytest.raises(ConnectionClosed):
                async with connect(ws_url(server, "/view/ws")) as late:
                    refusal = json.loads(await late.recv())
                    await late.recv()
            assert refusal["code"] == "engine_failed" and refusal["message"].startswith("the engine stopped: ")
        finally:
            await server.stop()

    run(main())


def test_a_device_that_fails_to_load_fails_the_start(tiny_components):
    def broken():
        raise RuntimeError("CUDA error: invalid device ordinal")

    async def main():
        server = TurboServer(config=server_config(), engine_factories={
            "cpu#0": lambda: Engine(preset("test"), tiny_components), "cpu#1": broken})
        await server.start()
        try:
            assert not await server.wait_ready(60)
            assert server.failed and server.error == "device cpu#1 failed to load: CUDA error: invalid device ordinal"
            status, _, body = await asyncio.to_thread(http_get, server, "/healthz")
            assert status == 503 and b"cpu#1: failed to load: CUDA error" in body
            status, _, body = await asyncio.to_thread(http_get, server, "/readyz")
            assert status == 503 and b"engine failed" in body
        finally:
            await server.stop()

    run(main())


@pytest.mark.slow
def test_serve_command_with_a_device_list_that_cannot_load_exits_with_its_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "turbostream", "serve", "--device", "cpu,cpu", "--model", str(tmp_path / "none"),
         "--size", "64", "--port", "0"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "the engine failed to start: device cpu#0 failed to load" in result.stderr


# ------------------------------------------------------------------------------------------------ readiness and proxies


def test_readyz_is_503_while_warming_or_full_and_200_otherwise(tiny_components):
    release = threading.Event()

    def slow():
        release.wait(20)
        return Engine(preset("test"), tiny_components)

    async def main():
        server = TurboServer(config=server_config(max_clients=1), engine_factory=slow)
        await server.start()
        try:
            status, _, body = await asyncio.to_thread(http_get, server, "/readyz")
            assert status == 503 and body == b"warming up\n"
            release.set()
            assert await server.wait_ready(30)
            status, _, body = await asyncio.to_thread(http_get, server, "/readyz")
            assert status == 200 and body == b"ready: 1 of 1 client places free\n"
            ws, _ = await open_client(server)
            status, _, body = await asyncio.to_thread(http_get, server, "/readyz")
            assert status == 503 and body == b"full: 1 of 1 clients\n"
            await ws.close()
            async with asyncio.timeout(10):
                while server.places["client"]:
                    await asyncio.sleep(0.02)
            status, _, _ = await asyncio.to_thread(http_get, server, "/readyz")
            assert status == 200
        finally:
            release.set()
            await server.stop()

    run(main())


def test_a_handshake_through_a_trusted_proxy_that_cannot_be_served_gets_503_before_the_upgrade(engine, caplog):
    """Logged once: every such handshake (no token needed) wrote a line, 1,750 a second from a peer that tried."""
    from turbostream.serve import guard

    guard.throttled._last.pop("refused_503 full", None)  # a line of this kind from an earlier test would hold it back

    async def main():
        # The test's own loopback peer plays the balancer.
        server = await start(TurboServer(engine, server_config(max_clients=1, trusted_proxies=("127.0.0.1",))))
        try:
            first, _ = await open_client(server, additional_headers={"X-Forwarded-For": "203.0.113.9"})
            with pytest.raises(InvalidStatus) as info:
                await connect(ws_url(server), additional_headers={"X-Forwarded-For": "198.51.100.4"})
            response = info.value.response
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
            assert b"full: 1 of 1 clients" in response.body
            for _ in range(5):
                with pytest.raises(InvalidStatus):
                    await connect(ws_url(server), additional_headers={"X-Forwarded-For": "198.51.100.5"})
            values = metrics_of(server)
            assert values['turbostream_handshakes_refused_total{reason="full"}'] == 6
            assert values['turbostream_connections_total{via="proxy"}'] == 7
            await first.close()
        finally:
            await server.stop()

    with caplog.at_level(logging.DEBUG, "turbostream.server"):
        run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert "client 203.0.113.9 connected on cpu" in messages  # the forwarded address, not the proxy's
    refused = [m for m in messages if "refused a stream" in m]  # the first, then (at stop) how many were held back
    assert len(refused) == 2 and "refused a stream from 198.51.100.4 with 503" in refused[0], refused
    assert "(the last of 5 like it, not logged)" in refused[1]


def test_direct_clients_keep_the_in_band_answers(engine):
    async def main():
        # A proxy is configured, but this peer (loopback) is not it: in-band server_full and close 1013, as before.
        server = await start(TurboServer(engine, server_config(max_clients=1, trusted_proxies=("10.0.0.0/8",))))
        try:
            first, _ = await open_client(server, additional_headers={"X-Forwarded-For": "203.0.113.9"})
            ws = await connect(ws_url(server))
            assert json.loads(await ws.recv())["code"] == "server_full"
            assert (await until_closed(ws))[1] == 1013
            assert server.client_address(next(iter(server.clients)).ws) == "127.0.0.1"  # its header is ignored
            assert metrics_of(server)['turbostream_connections_total{via="direct"}'] == 2
            await first.close()
        finally:
            await server.stop()

    run(main())


def test_a_proxied_handshake_while_warming_gets_503(tiny_components):
    release = threading.Event()

    def slow():
        release.wait(20)
        return Engine(preset("test"), tiny_components)

    async def main():
        server = TurboServer(config=server_config(trusted_proxies=("127.0.0.1",)), engine_factory=slow)
        await server.start()
        try:
            with pytest.raises(InvalidStatus) as info:
                await connect(ws_url(server))
            assert info.value.response.status_code == 503 and b"warming up" in info.value.response.body
            release.set()
            assert await server.wait_ready(30)
            ws, ready = await open_client(server)
            assert ready["type"] == "ready"
            await ws.close()
        finally:
            release.set()
            await server.stop()

    run(main())




@pytest.mark.slow
def test_a_model_that_cannot_load_is_explained_once(tmp_path):
    """The message of a model that cannot be loaded (what was tried, what to do: several lines) is printed once, in
    the error serve ends with; the inference thread's log line gives its first line only."""
    result = subprocess.run(
        [sys.executable, "-m", "turbostream", "serve", "--device", "cpu", "--model", str(tmp_path / "none"),
         "--size", "64", "--port", "0"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("What to do:") == 1, result.stderr
    assert result.stderr.count(f"Could not load model '{tmp_path / 'none'}'") == 2, result.stderr  # log + error
    assert "turbostream: error: the engine failed to start: Could not load model" in result.stderr
