"""OSC control (`--osc-port`): a UDP socket on a thread of its own; messages are parsed with python-osc and turned
into the fields of a `config` message for one callback (a RunTarget or a BroadcastTarget), or into playlist steps.

| address                  | arguments         | does                                                     |
| ------------------------ | ----------------- | -------------------------------------------------------- |
| /turbostream/prompt      | s                 | the prompt; JSON starting with [ is a weighted blend     |
| /turbostream/strength    | f (or i)          | strength, 0 < x <= 1 (steps x strength >= 1)             |
| /turbostream/steps       | i (or integral f) | schedule length, 1..the engine's max_steps (10)          |
| /turbostream/seed        | i (or integral f) | noise seed, 0..2^32-1                                    |
| /turbostream/similarity  | f (or i)          | skip still frames: 0 (off) or a threshold below 1        |
| /turbostream/transition  | f (or i)          | transition_s: seconds to blend after a prompt/seed change|
| /turbostream/feedback    | f (or i)          | feedback, 0 (off) to 0.95                                |
| /turbostream/reuse       | i (or integral f) | feature reuse: full UNet every N frames, 0..8 (0, 1: off)|
| /turbostream/next        | none, or a number | next playlist prompt (a number 0 is ignored: a button's  |
| /turbostream/previous    | none, or a number | release); needs --prompts                                |
| /turbostream/look        | i (or integral f) | go to the playlist's look N, from 1; needs --prompts     |
| /turbostream/refresh     | none, or a number | send every setting to the --osc-feedback desks now       |
| /turbostream/lora        | f; or i f; or s f | a LoRA's scale (the only one; number i from 1; name s);  |
| /turbostream/lora/<i>    | f (or i)          | needs --lora-live; changes every stream (LoraTarget)     |

Every message gets one result, counted in `counts` (and by `on_result`, for /metrics): applied, ignored (a button
release, next/previous without a playlist), rejected (a value out of range, or no stream to change yet),
bad_arguments (wrong count or type), unknown_address, malformed (a datagram that is not OSC). Each kind of problem is
logged once (kinds are per known address, so the set of them is bounded); the rest are only counted. Bundles are
unpacked and their messages applied at once (their time tags are not waited for). One thread takes one datagram at a
time: a flood costs this thread's time and nothing else.
"""

from __future__ import annotations

import logging
import math
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from ..config import MAX_LORAS, parse_prompt
from .targets import SETTINGS

log = logging.getLogger("turbostream.control")

PREFIX = "/turbostream/"
PARAM_ADDRESSES = ("prompt", *SETTINGS)
STEP_ADDRESSES = ("next", "previous")
BUTTON_ADDRESSES = (*STEP_ADDRESSES, "refresh")  # none, or one number: 0 is a button's release (ignored)
LORA_ADDRESSES = ("lora", *(f"lora/{i}" for i in range(1, MAX_LORAS + 1)))  # bounded: kinds are logged per address
RESULTS = ("applied", "ignored", "rejected", "bad_arguments", "unknown_address", "malformed")
MAX_DATAGRAM = 65536  # the largest UDP payload; a bigger one is cut by the kernel and fails to parse (malformed)
MAX_ARGS = 8  # arguments of one message shown in a log line; every address takes two at most
MAX_BUNDLE_DEPTH = 4  # bundles inside bundles; deeper is malformed (python-osc itself would recurse without limit)
POLL_S = 0.2  # how often the thread looks at its stop flag between datagrams
# Argument types python-osc parses; it logs a warning on the root logger for each other one, so a datagram with
# thousands of unknown type tags is refused here as malformed before it reaches python-osc.
_KNOWN_TAGS = frozenset("ihfdsbrmtTFN[]")


class BadArguments(ValueError):
    """A message whose arguments have the wrong count or type for its address."""


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadArguments(f"expected a number, got {type(value).__name__} {_short(value)}")
    return _decimal_of_float32(value) if isinstance(value, float) else float(value)


def _float32(value: float) -> float:
    return struct.unpack(">f", struct.pack(">f", value))[0]


def _decimal_of_float32(value: float) -> float:
    """The shortest decimal that a 32-bit float stands for (0.699999988079071 -> 0.7); other values as they are.

    OSC's `f` arguments (what TouchDesigner, python-osc and most desks send) are 32-bit: strength 0.7 arrives as
    0.699999988..., and steps 10 x that is 6.99..., one UNet evaluation fewer than the 0.7 typed in the browser or on
    the command line. A value a 32-bit float holds exactly is taken to be one (a 64-bit `d` argument rarely is).
    """
    if not math.isfinite(value) or value.is_integer() or abs(value) > 3.4e38 or _float32(value) != value:
        return value  # whole numbers are exact as they are (a seed of 2^31 sent as a float stays 2^31)
    for digits in range(1, 10):
        shortest = float(f"{value:.{digits}g}")
        if _float32(shortest) == value:
            return shortest
    return value


def _integer(value: Any) -> int:
    number = _number(value)
    if isinstance(value, int):
        return value
    if not number.is_integer():  # NaN and infinities too
        raise BadArguments(f"expected an integer, got {value!r}")
    return int(value)


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except RecursionError:  # arrays nested thousands deep (an OSC "[" tag per level)
        return "<nested too deep>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lora_arguments(name: str, args: list[Any]) -> tuple[int | str | None, float]:
    """(which LoRA: None for the only one, a number from 1 or a name; its scale) of /turbostream/lora[/<i>]."""
    if name != "lora":  # lora/<i>: the number in the address, as a fader sends it
        if len(args) != 1:
            raise BadArguments(f"expected one number (the scale), got {len(args)} arguments")
        return int(name.partition("/")[2]), _number(args[0])
    if len(args) == 1:
        return None, _number(args[0])
    if len(args) != 2:
        raise BadArguments(f"expected the scale, or which LoRA (a number from 1, or its name) and the scale; got "
                           f"{len(args)} arguments")
    which = args[0] if isinstance(args[0], str) else _integer(args[0])
    return which, _number(args[1])


def look_argument(args: list[Any]) -> int:
    """The look number (from 1) of /turbostream/look."""
    if len(args) != 1:
        raise BadArguments(f"expected one number (the look, from 1), got {len(args)} arguments")
    return _integer(args[0])


def fields_for(name: str, args: list[Any]) -> dict[str, Any]:
    """The config fields of /turbostream/<name> with these arguments; BadArguments if they do not fit."""
    if len(args) != 1:
        raise BadArguments(f"expected one argument, got {len(args)}")
    value = args[0]
    if name == "prompt":
        if not isinstance(value, str):
            raise BadArguments(f"expected a string, got {type(value).__name__} {_short(value)}")
        try:  # as --prompt, playlists and the prompt line read it: a weighted blend when it starts with "["
            return {"prompt": parse_prompt(value)}
        except ValueError as exc:
            raise BadArguments(str(exc)) from None
    field, kind = SETTINGS[name]
    return {field: _number(value) if kind is float else _integer(value)}


class OscServer:
    """Binds at once (so a port in use is reported before the model loads); start() begins serving on a thread.

    apply(fields) changes the stream (raises ValueError to refuse); playlist: an object with next()/previous(), or
    None; on_result(result) is called once per message (a Prometheus counter's inc, for instance); lora(which,
    scale) changes a LoRA's scale (a LoraTarget; None: /turbostream/lora is refused); feedback: an object with
    refresh() (OscFeedback), or None.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9000) -> None:
        self.host = host
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            raise OSError(f"cannot listen for OSC on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            self._sock.bind(address)
        except OSError as exc:
            self._sock.close()
            raise OSError(f"cannot listen for OSC on {host}:{port}: {exc.strerror or exc}") from None
        self._sock.settimeout(POLL_S)
        self.port: int = self._sock.getsockname()[1]
        self.apply: Callable[[dict[str, Any]], Any] | None = None
        self.playlist = None
        self.on_result: Callable[[str], Any] | None = None
        self.lora: Callable[[int | str | None, float], Any] | None = None
        self.feedback = None
        self.counts = dict.fromkeys(RESULTS, 0)
        self._logged: set[str] = set()  # kinds of problems already logged: bounded by RESULTS x known addresses
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, apply: Callable[[dict[str, Any]], Any], *, playlist=None,
              on_result: Callable[[str], Any] | None = None,
              lora: Callable[[int | str | None, float], Any] | None = None, feedback=None) -> OscServer:
        self.apply, self.playlist, self.on_result, self.lora = apply, playlist, on_result, lora
        self.feedback = feedback
        self._thread = threading.Thread(target=self._serve, name="turbostream-osc", daemon=True)
        self._thread.start()
        log.info("OSC: listening on udp %s:%d (%s%s)", self.host, self.port, PREFIX, _KNOWN)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self._sock.recvfrom(MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue  # e.g. an ICMP error surfaced on a UDP socket: nothing to do with the next datagram
            try:
                self.handle_datagram(data, sender)
            except Exception:  # noqa: BLE001 - never let one datagram end control of the show
                self._once("internal", "OSC: a message could not be handled", exc_info=True)

    # ------------------------------------------------------------------ Sans-I/O (tests call these directly)

    def handle_datagram(self, data: bytes, sender: Any = None) -> list[str]:
        """Every message of one datagram (a message or a bundle), each to its result; returns the results."""
        try:
            messages = split_datagram(data)
        except Exception as exc:  # noqa: BLE001 - ParseError, and whatever else a hostile datagram trips
            return [self._count("malformed", "malformed", f"OSC: ignoring a datagram that is not OSC "
                                f"({len(data)} bytes from {_who(sender)}): {exc}")]
        return [self.handle_message(m.address, list(m.params), sender) for m in messages]

    def handle_message(self, address: str, args: list[Any], sender: Any = None) -> str:
        """One message -> its result (counted; each kind of problem logged once)."""
        name = address[len(PREFIX):] if address.startswith(PREFIX) else None
        if name not in PARAM_ADDRESSES + BUTTON_ADDRESSES + LORA_ADDRESSES + ("look",):
            return self._count("unknown_address", "unknown_address",
                               f"OSC: ignoring unknown address {_short(address)} from {_who(sender)} "
                               f"(known: {PREFIX}{_KNOWN})")
        if len(args) > MAX_ARGS:  # every address takes two arguments at most: no log line as long as the datagram
            return self._count("bad_arguments", f"bad_arguments {address}",
                               f"OSC: ignoring {address} with {len(args)} arguments from {_who(sender)}")
        what = f"{address} {' '.join(_short(a, 40) for a in args)}".strip()
        if name in BUTTON_ADDRESSES:
            return self._button(name, args, address, what, sender)
        if name == "look":
            return self._change(address, what, sender, lambda: look_argument(args), self._select_look)
        if name in LORA_ADDRESSES:
            return self._change(address, what, sender, lambda: lora_arguments(name, args), self._set_lora,
                                lambda scales: f"LoRA scales {list(scales)}")
        return self._change(address, what, sender, lambda: fields_for(name, args), self.apply, str)

    def _change(self, address: str, what: str, sender: Any, parse: Callable[[], Any], act: Callable[[Any], Any],
                describe: Callable[[Any], str] | None = None) -> str:
        """A message that changes something: `parse()` its arguments (BadArguments: bad_arguments), `act` on them
        (ValueError: rejected), else applied; the first applied one logged at INFO with describe(act's result)."""
        try:
            parsed = parse()
        except BadArguments as exc:
            return self._count("bad_arguments", f"bad_arguments {address}",
                               f"OSC: ignoring {what} from {_who(sender)}: {exc}")
        try:
            outcome = act(parsed)
        except ValueError as exc:
            return self._count("rejected", f"rejected {address}", f"OSC: refused {what} from {_who(sender)}: {exc}")
        if describe is not None:
            level = logging.INFO if self.counts["applied"] == 0 else logging.DEBUG
            log.log(level, "OSC: %s from %s -> %s", what, _who(sender), describe(outcome))
        return self._count("applied")

    def _set_lora(self, which_and_scale: tuple[int | str | None, float]) -> tuple[float, ...]:
        if self.lora is None:
            raise ValueError("LoRA scales cannot be changed here")
        return self.lora(*which_and_scale)

    def _select_look(self, number: int) -> None:
        if self.playlist is None:
            raise ValueError("there is no playlist (start with --prompts FILE)")
        self.playlist.select(number)

    def _button(self, name: str, args: list[Any], address: str, what: str, sender: Any) -> str:
        """next, previous and refresh: no argument, or a button's value (0, its release, is ignored)."""
        if len(args) > 1:
            return self._count("bad_arguments", f"bad_arguments {address}",
                               f"OSC: ignoring {what} from {_who(sender)}: expected no argument or one number")
        if args:
            try:
                pressed = _number(args[0]) != 0.0
            except BadArguments as exc:
                return self._count("bad_arguments", f"bad_arguments {address}",
                                   f"OSC: ignoring {what} from {_who(sender)}: {exc}")
            if not pressed:
                return self._count("ignored")  # a button's release
        if name == "refresh":
            if self.feedback is None:
                return self._count("ignored", f"ignored {address}",
                                   f"OSC: {address} needs a desk to send to (start with --osc-feedback HOST:PORT); "
                                   "ignored")
            self.feedback.refresh()
            return self._count("applied")
        if self.playlist is None:
            return self._count("ignored", f"ignored {address}",
                               f"OSC: {address} needs a playlist (start with --prompts FILE); ignored")
        getattr(self.playlist, name)()
        return self._count("applied")

    def _count(self, result: str, kind: str | None = None, message: str | None = None) -> str:
        self.counts[result] += 1
        if self.on_result is not None:
            self.on_result(result)
        if kind is not None and message is not None:
            self._once(kind, message + " (logged once; later ones are only counted)")
        return result

    def _once(self, kind: str, message: str, **kw: Any) -> None:
        if kind in self._logged:
            return
        self._logged.add(kind)
        log.warning("%s", message, **kw)


def split_datagram(data: bytes, depth: int = 0) -> list:
    """The python-osc OscMessages of a datagram: one message, or a bundle's (nested up to MAX_BUNDLE_DEPTH).

    ValueError (or python-osc's ParseError) for anything else. Bundle time tags are not waited for.
    """
    from pythonosc.osc_message import OscMessage

    if data.startswith(b"#bundle\x00"):
        if depth >= MAX_BUNDLE_DEPTH:
            raise ValueError(f"bundles nested more than {MAX_BUNDLE_DEPTH} deep")
        if len(data) < 16:
            raise ValueError("a bundle shorter than its header")
        messages, index = [], 16  # "#bundle\0" and an 8-byte time tag
        while index < len(data):
            size = int.from_bytes(data[index : index + 4], "big", signed=True)
            index += 4
            if size <= 0 or size % 4 or index + size > len(data):
                raise ValueError(f"a bundle element of {size} bytes does not fit the datagram")
            messages += split_datagram(data[index : index + size], depth + 1)
            index += size
        return messages
    if not data.startswith(b"/"):
        raise ValueError("neither an OSC message (starts with /) nor a bundle")
    address_end = data.find(b"\x00")
    tags_start = (address_end // 4 + 1) * 4 if address_end >= 0 else len(data)
    if data[tags_start : tags_start + 1] == b",":
        tags_end = data.find(b"\x00", tags_start)
        tags = data[tags_start + 1 : tags_end if tags_end >= 0 else len(data)]
        unknown = set(tags.decode("latin-1")) - _KNOWN_TAGS
        if unknown:
            raise ValueError(f"argument types this server does not read: {''.join(sorted(unknown))[:20]!r}")
    return [OscMessage(data)]


_KNOWN = "{" + ",".join(PARAM_ADDRESSES + STEP_ADDRESSES + ("look",) + ("lora", f"lora/<1-{MAX_LORAS}>")
                         + ("refresh",)) + "}"


def _who(sender: Any) -> str:
    if isinstance(sender, tuple) and len(sender) >= 2:
        return f"{sender[0]}:{sender[1]}"
    return "?"
