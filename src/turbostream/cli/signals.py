"""Which signals stop a long-running subcommand (serve, run) the way Ctrl-C does."""

from __future__ import annotations

import signal


def stop_signals() -> list[signal.Signals]:
    """SIGTERM (docker stop, systemctl stop, kill), and SIGHUP (the terminal or ssh session that started the process
    went away) unless it is ignored: a process started under nohup keeps running when its terminal closes."""
    stops = [signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)  # absent on Windows
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        stops.append(hangup)
    return stops
