"""`turbostream warmup`: build and warm the engine once, then exit, so later starts with the same options are fast.

What it fills: the compile cache (`--compile`: torch's artifacts; `--compile-aot`: AOTInductor packages) and Triton's
kernel cache (`--fused-norm`, `--fused-epilogue`). Run it once per machine (or per cache volume) before the first
`serve`, e.g. as a deploy step, so the server's own first start does not spend minutes compiling.
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
    if cfg.compile and cfg.compile_aot and stats.aot_format:
        cache = "the compile cache" if cfg.compile_cache is not None else "nothing (--no-compile-cache)"
        what += (f"{'' if stats.aot_unavailable else ': '}{stats.aot_packages_built} "
                 f"{AOT_FORMAT_NAMES[stats.aot_format]} built, {stats.aot_packages_loaded} loaded, kept in {cache}")
    elif cfg.compile and cfg.compile_aot and stats.aot_unavailable:
        what += f"torch.compile {stats.compile_s:.1f} s instead" if engine.is_cuda else "eager frames instead"
    elif cfg.compile and engine.is_cuda:
        what += f": torch.compile {stats.compile_s:.1f} s, compile cache {'hit' if stats.compile_cache_hit else 'miss'}"
    if stats.kernel_variants:
        what += f"; {stats.kernel_variants} fused-kernel variants compiled in {stats.kernel_compile_s:.1f} s"
    print(f"turbostream warmup: {what}")
    return 0
