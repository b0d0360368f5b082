"""Compile the fused kernels' variants side by side before the first capture (fused_norm, fused_epilogue).

Why: Triton compiles a kernel the first time it is launched with a new specialization (its constexprs, and whether
each integer argument is 1 or a multiple of 16 and each pointer 16-byte aligned). One frame at 512x512 with both
options makes 183 launches of 37 variants (14 of the norm's statistics kernel, 21 of its normalize kernel, 2 of the
epilogue; counted on the CPU with this module's recording), and the first capture compiled them one after another:
the batch-1 capture took 16.9 s on the H200 in a start whose Triton cache was empty (0.46 s a variant; one takes
about 0.5 s to compile on this project's CPU machine), against 0.3 s for batch 8 after it. Triton's compiler runs
mostly outside the GIL (scripts/triton_compile_speed.py: median 1.6x on two threads), so warm-up first runs one
eager frame that records every launch of these kernels instead of running it (recording()), then compiles each
distinct variant once on a thread pool with JITFunction.warmup, which compiles without launching (precompile()). The
capture then finds them in Triton's cache. Triton's own AsyncCompileMode (added upstream in 2025) compiles warmups
on a thread pool the same way; this works with releases that lack it too. Whatever goes wrong here is logged and
left to the capture, which compiles what is missing as before: this only moves the compiling earlier.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# At most this many compiler threads (each compile is one CPU core's work; more than the variants is pointless).
MAX_THREADS = 16


@dataclass
class Launch:
    """One recorded kernel launch: what JITFunction.warmup needs to compile the same variant."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict  # the constexprs (every launch site passes them, and only them, by name)


# Per thread: a server with several GPUs warms its engines up on their own threads at once, and only the thread
# that records may skip its launches (another engine's capture must run its kernels).
_local = threading.local()


def record(kernel: Any, grid: tuple, args: tuple, kwargs: dict) -> bool:
    """While this thread is in recording(): keep this launch for precompile() and return True (the caller skips the
    launch); else False (the caller launches)."""
    launches = getattr(_local, "launches", None)
    if launches is None:
        return False
    launches.append(Launch(kernel, grid, args, kwargs))
    return True


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """This thread's launches of the fused kernels inside the block are recorded, not run (their outputs hold
    garbage), into the list it yields."""
    if getattr(_local, "launches", None) is not None:
        raise RuntimeError("kernel launches are being recorded already")
    _local.launches = []
    try:
        yield _local.launches
    finally:
        _local.launches = None


def variant(launch: Launch) -> tuple:
    """What makes Triton compile a launch anew: the kernel, its constexprs' values, and per positional argument the
    dtype and 16-byte alignment of a tensor, or whether an integer is 1, a multiple of 16 or past 32 bits."""
    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("t", v.dtype, v.data_ptr() % 16 == 0)
        if isinstance(v, bool):
            return ("b", v)
        if isinstance(v, int):
            return ("i", v == 1, v % 16 == 0, abs(v) >= 2**31)
        if isinstance(v, float):
            return ("f",)
        return ("?", repr(v))
    return (id(launch.kernel), tuple(spec(a) for a in launch.args), tuple(sorted(launch.kwargs.items())))


def distinct(launches: list[Launch]) -> list[Launch]:
    """One launch of each variant, in the order first seen."""
    seen: dict[tuple, Launch] = {}
    for launch in launches:
        seen.setdefault(variant(launch), launch)
    return list(seen.values())


def precompile(launches: list[Launch], device: torch.device, threads: int) -> tuple[int, float]:
    """Compile each distinct variant once, `threads` at a time; (variants, seconds). Logs and returns early on error."""
    todo = distinct(launches)
    if not todo:
        return 0, 0.0
    threads = max(1, min(threads, MAX_THREADS, len(todo)))
    t0 = time.perf_counter()

    def on_device() -> None:  # Triton compiles for the thread's current device
        if device.type == "cuda":
            torch.cuda.set_device(device)

    def compile_one(launch: Launch) -> None:
        launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)

    try:
        with ThreadPoolExecutor(threads, "turbostream-kernel-compile", initializer=on_device) as pool:
            for _ in pool.map(compile_one, todo):
                pass
    except Exception as exc:  # noqa: BLE001 - the capture compiles whatever is missing, as it always did
        log.warning("compiling the fused kernels ahead of the capture failed (%s: %s); the capture compiles them",
                    type(exc).__name__, exc)
    seconds = time.perf_counter() - t0
    log.info("fused kernels: %d variants compiled in %.1f s on %d threads", len(todo), seconds, threads)
    return len(todo), seconds
