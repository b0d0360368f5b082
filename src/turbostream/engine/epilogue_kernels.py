"""The Triton kernel of engine/epilogue.py (imported on first use: Triton picks its interpreter at import time)."""

import triton
import triton.language as tl


@triton.jit
def bias_act(x_ptr, bias_ptr, res_ptr, N, C, STRIDE_C, HAS_RES: tl.constexpr, RELU: tl.constexpr,
             BLOCK: tl.constexpr):
    """In place over a dense (N, C, H, W) tensor of N elements, channels STRIDE_C apart (1: channels_last; H*W:
    NCHW): x = relu(x + bias[c] + res), res and the ReLU if asked, in float32, rounded once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = (offs // STRIDE_C) % C
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        x = tl.maximum(x, 0.0)
    tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)
