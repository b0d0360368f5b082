"""Ceilings below the WebSocket protocol, per socket and for the whole server: sockets open at once, sockets still in
their handshake (before any token is seen), bytes waiting in a socket's send buffer, HTTP header sizes.

websockets bounds what a peer makes us *receive* (max_size, max_queue) and what we *send* with send() (write_limit),
but it answers every ping with a pong written straight to the transport, without back-pressure: a peer that sends
pings and never reads grows our send buffer without end (measured: 455 MB, +900 MiB RSS in 25 s, three peers). And it
buffers each handshake until its header limits, for as many sockets as connect. And its max_queue pauses reading
only after a whole socket read (up to 256 KiB) has been parsed and queued: one read can hold 43,000 empty messages,
which the session then handles one after another (measured: every other client and /healthz stalled 1.9 s per read).
GuardedConnection feeds the parser a piece at a time, closes a socket the moment one of these passes its limit (or its
peer sends pings or messages faster than any client needs), and counts why in /metrics. Handshakes are parsed at most
max_pending_handshakes at a time: a socket that arrives past them waits its turn unread (a crowd of viewers opening
/view at once all get in), and only past max_sockets is a new socket closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from functools import partial
from typing import Any

import websockets.http11
from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode

from ..config import Limits

log = logging.getLogger("turbostream.server")

# A socket read is handed to the WebSocket parser in pieces of this size, and a socket closed by a limit is not fed
# the rest: a read packed with tiny frames costs at most one piece of parsing past the message limit (4 KiB: 680 empty
# frames, a few ms on a 2-core machine) before it is closed. A 30 KiB JPEG is then 8 calls of the parser, not 1.
FEED_BYTES = 4 * 1024
# What the message limit counts: messages and fragments smaller than this. The harm of a flood is in their number (a
# 256 KiB read holds 43,690 empty ones, but only 256 of 1 KiB); larger ones are bounded by the bytes a read holds,
# and a client's frames are larger (a 512x512 JPEG: tens of KiB), so a load test with many frames in flight on a
# fast engine is never cut off, while configs (a few hundred bytes) and floods of tiny messages are counted.
SMALL_MESSAGE_BYTES = 1024
DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


class ThrottledLog:
    """Log lines that a peer can cause, at most one per key every interval_s; the lines in between are counted, and
    the count goes out with the next line of that key, or with flush() (the server calls it when it stops).

    Keys name a kind of line and, where it matters, what it is about (each refused Origin its own, so an operator's
    own page left out of --allow-origin is named even while an attacker's is refused over and over). At most max_keys
    are remembered; past that, lines share one key per kind.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, max_keys: int = 64) -> None:
        self.logger, self.interval_s, self.max_keys = logger, interval_s, max_keys
        self._last: dict[str, float] = {}
        self._held: dict[str, tuple[int, str, tuple]] = {}  # key -> (lines held back, the last one's message, args)

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if key not in self._last and len(self._last) >= self.max_keys:
            self._forget(now)
            if len(self._last) >= self.max_keys:
                key = key.split(" ", 1)[0] + " (others)"
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            count = self._held.get(key, (0, "", ()))[0]
            self._held[key] = (count + 1, message, args)
            return
        self._last[key] = now
        held = self._held.pop(key, (0, "", ()))[0]
        if held:
            message += f" (and {held} more like it in the last %.0f s, not logged)"
            args = (*args, self.interval_s)
        self.logger.warning(message, *args)

    def flush(self) -> None:
        """Log how many lines of each key were held back since its last line (once: the counts start again)."""
        for key, (count, message, args) in list(self._held.items()):
            self.logger.warning(message + f" (the last of {count} like it, not logged)", *args)
        self._held.clear()

    def _forget(self, now: float) -> None:
        """Drop the keys whose last line is older than the interval and that hold nothing back."""
        for key in [k for k, t in self._last.items() if now - t >= self.interval_s and k not in self._held]:
            del self._last[key]


throttled = ThrottledLog(log)


class ConnectionGuard:
    """Counts the server's sockets and those still in their handshake; refuses sockets past the limits."""

    def __init__(self, limits: Limits, on_close: Any = None, on_wait: Any = None) -> None:
        self.limits = limits
        self.sockets: set[GuardedConnection] = set()  # every socket from accept to close (the event loop's alone)
        self.handshaking = 0  # sockets whose request is being read and parsed: at most max_pending_handshakes
        # Sockets that arrived while max_pending_handshakes were being parsed: not read (their bytes stay in the
        # kernel's buffers) until a handshake ends; their open timeout runs meanwhile. At most max_sockets of them.
        self.waiting: deque[GuardedConnection] = deque()
        self.on_close = on_close or (lambda reason: None)  # reason -> None: counts a socket closed by a limit
        self.on_wait = on_wait or (lambda: None)  # counts a socket that waited for its turn
        # Per-request header limits: websockets reads these module globals for every request it parses, so they
        # are process-wide (the last server started in a process sets them).
        websockets.http11.MAX_NUM_HEADERS = limits.max_header_count
        websockets.http11.MAX_LINE_LENGTH = limits.max_header_line_bytes

    @property
    def max_sockets(self) -> int:
        """Sockets at once: every client and viewer place, plus the handshakes in flight."""
        return self.limits.max_clients + self.limits.max_viewers + self.limits.max_pending_handshakes

    def factory(self):
        """What serve(create_connection=...) calls to build each connection."""
        return partial(GuardedConnection, guard=self)

    def send_buffer_bytes(self) -> int:
        """Bytes written to every socket but not yet taken by the kernel."""
        return sum(c.transport.get_write_buffer_size() for c in list(self.sockets) if c.transport is not None)

    def _handshake_ended(self, conn: GuardedConnection) -> None:
        """conn's request was read whole, or conn closed during it: its place goes to the longest-waiting socket."""
        conn.handshaking = False
        self.handshaking -= 1
        while self.waiting and self.handshaking < self.limits.max_pending_handshakes:
            nxt = self.waiting.popleft()
            nxt.waiting = False
            nxt.handshaking = True
            self.handshaking += 1
            nxt.transport.resume_reading()

    def _refuse(self, conn: GuardedConnection, reason: str) -> None:
        if not conn.refused:  # once: the rest of the data already received is not looked at
            conn.refused = True
            self.on_close(reason)
            conn.transport.abort()


class TokenBucket:
    """`burst` events at once, refilled at `per_s` a second: pings (max_ping_burst, max_pings_per_s) and small
    messages (max_message_burst, max_messages_per_s) of one connection."""

    def __init__(self, burst: int, per_s: float, now: float) -> None:
        self.burst, self.per_s = burst, per_s
        self.tokens, self.t = float(burst), now

    def take(self, now: float) -> bool:
        """One event at `now` (seconds): False when the bucket is empty (past the limit)."""
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.per_s)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class GuardedConnection(ServerConnection):
    """A ServerConnection that its ConnectionGuard can refuse at accept and closes when its send buffer overflows."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.handshaking = False
        self.waiting = False  # in guard.waiting: accepted, not read yet
        self.refused = False
        # Set before the upgrade for a peer that will be refused (no token): its messages are dropped as they are
        # parsed, never queued; buffering them until the refusal's close cost up to max_queue_messages x
        # max_message_bytes (16 MiB) per socket of a peer that has not even got the token.
        self.discard_messages = False
        limits, now = guard.limits, self.loop.time()
        self._pings = TokenBucket(limits.max_ping_burst, limits.max_pings_per_s, now)
        self._messages = TokenBucket(limits.max_message_burst, limits.max_messages_per_s, now)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = self.guard
        if len(guard.sockets) >= guard.max_sockets:
            guard._refuse(self, "too_many_sockets")
            return
        guard.sockets.add(self)
        if guard.handshaking >= guard.limits.max_pending_handshakes:
            # Read nothing yet (pausing here is before the transport's first read): it waits its turn.
            transport.pause_reading()
            self.waiting = True
            guard.waiting.append(self)
            guard.on_wait()
        else:
            guard.handshaking += 1
            self.handshaking = True

    def process_event(self, event: Any) -> None:
        if self.refused:
            return
        if isinstance(event, Frame):
            limits = self.guard.limits
            if event.opcode is Opcode.PING and not self._pings.take(self.loop.time()):
                throttled.warning("ping_flood", "closing a connection that sent pings faster than %g/s (burst %d)",
                                  limits.max_pings_per_s, limits.max_ping_burst)
                self.guard._refuse(self, "ping_flood")
                return
            if (event.opcode in DATA_OPCODES and len(event.data) < SMALL_MESSAGE_BYTES
                    and not self._messages.take(self.loop.time())):
                throttled.warning("message_flood", "closing a connection that sent messages faster than %g/s "
                                  "(burst %d)", limits.max_messages_per_s, limits.max_message_burst)
                self.guard._refuse(self, "message_flood")
                return
            if self.discard_messages and event.opcode in DATA_OPCODES:
                return
        super().process_event(event)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if len(data) <= FEED_BYTES:
            super().data_received(data)
        else:
            for start in range(0, len(data), FEED_BYTES):
                super().data_received(data[start:start + FEED_BYTES])
                if self.refused:  # a limit closed it: the rest of the read is not parsed
                    return
        if self.handshaking and self.request is not None:  # the whole request has been read and parsed
            self.guard._handshake_ended(self)
        if self.transport.get_write_buffer_size() > self.guard.limits.max_send_buffer_bytes:
            # Only answers to what the peer sends (pongs, a close) can grow it this far: our own sends wait at
            # write_limit. A peer that sends and never reads is cut off, not buffered for.
            throttled.warning("send_buffer", "closing a connection whose send buffer passed %d bytes (a peer that "
                              "sends pings and never reads)", self.guard.limits.max_send_buffer_bytes)
            self.guard._refuse(self, "send_buffer")

    def connection_lost(self, exc: Exception | None) -> None:
        guard = self.guard
        if self in guard.sockets:
            guard.sockets.discard(self)
            if self.handshaking:
                guard._handshake_ended(self)
            elif self.waiting:  # closed while waiting (its open timeout, the peer gone): out of the line
                self.waiting = False
                guard.waiting.remove(self)
        super().connection_lost(exc)
