"""The virtual camera output (`run -o virtualcam`): the stylized stream appears as a webcam in Zoom, Meet, OBS...

Through pyvirtualcam (an optional package: `pip install pyvirtualcam`, or `pip install -e '.[virtualcam]'` in a
checkout), which needs a backend: v4l2loopback on Linux, OBS Studio's virtual camera on Windows and macOS. `virtualcam:DEVICE`
picks a device (`virtualcam:/dev/video10` on Linux). Frames are sent by a PacedSink thread at the source's rate.
"""

from __future__ import annotations

import logging
import sys
import time

import cv2
import numpy as np

from ..errors import SinkError
from .paced import PacedSink

log = logging.getLogger("turbostream.sinks")

if sys.platform.startswith("linux"):
    BACKEND_ADVICE = (
        "on Linux, install and load v4l2loopback: `sudo apt-get install v4l2loopback-dkms && sudo modprobe "
        "v4l2loopback devices=1 exclusive_caps=1 card_label=turbostream` (other distributions: their "
        "v4l2loopback package)"
    )
elif sys.platform == "darwin":
    BACKEND_ADVICE = ("on macOS, install OBS Studio 30 or later, then start and stop its virtual camera once "
                      "(Start Virtual Camera) so the system extension is installed")
else:
    BACKEND_ADVICE = ("on Windows, install OBS Studio 26 or later (its virtual camera is the backend), or "
                      "Unity Capture")
INSTALL_PACKAGE = "pip install pyvirtualcam"


def virtualcam_module():
    """pyvirtualcam, or SinkError saying what to install."""
    try:
        import pyvirtualcam
    except ImportError:
        raise SinkError(
            f"-o virtualcam needs the pyvirtualcam package and a virtual camera backend: `{INSTALL_PACKAGE}`; then "
            f"{BACKEND_ADVICE}"
        ) from None
    return pyvirtualcam


def parse_virtualcam(text: str) -> str | None:
    """'virtualcam' -> None (the backend's default device); 'virtualcam:/dev/video10' -> '/dev/video10'."""
    _, _, device = text.partition(":")
    return device.strip() or None


class VirtualCamSink(PacedSink):
    """Opens the virtual camera at once (so a missing backend is reported before the model loads)."""

    name = "virtual camera"

    def __init__(self, fps: float, size: tuple[int, int], device: str | None = None) -> None:
        super().__init__(fps, size)
        pyvirtualcam = virtualcam_module()
        try:
            self._camera = pyvirtualcam.Camera(width=size[0], height=size[1], fps=self.fps, device=device,
                                               fmt=pyvirtualcam.PixelFormat.RGB)
        except Exception as exc:  # noqa: BLE001 - RuntimeError for a missing backend; others for a busy device
            raise SinkError(f"the virtual camera could not be opened: {exc} ({BACKEND_ADVICE})") from None
        self.device = getattr(self._camera, "device", device) or "default"
        self.path = f"virtualcam {self.device}"
        log.info("virtual camera %s: %dx%d at %g fps (backend %s)", self.device, *size, self.fps,
                 getattr(self._camera, "backend", "?"))

    def _send_loop(self) -> None:
        deadline = time.perf_counter()
        while True:
            frame, _ = self.next_frame()
            if (frame.shape[1], frame.shape[0]) != self.size:
                frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
            self._camera.send(np.ascontiguousarray(frame, dtype=np.uint8))
            self.frames_sent += 1
            deadline = self.wait_tick(deadline)
            if deadline is None:
                return

    def _finish(self) -> None:
        camera, self._camera = getattr(self, "_camera", None), None
        if camera is not None:
            try:
                camera.close()
            except Exception:  # noqa: BLE001
                pass

    def describe(self) -> str:
        return f"{self.path}: {self.frames_sent} frames sent ({self.size[0]}x{self.size[1]}, {self.fps:g} fps)"

