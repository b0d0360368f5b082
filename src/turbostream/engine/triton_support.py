"""Where turbostream's own Triton kernels (--fused-norm, --fused-epilogue) can run, and how the tests run them.

They run on CUDA, and on the CPU only through Triton's interpreter (TRITON_INTERPRET=1), which Triton picks when it
is first imported: tests/conftest.py sets it on machines without CUDA, and the kernel modules are imported on first
use. The tests also compile every kernel ahead of time for NVIDIA GPUs, which needs no GPU.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1): the tests' way to run them."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_problem(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on `device` (None when they can): they need Triton, and CUDA or its interpreter."""
    if torch.device(device).type != "cuda" and not interpreting():
        return "it runs Triton kernels, which need a CUDA GPU"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"it needs Triton, which cannot be imported here ({exc}): pip install triton"
    return None
