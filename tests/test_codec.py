"""codec.decode_jpeg and encode_jpeg (simplejpeg): RGB order and the very pixels OpenCV decodes, for every JPEG kind
and EXIF orientation; corrupt input and bad arguments refused with CodecError."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from turbostream.codec import decode_jpeg, decode_reduction, encode_jpeg, exif_orientation, fit_frame
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
