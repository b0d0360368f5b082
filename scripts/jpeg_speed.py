#!/usr/bin/env python3
"""The server's JPEG codecs side by side: the CPU's (simplejpeg), `--jpeg gpu` (nvJPEG through torchvision), and
OpenCV's cv2.imdecode/imencode (the CPU codec until 2026-11-27, kept here for comparison), per frame.

For each codec, on camera-like frames of the engine's size: the median time of one decode and one encode from one
thread (what a single client's latency pays, copies to and from the GPU included), then frames/s with 1, 4 and 8
threads at once (what the codec workers can sustain for many clients), and the JPEG's size. Every other codec's
result is checked against the CPU codec's. Without CUDA (or without torchvision) the GPU rows say why instead. Also:
a client frame larger than the engine's (--large) decoded and fitted as the server does it, in full and reduced in
the DCT (codec.decode_reduction), side by side.

    python scripts/jpeg_speed.py --size 512 --iters 200 --json benchmarks/jpeg-speed-h200.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import threading
import time

import cv2
import numpy as np
import torch

from turbostream.codec import CPU_JPEG, decode_reduction, fit_frame
from turbostream.config import parse_size


def camera_like(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients, a disc, mild noise, a blur: roughly a webcam frame's spectrum (JPEG cost depends on content)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([x * 220, y * 200, (1 - x) * 180], -1) + rng.normal(0, 10, (h, w, 3))
    cv2.circle(img, (int(w * (0.2 + 0.05 * seed)), h // 2), min(h, w) // 5, (250, 240, 30), -1)
    return cv2.GaussianBlur(img.clip(0, 255).astype(np.uint8), (3, 3), 0)


def median_ms(fn, iters: int, burn_in: int = 10) -> float:
    for _ in range(burn_in):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def alternating_ms(fn_a, fn_b, iters: int, burn_in: int = 10) -> tuple[float, float]:
    """Median ms of fn_a and of fn_b, timed call by call in turn (a, b, a, b, ...)."""
    for _ in range(burn_in):
        fn_a(), fn_b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(iters):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times[0]), 3), round(statistics.median(times[1]), 3)


def rate(fn, threads: int, seconds: float) -> float:
    """Calls per second of fn from `threads` threads at once for about `seconds`."""
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            fn()
            counts[i] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return round(sum(counts) / (time.perf_counter() - t0), 1)


class OpenCvJpeg:
    """cv2.imdecode / cv2.imencode, as codec.py used them until 2026-11-27 (RGB in and out, quality, 4:2:0)."""

    _rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV 4.10+: decodes straight to RGB

    def decode(self, data: bytes) -> np.ndarray:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), self._rgb if self._rgb is not None else cv2.IMREAD_COLOR)
        return image if self._rgb is not None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def encode(self, rgb: np.ndarray, quality: int) -> bytes:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        return buf.tobytes()


def measure(codec, frames: list[np.ndarray], datas: list[bytes], args) -> dict:
    i = iter(range(10**9))
    decode = lambda: codec.decode(datas[next(i) % len(datas)])  # noqa: E731
    encode = lambda: codec.encode(frames[next(i) % len(frames)], args.quality)  # noqa: E731
    row = {"decode_ms": median_ms(decode, args.iters), "encode_ms": median_ms(encode, args.iters),
           "jpeg_kib": round(len(codec.encode(frames[0], args.quality)) / 1024, 1)}
    for n in args.threads:
        row[f"decode_fps_{n}_threads"] = rate(decode, n, args.rate_s)
        row[f"encode_fps_{n}_threads"] = rate(encode, n, args.rate_s)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512", help="frame size, WxH or one side (default: %(default)s)")
    ap.add_argument("--quality", type=int, default=85, help="encode quality, as serve's --jpeg-quality")
    ap.add_argument("--iters", type=int, default=200, help="timed calls per median")
    ap.add_argument("--threads", default="1,4,8", help="thread counts for the frames/s rows")
    ap.add_argument("--rate-s", type=float, default=2.0, help="seconds per frames/s row")
    ap.add_argument("--large", default="1920x1080", help="a client frame larger than --size, decoded and fitted to "
                    "it in full and at a reduced size (default: %(default)s)")
    ap.add_argument("--device", default="cuda", help="the GPU codec's device (default: %(default)s)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    args.threads = [int(n) for n in args.threads.split(",")]
    width, height = parse_size(args.size)
    frames = [camera_like(height, width, seed) for seed in range(8)]
    datas = [CPU_JPEG.encode(f, args.quality) for f in frames]  # what clients send: libjpeg's 4:2:0
    result = {"size": f"{width}x{height}", "quality": args.quality, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "command": "python scripts/jpeg_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu": measure(CPU_JPEG, frames, datas, args)}
    print("cpu:", result["cpu"], flush=True)
    opencv = OpenCvJpeg()
    row = measure(opencv, frames, datas, args)
    # The per-call medians above ran one codec after the other; these alternate the two call by call, so that both
    # see the same machine (clock, caches, neighbours): the ratio to trust.
    k = iter(range(10**9))
    calls = {"decode": lambda codec: codec.decode(datas[next(k) % len(datas)]),
             "encode": lambda codec: codec.encode(frames[next(k) % len(frames)], args.quality)}
    result["alternating"] = {}
    for op, call in calls.items():
        cpu_ms, opencv_ms = alternating_ms(functools.partial(call, CPU_JPEG), functools.partial(call, opencv),
                                           args.iters)
        result["alternating"][f"{op}_ms"] = {"cpu": cpu_ms, "opencv": opencv_ms}
    # Same pixels from the same JPEG? And how far the two encoders' JPEGs decode apart.
    row["decode_max_abs_vs_cpu"] = max(int(np.abs(opencv.decode(d).astype(np.int16) - CPU_JPEG.decode(d)).max())
                                       for d in datas)
    row["encode_max_abs_vs_cpu"] = max(int(np.abs(CPU_JPEG.decode(opencv.encode(f, args.quality)).astype(np.int16)
                                                  - CPU_JPEG.decode(CPU_JPEG.encode(f, args.quality))).max())
                                       for f in frames)
    result["opencv"] = row
    cpu = result["cpu"]
    # Times: OpenCV's over the CPU codec's (alternating); rates (the *_threads keys): the CPU codec's over OpenCV's.
    # Above 1 either way means the CPU codec is faster.
    result["ratio_opencv_over_cpu"] = {op: round(v["opencv"] / v["cpu"], 2) for op, v in result["alternating"].items()}
    result["ratio_opencv_over_cpu"].update({key: round(cpu[key] / row[key], 2) for key in row
                                            if key.endswith("_threads")})
    # A client that sends frames larger than the engine's (a 1080p webcam through a script of its own): decode and
    # fit as the server does, the JPEG decoded at full size, and at the size codec.decode_reduction allows.
    lw, lh = (int(v) for v in args.large.lower().split("x"))
    large = CPU_JPEG.encode(camera_like(lh, lw, 0), args.quality)
    full_ms, reduced_ms = alternating_ms(lambda: fit_frame(CPU_JPEG.decode(large), width, height),
                                         lambda: fit_frame(CPU_JPEG.decode(large, fit=(width, height)), width, height),
                                         max(20, args.iters // 5))
    result["large_frame"] = {"jpeg": f"{lw}x{lh}", "fit_to": f"{width}x{height}",
                             "reduction": decode_reduction(lw, lh, width, height),
                             "decode_fit_full_ms": full_ms, "decode_fit_reduced_ms": reduced_ms,
                             "ratio": round(full_ms / reduced_ms, 2)}
    print("large frame:", result["large_frame"], flush=True)
    print("opencv:", row, "\nalternating:", result["alternating"], "\nopencv/cpu (time, alternating; frames/s: "
          "cpu/opencv):", result["ratio_opencv_over_cpu"], flush=True)
    try:
        from turbostream.codec_cuda import CudaJpeg

        gpu = CudaJpeg(args.device)
    except ValueError as exc:
        result["gpu_codec"] = {"skipped": str(exc)}
        print("gpu: skipped:", exc)
    else:
        # The GPU decode of a client's JPEG against the CPU's, and the GPU's JPEG decoded on the CPU.
        err_in = max(float(np.abs(gpu.decode(d).astype(np.int16) - CPU_JPEG.decode(d)).mean()) for d in datas)
        err_out = max(float(np.abs(CPU_JPEG.decode(gpu.encode(f, args.quality)).astype(np.int16) - f).mean())
                      for f in frames)
        row = measure(gpu, frames, datas, args)
        row.update(decode_mean_abs_vs_cpu=round(err_in, 3), encode_round_trip_mean_abs=round(err_out, 3),
                   fallbacks=dict(gpu.fallbacks))
        result["gpu_codec"] = row
        print("gpu:", row)
        cpu = result["cpu"]
        result["ratio_cpu_over_gpu"] = {k: round(cpu[k] / row[k], 2) for k in ("decode_ms", "encode_ms")}
        print("cpu/gpu:", result["ratio_cpu_over_gpu"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
