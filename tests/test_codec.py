"""codec.decode_jpeg and encode_jpeg (simplejpeg): RGB order and the very pixels OpenCV decodes, for every JPEG kind
and EXIF orientation; corrupt input and bad arguments refused with CodecError."""

from __future__ import annotations

import io
import re
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from turbostream.codec import (
    MAX_SEGMENTS,
    check_decode_cost,
    count_scans,
    decode_jpeg,
    decode_reduction,
    encode_jpeg,
    exif_orientation,
    fit_frame,
    jpeg_header,
)
from turbostream.config import Limits
from turbostream.errors import CodecError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from jpeg_speed import camera_like  # noqa: E402 - the codec benchmark's webcam-like frames (scripts/jpeg_speed.py)


def _jpeg(img: np.ndarray, mode: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def oriented_jpeg(img: np.ndarray, orientation: int) -> bytes:
    """uint8 RGB (H, W, 3) -> a JPEG of those pixels as stored, with EXIF orientation `orientation` (1..8)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(img, "RGB", exif=exif.tobytes())


@pytest.mark.parametrize(("mode", "save"), [("RGB", {}), ("L", {}), ("CMYK", {}), ("RGB", {"progressive": True})])
def test_decode_is_rgb_and_matches_decoding_to_bgr_then_converting(mode, save):
    rng = np.random.default_rng(0)
    img = (rng.random((48, 80, 3)) * 255).astype(np.uint8)
    img[:16] = (250, 10, 10)  # a red band: RGB order shows in the first channel
    data = _jpeg(img, mode, **save)
    out = decode_jpeg(data)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert out.dtype == np.uint8 and out.shape == (48, 80, 3) and out.flags.c_contiguous
    assert np.array_equal(out, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if mode != "L":
        red = out[2:14].reshape(-1, 3).mean(0)
        assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_encode_then_decode_keeps_rgb_order():
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 2] = 240  # blue
    back = decode_jpeg(encode_jpeg(img, quality=95))
    assert back[..., 2].mean() > 200 and back[..., 0].mean() < 40


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_opencv_applies_it(orientation):
    rng = np.random.default_rng(orientation)
    img = (rng.random((40, 64, 3)) * 255).astype(np.uint8)
    img[:8, :16] = (250, 10, 10)  # a corner mark: every turn and mirror moves it somewhere else
    data = oriented_jpeg(img, orientation)
    assert exif_orientation(data) == orientation
    out = decode_jpeg(data)
    opencv = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert out.flags.c_contiguous and out.shape == opencv.shape == ((40, 64, 3) if orientation <= 4 else (64, 40, 3))
    assert np.array_equal(out, opencv)


@pytest.mark.parametrize("ahead", [5000, 65533 + 20000])
def test_exif_after_other_blocks_still_turns_the_picture(ahead):
    """An XMP block or an ICC profile (64 KiB a segment at most) ahead of the EXIF block: the orientation was looked
    for in the first 4096 bytes only, and such a portrait came out sideways (OpenCV and browsers turn it)."""
    img = np.zeros((40, 64, 3), np.uint8)
    img[:8, :16] = (250, 10, 10)
    data = oriented_jpeg(img, 6)
    blocks = b""
    while ahead > 0:  # APP1 segments of XMP-like text, each within a segment's 65533 bytes of data
        body = b"http://ns.adobe.com/xap/1.0/\x00" + b" " * (min(ahead, 65533) - 29)
        blocks += b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body
        ahead -= 65533
    upright = decode_jpeg(data)  # the EXIF block first: as OpenCV turns it (the test above)
    assert upright.shape == (64, 40, 3)
    # The same picture behind the blocks turns the same. (Not compared with OpenCV here: 4.9 looks for EXIF in the
    # first APP1 segment only and leaves this one sideways; later releases turn it.)
    assert np.array_equal(decode_jpeg(data[:2] + blocks + data[2:]), upright)


def test_a_broken_exif_block_turns_nothing():
    img = np.full((16, 24, 3), 100, np.uint8)
    data = _jpeg(img, "RGB")
    exif = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\xff\xff"  # its first directory points past its end
    broken = data[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + data[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL says "Corrupt EXIF data" (once a process, in a server's log)
        assert exif_orientation(broken) == 1
        assert decode_jpeg(broken).shape == (16, 24, 3)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_truncated_jpeg_is_refused(cut):
    data = encode_jpeg((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    with pytest.raises(CodecError, match="truncated or corrupt"):
        decode_jpeg(data[: int(len(data) * cut)])


def test_encode_takes_any_layout_and_refuses_a_bad_quality():
    img = (np.random.default_rng(1).random((32, 48, 3)) * 255).astype(np.uint8)
    view = np.ascontiguousarray(img.transpose(1, 0, 2)).transpose(1, 0, 2)  # the same pixels, not C-contiguous
    assert not view.flags.c_contiguous
    assert encode_jpeg(view, 90) == encode_jpeg(img, 90)
    for quality in (0, 101):
        with pytest.raises(CodecError, match="quality"):
            encode_jpeg(img, quality)


@pytest.mark.parametrize(("size", "fit", "reduction"), [
    ((1920, 1080), (512, 512), 2),  # crop 1080x1080: 540 a side at 1/2
    ((1280, 720), (512, 512), 1),  # crop 720: 360 at 1/2 is too small
    ((3840, 2160), (512, 512), 4),
    ((4096, 4096), (64, 64), 8),  # never past 1/8
    ((1024, 1024), (512, 512), 1),  # exactly twice: no pixel to spare for rounding
    ((1100, 1100), (512, 512), 2),
    ((1920, 1080), (1024, 576), 1),  # same aspect, 1.9x: crop 1920x1080, 960x540 is too small
    ((640, 480), (512, 512), 1),
])
def test_decode_reduction_keeps_the_fitted_crop_at_least_the_engine_size(size, fit, reduction):
    assert decode_reduction(*size, *fit) == reduction


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_large_jpeg_decoded_smaller_fits_like_the_full_decode(orientation):
    picture = camera_like(1080, 1920, 0)  # a webcam's frame, for an engine of 512x384 (384x512 for the portrait one)
    data = oriented_jpeg(picture, orientation)  # 6: stored sideways, upright it is 1080x1920 (portrait)
    target = (384, 512) if orientation == 6 else (512, 384)
    full = fit_frame(decode_jpeg(data), *target)
    half = decode_jpeg(data, fit=target)
    assert half.shape == ((960, 540, 3) if orientation == 6 else (540, 960, 3))  # upright, half a side
    reduced = fit_frame(half, *target)
    assert reduced.shape == full.shape == (target[1], target[0], 3)
    # Decoded at half size in the DCT, then shrunk less: the same picture within rounding and filter differences.
    err = np.abs(reduced.astype(np.int16) - full.astype(np.int16))
    assert err.mean() < 1.0 and np.percentile(err, 99) <= 8, (err.mean(), np.percentile(err, 99))


# ------------------------------------------------------------------------------------------------ the header walk


def _segments(marker: int, count: int, payload: bytes = b"") -> bytes:
    """count segments of one marker, each with payload."""
    return (bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload) * count


def test_real_jpegs_with_many_segments_pass_the_header_walk_and_decode():
    img = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    # Progressive (10 scans, a Huffman table before each), a 300 KB ICC profile (5 APP2 chunks), EXIF, a comment and
    # restart markers; and one with a restart marker after every block: more RSTn inside its scans than MAX_SEGMENTS,
    # which are not segments.
    rich = _jpeg(img, "RGB", progressive=True, icc_profile=bytes(300_000), exif=exif.tobytes(), comment=b"x",
                 restart_marker_blocks=4)
    restarts = _jpeg(img, "RGB", progressive=True, restart_marker_blocks=1)
    assert len(re.findall(rb"\xff[\xd0-\xd7]", restarts)) > MAX_SEGMENTS
    # As many 64 KiB APP1 segments (XMP, a phone's depth map) as a message of the largest size holds.
    plain = encode_jpeg(img)
    big = plain[:2] + _segments(0xE1, 63, b"x" * 65533) + plain[2:]
    assert len(big) <= Limits().max_message_bytes
    # Far more small segments than real JPEGs have, still under the limit.
    many = plain[:2] + _segments(0xFE, MAX_SEGMENTS - 32, b"comment") + plain[2:]
    cases = [(rich, 10, (160, 120, 3)), (restarts, 10, (120, 160, 3)), (big, 1, (120, 160, 3)),
             (many, 1, (120, 160, 3))]
    for data, scans, shape in cases:
        assert jpeg_header(data) == (160, 120, 3)
        assert count_scans(data) == scans
        assert decode_jpeg(data).shape == shape  # rich: EXIF orientation 6 turns it upright


@pytest.mark.parametrize("layout", ["segments before the frame header", "segments after it", "restart markers"])
def test_a_message_of_a_million_tiny_segments_is_refused_after_a_bounded_walk(layout):
    # The largest message the server takes, of 4-byte segments: the header walk (on the server's event loop) took
    # 2.5 s per message over its million segments, stalling every client, before MAX_SEGMENTS.
    size = Limits().max_message_bytes
    sof = bytes.fromhex("ffc0 0011 08 0040 0040 03 012200 021100 031100".replace(" ", ""))  # 64x64, 3 components
    n = (size - len(sof) - 4) // 4
    body = {"segments before the frame header": _segments(0xFE, n) + sof,
            "segments after it": sof + _segments(0xFE, n),
            "restart markers": sof + b"\xff\xd0" * (2 * n)}[layout]
    data = b"\xff\xd8" + body + b"\xff\xd9"
    assert len(data) <= size
    t0 = time.thread_time()  # this thread's CPU time: what it would have cost the event loop, whatever else runs
    with pytest.raises(CodecError, match=f"more than {MAX_SEGMENTS} segments"):
        check_decode_cost(data)
    spent = time.thread_time() - t0
    assert spent < 0.1, f"{spent:.3f} s of CPU to refuse it (a walk of at most {MAX_SEGMENTS} segments: about 1 ms)"
