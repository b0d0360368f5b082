"""Which signals stop a long-running subcommand (serve, run) the way Ctrl-C does, and how serve's event loop hears
them on every platform."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable


def stop_signals() -> list[signal.Signals]:
    """SIGTERM (docker stop, systemctl stop, kill), and SIGHUP (the terminal or ssh session that started the process
    went away) unless it is ignored: a process started under nohup keeps running when its terminal closes."""
    stops = [signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)  # absent on Windows
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        stops.append(hangup)
    brk = getattr(signal, "SIGBREAK", None)  # Windows only: Ctrl+Break, and what a console window's close sends
    if brk is not None:
        stops.append(brk)
    return stops


def on_signal(loop: asyncio.AbstractEventLoop, sig: signal.Signals, callback: Callable[[], None]) -> Callable[[], None]:
    """Run callback on loop when sig arrives; returns what undoes that. Windows' event loops have no
    add_signal_handler: there a plain handler hands the signal to the loop (which asyncio wakes for signals), instead
    of letting Ctrl+C cancel the main task and skip the graceful shutdown."""
    try:
        loop.add_signal_handler(sig, callback)
        return lambda: loop.remove_signal_handler(sig)
    except NotImplementedError:
        before = signal.signal(sig, lambda signum, frame: loop.call_soon_threadsafe(callback))
        return lambda: signal.signal(sig, before if before is not None else signal.SIG_DFL)
