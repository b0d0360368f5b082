"""`serve --jpeg gpu` (codec_cuda.CudaJpeg): nvJPEG through torchvision.io, with the CPU codec for what it refuses.

Without a GPU (and torchvision cannot load against this project's CPU torch), the wrapper's own work is tested with a
stand-in for torchvision.io that keeps its contract ((3, H, W) tensors in and out, 1-D uint8 bitstreams, RuntimeError
on failure): layouts, limits before any codec work, the fallback, the start-up trial, and a real server using it.
The tests marked gpu run the real nvJPEG on CUDA (scripts/gpu_check.sh jpeg).
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
import time
import types

import cv2
import numpy as np
import pytest
import torch
from test_server import next_result, open_client, run, serving

from turbostream import cli
from turbostream.codec import CPU_JPEG, decode_jpeg, encode_jpeg, jpeg_header
from turbostream.codec_cuda import CudaJpeg, HybridJpeg, _load_io, torchvision_install_hint
from turbostream.errors import CodecError


def _picture(h: int = 48, w: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric picture (a transposed or channel-swapped decode cannot match it)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 40)], -1).astype(np.uint8)
    img[h // 4 : h // 2, w // 5 : w // 2] = rng.integers(0, 255, 3)
    return img


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _near(a: np.ndarray, b: np.ndarray) -> bool:
    """A JPEG round trip's closeness: a few levels on average (sharp colour edges lose more to chroma subsampling)."""
    return a.shape == b.shape and float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) < 3.0


def _in_threads(work, n: int, timeout: float) -> list[BaseException]:
    """Run work(i) for i in range(n), each on a thread of its own, at once; what they raised."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


class FakeIO(types.SimpleNamespace):
    """torchvision.io's contract with OpenCV behind it; counts calls; fail=... makes the next calls raise."""

    ImageReadMode = types.SimpleNamespace(RGB="RGB")

    def __init__(self, **kw):
        super().__init__(**{"decodes": 0, "encodes": 0, "fail_decode": None, "fail_encode": None, "modes": [], **kw})

    def decode_jpeg(self, data: torch.Tensor, mode=None, device=None) -> torch.Tensor:
        assert data.dtype == torch.uint8 and data.dim() == 1 and data.device.type == "cpu"
        self.decodes += 1
        self.modes.append(mode)
        if self.fail_decode:
            raise RuntimeError(self.fail_decode)
        bgr = cv2.imdecode(data.numpy(), cv2.IMREAD_COLOR)
        return torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1).to(device)  # (3, H, W), non-contiguous

    def encode_jpeg(self, chw: torch.Tensor, quality: int = 75) -> torch.Tensor:
        assert chw.dtype == torch.uint8 and chw.dim() == 3 and chw.shape[0] == 3
        self.encodes += 1
        if self.fail_encode:
            raise RuntimeError(self.fail_encode)
        ok, buf = cv2.imencode(".jpg", chw.permute(1, 2, 0).numpy()[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        return torch.from_numpy(buf.reshape(-1))


@pytest.fixture
def fake_io():
    return FakeIO()


@pytest.fixture
def codec(fake_io):
    c = CudaJpeg("cpu", io=fake_io)
    fake_io.decodes = fake_io.encodes = 0  # the start-up trial's
    return c


def test_decode_hands_back_the_cpu_codecs_frame_layout(codec, fake_io):
    data = encode_jpeg(_picture(), 95)
    out = codec.decode(data)
    assert fake_io.decodes == 1 and fake_io.modes[-1] == "RGB"
    assert out.shape == (48, 80, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert _diff(out, decode_jpeg(data)) <= 1
    assert codec.fallbacks == {"decode": 0, "encode": 0}


def test_encode_takes_the_frame_in_the_cpu_codecs_layout(codec, fake_io):
    picture = _picture(40, 72)
    data = codec.encode(picture, 95)
    assert fake_io.encodes == 1 and isinstance(data, bytes)
    assert decode_jpeg(data).shape == (40, 72, 3) and _near(decode_jpeg(data), picture)
    # A view (not contiguous) is encoded as what it shows.
    view = np.ascontiguousarray(_picture(72, 40).transpose(1, 0, 2))[:, ::-1]
    assert _near(decode_jpeg(codec.encode(view, 95)), view)


def test_limits_are_checked_before_the_gpu_sees_the_bytes(codec, fake_io):
    big = encode_jpeg(np.zeros((200, 300, 3), np.uint8))
    with pytest.raises(CodecError, match="limit is 100 pixels"):
        codec.decode(big, max_side=100)
    with pytest.raises(CodecError, match="not a JPEG"):
        codec.decode(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert fake_io.decodes == 0


def test_what_nvjpeg_refuses_goes_to_the_cpu_codec_and_is_counted(codec, fake_io, caplog):
    fake_io.fail_decode = "nvjpegDecode failed: JPEG not supported (CMYK)"
    data = encode_jpeg(_picture(), 95)
    with caplog.at_level(logging.DEBUG, logger="turbostream.codec"):
        for _ in range(3):
            assert _diff(codec.decode(data), decode_jpeg(data)) == 0
    assert codec.fallbacks["decode"] == 3 and "CMYK" in codec.last_fallback
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "on the CPU instead" in warnings[0].getMessage()  # once, not once per frame
    # A corrupt JPEG nvJPEG refuses gets the CPU codec's verdict: the client's error, as without --jpeg gpu.
    with pytest.raises(CodecError):
        codec.decode(data[:20] + bytes(len(data) - 20))
    fake_io.fail_encode = "image encoding failed"
    assert _diff(decode_jpeg(codec.encode(_picture(), 90)), decode_jpeg(encode_jpeg(_picture(), 90))) == 0
    assert codec.fallbacks["encode"] == 1


def test_exif_jpegs_are_decoded_on_the_cpu_which_honours_their_orientation(codec, fake_io):
    data = encode_jpeg(_picture(), 95)
    exif = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + bytes(8)
    app1 = b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif
    with_exif = data[:2] + app1 + data[2:]
    assert _diff(codec.decode(with_exif), decode_jpeg(with_exif)) == 0
    assert fake_io.decodes == 0 and codec.fallbacks["decode"] == 0


def test_cmyk_jpegs_are_decoded_on_the_cpu_without_trying_nvjpeg(codec, fake_io):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_picture()).convert("CMYK").save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    assert jpeg_header(data)[2] == 4 and jpeg_header(encode_jpeg(_picture()))[2] == 3
    assert _diff(codec.decode(data), decode_jpeg(data)) == 0
    assert fake_io.decodes == 0 and codec.fallbacks["decode"] == 0


def test_a_codec_that_fails_its_trial_is_refused_at_start_up():
    with pytest.raises(ValueError, match="nvJPEG failed its trial"):
        CudaJpeg("cpu", io=FakeIO(fail_decode="nvjpegCreateEx failed"))

    class Garbling(FakeIO):
        def decode_jpeg(self, data, mode=None, device=None):
            return super().decode_jpeg(data, mode, device).flip(0)  # BGR, as a layout mistake would give

    with pytest.raises(ValueError, match="came back wrong"):
        CudaJpeg("cpu", io=Garbling())

    class Raising(FakeIO):
        def encode_jpeg(self, chw, quality=75):
            raise TypeError("encode_jpeg() got an unexpected keyword argument 'quality'")

    with pytest.raises(ValueError, match="failed its trial"):
        CudaJpeg("cpu", io=Raising())


def test_a_cpu_device_or_no_cuda_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CudaJpeg("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            CudaJpeg("cuda")


def test_missing_or_mismatched_torchvision_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as when it is not installed
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    with pytest.raises(ValueError, match="needs torchvision, the release built for this torch") as refused:
        _load_io()
    # The release for the torch that runs, named (a plain `pip install torchvision` may upgrade torch to match it).
    major, minor = torch.__version__.split(".")[:2]
    assert f'pip install "torchvision=={int(major) - 2}.{int(minor) + 15}.*"' in str(refused.value)
    assert torchvision_install_hint("2.11.0+cu128") == 'pip install "torchvision==0.26.*"'
    assert torchvision_install_hint("2.13.0") == 'pip install "torchvision==0.28.*"'
    assert torchvision_install_hint("3.0.0") == "pip install the torchvision release built for it"
    broken = types.ModuleType("torchvision")

    def fail(name):
        raise RuntimeError("operator torchvision::nms does not exist")

    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "torchvision", broken)
    monkeypatch.delitem(sys.modules, "torchvision.io")
    with pytest.raises(ValueError, match="cannot run with this torch"):
        _load_io()


def test_the_codec_is_safe_from_many_worker_threads(codec, fake_io):
    pictures = [_picture(48, 80, seed) for seed in range(8)]
    datas = [encode_jpeg(p, 95) for p in pictures]
    wanted = [decode_jpeg(d) for d in datas]

    def work(i: int) -> None:
        for _ in range(10):
            assert _diff(codec.decode(datas[i]), wanted[i]) <= 1
            assert _near(decode_jpeg(codec.encode(pictures[i], 95)), pictures[i])

    errors = _in_threads(work, 8, 60)
    assert not errors and fake_io.decodes == 80 and fake_io.encodes == 80


def _stream_three_frames(engine, codec) -> None:
    """A real server whose codec workers use `codec`: three frames in, one at a time, three results out."""
    async def main():
        async with serving(engine) as server:
            server.jpeg = codec
            ws, _ = await open_client(server)
            for seq in (1, 2, 3):
                await ws.send(encode_jpeg(_picture(96, 128, seq), 90))
                header, rgb, others = await next_result(ws)
                assert header["seq"] == seq and rgb.shape == (64, 64, 3)
                assert not [m for m in others if m["type"] == "error"]
            await ws.close()

    run(main())


def test_a_server_with_a_gpu_codec_decodes_and_encodes_every_frame_through_it(engine, codec, fake_io):
    _stream_three_frames(engine, codec)
    assert fake_io.decodes == 3 and fake_io.encodes == 3


def test_serve_jpeg_gpu_is_refused_before_loading_without_a_cuda_device(capsys):
    assert cli.main(["serve", "--model", "tiny-random", "--device", "cpu", "--jpeg", "gpu"]) == 2
    assert "--jpeg gpu needs a CUDA device among --device (got cpu)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["serve", "--model", "tiny-random", "--device", "auto", "--jpeg", "gpu"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ --jpeg hybrid


class BlockingIO(FakeIO):
    """FakeIO whose decode waits for `release` after it has started (`started`): a GPU decoder kept busy."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.started, self.release = threading.Event(), threading.Event()

    def decode_jpeg(self, data, mode=None, device=None):
        self.started.set()
        assert self.release.wait(30)
        return super().decode_jpeg(data, mode, device)


def test_hybrid_decodes_on_the_gpu_while_it_is_free_and_on_the_cpu_while_it_is_busy():
    fake = BlockingIO()
    fake.release.set()  # the start-up trial's decode runs through
    hybrid = HybridJpeg(CudaJpeg("cpu", io=fake))
    fake.release.clear()
    fake.started.clear()
    fake.decodes = 0
    a, b = encode_jpeg(_picture(48, 80, 1), 90), encode_jpeg(_picture(48, 80, 2), 90)
    results = {}
    first = threading.Thread(target=lambda: results.__setitem__("a", hybrid.decode(a)))
    first.start()
    assert fake.started.wait(10)  # the GPU is decoding a: b must not wait for it
    t0 = time.perf_counter()
    results["b"] = hybrid.decode(b)
    assert time.perf_counter() - t0 < 5 and first.is_alive()
    assert _diff(results["b"], decode_jpeg(b)) == 0 and fake.decodes == 0  # b: the CPU's decode (a's counts on return)
    fake.release.set()
    first.join(10)
    assert _diff(results["a"], decode_jpeg(a)) <= 1 and fake.decodes == 1
    assert hybrid.decodes == {"gpu": 1, "cpu": 1}
    # Free again: the next decode is the GPU's.
    assert _diff(hybrid.decode(b), decode_jpeg(b)) <= 1 and fake.decodes == 2
    assert hybrid.decodes == {"gpu": 2, "cpu": 1}


def test_hybrid_encodes_on_the_cpu(fake_io):
    hybrid = HybridJpeg(CudaJpeg("cpu", io=fake_io))
    fake_io.encodes = 0
    picture = _picture()
    assert hybrid.encode(picture, 90) == encode_jpeg(picture, 90) and fake_io.encodes == 0


def test_hybrid_keeps_the_limits_and_errors_of_either_codec():
    fake = BlockingIO()
    fake.release.set()
    hybrid = HybridJpeg(CudaJpeg("cpu", io=fake))
    big = encode_jpeg(np.zeros((64, 200, 3), np.uint8), 80)
    with pytest.raises(CodecError, match="limit is 100 pixels"):
        hybrid.decode(big, max_side=100)  # the GPU's way
    fake.release.clear()
    fake.started.clear()
    first = threading.Thread(target=lambda: hybrid.decode(encode_jpeg(_picture(), 90)))
    first.start()
    assert fake.started.wait(10)
    try:
        with pytest.raises(CodecError, match="limit is 100 pixels"):
            hybrid.decode(big, max_side=100)  # the CPU's way, while the GPU is busy
        with pytest.raises(CodecError):
            hybrid.decode(b"\xff\xd8\xff\xdb" + b"\x00" * 40)  # corrupt
    finally:
        fake.release.set()
        first.join(10)


def test_a_server_with_the_hybrid_codec_decodes_on_the_gpu_and_encodes_on_the_cpu(engine, fake_io):
    hybrid = HybridJpeg(CudaJpeg("cpu", io=fake_io))
    fake_io.decodes = fake_io.encodes = 0
    _stream_three_frames(engine, hybrid)
    # One frame in flight: the GPU decoder is always free.
    assert fake_io.decodes == 3 and fake_io.encodes == 0 and hybrid.decodes == {"gpu": 3, "cpu": 0}


def test_serve_jpeg_hybrid_is_refused_before_loading_without_a_cuda_device(capsys):
    assert cli.main(["serve", "--model", "tiny-random", "--device", "cpu", "--jpeg", "hybrid"]) == 2
    assert "--jpeg hybrid needs a CUDA device among --device (got cpu)" in capsys.readouterr().err


def test_the_cpu_codec_object_is_the_codec_modules_functions():
    picture = _picture()
    data = CPU_JPEG.encode(picture, 90)
    assert data == encode_jpeg(picture, 90)
    assert _diff(CPU_JPEG.decode(data), decode_jpeg(data)) == 0


# ------------------------------------------------------------------------------------------------ on CUDA


def _camera_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Gradients, a shape, mild noise and a blur: a webcam frame's spectrum, roughly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([x * 220, y * 200, (1 - x) * 180], -1) + rng.normal(0, 10, (h, w, 3))
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 5, (250, 240, 30), -1)
    return cv2.GaussianBlur(img.clip(0, 255).astype(np.uint8), (3, 3), 0)


@pytest.fixture(scope="module")
def gpu_codec():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return CudaJpeg("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["512", "640x480", "gray", "progressive", "420", "444"])
def test_nvjpeg_decodes_what_the_cpu_codec_decodes(gpu_codec, kind):
    h, w = (480, 640) if kind == "640x480" else (512, 512)
    picture = _camera_like(h, w)
    params = [cv2.IMWRITE_JPEG_QUALITY, 85]
    if kind == "gray":
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2GRAY), params)
    else:
        if kind == "progressive":
            params += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
        if kind in ("420", "444"):
            params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                       cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420 if kind == "420" else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
        ok, buf = cv2.imencode(".jpg", picture[..., ::-1], params)
    data = buf.tobytes()
    before = dict(gpu_codec.fallbacks)
    gpu, cpu = gpu_codec.decode(data), decode_jpeg(data)
    assert gpu.shape == cpu.shape == (h, w, 3) and gpu.flags.c_contiguous
    err = np.abs(gpu.astype(np.int16) - cpu.astype(np.int16))
    # Two correct decoders differ in their IDCT by a level or two. Where chroma is subsampled (4:2:0, OpenCV's
    # default, and what browsers send) they differ in its upsampling too: nvJPEG repeats each chroma sample, libjpeg
    # interpolates ("fancy upsampling"), so colours differ across sharp colour edges (on the H200 in 0.1 % of the
    # pixels by 30 levels, at most by 74-88: libjpeg-turbo's own fast upsampling gives those same numbers on this
    # picture). Luma is full resolution either way, so it must agree to a level or two everywhere.
    assert err.mean() < 1.0, (err.mean(), err.max())
    if kind in ("444", "gray"):
        assert np.percentile(err, 99.9) <= 8, (err.mean(), err.max())
    luma = np.array([0.299, 0.587, 0.114])
    luma_err = np.abs(gpu.astype(np.float64) @ luma - cpu.astype(np.float64) @ luma)
    assert np.percentile(luma_err, 99.9) <= 2 and luma_err.max() <= 8, (luma_err.mean(), luma_err.max())
    assert gpu_codec.fallbacks == before, gpu_codec.last_fallback  # nvJPEG decoded it itself


@pytest.mark.gpu
def test_nvjpeg_encodes_a_jpeg_any_decoder_reads_back(gpu_codec):
    picture = _camera_like(512, 512)
    before = dict(gpu_codec.fallbacks)
    data = gpu_codec.encode(picture, 85)
    assert gpu_codec.fallbacks == before, gpu_codec.last_fallback
    back = decode_jpeg(data)
    err = np.abs(back.astype(np.int16) - picture.astype(np.int16))
    assert back.shape == picture.shape and err.mean() < 3.0, err.mean()
    assert len(data) < picture.nbytes / 4  # it compressed


@pytest.mark.gpu
def test_nvjpeg_from_many_threads_gives_each_its_own_frames(gpu_codec):
    datas = [encode_jpeg(_camera_like(512, 512, seed), 85) for seed in range(8)]
    wanted = [gpu_codec.decode(d) for d in datas]  # one thread: the reference
    pictures = [_camera_like(512, 512, 100 + seed) for seed in range(8)]

    def work(i: int) -> None:
        for _ in range(20):
            assert np.array_equal(gpu_codec.decode(datas[i]), wanted[i])
            assert _near(decode_jpeg(gpu_codec.encode(pictures[i], 85)), pictures[i])

    errors = _in_threads(work, 8, 120)
    assert not errors, errors[:1]


@pytest.mark.gpu
def test_hybrid_from_many_threads_gives_each_its_own_frames(gpu_codec):
    hybrid = HybridJpeg(gpu_codec)
    datas = [encode_jpeg(_camera_like(512, 512, seed), 85) for seed in range(8)]
    wanted = [(gpu_codec.decode(d), decode_jpeg(d)) for d in datas]  # either decoder's frame is right

    def work(i: int) -> None:
        for _ in range(20):
            frame = hybrid.decode(datas[i])
            assert any(np.array_equal(frame, w) for w in wanted[i])

    errors = _in_threads(work, 8, 120)
    assert not errors, errors[:1]
    assert sum(hybrid.decodes.values()) == 160 and hybrid.decodes["gpu"] > 0, hybrid.decodes


@pytest.mark.gpu
def test_nvjpeg_does_not_wait_for_work_on_another_stream(gpu_codec):
    """The engine runs on a stream of its own: a codec call made while an engine call runs returns at once (the
    encoder's copy on the legacy default stream would wait for it if the engine ran there)."""
    picture, data = _camera_like(512, 512), encode_jpeg(_camera_like(512, 512), 85)
    gpu_codec.encode(picture, 85), gpu_codec.decode(data)  # warm
    busy = torch.cuda.Stream()
    with torch.cuda.stream(busy):
        torch.cuda._sleep(2_000_000_000)  # about a second on any current GPU
    t0 = time.perf_counter()
    gpu_codec.encode(picture, 85)
    gpu_codec.decode(data)
    took = time.perf_counter() - t0
    still_busy = not busy.query()
    busy.synchronize()
    assert still_busy and took < 0.2, took


@pytest.mark.gpu
def test_serve_jpeg_gpu_streams_frames():
    from turbostream.config import preset
    from turbostream.engine import Engine
    from turbostream.models import load_components

    engine = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 2)),
                    load_components("tiny-random", device="cuda", vae="tiny"))
    codec = CudaJpeg("cuda")

    async def main():
        async with serving(engine) as server:
            server.jpeg = codec
            ws, _ = await open_client(server)
            for seq in range(1, 6):
                await ws.send(encode_jpeg(_camera_like(256, 320, seq), 90))
                header, rgb, others = await asyncio.wait_for(next_result(ws), 30)
                assert header["seq"] == seq and rgb.shape == (128, 128, 3) and rgb.std() > 3
                assert not [m for m in others if m["type"] == "error"]
            await ws.close()

    run(main())
    assert codec.fallbacks == {"decode": 0, "encode": 0}, codec.last_fallback
