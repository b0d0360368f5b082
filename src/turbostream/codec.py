"""JPEG in and out, input validation, and fitting any frame to the engine's size.

Every function here runs on the CPU and is safe to call from worker threads: simplejpeg (libjpeg-turbo's TurboJPEG
API) and OpenCV release the GIL while they work. Frames are uint8 RGB arrays of shape (H, W, 3), values 0..255,
everywhere in turbostream.

JPEGs are decoded and encoded with simplejpeg rather than cv2.imdecode/imencode: the same libjpeg-turbo, but straight
from and to RGB, without OpenCV's own layers around it. The decoded pixels are the very same (every kind of JPEG and
EXIF orientation in tests/test_codec.py, bit for bit); at 512x512 on this project's 2-core CI machine a decode and an
encode each take 7-16 % less time, timed call by call in turn with OpenCV's (scripts/jpeg_speed.py,
benchmarks/jpeg-codecs-cpu-2026-11-27.json). In the server that is 0.28 ms less per frame of one client
(scripts/latency_breakdown.py --sim 2,5, three runs each way: decode 1.49-1.51 ms against 1.65-1.75, encode 1.03-1.05
against 1.12-1.16).
"""

from __future__ import annotations

import io
import re

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from .errors import CodecError

# A decoded 4096x4096 RGB frame is 48 MiB: the largest we agree to decode.
MAX_SIDE = 4096
MAX_SCANS = 64  # config.Limits.max_jpeg_scans: why
# Segments (markers) other than start-of-scan walked in one JPEG before it is refused. jpeg_header (on the server's
# event loop: protocol.check_jpeg_header) and count_scans (on a codec worker) walk them in Python, at about a
# microsecond each: 4 MiB of 4-byte comment segments were a million of them, 2.5 s of a stalled server per message.
# Real JPEGs have a few dozen (tables, APP blocks of EXIF, ICC or XMP: at most 64 KiB each, so 64 fill a 4 MiB
# message; progressive ones a Huffman table per scan); restart markers inside a scan are skipped by a regular
# expression and not counted.
MAX_SEGMENTS = 512
JPEG_MAGIC = b"\xff\xd8\xff"
# Start-of-frame markers (baseline, progressive, lossless, arithmetic...) carry the image size.
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}

# OpenCV threads of its own would fight the inference thread for cores; parallelism comes from our worker threads.
cv2.setNumThreads(1)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame header, without decoding; CodecError if not a JPEG."""
    width, height, _ = jpeg_header(data)
    return width, height


_FILL = re.compile(rb"\xff+")  # a marker's 0xFF and any fill bytes before it
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xff]")  # the next marker (0xFF 0x00 is data inside a scan)
_NEXT_SEGMENT = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")  # the same, skipping the RSTn markers inside a scan


def _too_many_segments() -> CodecError:
    return CodecError(f"a JPEG of more than {MAX_SEGMENTS} segments besides its scans (real ones have a few dozen): "
                      "refused before decoding, since every segment costs the server a step of its header walk")


def jpeg_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, components: 1 gray, 3 colour, 4 CMYK) from a JPEG's start-of-frame header, without decoding;
    CodecError if not a JPEG, or if more than MAX_SEGMENTS segments come before that header."""
    if len(data) < 4 or not data.startswith(JPEG_MAGIC):
        raise CodecError("not a JPEG image (it must start with FF D8 FF)")
    i, n = 2, len(data)
    for _ in range(MAX_SEGMENTS):
        if i >= n:
            break
        if data[i] != 0xFF:
            raise CodecError("corrupt JPEG: bad marker before the frame header")
        i = _FILL.match(data, i).end()  # fill bytes: a regular expression, not a Python loop over 4 MiB of them
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        if i + 2 > n:
            break
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2:
            raise CodecError("corrupt JPEG: bad segment length")
        if marker in _SOF_MARKERS:
            if i + 7 > n:
                break
            height = int.from_bytes(data[i + 3 : i + 5], "big")
            width = int.from_bytes(data[i + 5 : i + 7], "big")
            if width == 0 or height == 0:
                raise CodecError("corrupt JPEG: zero width or height")
            return width, height, data[i + 7] if i + 7 < n else 0
        i += length
    else:
        raise _too_many_segments()
    raise CodecError("corrupt JPEG: no frame header found")


def count_scans(data: bytes, limit: int | None = None) -> int:
    """Start-of-scan markers of a JPEG, counted by walking its segments (no decoding): at most `limit`.

    Segment lengths are skipped, so bytes inside an APP segment (an EXIF thumbnail) are not counted; a scan's
    entropy-coded data is searched for the next marker (0xFF is followed by 0x00 there; RSTn markers are not
    segments). About a millisecond per MiB of ordinary JPEG, but up to 0.05 s for 4 MiB of 0xFF bytes inside a scan
    (the search steps through them, holding the GIL): run it on a worker, not on an event loop. Not a JPEG: 0.
    CodecError past MAX_SEGMENTS segments besides the scans (with `limit`, the walk is then at most MAX_SEGMENTS +
    limit steps).
    """
    if not data.startswith(b"\xff\xd8"):
        return 0
    n, segments, i, size = 0, 0, 2, len(data)
    while i + 1 < size:
        # A marker here, after any fill bytes; else the next one. The fill bytes are skipped by one match (matching
        # them and the marker in one pattern backtracks through a long run of 0xFF), and the search starts past them:
        # inside a run every 0xFF is followed by another, so no marker starts there.
        fill = _FILL.match(data, i)
        j = fill.end() if fill is not None else i
        if fill is not None and j < size and data[j] != 0x00:
            marker, i = data[j], j + 1
        else:
            m = _NEXT_MARKER.search(data, j)
            if m is None:
                break
            marker, i = data[m.end() - 1], m.end()
        if marker == 0xD9:  # end of image
            break
        if marker != 0xDA:
            segments += 1
            if segments > MAX_SEGMENTS:
                raise _too_many_segments()
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            continue
        if i + 2 > size:
            break
        i += int.from_bytes(data[i : i + 2], "big")
        if marker == 0xDA:
            n += 1
            if limit is not None and n >= limit:
                return n
            m = _NEXT_SEGMENT.search(data, i)  # past the scan's entropy-coded data
            if m is None:
                break
            i = m.start()
    return n


def check_decode_cost(data: bytes, max_side: int = MAX_SIDE, max_scans: int = MAX_SCANS) -> tuple[int, int, int]:
    """(width, height, components) of a JPEG whose decode cost is bounded: sides and scans within limits (jpeg_header);
    CodecError if not."""
    width, height, components = jpeg_header(data)
    if width > max_side or height > max_side:
        raise CodecError(f"image is {width}x{height}; the limit is {max_side} pixels a side")
    if count_scans(data, max_scans + 1) > max_scans:
        raise CodecError(f"a JPEG of more than {max_scans} scans (progressive JPEGs have about 10): refused before "
                         "decoding, since every scan costs a pass over the whole image")
    return width, height, components


def decode_jpeg(data: bytes, max_side: int = MAX_SIDE, max_scans: int = MAX_SCANS,
                fit: tuple[int, int] | None = None) -> np.ndarray:
    """JPEG bytes -> uint8 RGB (H, W, 3), 0..255; magic bytes, declared size and scan count checked first.

    fit=(width, height): the frame is going to fit_frame(..., width, height); a JPEG at least twice that size (after
    the crop) is then decoded at 1/2, 1/4 or 1/8 of its size (decode_reduction), which fit_frame shrinks the rest of
    the way: a 1920x1080 webcam frame for a 512x512 engine decodes in about half the time.
    """
    width, height, _ = check_decode_cost(data, max_side, max_scans)
    orientation = exif_orientation(data) if has_exif(data) else 1
    reduction = 1
    if fit is not None:
        turned = orientation >= 5  # stored a quarter turn from upright
        reduction = decode_reduction(width, height, *(fit[::-1] if turned else fit))
    return decode_checked_jpeg(data, reduction, orientation)


def decode_reduction(width: int, height: int, fit_width: int, fit_height: int) -> int:
    """The largest of 1, 2, 4, 8 that a width x height picture can be divided by (decoded smaller: libjpeg-turbo's
    DCT scaling) while fit_frame's centre crop of it to fit_width:fit_height (centre_crop_size) still has at least
    fit_width x fit_height pixels, one to spare for rounding. Only halvings: libjpeg-turbo's 3/4 or 5/8 decode more
    slowly than in full."""
    crop_w, crop_h = centre_crop_size(width, height, fit_width, fit_height)
    reduction = 1
    while reduction < 8 and crop_w / (2 * reduction) >= fit_width + 1 and crop_h / (2 * reduction) >= fit_height + 1:
        reduction *= 2
    return reduction


def decode_checked_jpeg(data: bytes, reduction: int = 1, orientation: int | None = None) -> np.ndarray:
    """JPEG bytes that passed check_decode_cost -> uint8 RGB (H, W, 3), 0..255, upright; CodecError if corrupt.

    Gray, CMYK and progressive JPEGs come out as RGB too, and an EXIF orientation is applied (as OpenCV and browsers
    do: a phone's portrait photo is stored sideways). Strict: what libjpeg-turbo only warns about (a truncated scan,
    stray bytes between segments) is refused rather than decoded into a frame with a gray-filled rest.
    reduction (1, 2, 4 or 8): decode at that fraction of each side (rounded up), in the DCT, for less work.
    orientation: the EXIF orientation if the caller read it already (None: read here).
    """
    try:
        if reduction == 1:
            image = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        else:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            # simplejpeg takes the smallest of libjpeg-turbo's n/8 scales that gives at least these sides: 1/reduction.
            image = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_height=-(-h // reduction),
                                           min_width=-(-w // reduction))
    except ValueError as exc:
        raise CodecError(f"could not decode the JPEG image (truncated or corrupt): {exc}") from None
    if orientation is None:
        orientation = exif_orientation(data) if has_exif(data) else 1
    if orientation != 1:
        image = _ORIENT[orientation](image)
    return image if image.flags.c_contiguous else np.ascontiguousarray(image)


# EXIF belongs right after the start of the image, but writers put an XMP block or an ICC profile (up to 64 KiB a
# segment) ahead of it; a search of this much, in C, costs microseconds on a frame without any.
EXIF_SEARCH_BYTES = 1 << 17


def has_exif(data: bytes) -> bool:
    """Whether a JPEG carries an EXIF block (APP1 "Exif") near its start, which may say how to turn the picture (a
    false hit, those bytes in the pixel data, costs one parse that finds no orientation)."""
    return data.find(b"Exif\x00\x00", 0, EXIF_SEARCH_BYTES) != -1


def exif_orientation(data: bytes) -> int:
    """A JPEG's EXIF orientation tag (1..8; 1 is upright), 1 if it has none or it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # parses the segments before the first scan, decodes nothing
            value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block turns nothing; the pixels decoded all the same
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# EXIF orientation -> how to turn the stored pixels upright (the TIFF 6.0 meanings, as PIL's ImageOps.exif_transpose).
_ORIENT = {
    2: lambda a: a[:, ::-1],  # mirrored left to right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1],  # mirrored top to bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # stored a quarter turn counter-clockwise: turn it clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),  # stored a quarter turn clockwise: turn it back
}


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """uint8 RGB (H, W, 3), 0..255 -> baseline JPEG bytes, chroma subsampled 4:2:0 (as OpenCV and browsers encode)."""
    if not 1 <= int(quality) <= 100:
        raise CodecError(f"JPEG quality must be 1..100, got {quality}")
    try:
        return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), int(quality), colorspace="RGB",
                                      colorsubsampling="420")
    except ValueError as exc:
        raise CodecError(f"JPEG encoding failed: {exc}") from None


def check_frame(frame: np.ndarray) -> np.ndarray:
    """Return frame if it is uint8 (H, W, 3) with sides >= 8, else raise CodecError."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise CodecError(f"a frame must be a uint8 RGB array of shape (H, W, 3); got {got}")
    if frame.shape[0] < 8 or frame.shape[1] < 8:
        raise CodecError(f"frame of {frame.shape[1]}x{frame.shape[0]} is too small (8x8 at least)")
    return frame


def centre_crop_size(w: int, h: int, width: int, height: int) -> tuple[int, int]:
    """(crop width, crop height): the largest centred window of a w x h picture with width:height's aspect (the
    longer relative side is cropped), the window fit_frame resizes."""
    if w * height > h * width:
        return max(1, round(h * width / height)), h
    return w, max(1, round(w * height / width))


def fit_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Center-crop uint8 RGB (H, W, 3) to width:height, resize to exactly (height, width, 3); contiguous."""
    check_frame(frame)
    h, w = frame.shape[:2]
    if (w, h) == (width, height):
        return np.ascontiguousarray(frame)
    crop_w, crop_h = centre_crop_size(w, h, width, height)
    x0, y0 = (w - crop_w) // 2, (h - crop_h) // 2
    window = frame[y0 : y0 + crop_h, x0 : x0 + crop_w]
    shrinking = crop_w > width or crop_h > height
    resized = cv2.resize(window, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return np.ascontiguousarray(resized)


class CpuJpeg:
    """The CPU codec as an object with decode() and encode(), the form the server calls (codec_cuda.CudaJpeg is the
    GPU one)."""

    name = "cpu"

    @staticmethod
    def decode(data: bytes, max_side: int = MAX_SIDE, max_scans: int = MAX_SCANS,
               fit: tuple[int, int] | None = None) -> np.ndarray:
        """JPEG bytes -> uint8 RGB (H, W, 3), 0..255 (decode_jpeg; fit: the size it is going to be fitted to)."""
        return decode_jpeg(data, max_side, max_scans, fit)

    @staticmethod
    def encode(rgb: np.ndarray, quality: int = 85) -> bytes:
        """uint8 RGB (H, W, 3), 0..255 -> JPEG bytes (encode_jpeg)."""
        return encode_jpeg(rgb, quality)


CPU_JPEG = CpuJpeg()
