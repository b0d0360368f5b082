#!/usr/bin/env python3
"""How long the fused norm's Triton kernel takes to compile, variant by variant, one after another and on threads.

A start whose Triton cache lacks the kernels compiles every variant the UNet's shapes ask for, one after another, in
the first capture (about 13 s on the H200). This compiles 8 variants of the normalize kernel ahead of time for an
NVIDIA GPU (no GPU needed: Triton's compiler and ptxas run on the CPU), each in a fresh cache, first one after
another, then on a thread pool, so it shows whether compiling the variants side by side would shorten that start
(it does where Triton compiles outside the GIL).

    python scripts/triton_compile_speed.py --threads 2 [--arch 90] [--json out.json]
    python scripts/triton_compile_speed.py --count-at 512     # also: how many variants one frame needs

--count-at SIZE builds a `random` engine (the full SD-Turbo architecture) of that size on the CPU with both fused
options and records one frame's kernel launches without running them (engine/kernel_warmup.py), then counts the
distinct variants: what a start with an empty Triton cache compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def count_variants(size: int) -> dict:
    """One size x size frame of a `random` engine with both fused options, its launches recorded on the CPU (in a
    subprocess: the launch sites need Triton's interpreter, which Triton picks at import)."""
    code = f"""
import json, sys, torch
from turbostream.config import EngineConfig
from turbostream.engine import Engine
from turbostream.engine.kernel_warmup import distinct
e = Engine(EngineConfig(model="random", device="cpu", width={size}, height={size}, fused_norm=True,
                        fused_epilogue=True, buckets=(1,)))
with torch.inference_mode():
    launches = e._fused_launches()  # what warm-up records before compiling ahead
by = {{}}
for launch in distinct(launches):
    name = getattr(launch.kernel, "fn", launch.kernel).__name__
    by[name] = by.get(name, 0) + 1
print(json.dumps({{"size": {size}, "launches": len(launches), "variants": sum(by.values()), "by_kernel": by}}))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    counted = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"one {size}x{size} frame: {counted['launches']} launches, {counted['variants']} variants "
          f"{counted['by_kernel']}")
    return counted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads (default: the CPU count)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default: 90, Hopper)")
    ap.add_argument("--count-at", type=int, metavar="SIZE", help="also count the variants of one SIZE x SIZE frame")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    counted = count_variants(args.count_at) if args.count_at else None
    os.environ["TRITON_INTERPRET"] = "0"  # compiled, whatever the caller's environment says
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from turbostream.engine.group_norm import _kernels

    _, _, normalize = _kernels()
    variants = [{"SHIFT_A": True, "SHIFT_B": True, "SILU": True, "BLOCK_P": 16, "BLOCK_HW": hw, "BLOCK_CPG": cpg}
                for hw in (32, 64, 128, 256) for cpg in (16, 32)]
    signature = {}
    for name in normalize.arg_names:
        if name in variants[0]:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name == "part_ptr" else "*fp16"
        else:
            signature[name] = "fp32" if name == "eps" else "i32"

    def compile_one(constexprs: dict) -> float:
        t0 = time.perf_counter()
        triton.compile(ASTSource(fn=normalize, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", args.arch, 32))
        return time.perf_counter() - t0

    result = {"triton": triton.__version__, "arch": args.arch, "variants": len(variants), "thread_count": args.threads,
              "one_frame": counted}
    with tempfile.TemporaryDirectory() as cache:  # burn-in: the first compile of a process pays one-time set-up
        triton.knobs.cache.dir = cache
        compile_one({**variants[0], "BLOCK_P": 32})
    for how in ("one after another", "on threads"):
        with tempfile.TemporaryDirectory() as cache:  # a cold cache each time: every variant really compiles
            triton.knobs.cache.dir = cache
            t0 = time.perf_counter()
            if how == "on threads":
                with ThreadPoolExecutor(args.threads) as pool:
                    each = list(pool.map(compile_one, variants))
            else:
                each = [compile_one(v) for v in variants]
            result[how] = {"wall_s": round(time.perf_counter() - t0, 2), "sum_s": round(sum(each), 2)}
        print(f"{how:<18} {result[how]['wall_s']:6.2f} s for {len(variants)} variants")
    result["speedup"] = round(result["one after another"]["wall_s"] / result["on threads"]["wall_s"], 2)
    print(f"threads ({args.threads}): {result['speedup']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
