#!/usr/bin/env python3
"""The engine's host work per call, without the networks: what Engine.run costs around the GPU's part.

The UNet and the VAE are replaced by stand-ins that return zeros of the right shapes, so what is timed is everything
else one call does on the host: fitting and staging the frames, prompt embeddings and noise from the caches, the
schedule columns, the frame math's own tensor ops, and copying the outputs out. With --device cuda the tensor ops
are queued, so this is the time the inference thread holds the host (and the GIL) per batch; on a CPU the frame
math's own tensor ops (uint8 to float, the Euler step, back to uint8) run here too and dominate.

    python scripts/host_overhead.py --size 512 --batches 1,8 --iters 50 --json out.json

--malloc keep measures after heap.keep_freed_memory() (what serve and run set after warm-up); --malloc both runs the
default and keep side by side, each in a fresh process, alternating for --rounds rounds, and reports both.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from turbostream import heap
from turbostream.config import StreamParams, parse_size, preset
from turbostream.engine import Engine


def stub_networks(engine: Engine) -> None:
    """Replace the UNet and the VAE with zero-returning stand-ins of the same shapes (tiny VAE path)."""
    c, h, w = engine.latent_shape
    math = engine.math
    math.vae_kind = "tiny"
    math.unet_call = lambda x, t, encoder_hidden_states, return_dict: (torch.zeros_like(x),)
    math.encoder_call = lambda x: x.new_zeros((x.shape[0], c, h, w))
    math.decoder_call = lambda z: z.new_zeros((z.shape[0], 3, h * 8, w * 8))


def copy_out(engine: Engine, b: int, iters: int) -> dict:
    """Median ms to hand b frames out of a slot's host buffer as the engine does (fresh arrays), and into arrays
    allocated once (the least any reuse could cost), side by side in this process; the last 3 batches stay alive,
    as downstream queues keep them. A large gap means fresh arrays pay page faults here."""
    out = engine._slots[0].out
    rotation = [[np.empty(tuple(out.shape[1:]), np.uint8) for _ in range(b)] for _ in range(4)]

    def fresh(i: int):
        return [out[r].numpy().copy() for r in range(b)]

    def reused(i: int):
        frames = rotation[i % len(rotation)]
        for r, frame in enumerate(frames):
            np.copyto(frame, out[r].numpy())
        return frames

    result = {}
    for name, fn in (("fresh_ms", fresh), ("reused_ms", reused)):
        kept, times = [], []
        for i in range(iters + 5):
            t0 = time.perf_counter()
            kept.append(fn(i))
            if i >= 5:  # burn in: the allocator warm
                times.append((time.perf_counter() - t0) * 1e3)
            del kept[:-3]
        result[name] = round(statistics.median(times), 3)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="512")
    ap.add_argument("--batches", default="1,8", help="batch sizes (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per batch size (default: %(default)s)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--malloc", choices=("default", "keep", "both"), default="default",
                    help="glibc malloc as it is, after heap.keep_freed_memory(), or both side by side (default: "
                         "%(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="with --malloc both: rounds of the two (default: 2)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.malloc == "both":
        return compare_malloc(args, argv if argv is not None else sys.argv[1:])
    width, height = parse_size(args.size)
    batches = [int(b) for b in args.batches.split(",")]
    engine = Engine(preset("test", device=args.device, width=width, height=height, buckets=tuple(sorted(batches)),
                           cuda_graphs=False))
    stub_networks(engine)
    engine.warmup()
    kept = heap.keep_freed_memory() if args.malloc == "keep" else False
    rng = np.random.default_rng(0)
    rows = {}
    for b in batches:
        frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(b)]
        params = [StreamParams(f"prompt {k % 3}", 0.5, 2, k) for k in range(b)]
        for _ in range(5):  # burn in: caches filled, allocator warm
            engine.run(frames, params)
        times = []
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(args.iters):
            t0 = time.perf_counter()
            engine.run(frames, params)
            times.append((time.perf_counter() - t0) * 1e3)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        median = statistics.median(times)
        rows[str(b)] = {"median_ms": round(median, 3), "per_frame_ms": round(median / b, 3),
                        "p95_ms": round(sorted(times)[int(0.95 * (len(times) - 1))], 3),
                        "page_faults_per_call": round(faults / args.iters, 1)}
        rows[str(b)]["copy_out"] = copy_out(engine, b, args.iters)
        print(f"batch {b} at {width}x{height}: host work {rows[str(b)]['median_ms']:.2f} ms a call "
              f"({rows[str(b)]['per_frame_ms']:.2f} ms a frame), p95 {rows[str(b)]['p95_ms']:.2f} ms; "
              f"copying the frames out: {rows[str(b)]['copy_out']['fresh_ms']:.2f} ms into fresh arrays (the "
              f"engine), {rows[str(b)]['copy_out']['reused_ms']:.2f} ms into arrays allocated once")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": f"{width}x{height}", "device": args.device, "torch": torch.__version__,
                       "iters": args.iters, "malloc": args.malloc, "kept_freed_memory": kept, "rows": rows}, f,
                      indent=2)
    return 0


def compare_malloc(args, argv: list[str]) -> int:
    """--malloc both: default and keep, each in a fresh process (a malloc setting cannot be undone), alternating."""
    own = ("--malloc", "--json", "--rounds")  # this run's; the children get their own
    base = [a for i, a in enumerate(argv)
            if not a.startswith(own) and not (i and argv[i - 1] in own)]
    runs: dict[str, list[dict]] = {"default": [], "keep": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in runs:
                out = f"{tmp}/{mode}-{r}.json"
                subprocess.run([sys.executable, __file__, *base, "--malloc", mode, "--json", out], check=True)
                with open(out) as f:
                    runs[mode].append(json.load(f))
    summary = {}
    for b in runs["default"][0]["rows"]:
        med = {mode: statistics.median(run["rows"][b]["median_ms"] for run in rs) for mode, rs in runs.items()}
        flt = {mode: statistics.median(run["rows"][b]["page_faults_per_call"] for run in rs)
               for mode, rs in runs.items()}
        summary[b] = {"default_ms": med["default"], "keep_ms": med["keep"],
                      "speedup": round(med["default"] / med["keep"], 2),
                      "default_page_faults": flt["default"], "keep_page_faults": flt["keep"]}
        print(f"batch {b}: host work {med['default']:.2f} ms a call as glibc frees, {med['keep']:.2f} ms with freed "
              f"memory kept ({summary[b]['speedup']:.2f}x); page faults a call {flt['default']:.0f} -> "
              f"{flt['keep']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python scripts/host_overhead.py " + " ".join(argv),
                       "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "summary": summary, "runs": runs},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
