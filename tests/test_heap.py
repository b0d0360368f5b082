"""heap.py: the warm process's objects frozen out of the garbage collector, in pairs, and its pauses logged."""

from __future__ import annotations

import gc
import json
import platform
import subprocess
import sys
import weakref

import pytest

from turbostream import heap


class _Node:
    pass


def test_freeze_collects_the_garbage_first_and_thaws_in_pairs():
    assert heap._holders == 0  # every server and run of the other tests thawed what it froze
    cycle = _Node()
    cycle.me = cycle  # garbage only the cyclic collector frees
    gone = weakref.ref(cycle)
    del cycle
    first = heap.freeze()
    assert gone() is None  # collected before the freeze: never stuck in the permanent generation
    # (objects frozen may still be freed by reference counting: the count only goes down from there)
    assert first.objects > 10_000 and 0 < gc.get_freeze_count() <= first.objects and first.collect_ms >= 0
    second = heap.freeze()  # a second holder (another server in the process) freezes what is new
    assert second.objects > 10_000
    heap.thaw()
    assert gc.get_freeze_count() > 10_000  # the other holder still has it frozen
    heap.thaw()
    assert gc.get_freeze_count() == 0 and heap._holders == 0  # the last thaw hands everything back


def test_an_unpaired_thaw_does_nothing():
    assert heap._holders == 0
    heap.thaw()
    assert heap._holders == 0 and gc.get_freeze_count() == 0


def test_frozen_objects_are_out_of_a_full_collections_reach():
    """What freezing is for: a full collection walks only what was made after the freeze."""
    with heap.PauseLog() as before:
        gc.collect()
    heap.freeze()
    try:
        survivors = [[_Node() for _ in range(10)] for _ in range(100)]  # new objects: still collected as usual
        with heap.PauseLog() as after:
            gc.collect()
        assert after.counts == [0, 0, 1] and before.counts == [0, 0, 1]
        assert len(gc.get_objects(generation=2)) < gc.get_freeze_count()
        assert survivors
    finally:
        heap.thaw()


def test_pause_log_counts_collections_by_generation_and_times_them():
    with heap.PauseLog() as log:
        gc.collect(0)
        gc.collect(2)
    summary = log.summary()
    assert summary["collections"][0] >= 1 and summary["collections"][2] >= 1
    assert summary["max_pause_ms"] >= 0 and summary["total_pause_ms"] >= summary["max_pause_ms"]
    assert log._callback not in gc.callbacks  # removed on exit


def test_freeze_keeps_freed_memory_in_the_process(monkeypatch):
    """serve and run freeze after warm-up; that is also when glibc is told to keep freed blocks."""
    called = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: called.append(1) or True)
    heap.freeze()
    heap.thaw()
    assert called == [1]


_FRAMES_ALLOCATED_AND_FREED = """
import ctypes, json, resource, sys
from turbostream import heap
kept = heap.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 512 * 512 * 3  # one 512x512 RGB frame
faults = []
for _ in range(10):  # a batch of 8 frames made, written, and let go, as each engine call's outputs are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(8)]
    for block in blocks:
        libc.memset(block, 1, size)
    for block in reversed(blocks):
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="not glibc: its malloc thresholds are what is tested")
def test_kept_freed_memory_spares_the_page_faults_of_fresh_frames():
    """Batches of eight 512x512 frames allocated, written and freed, in fresh processes: as glibc frees by default,
    the heap's top is trimmed after each batch, so every batch faults all its pages (8 x 192) in again; with freed
    memory kept, only the first does. (The engine's own host work, measured: scripts/host_overhead.py --malloc both,
    whose default side varies with the order blocks are freed in; this pattern is the one that always trims.)"""
    import resource  # POSIX only, as glibc is

    pages = 8 * 512 * 512 * 3 // resource.getpagesize()
    runs = {}
    for mode in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", _FRAMES_ALLOCATED_AND_FREED, mode], check=True,
                              capture_output=True, text=True, timeout=120)
        runs[mode] = json.loads(done.stdout)
    assert runs["keep"]["kept"] is True and runs["default"]["kept"] is False
    assert all(f >= pages * 0.9 for f in runs["default"]["faults"][2:]), runs  # trimmed and faulted in, every batch
    assert sum(runs["keep"]["faults"][1:]) <= 0.1 * pages, runs  # the first batch's pages, reused ever after
