"""One JPEG encoded on several threads at once: horizontal stripes encoded apart and joined with restart markers.

Why: a single client waits for its result's encode on every frame (1.0 ms at 512x512 on this project's CPU machine,
0.8-1.0 on the H200 machine's), and libjpeg-turbo encodes one picture on one core. A baseline JPEG may carry restart
markers (DRI/RSTn, JPEG's own way to resynchronise a decoder): at each one the DC predictions start again from zero,
exactly as at the start of a picture. So stripes whose height is a whole number of MCU rows (16 pixels for 4:2:0),
encoded as JPEGs of their own with the same tables, are the restart intervals of the whole picture: their entropy-coded
data are joined behind one header (the first stripe's, its height the picture's, a DRI of one stripe's MCUs) with RSTn
between them. A decoder reads the very pixels a single encode gives (tests/test_codec_stripes.py checks with
simplejpeg, OpenCV and PIL); the file is a few bytes longer per stripe.

The stripes after the first go to helper threads of their own (never the caller's pool: a helper waits for nothing, so
no encode can deadlock on another), and only while a helper is free: under load every encode runs whole on its caller,
at no extra cost. Frames are uint8 RGB (H, W, 3), 0..255.
"""

from __future__ import annotations

import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .codec import MAX_SCANS, MAX_SIDE, decode_jpeg, encode_jpeg

MCU_ROWS = 16  # 4:2:0 chroma (encode_jpeg's): one MCU is 16x16 pixels
MIN_STRIPE_ROWS = 128  # a stripe smaller than this is not worth a hand-off to another thread (about 0.05 ms)


def _split(data: bytes) -> tuple[bytes, bytes]:
    """A baseline JPEG from encode_jpeg -> (its segments up to and including SOS, its entropy-coded data without EOI).
    ValueError if it is not laid out that way."""
    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        raise ValueError("not a complete JPEG")
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker == 0xDA:  # start of scan: the entropy-coded data follow its header
            return data[: i + 2 + length], data[i + 2 + length : -2]
        if marker == 0xDD:  # a restart interval of its own: these stripes must not have one
            break
        i += 2 + length
    raise ValueError("no single scan without restart markers in this JPEG")


def _frame_height_at(header: bytes) -> int:
    """Offset of the height field of the baseline start-of-frame segment (SOF0) in a JPEG header."""
    i = 2
    while i + 4 <= len(header):
        marker = header[i + 1]
        (length,) = struct.unpack(">H", header[i + 2 : i + 4])
        if marker == 0xC0:
            return i + 5  # FF C0, length (2), precision (1), then height (2)
        i += 2 + length
    raise ValueError("not a baseline JPEG")


def join_stripes(stripes: list[bytes], width: int, height: int, stripe_rows: int) -> bytes | None:
    """JPEGs of consecutive horizontal stripes of one width x height picture (each stripe_rows high, a multiple of 16,
    but the last) -> one baseline JPEG of the picture, with a restart marker between stripes; None if the stripes'
    tables differ (then encode it whole)."""
    if stripe_rows % MCU_ROWS or not 0 < stripe_rows < height:
        raise ValueError(f"stripes must be a multiple of {MCU_ROWS} rows and fewer than the picture's {height}")
    mcus = -(-width // MCU_ROWS) * (stripe_rows // MCU_ROWS)
    if mcus > 0xFFFF:
        return None  # longer than a restart interval can be
    heads, scans = zip(*(_split(s) for s in stripes))
    at = _frame_height_at(heads[0])
    first = bytearray(heads[0])
    first[at : at + 2] = b"\0\0"
    for head in heads[1:]:  # quantization and Huffman tables, subsampling: all but the height must be the same
        other = bytearray(head)
        other[at : at + 2] = b"\0\0"
        if other != first:
            return None
    first[at : at + 2] = struct.pack(">H", height)
    sos = first.rindex(b"\xff\xda")
    out = bytearray(first[:sos])
    out += b"\xff\xdd" + struct.pack(">HH", 4, mcus)  # DRI: a restart every `mcus` MCUs, one stripe
    out += first[sos:]
    out += scans[0]
    for k, scan in enumerate(scans[1:]):
        out += bytes((0xFF, 0xD0 + k % 8))  # RST0..RST7, in turn
        out += scan
    out += b"\xff\xd9"
    return bytes(out)


class StripedCpuJpeg:
    """The CPU codec (codec.py) whose encode() splits a picture into up to `stripes` horizontal stripes, encoded at
    once on helper threads while they are free (join_stripes). decode() is codec.decode_jpeg. Safe from many threads.

    stripes: 1 encodes whole, as codec.encode_jpeg; n > 1 keeps n - 1 helper threads. A picture is split only into
    stripes of at least min_rows rows.
    """

    name = "cpu"

    def __init__(self, stripes: int = 2, min_rows: int = MIN_STRIPE_ROWS) -> None:
        if stripes < 1:
            raise ValueError(f"stripes must be at least 1, got {stripes}")
        self.stripes = stripes
        self.min_rows = max(MCU_ROWS, min_rows)
        self._free = threading.Semaphore(stripes - 1)  # helpers not encoding a stripe now
        self._helpers = (ThreadPoolExecutor(stripes - 1, thread_name_prefix="turbostream-jpeg-stripe")
                         if stripes > 1 else None)
        self._count_lock = threading.Lock()
        self.encodes = {"whole": 0, "striped": 0}

    @staticmethod
    def decode(data: bytes, max_side: int = MAX_SIDE, max_scans: int = MAX_SCANS,
               fit: tuple[int, int] | None = None) -> np.ndarray:
        """JPEG bytes -> uint8 RGB (H, W, 3), 0..255 (codec.decode_jpeg)."""
        return decode_jpeg(data, max_side, max_scans, fit)

    def encode(self, rgb: np.ndarray, quality: int = 85) -> bytes:
        """uint8 RGB (H, W, 3), 0..255 -> baseline JPEG bytes, 4:2:0 chroma, decoding to codec.encode_jpeg's pixels."""
        height, width = rgb.shape[:2]
        wanted = min(self.stripes, height // self.min_rows)
        helpers = 0
        while helpers < wanted - 1 and self._free.acquire(blocking=False):
            helpers += 1
        try:
            data = self._striped(rgb, quality, helpers + 1) if helpers else None
        finally:
            for _ in range(helpers):
                self._free.release()
        with self._count_lock:
            self.encodes["striped" if data is not None else "whole"] += 1
        return data if data is not None else encode_jpeg(rgb, quality)

    def _striped(self, rgb: np.ndarray, quality: int, n: int) -> bytes | None:
        """rgb in n stripes: the first encoded here, the others on helpers at the same time; None if they cannot be
        joined."""
        height, width = rgb.shape[:2]
        rows = -(-height // n // MCU_ROWS) * MCU_ROWS  # each stripe a whole number of MCU rows, the last the rest
        cuts = list(range(0, height, rows)) + [height]
        try:
            later = [self._helpers.submit(encode_jpeg, np.ascontiguousarray(rgb[a:b]), quality)
                     for a, b in zip(cuts[1:-1], cuts[2:])]
        except RuntimeError:  # closed meanwhile
            return None
        first = encode_jpeg(np.ascontiguousarray(rgb[: cuts[1]]), quality)
        return join_stripes([first] + [f.result() for f in later], width, height, rows)

    def close(self) -> None:
        """Let the helper threads go (encode() encodes whole afterwards)."""
        if self._helpers is not None:
            self.stripes = 1
            self._helpers.shutdown(wait=False)
