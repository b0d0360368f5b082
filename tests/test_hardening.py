"""Cheap messages must not buy expensive work or memory, and security headers and tokens are checked exactly: each
attack over real sockets against a real server on port 0 (tiny-random on the CPU)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from test_server import (
    _viewer_server,
    jpeg,
    next_of_type,
    next_result,
    open_client,
    run,
    serving,
    ws_url,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from turbostream.config import preset
from turbostream.engine import Engine
from turbostream.serve.http import query_params, token_matches


@pytest.fixture
def engine(tiny_components):
    return Engine(preset("test"), tiny_components)


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
