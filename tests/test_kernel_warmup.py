"""The fused kernels compiled ahead of the first capture (engine/kernel_warmup.py): recording launches instead of
running them, one compile per variant on a thread pool, errors left to the capture.

On the CPU the kernels run in Triton's interpreter, which compiles nothing, so the compile itself is timed on a GPU
(`bash scripts/gpu_check.sh starts`); here a stand-in kernel says what would be compiled, on which thread."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from turbostream.config import StreamParams, preset
from turbostream.engine import Engine, kernel_warmup
from turbostream.engine import engine as engine_module
from turbostream.engine.epilogue import bias_act
from turbostream.engine.group_norm import group_norm
from turbostream.engine.kernel_warmup import (
    Launch,
    distinct,
    precompile,
    record,
    recording,
)

pytest.importorskip("triton", reason="the fused kernels need Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class StandIn:
    """A kernel with JITFunction.warmup's signature: records what it was asked to compile, and where."""

    def __init__(self, fail: bool = False) -> None:
        self.compiled: list[tuple] = []
        self.fail = fail

    def warmup(self, *args, grid, **kwargs):
        if self.fail:
            raise RuntimeError("ptxas fatal: no such target")
        self.compiled.append((args, grid, kwargs, threading.current_thread().name))


def test_launches_are_recorded_only_inside_the_block_and_only_on_its_thread():
    kernel = StandIn()
    assert record(kernel, (1,), (), {}) is False  # outside: the caller launches
    seen_elsewhere = []
    with recording() as launches:
        assert record(kernel, (4,), (1, 2), {"BLOCK": 8}) is True
        # Another engine warming up on another thread (a server with several GPUs) must launch its kernels.
        other = threading.Thread(target=lambda: seen_elsewhere.append(record(kernel, (1,), (), {})))
        other.start()
        other.join()
        with pytest.raises(RuntimeError, match="recorded already"), recording():
            pass
    assert seen_elsewhere == [False]
    assert [(la.grid, la.args, la.kwargs) for la in launches] == [((4,), (1, 2), {"BLOCK": 8})]
    assert record(kernel, (1,), (), {}) is False


def test_one_launch_per_variant_as_triton_specializes():
    a, b = StandIn(), StandIn()
    x = torch.zeros(64)
    launches = [
        Launch(a, (1,), (x, 32, 1.0), {"BLOCK": 64}),
        Launch(a, (9,), (torch.ones(64), 48, 2.0), {"BLOCK": 64}),  # same dtypes, alignment, multiple of 16: same
        Launch(a, (1,), (x, 33, 1.0), {"BLOCK": 64}),  # 33 is no multiple of 16: another variant
        Launch(a, (1,), (x, 1, 1.0), {"BLOCK": 64}),  # 1 is specialized on its own
        Launch(a, (1,), (x[1:], 32, 1.0), {"BLOCK": 64}),  # a pointer 4 bytes past alignment
        Launch(a, (1,), (x.half(), 32, 1.0), {"BLOCK": 64}),  # another dtype
        Launch(a, (1,), (x, 32, 1.0), {"BLOCK": 128}),  # another constexpr
        Launch(b, (1,), (x, 32, 1.0), {"BLOCK": 64}),  # another kernel
    ]
    assert [id(la) for la in distinct(launches)] == [id(la) for la in [launches[0], *launches[2:]]]


def test_precompile_compiles_each_variant_once_on_worker_threads():
    kernel = StandIn()
    launches = [Launch(kernel, (k,), (torch.zeros(8), 16 * (k + 1)), {"N": k % 3}) for k in range(9)]
    count, seconds = precompile(launches, torch.device("cpu"), threads=4)
    assert count == 3 and seconds >= 0
    assert sorted(kw["N"] for _, _, kw, _ in kernel.compiled) == [0, 1, 2]
    assert all(name.startswith("turbostream-kernel-compile") for *_, name in kernel.compiled)
    assert {grid for _, grid, _, _ in kernel.compiled} == {(0,), (1,), (2,)}  # the first launch of each variant
    assert precompile([], torch.device("cpu"), threads=4) == (0, 0.0)


def test_a_failed_compile_is_logged_and_left_to_the_capture(caplog):
    with caplog.at_level(logging.WARNING, logger="turbostream.engine.kernel_warmup"):
        count, _ = precompile([Launch(StandIn(fail=True), (1,), (), {})], torch.device("cpu"), threads=2)
    assert count == 1
    assert "the capture compiles them" in caplog.text and "ptxas fatal" in caplog.text


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA the kernels would launch; the recording path is the same")
def test_the_fused_kernels_record_their_launches_and_skip_them():
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(64), torch.zeros(64)
    with recording() as launches:
        group_norm(x, 32, w, b, 1e-5, silu=True)
        conv_out = torch.randn(2, 8, 4, 4)
        before = conv_out.clone()
        assert bias_act(conv_out, torch.ones(8), relu=True) is conv_out
    names = [la.kernel.fn.__name__ if hasattr(la.kernel, "fn") else la.kernel.__name__ for la in launches]
    assert names == ["block_stats", "normalize", "bias_act"]
    assert torch.equal(conv_out, before)  # recorded, not run: the bias and ReLU were not applied
    assert launches[1].kwargs["SILU"] is True and launches[2].kwargs == {"HAS_RES": False, "RELU": True,
                                                                          "BLOCK": 1024}


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU engine's fused path, the interpreter standing in for CUDA")
def test_engine_warmup_compiles_the_variants_of_one_frame_ahead(own_components, monkeypatch):
    """The engine's step before the capture, with the interpreter taken for a compiler: one eager frame's launches
    go to precompile with the configured threads, and the frames after are the same as without it."""
    calls = []
    monkeypatch.setattr(engine_module, "interpreting", lambda: False)
    monkeypatch.setattr(engine_module, "precompile",
                        lambda launches, device, threads: calls.append((len(distinct(launches)), threads)) or (7, 0.5))
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    params = [StreamParams("a watercolor", strength=0.5, steps=2, seed=1)]
    engine = Engine(preset("test", buckets=(1,), fused_norm=True, fused_epilogue=True, kernel_compile_threads=3),
                    own_components)
    engine._compile_fused_kernels()  # what warmup() does before capturing on CUDA
    assert len(calls) == 1 and calls[0][0] >= 4 and calls[0][1] == 3  # norms and epilogues of several shapes
    assert (engine.stats.kernel_variants, engine.stats.kernel_compile_s) == (7, 0.5)
    with_precompile = engine.run(frames, params)
    fresh = Engine(preset("test", buckets=(1,), fused_norm=True, fused_epilogue=True), own_components)
    assert np.array_equal(with_precompile[0], fresh.run(frames, params)[0])  # nothing recorded stayed behind
    calls.clear()
    serial = Engine(preset("test", buckets=(1,), fused_norm=True, kernel_compile_threads=1), own_components)
    serial._compile_fused_kernels()
    plain = Engine(preset("test", buckets=(1,)), own_components)
    plain._compile_fused_kernels()
    assert calls == []  # one thread asks for none ahead; without fused kernels there is nothing to compile
    assert kernel_warmup.record(object(), (1,), (), {}) is False


@pytest.mark.gpu
def test_on_cuda_the_variants_compile_ahead_and_the_frames_are_the_same(own_components, caplog):
    """On a GPU, warm-up compiles the fused kernels' variants on threads before the capture, without falling back; an
    engine that lets the capture compile them (one thread) gives the same frames, bit for bit (the same kernels)."""
    caplog.set_level(logging.INFO, logger="turbostream.engine.kernel_warmup")
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)]
    params = [StreamParams("a watercolor", strength=0.5, steps=2, seed=1)]
    out = {}
    for threads in (4, 1):
        engine = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1,), fused_norm=True,
                               fused_epilogue=True, kernel_compile_threads=threads), own_components)
        engine.warmup()
        assert (engine.stats.kernel_variants > 0) is (threads > 1)
        out[threads] = engine.run(frames, params)[0]
    assert "variants compiled in" in caplog.text and "failed" not in caplog.text  # compiled ahead, not left over
    assert np.array_equal(out[4], out[1])
