"""`turbostream bench`: options, and the checks made before minutes of model loading (the bench itself: bench.py)."""

from __future__ import annotations

import argparse
import os
import shlex
import stat
from pathlib import Path

from ..config import BENCH_COMPILE_BUCKETS
from ..errors import UserError, path_stat
from ..io.sinks import ensure_writable_folder
from .options import add_engine_options, buckets, engine_config


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="side-by-side benchmark: diffusers pipeline vs this engine (eager, graphs)")
    add_engine_options(p, stream_options=False, lora=False)
    p.add_argument("--iters", type=int, default=30, help="timed calls per measurement (default: %(default)s)")
    p.add_argument("--burn-in", type=int, default=5, help="untimed calls before each measurement (default: %(default)s)")
    p.add_argument("--compile-buckets", type=buckets, default=BENCH_COMPILE_BUCKETS, metavar="1,4,8",
                   help="batch sizes compiled and captured with --compile (each costs a compile; default: 1,4,8)")
    p.add_argument("--skip-diffusers", action="store_true", help="leave out the diffusers pipeline baseline")
    p.add_argument("--skip-streamdiffusion", action="store_true",
                   help="leave out StreamDiffusion's rows (timed on CUDA where the streamdiffusion package is "
                        "installed)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = engine_config(args)  # --device cuda without a GPU, bad sizes: said before anything loads
    if cfg.compile:
        from ..models import resolve_device

        if resolve_device(cfg.device).type != "cuda":  # its phase (d) came after (c), inside CUDA graphs: nothing ran
            flag = "--compile-aot" if cfg.compile_aot else "--compile"
            raise UserError(f"bench {flag} times compiled CUDA graphs: it needs a CUDA device (on the CPU, "
                            "scripts/compile_buckets.py times torch.compile)")
    if args.iters < 1 or args.burn_in < 0:
        raise UserError(f"--iters must be at least 1 and --burn-in at least 0, got {args.iters} and {args.burn_in}")
    if args.json:
        path = Path(args.json).expanduser()  # --json=~/b.json: the shell leaves ~ after = as it is
        args.json = str(path)
        found = path_stat(path, f"--json {args.json}")
        if found is not None and stat.S_ISDIR(found.st_mode):
            raise UserError(f"--json {args.json} is a folder; give a file name")
        ensure_writable_folder(path.parent if str(path.parent) else Path("."), args.json)  # SinkError: a UserError
        if found is not None and not os.access(path, os.W_OK):
            raise UserError(f"--json {args.json}: permission denied")
    from ..bench import BenchOptions, run_bench

    options = BenchOptions(iters=args.iters, burn_in=args.burn_in, compile_buckets=args.compile_buckets,
                           skip_diffusers=args.skip_diffusers, skip_streamdiffusion=args.skip_streamdiffusion,
                           json=args.json, command=shlex.join(["turbostream", *args.argv]))
    return run_bench(cfg, options)
