#!/usr/bin/env python3
"""The two writers of `run -o out.mp4` side by side: H.264 through ffmpeg (io/h264.py, used when ffmpeg has libx264)
and OpenCV's mp4v (the fallback). Each writes the same frames: a smooth picture panning one pixel a frame (like video,
unlike noise, which no codec compresses); reported: frames/s of writing (the writer thread's cost per frame), the
file's bytes, and PSNR against the frames written, over BGR and over luma alone (both store 4:2:0 chroma, which
costs either the same dB on colour edges).

    python scripts/video_writer_speed.py --size 512 --frames 300 --json benchmarks/video-writers-cpu-2026-11-29.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

from turbostream.io.h264 import CRF, PRESET, H264Writer, h264_program


def clip(size: int, frames: int) -> list[np.ndarray]:
    """`frames` BGR frames of size x size: a window panning diagonally over a smooth random picture."""
    rng = np.random.default_rng(0)
    side = size + frames
    picture = cv2.resize(rng.integers(0, 256, (side // 16 + 1, side // 16 + 1, 3), dtype=np.uint8), (side, side),
                         interpolation=cv2.INTER_CUBIC)
    return [np.ascontiguousarray(picture[k:k + size, k:k + size]) for k in range(frames)]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def psnr(path: str, frames: list[np.ndarray]) -> tuple[float, float]:
    """Mean PSNR (dB) of the file's frames against those written: over BGR, and over luma alone (Y of YCrCb: the
    codecs' own work, without the 4:2:0 chroma both share)."""
    cap = cv2.VideoCapture(path)
    bgr, luma = [], []
    for frame in frames:
        ok, got = cap.read()
        if not ok:
            raise RuntimeError(f"{path} holds fewer frames than were written")
        bgr.append(_psnr(got, frame))
        y = [cv2.cvtColor(f, cv2.COLOR_BGR2YCrCb)[..., 0] for f in (got, frame)]
        luma.append(_psnr(*y))
    cap.release()
    return float(np.mean(bgr)), float(np.mean(luma))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    program = h264_program()
    if program is None:
        print("no ffmpeg with libx264 (apt-get install ffmpeg)", file=sys.stderr)
        return 2
    frames = clip(args.size, args.frames)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("h264", "mp4v"):
            path = os.path.join(tmp, f"{name}.mp4")
            t0 = time.perf_counter()
            if name == "h264":
                writer = H264Writer(program, path, args.fps, (args.size, args.size))
            else:
                writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), args.fps, (args.size, args.size))
            for frame in frames:
                writer.write(frame)
            writer.release()  # the file finished: ffmpeg's last frames encoded and its index written
            seconds = time.perf_counter() - t0
            rows[name] = {
                "frames_per_s": round(args.frames / seconds, 1),
                "bytes": os.path.getsize(path),
                "mbit_per_s_at_fps": round(os.path.getsize(path) * 8 / (args.frames / args.fps) / 1e6, 2),
            }
            rows[name]["psnr_db"], rows[name]["psnr_luma_db"] = (round(v, 2) for v in psnr(path, frames))
            print(f"{name}: {rows[name]}")
    version = subprocess.run([program, "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    result = {
        "what": "run's video file writers side by side on the same frames (scripts/video_writer_speed.py)",
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "ffmpeg": version,
                    "opencv": cv2.__version__},
        "size": args.size, "frames": args.frames, "fps": args.fps,
        "h264_settings": {"preset": PRESET, "crf": CRF, "pix_fmt": "yuv420p"},
        "writers": rows,
        "h264_bytes_vs_mp4v": round(rows["h264"]["bytes"] / rows["mp4v"]["bytes"], 3),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
