#!/usr/bin/env python3
"""`turbostream run` of a file into a file, end to end, with each video writer: H.264 through ffmpeg (where ffmpeg has
libx264), OpenCV's mp4v (ffmpeg hidden from the run), and .avi (MJPG) for reference; each row the run's own summary
(frames, seconds, frames/s, the device's busy share). A smooth moving 640x480 test clip at 30 fps, made with OpenCV.

    python scripts/file_run_speed.py --model random --device cuda --frames 600 --json $OUT/file_run_speed.json
    python scripts/file_run_speed.py --model tiny-random --device cpu --size 64 --frames 60   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

SUMMARY = re.compile(r"done: (\d+) frames in ([\d.]+) s \(([\d.]+) fps\)(?:; the device was busy (\d+) %)?")


def make_clip(path: str, frames: int) -> None:
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    y, x = np.mgrid[0:480, 0:640]
    for i in range(frames):
        out.write(np.stack([(x + 4 * i) % 256, (y + 3 * i) % 256, np.full_like(x, i % 256)], -1).astype(np.uint8))
    out.release()


def run(clip: str, output: str, engine_args: list[str], env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "turbostream", "run", "-i", clip, "-o", output, *engine_args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    match = SUMMARY.search(done.stderr)
    row = {"command": " ".join(cmd[1:]), "status": done.returncode, "wall_s": round(wall, 2),
           "bytes": os.path.getsize(output) if os.path.exists(output) else None}
    if match:
        row.update(frames=int(match.group(1)), run_s=float(match.group(2)), fps=float(match.group(3)),
                   device_busy_pct=int(match.group(4)) if match.group(4) else None)
    else:
        row["stderr_tail"] = done.stderr[-2000:]
    codec = re.search(r"frames, \d+x\d+ (\S+),", done.stderr)
    row["written_as"] = codec.group(1) if codec else None
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="512")
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    engine_args = ["--model", args.model, "--device", args.device, "--size", args.size]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        clip = os.path.join(tmp, "clip.avi")
        make_clip(clip, args.frames)
        env = dict(os.environ)
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg:
            rows["mp4_h264"] = run(clip, os.path.join(tmp, "h264.mp4"), engine_args, env)
        rows["mp4_mp4v"] = run(clip, os.path.join(tmp, "mp4v.mp4"), engine_args,
                               {**env, "TURBOSTREAM_FFMPEG": os.path.join(tmp, "no-ffmpeg")})
        rows["avi_mjpg"] = run(clip, os.path.join(tmp, "mjpg.avi"), engine_args, env)
        for name, row in rows.items():
            print(name, {k: v for k, v in row.items() if k != "command"})
    result = {"what": "turbostream run, a 640x480 30 fps file into a file, per video writer",
              "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "ffmpeg": subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout.split("\n")[0]
              if ffmpeg else None, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0 if all(row["status"] == 0 for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
