"""JPEG decode and encode on a CUDA GPU for `serve --jpeg gpu`: nvJPEG through torchvision.io, and the CPU codec
(codec.py) for what nvJPEG refuses. `serve --jpeg hybrid` (HybridJpeg): decode on the GPU while its decoder is free,
on the CPU when it is busy; encode on the CPU.

Why: the CPU codec costs a frame 1.8 ms to decode and 1.3 ms to encode at 512x512 on the H200 machine, latency a
single client pays in full on every frame. nvJPEG decodes baseline JPEGs on the hardware JPEG engines of A100, H100
and H200 (other JPEGs, and other GPUs, in CUDA kernels) and encodes in CUDA kernels.

Frames go in and out as with the CPU codec: uint8 RGB (H, W, 3) numpy arrays, 0..255, so nothing else in the server
changes; the copies to and from the GPU (0.8 MB each way at 512x512) are part of what it costs.

Streams, and why each worker thread has its own:
- torchvision allocates a decoded image on the caller's current stream and writes it from a stream of its own
  without first waiting for the caller's, so it can overwrite memory that kernels queued on the caller's stream
  still read (pytorch/vision#9606). Each worker thread decodes on a stream that only this codec uses and whose work
  is finished before the call returns (the copy to the host waits), so no queued kernel reads a recycled block.
- torchvision's encoder reads its input from its own stream without waiting for the caller's: the upload of the
  frame is waited for before encoding.
- The encoder copies the finished bitstream on the legacy default stream, so it is copied to the host there. The
  engine runs on a stream of its own (engine.py), so that copy neither waits for an engine call nor delays one.
torchvision serializes its decoder and its encoder with a lock each: at most one decode and one encode run at a time,
however many workers call in.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from types import ModuleType

import numpy as np
import torch

from .codec import MAX_SCANS, MAX_SIDE, check_decode_cost, decode_checked_jpeg, decode_jpeg, encode_jpeg, has_exif

log = logging.getLogger("turbostream.codec")

# The trial frame __init__ round-trips through the GPU codec: the CPU decode of its bitstream must match the frame
# within this many levels (JPEG at quality 90 on a smooth image: a few levels).
TRIAL_SIDE = 64
TRIAL_MAX_DIFF = 12


def torchvision_install_hint(torch_version: str) -> str:
    """The pip command for the torchvision release built for a torch version: its minor is torch's plus 15 (2.13 goes
    with 0.28). Named, since a plain `pip install torchvision` may upgrade torch to match the newest torchvision."""
    try:
        major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    except ValueError:
        return "pip install the torchvision release built for it"
    if major != 2:
        return "pip install the torchvision release built for it"
    return f'pip install "torchvision=={0}.{minor + 15}.*"'


def _load_io() -> ModuleType:
    """torchvision.io, or ValueError saying what to install."""
    try:
        import torchvision.io as tv_io
    except ImportError:
        raise ValueError(f"--jpeg gpu needs torchvision, the release built for this torch ({torch.__version__}): "
                         f"{torchvision_install_hint(torch.__version__)}") from None
    except Exception as exc:  # noqa: BLE001 - torchvision's ops failing to load for a torch they were not built for
        raise ValueError(f"torchvision cannot run with this torch ({torch.__version__}): {exc}; install the "
                         "torchvision release built for it") from None
    if not hasattr(tv_io, "decode_jpeg") or not hasattr(tv_io, "encode_jpeg"):
        raise ValueError("this torchvision has no JPEG decode and encode in torchvision.io")
    return tv_io


class CudaJpeg:
    """decode()/encode() like the CPU codec's, on a CUDA GPU; the CPU codec for JPEGs nvJPEG refuses.

    Building one runs a trial round trip on the device and raises ValueError, with the reason, if the GPU codec
    cannot work here (no CUDA, no torchvision for this torch, nvJPEG failing). Safe to call from many threads.
    io: a stand-in for torchvision.io (tests); device "cpu" is accepted only with one.
    """

    name = "gpu"

    def __init__(self, device: str | torch.device = "cuda", *, io: ModuleType | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--jpeg gpu needs a CUDA GPU (this machine, or this torch build, has none)")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif io is None:
            raise ValueError(f"--jpeg gpu needs a CUDA device, not {self.device}")
        self._io = io if io is not None else _load_io()
        self._rgb = getattr(getattr(self._io, "ImageReadMode", None), "RGB", "RGB")
        self._local = threading.local()
        self._lock = threading.Lock()
        # JPEGs each side handed to the CPU codec, and the last reason (for logs and tests).
        self.fallbacks = {"decode": 0, "encode": 0}
        self.last_fallback: str | None = None
        self._trial()

    # ------------------------------------------------------------------ the codec

    def decode(self, data: bytes, max_side: int = MAX_SIDE, max_scans: int = MAX_SCANS,
               fit: tuple[int, int] | None = None) -> np.ndarray:
        """JPEG bytes -> uint8 RGB (H, W, 3), 0..255; the same checks and errors (CodecError) as codec.decode_jpeg.
        fit: accepted for the CPU codec's sake and not used (nvJPEG decodes at full size; so do the fallbacks)."""
        # Before any GPU work: size and scan limits, not a JPEG. The CPU decodes below need not check again.
        components = check_decode_cost(data, max_side, max_scans)[2]
        if components not in (1, 3) or has_exif(data):
            # CMYK (4 components) is left to libjpeg-turbo, which knows Adobe's inverted CMYK; EXIF may turn the
            # picture, which the CPU decode applies and nvJPEG does not.
            return decode_checked_jpeg(data)
        try:
            with self._own_stream():
                image = self._io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=self._rgb,
                                             device=self.device)
                # (3, H, W) -> (H, W, 3) on the GPU, then one blocking copy to the host (it waits for the decode).
                return image.permute(1, 2, 0).contiguous().cpu().numpy()
        except RuntimeError as exc:  # nvJPEG refused it (CMYK, arithmetic coding, corrupt): the CPU decides
            self._fell_back("decode", exc)
            return decode_checked_jpeg(data)

    def encode(self, rgb: np.ndarray, quality: int = 85) -> bytes:
        """uint8 RGB (H, W, 3), 0..255 -> JPEG bytes (4:4:4 chroma: nvJPEG's, as torchvision sets it)."""
        try:
            with self._own_stream() as stream:
                chw = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1).contiguous()
                if stream is not None:
                    stream.synchronize()  # the encoder reads the frame from its own stream without waiting for ours
                bitstream = self._io.encode_jpeg(chw, quality=int(quality))
            with self._default_stream():  # where the encoder copied the bitstream
                return bitstream.cpu().numpy().tobytes()
        except RuntimeError as exc:
            self._fell_back("encode", exc)
            return encode_jpeg(rgb, quality)

    # ------------------------------------------------------------------ streams and fallbacks

    def _own_stream(self):
        """This worker thread's CUDA stream made current (created on first use; one per thread): yields it."""
        if self.device.type != "cuda":
            return contextlib.nullcontext(None)
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return _stream_context(stream)

    def _default_stream(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext(None)
        return _stream_context(torch.cuda.default_stream(self.device))

    def _fell_back(self, op: str, exc: BaseException) -> None:
        with self._lock:
            self.fallbacks[op] += 1
            first = self.fallbacks[op] == 1
            self.last_fallback = f"{op}: {exc}"
        # The first of each kind is worth a warning; later ones would flood the log at one per frame.
        (log.warning if first else log.debug)("GPU JPEG %s failed, done on the CPU instead (%s)", op,
                                              str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def _trial(self) -> None:
        """Encode a small frame on the device and decode it back, so a codec that cannot work fails at start-up."""
        y, x = np.mgrid[0:TRIAL_SIDE, 0:TRIAL_SIDE]
        frame = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
        before = dict(self.fallbacks)
        try:
            data = self.encode(frame, 90)
            back = self.decode(data)
        except Exception as exc:  # noqa: BLE001 - any failure here means the option cannot be used
            raise ValueError(f"--jpeg gpu: the GPU JPEG codec failed its trial on {self.device}: {exc}") from None
        if self.fallbacks != before:
            raise ValueError(f"--jpeg gpu: nvJPEG failed its trial on {self.device} ({self.last_fallback})")
        if back.shape != frame.shape or np.abs(back.astype(int) - frame).max() > TRIAL_MAX_DIFF:
            raise ValueError(f"--jpeg gpu: a frame round-tripped through the GPU codec on {self.device} came back "
                             "wrong")
        cpu = decode_jpeg(data)
        if np.abs(cpu.astype(int) - frame).max() > TRIAL_MAX_DIFF:
            raise ValueError(f"--jpeg gpu: the GPU codec's JPEG on {self.device} does not decode right on the CPU")


@contextlib.contextmanager
def _stream_context(stream: torch.cuda.Stream):
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        yield stream


class HybridJpeg:
    """decode() on the GPU (a CudaJpeg) when no other worker is decoding there, else on the CPU; encode() on the CPU.

    Why: one frame decodes faster on the GPU (on the H200 machine, 0.61 ms against the CPU's 0.93 called alone, 0.76
    against 1.35 through the server), which a single client gains on every frame, but torchvision decodes one JPEG
    at a time, so under load `--jpeg gpu`'s decodes queue behind each other (16 clients: 3.4 ms each against the
    CPU's 2.0) while the CPU codec scales with cores. Here a decode never waits for the GPU's: it goes to the CPU
    instead. Encoding stays on the CPU: nvJPEG's was no faster through the server and its JPEGs are 4:4:4, larger.
    Safe to call from many threads.
    """

    name = "hybrid"

    def __init__(self, gpu: CudaJpeg) -> None:
        self.gpu = gpu
        self._gpu_free = threading.Lock()  # held by the one worker decoding on the GPU
        self._count_lock = threading.Lock()
        self.decodes = {"gpu": 0, "cpu": 0}  # where each decode ran (the GPU's fallbacks to the CPU count as gpu)

    def decode(self, data: bytes, max_side: int = MAX_SIDE, max_scans: int = MAX_SCANS,
               fit: tuple[int, int] | None = None) -> np.ndarray:
        """JPEG bytes -> uint8 RGB (H, W, 3), 0..255: CudaJpeg.decode if the GPU is free, else codec.decode_jpeg."""
        on_gpu = self._gpu_free.acquire(blocking=False)
        with self._count_lock:
            self.decodes["gpu" if on_gpu else "cpu"] += 1
        if not on_gpu:
            return decode_jpeg(data, max_side, max_scans, fit)
        try:
            return self.gpu.decode(data, max_side, max_scans, fit)
        finally:
            self._gpu_free.release()

    @staticmethod
    def encode(rgb: np.ndarray, quality: int = 85) -> bytes:
        """uint8 RGB (H, W, 3), 0..255 -> JPEG bytes on the CPU (codec.encode_jpeg: 4:2:0 chroma)."""
        return encode_jpeg(rgb, quality)
