"""Where turbostream's own Triton kernels (--fused-norm, --fused-epilogue) can run, and how the tests run them.

They run on CUDA, and on the CPU only through Triton's interpreter (TRITON_INTERPRET=1), which Triton picks when it
is first imported: tests/conftest.py sets it on machines without CUDA, and the kernel modules are imported on first
use. The tests also compile every kernel ahead of time for NVIDIA GPUs, which needs no GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable

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


def check_against(device: torch.device | str, run: Callable[[], torch.Tensor], want: torch.Tensor, what: str) -> None:
    """ValueError (clear) unless Triton can run here and run() (which compiles and runs the kernels) gives `want`
    within 0.05: said when the engine is built, not as a Triton compile error in the middle of warm-up. `what`
    names the PyTorch ops `want` comes from."""
    if problem := triton_problem(device):
        raise ValueError(problem)
    try:
        got = run().float()
    except Exception as exc:  # noqa: BLE001 - whatever Triton raises (no compiler for this GPU, a driver too old...)
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise ValueError(f"Triton could not run its kernels on {device} ({type(exc).__name__}: {last})") from exc
    err = float((got - want.float()).abs().max())
    if not err <= 0.05:  # fp16 rounding is below 0.01 in the engines' checks; NaN fails too
        raise ValueError(f"its kernels disagree with {what} on {device} (max difference {err:.3g})")
