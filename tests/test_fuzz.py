"""Input fuzzing over real sockets: random and mutated JPEGs, random JSON, protocol violations.

Every case must be answered (an image, a config echo or an error with the expected code), on a connection that stays
open, within a bounded time; the server is healthy afterwards. Most cases run against a server whose engine skips
the UNet (its checks and its text encoder are the real ones), so thousands fit in seconds; a seeded few hundred go
through the real tiny engine. Hypothesis runs derandomized: CI sees the same cases every time.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_server import http_get
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from turbostream.codec import encode_jpeg, fit_frame
from turbostream.config import Limits, ServerConfig, preset
from turbostream.engine import Engine
from turbostream.serve import ServerThread, TurboServer
from turbostream.serve.protocol import ERROR_CODES

MAX_TEXT_BYTES = Limits().max_text_bytes

ANSWER_TIMEOUT_S = 20.0  # per case; answers take milliseconds, this only turns a hang into a failure
IMAGE_ANSWERS = {"image", "bad_image", "image_too_large"}
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


class SkipUNetEngine:
    """The real engine's parameter checks and text encoder, without the UNet: run() returns the fitted frames."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def run(self, frames, params, **kw):
        for p in params:
            self._engine.validate(p)
            self._engine.prompt_embeddings(p.prompt)
        return [fit_frame(f, self._engine.width, self._engine.height) for f in frames]


class Wire:
    """One long-lived sync client: send a case, read until the message that answers it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(
            connect(f"ws://127.0.0.1:{port}/ws", max_size=2**23, compression=None, open_timeout=30))
        ready = json.loads(self.ws.recv(timeout=30))
        assert ready["type"] == "ready"
        self.ready = ready
        self.seq = 0  # binary messages sent: the server numbers frames the same way
        self.cases = 0

    def send(self, message: bytes | str) -> tuple[str, dict]:
        """('image' | 'config' | an error code, the answering JSON) for one message."""
        self.cases += 1
        self.ws.send(message)
        binary = isinstance(message, bytes)
        if binary:
            self.seq += 1
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        header = None
        while True:
            msg = self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(msg, bytes):
                assert header is not None and header["seq"] == self.seq, (header, self.seq)
                assert msg[:3] == b"\xff\xd8\xff" and len(msg) > 100
                return "image", header
            obj = json.loads(msg)
            kind = obj["type"]
            if kind == "stats":
                continue
            if kind == "frame":
                assert binary, obj
                header = obj
                continue
            if kind == "error":
                assert obj["code"] in ERROR_CODES and isinstance(obj["message"], str) and obj["message"], obj
                if binary:
                    assert obj.get("seq") == self.seq, (obj, self.seq)
                return obj["code"], obj
            if kind == "config":
                assert not binary, obj
                return "config", obj
            raise AssertionError(f"unexpected message {obj}")

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def fast_server(tiny_components):
    # One client sends hundreds of cases back to back, each answered in about a millisecond when it is refused at
    # once: past the message-rate limit (500/s after a burst of 200) on a fast enough machine, which then closes the
    # connection as a flood. The limit has its own tests (test_hardening); here it is out of the way.
    limits = Limits(max_messages_per_s=1e6, max_message_burst=10**6)
    with ServerThread(TurboServer(SkipUNetEngine(Engine(preset("test"), tiny_components)),
                                  ServerConfig(port=0, limits=limits))) as server:
        yield server


@pytest.fixture(scope="module")
def wire(fast_server):
    w = Wire(fast_server.port)
    yield w
    w.close()


# ------------------------------------------------------------------------------------------------ JPEG cases


def _picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7 + seed) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)


BASES = [encode_jpeg(_picture(w, h, i), q) for i, (w, h, q) in enumerate([(64, 64, 90), (96, 128, 50), (200, 40, 95),
                                                                          (17, 9, 80)])]
# Progressive and grayscale JPEGs decode too (cv2 writes them).
BASES.append(cv2.imencode(".jpg", _picture(80, 60), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes())
BASES.append(cv2.imencode(".jpg", _picture(72, 48)[..., 0])[1].tobytes())


def _sof_offset(data: bytes) -> int | None:
    """Index of the height field of the first start-of-frame segment."""
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        i = data.find(marker)
        if i >= 0:
            return i + 5
    return None


@st.composite
def mutated_jpegs(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "dims", "splice", "cut", "repeat"]))
        n = len(data)
        if op == "truncate":
            del data[draw(st.integers(0, n)):]
        elif op == "flip" and n:
            for _ in range(draw(st.integers(1, 16))):
                i = draw(st.integers(0, n - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "dims":
            i = _sof_offset(bytes(data))
            if i is not None and i + 4 <= n:
                dims = draw(st.sampled_from([0, 1, 7, 8, 64, 4096, 4097, 8192, 65535]) | st.integers(0, 65535))
                field = draw(st.sampled_from([0, 2]))
                data[i + field : i + field + 2] = dims.to_bytes(2, "big")
        elif op == "splice":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(max_size=64))
        elif op == "cut" and n:
            i = draw(st.integers(0, n - 1))
            del data[i : i + draw(st.integers(1, 256))]
        elif op == "repeat" and n:
            i = draw(st.integers(0, n - 1))
            data[i:i] = data[i : i + draw(st.integers(1, 512))]
    return bytes(data)


SIDES = st.sampled_from([1, 2, 7, 8, 9, 63, 64, 65, 127, 500, 4095, 4096, 4097]) | st.integers(1, 300)


@st.composite
def odd_jpegs(draw) -> tuple[bytes, tuple[int, int]]:
    """A valid JPEG of odd size (1x1, 8x4096, 4097x8...) and its size; kept small in pixels so encoding is quick."""
    width = draw(SIDES)
    height = draw(SIDES.filter(lambda h: width * h <= 600_000))
    return encode_jpeg(_picture(width, height), draw(st.integers(1, 100))), (width, height)


def expected_for_size(width: int, height: int) -> str:
    if max(width, height) > Limits().max_image_side:
        return "image_too_large"
    if min(width, height) < 8:
        return "bad_image"  # smaller than 8 pixels a side: refused after decoding
    return "image"


@settings(FUZZ, max_examples=600)
@given(data=st.binary(max_size=4096) | st.binary(max_size=2048).map(lambda b: b"\xff\xd8\xff" + b))
def test_random_bytes_are_answered_with_an_error(wire, data):
    answer, _ = wire.send(data)
    assert answer in ("bad_image", "image_too_large")


@settings(FUZZ, max_examples=900)
@given(data=mutated_jpegs())
def test_mutated_jpegs_are_answered(wire, data):
    answer, _ = wire.send(data)
    assert answer in IMAGE_ANSWERS


@settings(FUZZ, max_examples=300)
@given(case=odd_jpegs())
def test_valid_jpegs_of_odd_sizes_get_the_answer_their_size_calls_for(wire, case):
    data, (width, height) = case
    answer, msg = wire.send(data)
    assert answer == expected_for_size(width, height), (width, height, msg)


# ------------------------------------------------------------------------------------------------ JSON cases


def _jsonable(strategy):
    return st.recursive(
        strategy, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                     max_size=4),
        max_leaves=12,
    )


SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-2**80, 2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30))
ANY_JSON = _jsonable(SCALARS)
# Text with lone surrogates, control characters, astral planes: JSON escapes carry all of it.
# (A list joined, not st.text: text() leaves surrogates out.)
ODD_TEXT = st.lists(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)  # surrogates, paired or not
                    | st.characters(max_codepoint=0x1F) | st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)
                    | st.characters(), max_size=40).map("".join)
# Per field: values a client could mean (odd text included: surrogates, control characters, 1000 characters), and
# values that must be refused (wrong types, out of range, NaN, huge). A config takes the first kind three times in
# four, so most configs are accepted and the frame after them shows whether the engine copes with them.
PLAUSIBLE = {
    "prompt": st.text(max_size=60) | ODD_TEXT | st.text(min_size=990, max_size=1000, alphabet="ab "),
    "strength": st.floats(0.5, 1.0) | st.sampled_from([1, 0.5, 0.75]),
    "steps": st.integers(2, 10),
    "seed": st.integers(0, 2**32 - 1),
}
WRONG = {
    "prompt": st.text(min_size=1001, max_size=1010, alphabet="ab ") | ANY_JSON,
    "strength": st.floats(-2, 3) | st.sampled_from([0, 1.0000001, float("nan"), float("inf"), "0.5", 10**400])
    | ANY_JSON,
    "steps": st.integers(-3, 14) | st.sampled_from([2.0, 2**63, -(2**70), True]) | ANY_JSON,
    "seed": st.integers(-(2**40), 2**40) | st.sampled_from([2**32, 2**64, 1e30, False, -1]) | ANY_JSON,
}


@st.composite
def configs(draw) -> dict:
    obj = {"type": "config"}
    for name in draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), unique=True, max_size=4)):
        obj[name] = draw(WRONG[name] if draw(st.integers(0, 3)) == 0 else PLAUSIBLE[name])
    if draw(st.integers(0, 9)) == 0:
        obj[draw(st.text(max_size=10))] = draw(ANY_JSON)  # an unknown field (or "type" itself replaced)
    return obj


def _dumps(obj) -> str:
    return json.dumps(obj, allow_nan=True)  # NaN and Infinity: Python's json reads them, so clients may send them


@settings(FUZZ, max_examples=900)
@given(obj=configs())
@example(obj={"type": "config", "prompt": "\ud800\udc00"})  # two lone surrogates that JSON sends as one pair
@example(obj={"type": "config", "strength": 10**400})  # an integer too large for a float: bad_config, not a crash
def test_config_messages_are_echoed_or_refused_and_never_break_the_stream(wire, obj):
    answer, msg = wire.send(_dumps(obj))
    if obj.get("type") != "config":
        assert answer in ("bad_message", "unknown_type")
        return
    assert answer in ("config", "bad_config"), msg
    if answer == "config":
        # Echoed as the client's JSON means it: an escaped surrogate pair ("\ud800\udc00", from two lone surrogates
        # in obj) is one astral character (U+10000) to any JSON reader, the server's included.
        sent = json.loads(_dumps(obj))
        for name in ("prompt", "strength", "steps", "seed"):
            if name in sent:
                assert msg[name] == sent[name]
        # A configuration the server accepted must work: the next frame is stylized, not an engine error.
        assert wire.send(BASES[0])[0] == "image"


@settings(FUZZ, max_examples=500)
@given(value=ANY_JSON | st.text(max_size=200) | st.binary(max_size=100).map(lambda b: b.decode("latin-1")))
def test_any_json_value_or_text_is_answered(wire, value):
    text = value if isinstance(value, str) and not value.startswith('"') else _dumps(value)
    answer, _ = wire.send(text)
    assert answer in ("bad_json", "bad_message", "unknown_type", "bad_config", "config")


@pytest.mark.parametrize("text, code", [
    ("[" * 100_000, "bad_message"),  # over the text limit
    ("[" * 60_000, "bad_json"),  # deep nesting under it
    ('{"type": "config", "prompt": ' + "[" * 30_000 + "]" * 30_000 + "}", "bad_json"),
    ('{"type": "config", "seed": ' + "9" * 5000 + "}", "bad_json"),  # past Python's digit limit for int()
    ('{"type": "config", "seed": 1' + "0" * 400 + "}", "bad_config"),
    ('{"type": "config", "strength": 1e999}', "bad_config"),  # inf
    ('{"type": "config", "strength": NaN}', "bad_config"),
    ('{"type": "config", "steps": -Infinity}', "bad_config"),
    ('{"type": "config", "prompt": "\\ud800 half a surrogate pair"}', "bad_config"),
    ('{"type": "config", "prompt": "\\udfff"}', "bad_config"),
    ('{"type": "config", "type": "config", "type": "nope"}', "unknown_type"),
    ('{"type": "config", "prompt": "\\u0000 nul and emoji \\ud83c\\udfa8"}', "config"),
    ("{}", "bad_message"),
    ("null", "bad_json"),
    ('"config"', "bad_json"),
    ("", "bad_json"),
    ("\x00", "bad_json"),
    (" " * MAX_TEXT_BYTES, "bad_json"),
])
def test_pathological_text_messages(wire, text, code):
    answer, msg = wire.send(text)
    assert answer == code, msg
    assert wire.send(BASES[0])[0] == "image"


def _with_dims(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    i = _sof_offset(data)
    out[i : i + 4] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


def _decodes(server) -> float:
    for line in server.metrics.render().decode().splitlines():
        if line.startswith('turbostream_stage_seconds_count{stage="decode"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("width, height", [(4096, 4096), (4096, 300), (1000, 1000)])
def test_forged_dimensions_are_refused_before_decoding(fast_server, wire, width, height):
    # A few hundred bytes that declare millions of pixels: libjpeg would "decode" them (gray fill after the data
    # ends) at the full declared size, 48 MiB and a quarter second of a codec worker for 4096x4096.
    forged = _with_dims(cv2.imencode(".jpg", np.zeros((16, 16), np.uint8))[1].tobytes(), width, height)
    assert len(forged) < 700
    before = _decodes(fast_server)
    answer, msg = wire.send(forged)
    assert answer == "bad_image" and "pixels" in msg["message"], msg
    assert _decodes(fast_server) == before
    # The real thing of that size, even flat (compressing best), is decoded.
    flat = cv2.imencode(".jpg", np.zeros((height, width), np.uint8),
                        [cv2.IMWRITE_JPEG_QUALITY, 1, cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert wire.send(flat)[0] == "image"


class ViewerWire:
    """A viewer with the control token: every text it sends is answered by a config echo or an error."""

    def __init__(self, port: int) -> None:
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(
            # max_queue=None: the broadcast goes on between this module's tests; a bounded queue would fill, the
            # client would stop reading, and its close handshake would wait out the 10 s close timeout at teardown.
            connect(f"ws://127.0.0.1:{port}/view/ws?control=ctl", max_size=2**23, compression=None, max_queue=None))
        ready = json.loads(self.ws.recv(timeout=30))
        assert ready["type"] == "ready" and ready["control"] is True
        self.frames = 0

    def send(self, message: bytes | str) -> str:
        self.ws.send(message)
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:
            msg = self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(msg, bytes):  # the broadcast goes on meanwhile
                self.frames += 1
                continue
            obj = json.loads(msg)
            if obj["type"] in ("stats", "source"):
                continue
            if obj["type"] == "error":
                assert obj["code"] in ERROR_CODES, obj
                return obj["code"]
            assert obj["type"] == "config", obj
            return "config"


@pytest.fixture(scope="module")
def viewer_wire(tiny_components):
    from test_server import FakeCapture

    server = TurboServer(SkipUNetEngine(Engine(preset("test"), tiny_components)),
                         ServerConfig(port=0, source="fake:0", control_token="ctl"), capture_factory=FakeCapture)
    with ServerThread(server):
        wire = ViewerWire(server.port)
        yield wire
        wire._stack.close()


@settings(FUZZ, max_examples=300)
@given(message=configs().map(_dumps) | ANY_JSON.map(_dumps) | st.binary(max_size=64))
def test_viewer_messages_are_answered_and_the_broadcast_goes_on(viewer_wire, message):
    answer = viewer_wire.send(message)
    if isinstance(message, bytes):
        assert answer == "not_supported"
    else:
        assert answer in ("config", "bad_config", "bad_json", "bad_message", "unknown_type")


def test_the_broadcast_went_on_during_the_viewer_fuzzing(viewer_wire):
    before = viewer_wire.frames
    assert viewer_wire.send('{"type": "config", "prompt": "a calm sea"}') == "config"
    deadline = time.monotonic() + 20
    while viewer_wire.frames < before + 5 and time.monotonic() < deadline:
        if isinstance(viewer_wire.ws.recv(timeout=20), bytes):
            viewer_wire.frames += 1
    assert viewer_wire.frames >= before + 5


# ------------------------------------------------------------------------------------------------ protocol violations


def _raw_client(port: int) -> socket.socket:
    """A WebSocket handshake by hand, so the frames after it can break the rules; returns after the ready message."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(4096)
    assert buf.startswith(b"HTTP/1.1 101")
    return sock


def _frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    length = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big")
    if not mask:
        return head + length + payload
    key = b"\x01\x02\x03\x04"
    length = bytes([length[0] | 0x80]) + length[1:]
    return head + length + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _close_code(sock: socket.socket, timeout: float = 15.0) -> int | None:
    """Read until the server's close frame; its code (None if the socket closed without one)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            chunk = b""
        if not chunk:
            break
        data += chunk
    i = 0
    while i + 2 <= len(data):  # walk the server's (unmasked) frames
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        if opcode == 0x8:
            return int.from_bytes(data[i : i + 2], "big")
        i += n
    return None


@pytest.mark.parametrize("frames, code", [
    ([_frame(0x1, b"\xff\xfe not UTF-8")], 1007),
    ([_frame(0x1, b'{"type": "config", "prompt": "\xed\xa0\x80"}')], 1007),  # an encoded surrogate
    ([_frame(0x2, BASES[0], mask=False)], 1002),  # clients must mask
    ([_frame(0x3, b"x")], 1002),  # reserved opcode
    ([_frame(0x0, b"continuation without a start")], 1002),
    ([_frame(0x9, b"p" * 126)], 1002),  # a ping over 125 bytes
    ([_frame(0x1, b'{"type":', fin=False), _frame(0x2, b"x")], 1002),  # a new message inside a fragmented one
])
def test_protocol_violations_close_only_their_connection(fast_server, frames, code):
    other = Wire(fast_server.port)
    sock = _raw_client(fast_server.port)
    for frame in frames:
        sock.sendall(frame)
    assert _close_code(sock) == code
    sock.close()
    assert other.send(BASES[0])[0] == "image"
    other.close()


def test_fragmented_messages_are_reassembled(fast_server):
    sock = _raw_client(fast_server.port)
    data = BASES[1]
    half = len(data) // 2
    sock.sendall(_frame(0x2, data[:half], fin=False) + _frame(0x0, data[half:]))
    sock.settimeout(15)
    seen = b""
    while b'"type": "frame"' not in seen:
        seen += sock.recv(65536)
    sock.sendall(_frame(0x8, (1000).to_bytes(2, "big")))
    assert _close_code(sock) == 1000
    sock.close()


# ------------------------------------------------------------------------------------------------ the real engine


def test_seeded_mix_through_the_real_engine(tiny_components):
    """Three hundred cases of every kind above through the real tiny engine; the server healthy afterwards."""
    rng = random.Random(20261126)
    engine = Engine(preset("test"), tiny_components)
    with ServerThread(TurboServer(engine, ServerConfig(port=0))) as server:
        wire, bystander = Wire(server.port), Wire(server.port)
        counts: dict[str, int] = {}
        for i in range(300):
            kind = rng.choice(["odd", "mutated", "random", "config", "json"])
            if kind == "odd":
                w, h = rng.choice([1, 8, 33, 64, 100, 640, 4097]), rng.choice([1, 8, 48, 64, 333, 1000])
                answer, _ = wire.send(encode_jpeg(_picture(w, h, i), rng.randint(1, 100)))
                assert answer == expected_for_size(w, h), (w, h)
            elif kind == "mutated":
                data = bytearray(rng.choice(BASES))
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                if rng.random() < 0.3:
                    del data[rng.randrange(len(data)) :]
                answer, _ = wire.send(bytes(data))
                assert answer in IMAGE_ANSWERS
            elif kind == "random":
                answer, _ = wire.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600))))
                assert answer in ("bad_image", "image_too_large")
            elif kind == "config":
                obj = {"type": "config"}
                if rng.random() < 0.7:
                    obj["prompt"] = rng.choice(["a harbor at dusk", "", "x" * 1000, "x" * 1001, "\ud83c\udfa8", 5])
                if rng.random() < 0.5:
                    obj["strength"] = rng.choice([0.5, 1.0, 0.0, 0.25, -1, "0.5", None, 1.5])
                if rng.random() < 0.5:
                    obj["steps"] = rng.choice([1, 2, 4, 10, 11, 0, 2.5])
                if rng.random() < 0.5:
                    obj["seed"] = rng.choice([0, 7, 2**32 - 1, 2**32, -1])
                answer, _ = wire.send(json.dumps(obj))
                assert answer in ("config", "bad_config")
                if answer == "config":
                    assert wire.send(BASES[0])[0] == "image"
            else:
                value = rng.choice([[1, 2], {"type": None}, {"type": "dance"}, "text", 3.5, None, {"x": [{}] * 5}])
                answer, _ = wire.send(json.dumps(value))
                assert answer in ("bad_json", "bad_message", "unknown_type")
            counts[answer] = counts.get(answer, 0) + 1
        # Every kind of answer came up, and the other client streams as before.
        assert {"image", "bad_image", "config", "bad_config", "bad_json"} <= set(counts), counts
        assert bystander.send(BASES[1])[0] == "image"
        status, _, _ = http_get(server, "/healthz")
        assert status == 200 and server.batcher.alive
        assert wire.cases >= 300
        wire.close()
        bystander.close()


def test_the_fast_server_is_healthy_after_the_fuzzing(fast_server, wire):
    # Runs last in this module (pytest keeps file order): the long-lived connection took every case above. Selected
    # alone (pytest -k), it has no fuzzing to be healthy after.
    if wire.cases == 0:
        pytest.skip("checks the server after this module's fuzz tests; run the module")
    assert wire.cases >= 3000, wire.cases
    assert wire.send(BASES[0])[0] == "image"
    status, _, body = http_get(fast_server, "/healthz")
    assert status == 200 and body == b"ok\n"
    assert fast_server.batcher.alive and len(fast_server.clients) == 1
    # And it still closes connections politely. Messages that arrived before the close (a stats message sent after
    # the last answer) are still handed out first: this was the once-in-three failure, "DID NOT RAISE".
    wire.ws.close()
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(10):
            assert json.loads(wire.ws.recv(timeout=5))["type"] == "stats"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
