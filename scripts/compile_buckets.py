#!/usr/bin/env python3
"""What --compile-dynamic saves at start-up: the engine's torch.compile of every bucket, static and dynamic, timed.

Each mode runs in a process of its own with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), so neither finds the
other's graphs, and reports the seconds Engine._compile took and how many graphs dynamo compiled. On the CPU it times
inductor's C++ back end (the GPU's is Triton), so the ratio, not the seconds, is what carries over.

    python scripts/compile_buckets.py --model tiny-random --device cpu --size 64 --buckets 1,2,4,8 [--json out.json]
    python scripts/compile_buckets.py --model random --device cuda --size 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONE = r"""
import json, sys, time, torch
from torch._dynamo.utils import counters
from turbostream.config import EngineConfig
from turbostream.engine import Engine
model, device, size, buckets, dynamic = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
if device == "cpu":
    torch.cuda.synchronize = lambda *a: None  # Engine._compile waits for the GPU at the end; nothing to wait for
engine = Engine(EngineConfig(model=model, device=device, width=size, height=size, compile=True, compile_cache=None,
                             compile_dynamic=dynamic, buckets=tuple(int(b) for b in buckets.split(","))))
t0 = time.perf_counter()
with torch.inference_mode():
    engine._compile()
print(json.dumps({"compile_s": round(time.perf_counter() - t0, 1), "graphs": counters["stats"]["unique_graphs"]}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--buckets", default="1,2,4,8")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    result = {"command": "python scripts/compile_buckets.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": args.model, "device": args.device, "size": args.size, "buckets": args.buckets,
              "date": time.strftime("%Y-%m-%d")}
    for name, dynamic in (("static", "0"), ("dynamic", "1")):
        with tempfile.TemporaryDirectory(prefix="turbostream-inductor-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(ROOT / "src")}
            proc = subprocess.run([sys.executable, "-c", ONE, args.model, args.device, str(args.size), args.buckets,
                                   dynamic], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:<8} compile {result[name]['compile_s']:7.1f} s, {result[name]['graphs']} graphs")
    result["static_over_dynamic"] = round(result["static"]["compile_s"] / result["dynamic"]["compile_s"], 2)
    print(f"static / dynamic: {result['static_over_dynamic']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
