"""What --fused-norm and --fused-epilogue share: where they may run, how they fail, and their kernels' compile.

The interpreter the CPU tests run the kernels in is laxer than the compiler (scalar stores, one-element ranges, casts,
names it resolves), so each kernel is also compiled ahead of time with Triton's own ptxas for Ampere, Ada and Hopper,
in every dtype the engine runs, in a subprocess with TRITON_INTERPRET=0: a kernel that would only fail on the GPU
fails here. The kernels themselves: tests/test_group_norm.py and tests/test_epilogue.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from turbostream.cli.options import add_engine_options, engine_config
from turbostream.config import EngineConfig, preset
from turbostream.engine import Engine
from turbostream.errors import UserError

triton = pytest.importorskip("triton", reason="the fused kernels need Triton (pip install triton; Linux x86_64)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# option, its flag, the module whose kernels it loads (and their loader), a test that its surgery left no trace
OPTIONS = {
    "fused_norm": ("--fused-norm", "group_norm", "_kernels",
                   lambda c: not any(type(m).__name__.startswith("FusedGroupNorm") for m in c.unet.modules())),
    "fused_epilogue": ("--fused-epilogue", "epilogue", "_kernel",
                       lambda c: not any(type(m).__name__ == "ConvBiasReLU" for m in c.vae.modules())),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_refused_with_compile_and_where_triton_cannot_run(option, monkeypatch, own_components):
    flag, *_, untouched = OPTIONS[option]
    with pytest.raises(ValueError, match=f"{option} is for the path without compile"):
        EngineConfig(**{option: True}, compile=True)
    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    assert getattr(engine_config(parser.parse_args([flag, "--device", DEVICE])), option)
    assert not getattr(engine_config(parser.parse_args([])), option)
    with pytest.raises(UserError, match=f"{flag} is for the path without --compile"):
        engine_config(parser.parse_args([flag, "--compile"]))
    if DEVICE == "cpu":  # without the interpreter, Triton cannot run on a CPU: said before any weights load
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(UserError, match=f"{flag} cannot run here: it runs Triton kernels, which need a CUDA GPU"):
            engine_config(parser.parse_args([flag, "--device", "cpu"]))
        with pytest.raises(ValueError, match=f"{option} cannot run here: it runs Triton kernels"):
            Engine(preset("test", **{option: True}), own_components)
        assert untouched(own_components)  # nothing changed


@pytest.mark.parametrize("option", OPTIONS)
def test_kernels_that_fail_or_disagree_are_a_clear_error_when_the_engine_is_built(option, monkeypatch, own_components):
    """A GPU whose Triton cannot compile, or a kernel that computes nonsense: said when the engine is built."""
    import importlib

    _, module_name, loader, untouched = OPTIONS[option]
    module = importlib.import_module(f"turbostream.engine.{module_name}")

    class Kernel:
        def __init__(self, run):
            self.run = run

        def __getitem__(self, grid):
            return self.run

    def no_compiler(*args, **kwargs):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_70\nptxas fatal: bad target")

    def nan_out(*args, **kwargs):  # every tensor argument filled with NaN, whatever the kernel writes
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.is_floating_point():
                arg.fill_(float("nan"))

    where = next(own_components.unet.parameters()).device
    for run, message in ((no_compiler, f"Triton could not run its kernels on {where} (RuntimeError: ptxas fatal: "
                                       "bad target)"),
                         (nan_out, "disagree")):
        kernels = (triton, Kernel(run), Kernel(run)) if loader == "_kernels" else (triton, Kernel(run))
        monkeypatch.setattr(module, loader, lambda kernels=kernels: kernels)
        with pytest.raises(ValueError, match=f"{option} cannot run here: .*" + re.escape(message)):
            Engine(preset("test", **{option: True}, device=DEVICE), own_components)
        assert untouched(own_components)


AHEAD_OF_TIME = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from turbostream.engine.epilogue import _kernel
from turbostream.engine.group_norm import _kernels

_, block_stats, normalize = _kernels()
_, bias_act = _kernel()
assert type(block_stats).__name__ == "JITFunction", type(block_stats)  # compiled, not interpreted
plain, shifted = {"SHIFT_A": False, "SHIFT_B": False}, {"SHIFT_A": True, "SHIFT_B": True}
cases = [
    (block_stats, {**plain, "BLOCK_HW": 256, "BLOCK_CPG": 16}),
    (block_stats, {**shifted, "BLOCK_HW": 32, "BLOCK_CPG": 128}),
    (normalize, {**shifted, "SILU": True, "BLOCK_P": 16, "BLOCK_HW": 256, "BLOCK_CPG": 16}),
    (normalize, {**plain, "SILU": False, "BLOCK_P": 1, "BLOCK_HW": 32, "BLOCK_CPG": 128}),
    (bias_act, {"HAS_RES": True, "RELU": True, "BLOCK": 1024}),
    (bias_act, {"HAS_RES": False, "RELU": False, "BLOCK": 1024}),
]
done = []
for arch, dtype in ((90, "fp16"), (90, "bf16"), (80, "fp16"), (89, "fp32")):
    for fn, constexprs in cases:
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name == "part_ptr":
                signature[name] = "*fp32"  # the norm's block statistics are float32 whatever the activations
            elif name.endswith("_ptr"):
                signature[name] = "*" + dtype
            else:
                signature[name] = "fp32" if name == "eps" else "i32"
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", arch, 32))
        assert kernel.asm["cubin"], (fn, arch)
        done.append([fn.__name__, arch, dtype, len(kernel.asm["cubin"])])
print(json.dumps(done))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and run for real")
def test_every_kernel_compiles_to_nvidia_machine_code_without_a_gpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", AHEAD_OF_TIME], env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(built) == 24 and all(size > 1000 for *_, size in built)
    assert {name for name, *_ in built} == {"block_stats", "normalize", "bias_act"}
