#!/usr/bin/env python
"""Measure the live-video controls: play synthetic clips through the engine, one setting at a time.

For each setting (similarity, feedback, both, off) two clips of --frames frames are played as a producer would play
them (the similarity check on each frame, skipped frames answered with the last output, the rest through
Engine.run with a stream key), and reported:

- flicker: mean absolute frame-to-frame change of the output (uint8 levels) for a still scene with sensor-like
  noise (a fixed picture plus fresh Gaussian noise, sigma --noise, every frame), after --settle frames;
- motion: the same for a moving scene (the picture panning --pan pixels a frame, same noise): a control that
  freezes or smears motion shows here;
- skipped: fraction of frames answered without the engine, still and moving;
- ms/frame: engine milliseconds per delivered frame (skipped frames deliver too, at no engine cost), still and moving.

Then a prompt change on a still, noise-free scene, with and without transition_s: the jump (mean change at the switch
without a transition), the largest single step with one, and the frames until the output reaches the new prompt's.
The clips play at --fps on the engine's clock, so transitions are timed as a camera at that rate would see them.

    python scripts/live_controls.py --model tiny-random --device cpu --size 64
    python scripts/live_controls.py --model random --device cuda --size 512 --json benchmarks/live-controls.json

Random weights cannot show beauty, but they show mechanics honestly: their outputs are far from their inputs, so
feedback first drifts for a few frames to its fixed point (hence --settle).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from turbostream.config import EngineConfig, StreamParams, parse_size
from turbostream.similarity import SimilarityFilter

SETTINGS = [
    ("off (today's output)", {}),
    ("feedback 0.3", {"feedback": 0.3}),
    ("feedback 0.5", {"feedback": 0.5}),
    ("similarity 0.95", {"similarity": 0.95}),
    ("similarity 0.98", {"similarity": 0.98}),
    ("similarity 0.98 + feedback 0.5", {"similarity": 0.98, "feedback": 0.5}),
]


def picture(width: int, height: int, shift: float = 0.0) -> np.ndarray:
    """A smooth test picture (gradients, stripes, a block), panned right by `shift` pixels; float32."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (x - shift) / width, y / height
    img = np.stack([255 * ((u * 1.5) % 1.0), 255 * v, 128 + 80 * np.sin(u * 12.0)], -1)
    bx = ((u % 1.0) > 0.3) & ((u % 1.0) < 0.55) & (v > 0.35) & (v < 0.65)
    img[bx] = (220, 50, 90)
    return img


def clip(kind: str, n: int, width: int, height: int, noise: float, pan: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        base = picture(width, height, shift=pan * k if kind == "moving" else 0.0)
        frames.append((base + rng.normal(0, noise, base.shape)).clip(0, 255).astype(np.uint8))
    return frames


def change(outs: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(outs, outs[1:])]))


class FrameClock:
    """The engine's and the filter's clock: advances 1/fps per frame played."""

    def __init__(self, fps: float) -> None:
        self.t, self.dt = 1000.0, 1.0 / fps

    def __call__(self) -> float:
        return self.t

    def tick(self) -> None:
        self.t += self.dt


def play(engine, clock: FrameClock, key: str, frames: list[np.ndarray], params) -> dict:
    """Frames as a producer plays them; params(k) gives frame k's parameters. Outputs and costs."""
    filt = SimilarityFilter(seed=0, clock=clock)
    outs, engine_s, check_s, skipped = [], 0.0, 0.0, 0
    last_in = last_out = None
    for k, frame in enumerate(frames):
        p = params(k)
        t0 = time.perf_counter()
        ref = filt.check(frame, p)
        check_s += time.perf_counter() - t0
        if ref is not None and ref is last_in:
            outs.append(last_out)
            skipped += 1
        else:
            frame = frame if ref is None else ref
            t0 = time.perf_counter()
            out = engine.run([frame], [p], streams=[key])[0]
            engine_s += time.perf_counter() - t0
            last_in, last_out = frame, out
            outs.append(out)
        clock.tick()
    engine.release_stream(key)
    return {"outs": outs, "engine_s": engine_s, "check_s": check_s, "skipped": skipped}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--size", default="64")
    ap.add_argument("--frames", type=int, default=60, help="frames per clip (default: %(default)s)")
    ap.add_argument("--settle", type=int, default=20, help="frames before flicker is measured (default: %(default)s)")
    ap.add_argument("--noise", type=float, default=4.0, help="sensor noise sigma, levels (default: %(default)s)")
    ap.add_argument("--pan", type=float, default=1.0, help="moving clip: pixels a frame (default: %(default)s)")
    ap.add_argument("--fps", type=float, default=30.0, help="the clips' frame rate (default: %(default)s)")
    ap.add_argument("--transition", type=float, default=1.0, help="transition_s measured (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    width, height = parse_size(args.size)

    from turbostream.engine import Engine

    engine = Engine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, width=width,
                                 height=height))
    engine.warmup()
    clock = FrameClock(args.fps)
    engine.clock = clock
    clips = {kind: clip(kind, args.frames, width, height, args.noise, args.pan) for kind in ("still", "moving")}
    base = StreamParams(prompt="a watercolor painting", seed=1)
    rows = []
    for name, controls in SETTINGS:
        p = base.updated(**controls)
        row = {"setting": name, **controls}
        for kind, frames in clips.items():
            got = play(engine, clock, f"{name}/{kind}", frames, lambda k, p=p: p)
            delivered = len(frames)
            row[f"{kind}_change"] = change(got["outs"][args.settle:])
            row[f"{kind}_skipped"] = got["skipped"] / delivered
            row[f"{kind}_engine_ms_per_frame"] = 1e3 * got["engine_s"] / delivered
            row[f"{kind}_check_ms_per_frame"] = 1e3 * got["check_s"] / delivered
        rows.append(row)
        print(f"{name}: still {row['still_change']:.2f}, moving {row['moving_change']:.2f}", file=sys.stderr)

    # A prompt change on a still, noise-free scene, with and without a transition.
    still = clip("still", 1, width, height, 0.0, 0.0)[0]
    new = base.updated(prompt="a charcoal drawing", seed=7)
    switch, n = 5, 5 + int(args.transition * args.fps) + 10
    transition = {}
    for t in (0.0, args.transition):
        got = play(engine, clock, f"transition {t}", [still] * n,
                   lambda k, t=t: (base if k < switch else new).updated(transition_s=t))["outs"]
        steps = [float(np.abs(a.astype(np.int16) - b).mean()) for a, b in zip(got, got[1:])]
        final = got[-1]
        arrived = next(k for k in range(switch, n) if np.array_equal(got[k], final)) - switch
        transition[str(t)] = {"largest_step": max(steps), "frames_to_new": arrived, "steps": steps}
    transition["jump"] = transition["0.0"]["largest_step"]

    result = {"model": args.model, "device": str(engine.device), "size": f"{width}x{height}",
              "dtype": str(engine.dtype).replace("torch.", ""), "frames": args.frames, "settle": args.settle,
              "noise": args.noise, "pan": args.pan, "fps": args.fps, "rows": rows, "transition": transition,
              "command": " ".join(sys.argv)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"{r['model']} on {r['device']} at {r['size']} ({r['dtype']}), {r['frames']} frames a clip at {r['fps']:g} fps, "
        f"sensor noise sigma {r['noise']:g}, pan {r['pan']:g} px/frame; change measured after {r['settle']} frames",
        "",
        "| setting | flicker, still (levels) | change, moving (levels) | skipped still | skipped moving "
        "| engine ms/frame still | engine ms/frame moving |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['setting']} | {row['still_change']:.2f} | {row['moving_change']:.2f} "
            f"| {100 * row['still_skipped']:.0f}% | {100 * row['moving_skipped']:.0f}% "
            f"| {row['still_engine_ms_per_frame']:.2f} | {row['moving_engine_ms_per_frame']:.2f} |")
    t = r["transition"]
    secs = next(k for k in t if k not in ("0.0", "jump"))
    lines += ["", f"Prompt and seed change on a still scene: jump without a transition {t['jump']:.1f} levels; with "
                  f"transition_s {secs}: largest step {t[secs]['largest_step']:.1f} levels, the new prompt's output "
                  f"reached after {t[secs]['frames_to_new']} frames (without: {t['0.0']['frames_to_new']})."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
