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
"""

from __future__ import annotations

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


def freeze() -> Frozen:
    """Collect the garbage there is, then freeze every object tracked now; pair each call with one thaw()."""
    global _holders
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
