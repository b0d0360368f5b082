"""turbostream's Triton kernels compile to NVIDIA machine code, for Ampere, Ada and Hopper, without a GPU.

The interpreter the CPU tests run them in is laxer than the compiler (scalar stores, one-element ranges, casts,
names it resolves), so each kernel is also compiled ahead of time with Triton's own ptxas, in every dtype the engine
runs, in a subprocess with TRITON_INTERPRET=0: a kernel that would only fail on the GPU fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install triton; Linux x86_64 wheels)")

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
