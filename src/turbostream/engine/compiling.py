"""--compile and --compile-aot: the engine's networks (UNet, TAESD's encoder and decoder, feature reuse's two
UNet forwards) swapped for compiled ones in its FrameMath, before warmup captures graphs around them.

torch.compile (`compile_networks`) compiles at the first eager frames of every bucket and keeps inductor's caches in
a compile cache file (compile_cache.py) so a second start loads them; --compile-aot (`_compile_aot`) records one eager
frame's calls per bucket and builds or loads AOTInductor packages or torch.compile's ahead-of-time artifacts from
them (aot.py). Both run on the engine's thread, from Engine.warmup, and write what they found to engine.stats.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import torch

from .aot import AotCall, AotPackages, DynamoArtifacts, Recorded, ReuseFull, ReusePartial, UNetEps, record_calls
from .aot import device_name as aot_device_name
from .compile_cache import CompileCache, aot_folder, cache_folder, cache_key, device_key

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("turbostream.engine")


def compile_networks(engine: Engine) -> None:
    """torch.compile the UNet and the VAE's encoder/decoder (and reuse's forwards), compiling every bucket now; with
    compile_aot, ahead-of-time packages instead (AOTInductor's that cannot run here become torch.compile's artifacts,
    and if those cannot be built either, torch.compile as above; a format asked for by name that fails raises)."""
    if engine.config.compile_aot:
        fmt = engine.config.aot_format
        if fmt == "aotinductor":
            engine.stats.aot_unavailable = _aot_unavailable(engine)
            if engine.stats.aot_unavailable is not None:
                if not engine.is_cuda:
                    return  # eager frames, as --compile gives on the CPU
                fmt = "dynamo"  # torch.compile's artifacts: no AOTInductor library to load
        try:
            return _compile_aot(engine, fmt)
        except RuntimeError as exc:
            if fmt == engine.config.aot_format:
                raise  # what was asked for cannot be built: said, with the way on
            log.warning("--compile-aot: %s. Running torch.compile (as --compile) instead.", exc)
            engine.stats.aot_format = None
    t0 = time.perf_counter()
    cache = None
    folder = cache_folder(engine.config.compile_cache)
    if folder is not None:
        # Keyed by the GPU's index too (device_key): cuda:0's artifacts do not serve cuda:1, and one file for both
        # would be rewritten by each GPU's engine in turn.
        key = cache_key(engine.config, torch.cuda.get_device_name(engine.device), engine.dtype)
        cache = CompileCache(folder, device_key(key, engine.device))
        cache.load()
    mode = engine.config.torch_compile_mode  # None: torch's default mode
    # False: one static graph per bucket. None (compile_dynamic): the first bucket's graph is static, the second
    # bucket's recompile makes the batch size symbolic, and the later buckets run that graph without compiling.
    dynamic = engine.config.torch_compile_dynamic
    engine.math.unet_call = torch.compile(engine.unet, fullgraph=False, dynamic=dynamic, mode=mode)
    if engine.components.vae_kind == "tiny":
        engine.math.encoder_call = torch.compile(engine.vae.encoder, dynamic=dynamic, mode=mode)
        engine.math.decoder_call = torch.compile(engine.vae.decoder, dynamic=dynamic, mode=mode)
    if engine.reuse is not None:
        # The keep and reuse steps go through the UNet's blocks, not its forward: left uncompiled, a frame that
        # keeps deep features would run slower than a plain compiled one and the partial frames would lose
        # the fusions the full ones have. Each is a graph of its own for dynamo (compile time: about one more
        # UNet for full, the outer blocks for partial).
        engine.math.full_call = torch.compile(engine.reuse.full, fullgraph=False, dynamic=dynamic, mode=mode)
        engine.math.partial_call = torch.compile(engine.reuse.partial, fullgraph=False, dynamic=dynamic, mode=mode)
    # Compile every bucket and step mode now (eager runs on the compiled modules), so no call on the hot path
    # compiles and the timing below is the whole compile cost. A first start spends minutes here: say where it is.
    buckets = engine.config.buckets
    for i, b in enumerate(buckets, start=1):
        t_bucket = time.perf_counter()
        log.info("torch.compile: batch size %d (%d of %d)...", b, i, len(buckets))
        engine._default_frames(b)
        torch.cuda.synchronize()
        log.info("torch.compile: batch size %d ready in %.1f s", b, time.perf_counter() - t_bucket)
    engine.stats.compile_s = time.perf_counter() - t0
    # A hit only if the file held everything compiled above; else (a miss, or a partial hit: the file from
    # another diffusers, say) it is written anew with what this start compiled, so the next one is a hit.
    engine.compile_cache_state = "off" if cache is None else cache.refresh()
    engine.stats.compile_cache_hit = engine.compile_cache_state == "hit"
    log.info("torch.compile: %.1f s for buckets %s (compile cache: %s)", engine.stats.compile_s,
             engine.config.buckets, engine.compile_cache_state)

def _aot_unavailable(engine: Engine) -> str | None:
    """None if AOTInductor packages load and run in this environment (aot_check.py: a child process finds out,
    once per compile cache folder); else why not, logged with what the engine does instead."""
    # Imported here, not at the top: `python -m turbostream.engine.aot_check` (the check's child) imports this
    # package first, and runpy warns when the module it runs is already imported.
    from . import aot_check

    folder = cache_folder(engine.config.compile_cache)
    verdict = aot_check.check(engine.device, engine.dtype, folder)
    if verdict.works:
        log.info("AOTInductor: %s (%s)", verdict.detail, "checked at an earlier start" if verdict.cached
                 else f"checked in a child process in {verdict.seconds:.1f} s")
        return None
    log.warning("--compile-aot: AOTInductor packages cannot be used here: %s. Running %s instead. %s",
                verdict.detail, "torch.compile's ahead-of-time artifacts (--aot-format dynamo)" if engine.is_cuda
                else "eager frames",
                "The compile cache folder keeps this verdict for this torch, GPU and compiler (delete its "
                "aotinductor-check-*.json to check again)." if verdict.kept else
                "(Not kept: the next start checks again.)" if folder is not None else "")
    return verdict.detail

def _compile_aot(engine: Engine, fmt: str) -> None:
    """--compile-aot: the networks through AOTInductor packages (fmt "aotinductor") or torch.compile's
    ahead-of-time artifacts ("dynamo"), loaded from the compile cache or built into it.

    One eager frame per bucket and step mode records what each network is called with (shapes, dtypes, layouts)
    and returns; each package is built from those inputs and checked against those outputs (engine/aot.py).
    """
    t0 = time.perf_counter()
    engine.stats.aot_format = fmt
    # name -> (the module exported, how FrameMath calls it)
    networks: dict[str, tuple[torch.nn.Module, str]] = {"unet": (UNetEps(engine.unet), "unet")}
    hooked: dict[str, torch.nn.Module] = {"unet": engine.unet}  # what record_calls hooks: the modules FrameMath calls
    if engine.components.vae_kind == "tiny":
        for name, module in (("encoder", engine.vae.encoder), ("decoder", engine.vae.decoder)):
            networks[name], hooked[name] = (module, "plain"), module
    if engine.reuse is not None:
        # The keep and reuse steps call FeatureReuse's forwards; record them through the modules that export them.
        for name, module, kind in (("reuse_full", ReuseFull(engine.reuse), "full"),
                                   ("reuse_partial", ReusePartial(engine.reuse), "partial")):
            networks[name], hooked[name] = (module, kind), module
        engine.math.full_call = AotCall("reuse_full", [], hooked["reuse_full"], "full")
        engine.math.partial_call = AotCall("reuse_partial", [], hooked["reuse_partial"], "partial")
    recorded: dict[str, dict[int, Recorded]] = {name: {} for name in networks}
    for b in engine.config.buckets:
        with record_calls(hooked) as calls:
            engine._default_frames(b)
        for name, rec in calls.items():
            recorded[name][b] = rec
    record_s = time.perf_counter() - t0
    folder = kernels = None
    writable = False
    root = cache_folder(engine.config.compile_cache)
    if root is not None:
        config = dataclasses.replace(engine.config, aot_format=fmt)
        key = cache_key(config, aot_device_name(engine.device), engine.dtype)
        if fmt == "dynamo":
            # The artifacts keep the CUDA device index inductor wrote into their code (AOTInductor's packages are
            # handed it at load, so GPUs of one model share those).
            key = device_key(key, engine.device)
        folder, writable = aot_folder(root, key)
        if fmt == "dynamo":
            # The artifacts hold the traced graphs and inductor's code; its compiled kernels (Triton's, or the
            # CPU's C++) are inductor's cache entries, kept in a compile cache file as --compile keeps them.
            kernels = CompileCache(root, key)
            kernels.load()
    kind = DynamoArtifacts if fmt == "dynamo" else AotPackages
    packages = kind(folder, device=engine.device, dtype=engine.dtype, dynamic=engine.config.compile_dynamic,
                    mode=engine.config.compile_mode, read_only=not writable)
    packages.expected = len(networks) * len(packages.plan(engine.config.buckets))
    calls = {name: packages.prepare(name, module, recorded[name], engine.config.buckets, kind)
             for name, (module, kind) in networks.items()}
    engine.math.unet_call = calls["unet"]
    if "encoder" in calls:
        engine.math.encoder_call, engine.math.decoder_call = calls["encoder"], calls["decoder"]
    if "reuse_full" in calls:
        engine.math.full_call, engine.math.partial_call = calls["reuse_full"], calls["reuse_partial"]
    if engine.is_cuda:
        torch.cuda.synchronize()
    engine.stats.compile_s = time.perf_counter() - t0
    engine.stats.aot_packages_built, engine.stats.aot_packages_loaded = packages.built, packages.loaded
    engine.stats.compile_cache_hit = packages.built == 0
    if kernels is not None and writable:
        # Also when nothing was built: a kernels file that was missing or corrupt is written anew from what this
        # start compiled or took from inductor's caches (a corrupt one is removed if that is nothing). A
        # read-only folder is only read.
        kernels.refresh()
    # Where the packages are, for `turbostream warmup` to say: kept in the cache folder; loaded from a read-only
    # one (any built are for this start only); built for this start only (no folder could be made); or nowhere.
    hit = "hit" if engine.stats.compile_cache_hit else "miss"
    if root is None:
        engine.aot_cache, state = "off", "off"
    elif folder is None:
        engine.aot_cache, state = "unwritable", "off (its folder cannot be written)"
    elif not writable:
        engine.aot_cache, state = "read-only", f"{hit} (read-only folder)"
    else:
        engine.aot_cache, state = "kept", hit
    engine.compile_cache_state = state
    log.info("%s: %.1f s for buckets %s: eager frames recorded in %.1f s, %d packages loaded and checked "
             "(%.1f s), %d built (%.1f s); compile cache: %s", packages.label, engine.stats.compile_s,
             engine.config.buckets, record_s, packages.loaded, packages.load_s, packages.built, packages.build_s,
             state)
