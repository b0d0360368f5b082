#!/usr/bin/env python3
"""Start `turbostream serve` twice with the same options and a compile cache of its own; time each start to /healthz.

The first start fills the compile cache (with --compile: minutes on a GPU), the second should load it: the log says
`compile cache: hit`. Triton's kernel cache is a fresh one too (TRITON_CACHE_DIR, shared by the two starts), so the
first start pays what a first start on a new machine pays for --fused-norm's and --fused-epilogue's kernels and the
second shows whether Triton's cache takes it away. Inductor's cache is a fresh one as well, so the first start with
--compile compiles everything; --only-compile-cache gives the second start fresh kernel caches of its own, so only the
compile cache file carries over, as into a new container. Writes both times, each start's engine warm-up (from its log),
whether it hit the compile cache, and the command to --json.

    python scripts/warm_start.py --json out.json -- --model random --device cuda --size 512 --compile
    python scripts/warm_start.py --json out.json -- --model random --device cuda --size 512 --fused-norm \
        --fused-epilogue
    python scripts/warm_start.py -- --model tiny-random --device cpu --size 64     # a dry run of the script
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadtest  # spawn_server, wait_healthy, stop_server: the load test's conventions


def one_start(serve_args: list[str], log_path: Path, timeout: float) -> dict:
    """Seconds from launch to /healthz 200, and what the log said of the compile cache."""
    t0 = time.monotonic()
    proc, port = loadtest.spawn_server(serve_args, "127.0.0.1", 1, log_path)
    try:
        loadtest.wait_healthy(f"http://127.0.0.1:{port}", timeout, proc, log_path)
        ready_s = time.monotonic() - t0
    finally:
        status = loadtest.stop_server(proc)
    text = log_path.read_text(errors="replace")
    warmup = re.search(r"warmup ([\d.]+) s \(compile ([\d.]+) s\)", text)
    ahead = re.search(r"fused kernels: (\d+) variants compiled in ([\d.]+) s on (\d+) threads", text)
    aot = re.search(r"(AOTInductor|torch.compile AOT): [\d.]+ s for buckets .*: eager frames recorded in ([\d.]+) s, "
                    r"(\d+) packages loaded and checked \(([\d.]+) s\), (\d+) built \(([\d.]+) s\)", text)
    return {"ready_s": round(ready_s, 1), "exit_status": status, "compile_cache_hit": "compile cache: hit" in text,
            "warmup_s": float(warmup[1]) if warmup else None, "compile_s": float(warmup[2]) if warmup else None,
            "kernel_variants": int(ahead[1]) if ahead else 0, "kernel_compile_s": float(ahead[2]) if ahead else None,
            "kernel_compile_threads": int(ahead[3]) if ahead else None,
            **({"aot": {"format": "aotinductor" if aot[1] == "AOTInductor" else "dynamo", "record_s": float(aot[2]),
                        "loaded": int(aot[3]), "load_s": float(aot[4]), "built": int(aot[5]),
                        "build_s": float(aot[6])}} if aot else {})}


def main(argv: list[str] | None = None) -> int:
    argv, serve_args = loadtest.split_serve_args(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    ap.add_argument("--timeout", type=float, default=600, help="seconds each start may take (default: %(default)s)")
    ap.add_argument("--cache", metavar="DIR", help="compile cache folder (default: a new temporary one)")
    ap.add_argument("--triton-cache", metavar="DIR", help="Triton's and inductor's kernel cache folder (default: a "
                    "new temporary one; 'keep': the ones this machine has)")
    ap.add_argument("--logs", metavar="DIR", help="keep each start's server log here (start-1.log, start-2.log); "
                    "the JSON is also written after the first start, so a run cut short keeps what it measured")
    ap.add_argument("--only-compile-cache", action="store_true",
                    help="give the second start fresh Triton and inductor caches too, so only turbostream's compile "
                         "cache file carries over (a new container with the cache folder mounted)")
    args = ap.parse_args(argv)
    if args.only_compile_cache and args.triton_cache:
        ap.error("--only-compile-cache gives each start fresh kernel caches; it takes no --triton-cache")
    with tempfile.TemporaryDirectory(prefix="turbostream-warm-") as tmp:
        cache = args.cache or str(Path(tmp) / "compile")
        run_args = [*serve_args, "--compile-cache", cache]
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        starts = []
        for k in (1, 2):
            if args.triton_cache != "keep":  # the servers are children: they inherit these
                kernels = Path(args.triton_cache) if args.triton_cache else Path(tmp) / (
                    f"kernels-{k}" if args.only_compile_cache else "kernels")
                os.environ["TRITON_CACHE_DIR"] = str(kernels / "triton")
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(kernels / "inductor")
            start = one_start(run_args, logs / f"start-{k}.log", args.timeout)
            starts.append(start)
            print(f"start {k}: /healthz 200 after {start['ready_s']} s (engine warm-up {start['warmup_s']} s), "
                  f"compile cache {'hit' if start['compile_cache_hit'] else 'not hit'}, exit {start['exit_status']}",
                  flush=True)
            result = {"command": ["turbostream", "serve", *run_args], "first": starts[0],
                      "second": starts[1] if len(starts) > 1 else None,
                      "kernel_caches": args.triton_cache or ("fresh for each start" if args.only_compile_cache
                                                             else "fresh, shared by both starts"),
                      "date": time.strftime("%Y-%m-%d")}
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(s["exit_status"] == 0 for s in starts) else 1


if __name__ == "__main__":
    sys.exit(main())
