#!/usr/bin/env python3
"""What --compile-dynamic saves at start-up: the engine's torch.compile of every bucket, static and dynamic, timed.

Each mode runs in a process of its own with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), so neither finds the
other's graphs, and reports the seconds Engine._compile took and how many graphs dynamo compiled. On the CPU it times
inductor's C++ back end (the GPU's is Triton), so the ratio, not the seconds, is what carries over.

--warm: what the compile cache (engine/compile_cache.py) leaves of it. Each mode's first process saves its artifacts
to a compile cache folder, and a second process, with an empty inductor cache of its own, loads them and compiles
again: the time a second start still spends (dynamo traces the Python code again; inductor's and AOTAutograd's work
comes from the artifacts). Each run also reports torch's compile phases that took longest (compile_times: nested, so
they overlap) and inductor's cache counters.

--trace-only: torch.compile with dynamo's "eager" back end (no AOTAutograd, no inductor): what tracing the engine's
modules costs per bucket, which a second start pays whatever the compile cache holds. Dynamo runs on the CPU in
either case, so these seconds carry over to a GPU machine's host, scaled by its CPU's speed.

    python scripts/compile_buckets.py --model tiny-random --device cpu --size 64 --buckets 1,2,4,8 [--json out.json]
    python scripts/compile_buckets.py --model random --device cuda --size 512 [--warm]
    python scripts/compile_buckets.py --model random --device cpu --size 128 --trace-only
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
from torch._dynamo.utils import compile_times, counters
from turbostream.config import EngineConfig
from turbostream.engine import Engine
model, device, size, buckets, dynamic = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
cache = sys.argv[6] or None  # the compile cache folder, or none
if sys.argv[7] == "1":  # --trace-only: dynamo's eager back end, nothing compiled below it
    _compile = torch.compile
    torch.compile = lambda model, **kw: _compile(model, **{**kw, "mode": None, "backend": "eager"})
if device == "cpu":
    torch.cuda.synchronize = lambda *a: None  # Engine._compile waits for the GPU at the end; nothing to wait for
    torch.cuda.get_device_name = lambda *a: "cpu"  # the compile cache's key names the GPU
engine = Engine(EngineConfig(model=model, device=device, width=size, height=size, compile=True, compile_cache=cache,
                             compile_dynamic=dynamic, buckets=tuple(int(b) for b in buckets.split(","))))
t0 = time.perf_counter()
with torch.inference_mode():
    engine._compile()
names, seconds = compile_times(repr="csv", aggregate=True)  # seconds per compiler phase (nested: they overlap)
phases = sorted(((n, float(s)) for n, s in zip(names, seconds)), key=lambda p: -p[1])[:12]
print(json.dumps({"compile_s": round(time.perf_counter() - t0, 1), "graphs": counters["stats"]["unique_graphs"],
                  "dynamo_s": round(float(dict(zip(names, seconds)).get("_compile.compile_inner", 0.0)), 1),
                  "compile_cache_hit": engine.stats.compile_cache_hit,
                  "phases_s": {n: round(s, 1) for n, s in phases},
                  "inductor": {k: v for k, v in counters["inductor"].items() if "cache" in k}}))
"""


def one_process(args: argparse.Namespace, dynamic: str, cache: str) -> dict | None:
    """Engine._compile in a new process with an empty inductor cache: its seconds, graphs, and compile cache hit."""
    with tempfile.TemporaryDirectory(prefix="turbostream-inductor-") as inductor:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor, "TRITON_CACHE_DIR": str(Path(inductor) / "triton"),
               "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.run([sys.executable, "-c", ONE, args.model, args.device, str(args.size), args.buckets,
                               dynamic, cache, "1" if args.trace_only else "0"], capture_output=True, text=True,
                              env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--buckets", default="1,2,4,8")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--modes", choices=("static", "dynamic", "both"), default="both",
                    help="compile one static graph per bucket, --compile-dynamic's two, or both (default)")
    ap.add_argument("--warm", action="store_true", help="then compile each mode again in a new process from the "
                    "compile cache the first one saved (an empty inductor cache): what a second start spends")
    ap.add_argument("--trace-only", action="store_true",
                    help="dynamo's eager back end: the tracing alone, which a second start pays again")
    args = ap.parse_args(argv)
    if args.trace_only and args.warm:
        ap.error("--trace-only compiles nothing to keep: leave out --warm")
    result = {"trace_only": args.trace_only,
              "command": "python scripts/compile_buckets.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": args.model, "device": args.device, "size": args.size, "buckets": args.buckets,
              "date": time.strftime("%Y-%m-%d")}
    for name, dynamic in (("static", "0"), ("dynamic", "1")):
        if args.modes not in ("both", name):
            continue
        with tempfile.TemporaryDirectory(prefix="turbostream-compile-cache-") as folder:
            runs = ("cold", "warm") if args.warm else ("cold",)
            for run in runs:
                outcome = one_process(args, dynamic, folder if args.warm else "")
                if outcome is None:
                    return 1
                if run == "cold":
                    result[name] = outcome
                else:
                    result[name]["warm"] = outcome
                print(f"{name:<8} {run} compile {outcome['compile_s']:7.1f} s (dynamo {outcome['dynamo_s']:.1f} s), "
                      f"{outcome['graphs']} graphs"
                      + (f", compile cache {'hit' if outcome['compile_cache_hit'] else 'not hit'}" if args.warm
                         else ""))
    if args.modes == "both":
        result["static_over_dynamic"] = round(result["static"]["compile_s"] / result["dynamic"]["compile_s"], 2)
        print(f"static / dynamic: {result['static_over_dynamic']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
