"""OSC feedback (`--osc-feedback HOST:PORT`): the stream's settings sent to a desk whenever they change.

A desk (TouchOSC, Open Stage Control, a TouchDesigner OSC In, a lighting console) shows a fader per setting. When
something else changes the stream (a playlist's next look, a viewer with the control token, the prompt line, another
desk), its faders would show stale values, and the next touch would jump the picture back. Feedback sends each
setting that changed, on the same address the desk sends it to (a control bound to /turbostream/strength both sets
and shows it), plus the playlist's position:

| address                  | argument | value                                                 |
| ------------------------ | -------- | ----------------------------------------------------- |
| /turbostream/prompt      | s        | the prompt; a weighted blend as its JSON              |
| /turbostream/<setting>   | f or i   | strength, steps, seed, similarity, transition, ...    |
| /turbostream/lora/<i>    | f        | each loaded LoRA's scale, numbered from 1             |
| /turbostream/look        | i        | the playlist's look, numbered from 1 (with --prompts) |

One thread looks at the stream's settings every INTERVAL_S (whoever changed them, feedback follows: one place to
watch instead of a hook in every path that changes a stream) and sends what differs from what it sent last, one
message a datagram (simple receivers read no bundles). Everything is sent at the first look and after
`/turbostream/refresh` (a desk that restarted asks for it). Sends never block (UDP); one that fails is counted and
logged once per desk, and the next change is sent all the same.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pythonosc.osc_message_builder import OscMessageBuilder

from ..config import StreamParams
from .osc import PREFIX
from .targets import SETTINGS

log = logging.getLogger("turbostream.control")

MAX_TARGETS = 4  # desks fed at once: each change costs a datagram per setting per desk
INTERVAL_S = 0.05  # how often the settings are looked at: a fader moved elsewhere shows 50 ms later at most
INT32 = range(-(2**31), 2**31)

# address -> its arguments, each (OSC type tag, value): what one look at the stream gives
State = dict[str, tuple[tuple[str, Any], ...]]


def parse_target(text: str) -> tuple[str, int]:
    """'HOST:PORT' (an IPv6 address in brackets: '[::1]:9001') -> (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--osc-feedback takes HOST:PORT (for example 127.0.0.1:9001, [::1]:9001), got {text!r}")
    return host, int(port)


def _prompt_text(prompt) -> str:
    """A prompt as the desk would send it: the text, or a blend's JSON ([["a watercolor", 0.7], ...])."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps([list(entry) for entry in prompt], ensure_ascii=False)


def _typed(value: Any, kind: type) -> tuple[str, Any]:
    if kind is float:
        return "f", float(value)
    return ("i" if int(value) in INT32 else "h"), int(value)  # a seed past 2^31 needs OSC's 64-bit int


def feedback_state(params: StreamParams | None, lora_scales: Sequence[float] = (), look: int | None = None,
                   ) -> State:
    """Every address feedback sends for these settings, LoRA scales and playlist look (from 1; None: no playlist);
    an empty state while there is no stream (a broadcast that is still loading)."""
    if params is None:
        return {}
    state: State = {PREFIX + "prompt": (("s", _prompt_text(params.prompt)),)}
    for name, (field, kind) in SETTINGS.items():
        state[PREFIX + name] = (_typed(getattr(params, field), kind),)
    for number, scale in enumerate(lora_scales, 1):
        state[f"{PREFIX}lora/{number}"] = (("f", float(scale)),)
    if look is not None:
        state[PREFIX + "look"] = (("i", int(look)),)
    return state


def changes(sent: State, now: State) -> State:
    """What differs in `now` from what was `sent` (each address's newest arguments)."""
    return {address: args for address, args in now.items() if sent.get(address) != args}


def encode(address: str, args: tuple[tuple[str, Any], ...]) -> bytes:
    builder = OscMessageBuilder(address)
    for tag, value in args:
        builder.add_arg(value, tag)
    return builder.build().dgram


class OscFeedback:
    """Resolves and checks the desks' addresses at once (before the model loads: ValueError says what is wrong);
    start(state) begins looking at `state()` (a State, see feedback_state) on a thread of its own."""

    def __init__(self, targets: Sequence[str], *, interval_s: float = INTERVAL_S) -> None:
        if len(targets) > MAX_TARGETS:
            raise ValueError(f"--osc-feedback: at most {MAX_TARGETS} desks, got {len(targets)}")
        self.targets: list[tuple[str, Any]] = []  # (as given, the resolved socket address)
        self._socks: list[socket.socket] = []
        try:
            for text in targets:
                host, port = parse_target(text)
                try:
                    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
                except (OSError, UnicodeError) as exc:
                    raise ValueError(f"--osc-feedback {text}: cannot resolve {host!r}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)  # a full send buffer drops a datagram, never stalls the thread
                self._socks.append(sock)
                self.targets.append((text, address))
        except BaseException:
            self.close()
            raise
        self.interval_s = interval_s
        self.sent = 0  # datagrams sent, every desk
        self.failed = 0  # datagrams a send refused
        self._sent_state: State = {}
        self._state: Callable[[], State] | None = None
        self._refresh = threading.Event()
        self._warned: set[str] = set()  # desks a send to failed (logged once each; the rest are counted)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, state: Callable[[], State]) -> OscFeedback:
        self._state = state
        self._thread = threading.Thread(target=self._run, name="turbostream-osc-feedback", daemon=True)
        self._thread.start()
        log.info("OSC feedback: the settings go to %s whenever they change",
                 ", ".join(text for text, _ in self.targets))
        return self

    def refresh(self) -> None:
        """Send every setting at the next look, changed or not (any thread)."""
        self._refresh.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.close()

    def close(self) -> None:
        for sock in self._socks:
            sock.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a state read that failed once must not end feedback for the show
                log.debug("OSC feedback: a look at the settings failed", exc_info=True)

    def poll(self) -> int:
        """One look: send what changed since the last (everything after refresh()); returns the messages sent."""
        now = self._state() if self._state is not None else {}
        if not now:
            return 0  # no stream yet: the desk keeps what it shows
        send = dict(now) if self._refresh.is_set() else changes(self._sent_state, now)
        self._refresh.clear()
        self._sent_state = now
        for address, args in send.items():
            self._send(encode(address, args))
        return len(send)

    def _send(self, datagram: bytes) -> None:
        for (text, address), sock in zip(self.targets, self._socks):
            try:
                sock.sendto(datagram, address)
            except OSError as exc:  # a full buffer, an unreachable network, a port refused (ICMP)
                self.failed += 1
                if text not in self._warned:
                    self._warned.add(text)
                    log.warning("OSC feedback to %s failed: %s (logged once; later failures are only counted)",
                                text, exc.strerror or exc)
                continue
            self.sent += 1
