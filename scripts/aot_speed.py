#!/usr/bin/env python3
"""--compile-aot's frames against the same engine without it: side by side in one process, on the same inputs.

Both engines share one set of components; calls alternate between them (ABAB...), so a machine that slows down in
the middle (other work on the cores, clocks) slows both. The AOT engine loads its packages from --compile-cache (or
builds them there first: minutes), and its warm-up split (recording, loading, building) is reported. Frames are
compared too (uint8 levels), since the packages are a different compilation of the same math.

    python scripts/aot_speed.py --model random --device cpu --size 128 --compile-dynamic --compile-cache DIR \
        --json benchmarks/aot-speed-cpu-random-128.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--buckets", default="1,2,4,8")
    ap.add_argument("--batches", default="1,4", help="batch sizes timed (default: %(default)s)")
    ap.add_argument("--compile-dynamic", action="store_true")
    ap.add_argument("--compile-cache", default="", help="folder of the packages (default: the compile cache's)")
    ap.add_argument("--iters", type=int, default=10, help="timed calls per engine and batch (default: %(default)s)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    from turbostream.config import EngineConfig, StreamParams
    from turbostream.engine import Engine
    from turbostream.models import load_components

    buckets = tuple(int(b) for b in args.buckets.split(","))
    base = dict(model=args.model, device=args.device, width=args.size, height=args.size, buckets=buckets,
                compile_dynamic=args.compile_dynamic, compile_cache=args.compile_cache)
    comps = load_components(args.model, device=args.device)
    eager = Engine(EngineConfig(**base), comps)
    ahead = Engine(EngineConfig(**base, compile=True, compile_aot=True), comps)
    warm = {}
    for name, engine in (("eager", eager), ("aot", ahead)):
        stats = engine.warmup()
        warm[name] = {"warmup_s": round(stats.warmup_s, 2), "compile_s": round(stats.compile_s, 2),
                      "packages_built": stats.aot_packages_built, "packages_loaded": stats.aot_packages_loaded}
    sync = torch.cuda.synchronize if engine.is_cuda else (lambda: None)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(max(buckets))]
    params = StreamParams("a watercolor painting of a city street", seed=42)
    result = {"command": ["python", "scripts/aot_speed.py", *(argv if argv is not None else sys.argv[1:])],
              "device": torch.cuda.get_device_name() if engine.is_cuda else "cpu", "torch": torch.__version__,
              "warmup": warm, "batches": {}, "date": time.strftime("%Y-%m-%d")}
    for b in (int(x) for x in args.batches.split(",")):
        inputs = (frames[:b], [params] * b)
        outs = {name: engine.run(*inputs) for name, engine in (("eager", eager), ("aot", ahead))}  # burn-in
        times = {"eager": [], "aot": []}
        for _ in range(args.iters):
            for name, engine in (("eager", eager), ("aot", ahead)):
                sync()
                t0 = time.perf_counter()
                engine.run(*inputs)
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        diff = max(int(np.abs(a.astype(np.int16) - c.astype(np.int16)).max()) for a, c in zip(outs["eager"],
                                                                                               outs["aot"]))
        result["batches"][str(b)] = {"eager_median_ms": round(med["eager"], 2), "aot_median_ms": round(med["aot"], 2),
                                     "speedup": round(med["eager"] / med["aot"], 3), "max_level_diff": diff,
                                     "iters": args.iters}
        print(f"batch {b}: eager {med['eager']:.1f} ms, aot {med['aot']:.1f} ms "
              f"({med['eager'] / med['aot']:.2f}x), frames differ by at most {diff} levels", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
