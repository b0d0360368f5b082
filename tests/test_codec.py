"""codec.decode_jpeg: RGB order and the same pixels as decoding to BGR and converting, for every JPEG kind."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from turbostream.codec import decode_jpeg, encode_jpeg


def _jpeg(img: np.ndarray, mode: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


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
