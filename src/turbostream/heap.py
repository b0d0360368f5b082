"""Python's cyclic garbage collector kept off the hot path: the warm process's objects frozen out of its reach.

Why: once a model is loaded the process tracks about half a million Python objects (torch, diffusers and the
model's modules). A full (generation 2) collection walks every one of them while holding the GIL, so no thread of
the server runs meanwhile: on this project's 2-core machine one such collection fell in each 20 s of a single
client and took 238-318 ms (`scripts/latency_breakdown.py` reports them), and every stream stalled for it. Python runs
one whenever enough objects have survived since the last, whatever allocates them.

Everything that exists once the engines are warm lives as long as they do, so after warm-up it is moved to the
permanent generation (gc.freeze): later collections walk only what was made since, and what is frozen is still
freed by reference counting as usual. The price: a frozen object caught in a reference cycle that becomes garbage
later is never reclaimed. Those are the objects of the start-up, a fixed amount, which live to the end anyway.

The same moment also keeps freed memory in the process (keep_freed_memory): every frame makes arrays of the same few
sizes (a decoded 512x512 frame, an engine result: 768 KiB each; on the CPU the engine's own tensors), and glibc's
malloc handed such blocks back to the kernel and took them again, each time faulting in all their pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("turbostream.heap")
_lock = threading.Lock()
_holders = 0  # freeze() calls not yet thawed: several servers may share a process (tests)


@dataclass(frozen=True)
class Frozen:
    """What one freeze() did: objects in the permanent generation after it, and its full collection's time."""

    objects: int
    collect_ms: float


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # blocks up to this size come from the heap, whose freed memory is reused
TRIM_THRESHOLD = 512 * 2**20  # free memory at the heap's top kept before any goes back to the kernel


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of unmapping them or trimming the heap;
    True if set, False where the C library is not glibc (macOS, Windows, musl: nothing changes).

    By default a block past a threshold (128 KiB, raised as such blocks are freed) gets its own mapping, and free
    memory at the top of a heap beyond twice that goes back to the kernel. With several frames alive at once, each
    new frame-sized array then faulted in all of its pages again: the CPU engine's host work per batch of 8 at
    512x512 took 68.3 ms and 24,723 page faults as glibc frees by default, 18.4 ms and 307 with this, side by side on
    this project's 2-core machine (benchmarks/malloc-keep-cpu-host-overhead-2026-11-28.json). Fixed values also stop
    glibc adjusting them. The price: memory freed after a peak stays with the process for its next use.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        gnu = ctypes.CDLL(None).gnu_get_libc_version  # glibc only: musl has a mallopt that does nothing
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) where there is no process-wide handle
        return False
    del gnu
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def freeze() -> Frozen:
    """Collect the garbage there is, then freeze every object tracked now (and keep freed memory in the process:
    keep_freed_memory); pair each call with one thaw()."""
    global _holders
    keep_freed_memory()
    with _lock:
        t = time.perf_counter()
        gc.collect()  # garbage frozen now would never be collected
        ms = (time.perf_counter() - t) * 1e3
        gc.freeze()
        _holders += 1
        frozen = Frozen(gc.get_freeze_count(), round(ms, 1))
    log.info("%d objects frozen out of the garbage collector after warm-up (the full collection before it: %.0f ms)",
             frozen.objects, frozen.collect_ms)
    return frozen


def thaw() -> None:
    """Undo one freeze(); the last one gives the frozen objects back to the collector (gc.unfreeze)."""
    global _holders
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0:
            gc.unfreeze()


class PauseLog:
    """Garbage collections while on (a gc.callbacks entry): their count per generation, the longest pause and the
    pauses' total, in ms (a few numbers, however long it is on)."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.max_ms = self.total_ms = 0.0
        self._started: dict[int, float] = {}  # thread id -> start of the collection it runs (one per thread)

    def __enter__(self) -> PauseLog:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        now, me = time.perf_counter(), threading.get_ident()
        if phase == "start":
            self._started[me] = now
        elif me in self._started:
            ms = (now - self._started.pop(me)) * 1e3
            self.counts[info["generation"]] += 1
            self.max_ms, self.total_ms = max(self.max_ms, ms), self.total_ms + ms

    def summary(self) -> dict:
        """{"collections": [gen0, gen1, gen2], "max_pause_ms", "total_pause_ms"}."""
        return {"collections": list(self.counts), "max_pause_ms": round(self.max_ms, 2),
                "total_pause_ms": round(self.total_ms, 2)}
