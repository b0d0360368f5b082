"""codec_stripes: a JPEG encoded in stripes on several threads decodes to the very pixels of one encoded whole."""

from __future__ import annotations

import io
import threading
import time

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image
from test_server import jpeg, next_result, open_client, run, serving

from turbostream.codec import decode_jpeg, encode_jpeg
from turbostream.codec_stripes import StripedCpuJpeg, join_stripes
from turbostream.errors import CodecError


def _camera_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Gradients, a disc and sensor noise: a frame with detail in every stripe."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([x * 220, y * 200, (1 - x) * 180], -1) + rng.normal(0, 8, (h, w, 3))
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 4, (250, 240, 30), -1)
    return img.clip(0, 255).astype(np.uint8)


def _decoders(data: bytes) -> list[np.ndarray]:
    """The same JPEG through three decoders: simplejpeg (strict), OpenCV and PIL."""
    return [simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True),
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1],
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))]


@pytest.mark.parametrize("h,w,rows", [(512, 512, 256), (480, 640, 160), (300, 200, 112), (64, 48, 16),
                                      (512, 512, 128)])
def test_stripes_joined_decode_to_the_pixels_of_one_whole_encode(h, w, rows):
    picture = _camera_like(h, w, seed=h + w)
    whole = encode_jpeg(picture, 85)
    stripes = [encode_jpeg(np.ascontiguousarray(picture[a : a + rows]), 85) for a in range(0, h, rows)]
    joined = join_stripes(stripes, w, h, rows)
    assert joined is not None and len(joined) < len(whole) + 16 * len(stripes)
    wanted = simplejpeg.decode_jpeg(whole, colorspace="RGB")
    for decoded in _decoders(joined):
        assert decoded.shape == (h, w, 3) and np.array_equal(decoded, wanted)
    assert simplejpeg.decode_jpeg_header(joined)[:2] == (h, w)


def test_stripes_with_other_tables_are_not_joined():
    picture = _camera_like(256, 128)
    stripes = [encode_jpeg(picture[:128].copy(), 85), encode_jpeg(picture[128:].copy(), 60)]  # two qualities
    assert join_stripes(stripes, 128, 256, 128) is None
    with pytest.raises(ValueError, match="multiple of 16"):
        join_stripes(stripes, 128, 256, 100)


def test_the_codec_encodes_in_stripes_while_a_helper_is_free():
    codec = StripedCpuJpeg(stripes=2)
    try:
        picture = _camera_like(512, 512)
        data = codec.encode(picture, 85)
        assert data != encode_jpeg(picture, 85)  # joined stripes: a restart marker between them
        assert np.array_equal(decode_jpeg(data), decode_jpeg(encode_jpeg(picture, 85)))
        assert codec.encodes == {"whole": 0, "striped": 1}
        # Too small to be worth a stripe: encoded whole, byte for byte codec.encode_jpeg's.
        small = _camera_like(200, 300)
        assert codec.encode(small, 85) == encode_jpeg(small, 85)
        assert codec.encodes == {"whole": 1, "striped": 1}
        with pytest.raises(CodecError, match="quality"):
            codec.encode(picture, 0)
    finally:
        codec.close()


def test_an_encode_never_waits_for_a_busy_helper():
    codec = StripedCpuJpeg(stripes=2)
    release, started = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(30)

    codec._free.acquire()  # the one helper is taken, as by another encode in flight
    busy = codec._helpers.submit(hold)
    try:
        assert started.wait(10)
        picture = _camera_like(512, 512)
        t0 = time.perf_counter()
        data = codec.encode(picture, 85)
        assert time.perf_counter() - t0 < 5
        assert data == encode_jpeg(picture, 85) and codec.encodes == {"whole": 1, "striped": 0}
    finally:
        release.set()
        busy.result(10)
        codec._free.release()
        codec.close()


def test_many_threads_share_the_helpers_and_get_their_own_pictures():
    codec = StripedCpuJpeg(stripes=3)
    pictures = [_camera_like(384, 256, seed) for seed in range(6)]
    wanted = [decode_jpeg(encode_jpeg(p, 85)) for p in pictures]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(15):
                assert np.array_equal(decode_jpeg(codec.encode(pictures[i], 85)), wanted[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codec.close()
    assert not errors, errors[:1]
    assert sum(codec.encodes.values()) == 90 and codec._free._value == 2  # every helper handed back
    assert codec.encode(pictures[0], 85) == encode_jpeg(pictures[0], 85)  # closed: whole from now on


def test_the_server_encodes_its_results_in_stripes(engine):
    codec = StripedCpuJpeg(stripes=2, min_rows=16)  # the test engine's 64x64 frames: two stripes of 32 rows

    async def main():
        async with serving(engine) as server:
            assert isinstance(server.jpeg, StripedCpuJpeg)  # the default
            server.jpeg = codec
            ws, _ = await open_client(server)
            for seq in (1, 2, 3):
                await ws.send(jpeg(seq))
                header, rgb, others = await next_result(ws)
                assert header["seq"] == seq and rgb.shape == (64, 64, 3)
                assert not [m for m in others if m["type"] == "error"]
            await ws.close()

    run(main())
    codec.close()
    assert codec.encodes["striped"] == 3
