"""`turbostream warmup`: build and warm the engine once, then exit, so later starts with the same options are fast.

What it fills: the compile cache (`--compile`: torch's artifacts; `--compile-aot`: AOTInductor packages) and Triton's
kernel cache (`--fused-norm`, `--fused-epilogue`). Run it once per machine (or per cache volume) before the first
`serve`, e.g. as a deploy step, so the server's own first start does not spend minutes compiling. It says what it
found in the compile cache and whether what it built was kept there (not where the folder is read-only or cannot be
made: then it was built for that run only).
"""

from __future__ import annotations

import argparse

from ..config import AOT_FORMAT_NAMES
from .options import add_engine_options, build_engine


def add_parser(sub) -> None:
    p = sub.add_parser("warmup", help="build and warm the engine once (compile caches filled), then exit")
    add_engine_options(p, stream_options=True)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    engine = build_engine(args)
    stats = engine.warmup()
    cfg = engine.config
    what = f"warm-up {stats.warmup_s:.1f} s on {engine.device}"
    if cfg.compile and cfg.compile_aot and stats.aot_unavailable:
        what += f": AOTInductor packages cannot be used here ({stats.aot_unavailable}); "
    # What the engine's compile found in the compile cache and did with it (unset when it did not compile).
    state = engine.compile_cache_state
    if cfg.compile and cfg.compile_aot and stats.aot_format:
        names = AOT_FORMAT_NAMES[stats.aot_format]
        built, loaded = stats.aot_packages_built, stats.aot_packages_loaded
        where = engine.aot_cache
        if where == "read-only":  # loaded from it, nothing written
            done = (f"{built} {names} built{' for this start only' if built else ''}, {loaded} loaded from the "
                    "read-only compile cache")
        elif where == "unwritable":
            done = f"{built} {names} built for this start only (the compile cache folder cannot be written)"
        else:
            cache = "the compile cache" if where == "kept" else "nothing (--no-compile-cache)"
            done = f"{built} {names} built, {loaded} loaded, kept in {cache}"
        what += f"{'' if stats.aot_unavailable else ': '}{done}"
    elif cfg.compile and cfg.compile_aot and stats.aot_unavailable:
        what += f"torch.compile {stats.compile_s:.1f} s instead" if engine.is_cuda else "eager frames instead"
    elif cfg.compile and engine.is_cuda:
        what += f": torch.compile {stats.compile_s:.1f} s, compile cache {state}"
    if stats.kernel_variants:
        what += f"; {stats.kernel_variants} fused-kernel variants compiled in {stats.kernel_compile_s:.1f} s"
    print(f"turbostream warmup: {what}")
    return 0
