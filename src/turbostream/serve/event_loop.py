"""The event loop `serve` runs on: uvloop where it is installed (`--event-loop auto`, the default), else asyncio's.

Why try it: each frame crosses between the event loop and other threads three times (its JPEG to a decode worker, its
result from the inference thread to the sender, the encoded JPEG back to the sender), and the loop's wake-ups and its
WebSocket reads and writes are part of a single client's latency. uvloop (libuv under asyncio's API) is said to do
those faster; scripts/latency_breakdown.py --event-loop asyncio|uvloop measures it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

EVENT_LOOPS = ("auto", "asyncio", "uvloop")

T = TypeVar("T")


def loop_factory(kind: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A new-loop factory for `kind` (auto, asyncio or uvloop); None means asyncio's own loop.

    auto is uvloop when it can be imported and Python is 3.11 or newer (asyncio.Runner takes a loop factory), else
    asyncio's. uvloop asked for by name and missing is a ValueError saying what to install.
    """
    if kind not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, not {kind!r}")
    if kind == "asyncio" or (kind == "auto" and sys.version_info < (3, 11)):
        return None
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise ValueError("--event-loop uvloop needs uvloop (pip install uvloop; not on Windows)") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: str = "auto") -> T:
    """asyncio.run(main) on the event loop `kind` names (loop_factory)."""
    factory = loop_factory(kind)
    if factory is None:
        return asyncio.run(main)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)
    loop = factory()  # Python 3.10, uvloop asked for by name
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """What a running loop is, for the log: 'uvloop 0.23.0' or 'asyncio'."""
    module = type(loop).__module__.split(".")[0]
    if module == "uvloop":
        import uvloop

        return f"uvloop {uvloop.__version__}"
    return "asyncio"
