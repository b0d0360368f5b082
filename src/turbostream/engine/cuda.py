"""The one place where building an engine changes modules or process-wide state, and why each change is made.

prepare_cuda() rewrites the given components in place (channels_last, fused QKV) and flips global backend flags
(cuDNN autotuning, TF32 matmuls): anything else built on the same components afterwards runs the engine's kernels,
not diffusers' defaults. That is why the parity reference (reference.py) always loads components of its own.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def prepare_cuda(components: Any) -> None:
    """channels_last convs, fused QKV projections, cuDNN autotuning, TF32 matmuls; idempotent (engines may share)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    for module in (components.unet, components.vae):
        module.to(memory_format=torch.channels_last)
    if not getattr(components.unet, "_turbostream_fused", False):
        # One projection GEMM for Q, K and V instead of three: fewer, larger kernels (diffusers' own API).
        components.unet.fuse_qkv_projections()
        components.unet._turbostream_fused = True


def prepare_cpu() -> None:
    """Leave one core to decoding, encoding and the event loop (the CPU path's torch thread pool)."""
    cores = os.cpu_count() or 1
    if cores > 1:
        # With every core in torch's pool, a busy neighbour thread made CPU calls swing from 5 ms to seconds
        # (OpenMP workers waiting on each other).
        torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - 1)))
