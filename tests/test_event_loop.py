"""serve's event loop (serve/event_loop.py): uvloop where installed, asyncio's on request; the server streams on both."""

from __future__ import annotations

import asyncio
import sys

import pytest
from test_server import jpeg, next_result, run
from websockets.asyncio.client import connect

from turbostream import cli
from turbostream.config import ServerConfig
from turbostream.serve import ServerThread, TurboServer, event_loop

uvloop = pytest.importorskip("uvloop") if sys.platform != "win32" else None


def test_each_kind_runs_a_coroutine_on_its_own_loop():
    async def which():
        return event_loop.describe(asyncio.get_running_loop())

    assert event_loop.loop_factory("asyncio") is None
    assert event_loop.run(which(), "asyncio") == "asyncio"
    assert event_loop.run(which(), "uvloop") == f"uvloop {uvloop.__version__}"
    expected = f"uvloop {uvloop.__version__}" if sys.version_info >= (3, 11) else "asyncio"
    assert event_loop.run(which(), "auto") == expected


def test_an_unknown_loop_or_a_missing_uvloop_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="one of auto, asyncio, uvloop"):
        event_loop.loop_factory("trio")
    with pytest.raises(ValueError, match="must be auto, asyncio or uvloop"):
        ServerConfig(event_loop="trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert event_loop.loop_factory("auto") is None  # auto falls back to asyncio's
    with pytest.raises(ValueError, match="pip install uvloop"):
        event_loop.loop_factory("uvloop")


def test_serve_with_uvloop_missing_says_so_before_loading(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert cli.main(["serve", "--model", "tiny-random", "--device", "cpu", "--event-loop", "uvloop"]) == 2
    err = capsys.readouterr().err
    assert "--event-loop uvloop needs uvloop" in err and "loading" not in err


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_the_server_streams_frames_on_either_loop(engine, kind):
    with ServerThread(TurboServer(engine, ServerConfig(port=0, event_loop=kind))) as server:
        assert server.event_loop_name.split()[0] == kind

        async def client():
            async with connect(f"ws://127.0.0.1:{server.port}/ws", max_size=2**23, compression=None) as ws:
                for seq in (1, 2, 3):
                    await ws.send(jpeg(seq))
                    header, rgb, others = await next_result(ws)
                    assert header["seq"] == seq and rgb.shape == (64, 64, 3)
                    assert not [m for m in others if m["type"] == "error"]

        run(client())
