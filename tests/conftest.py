"""Shared fixtures: tiny random models are built once per session (importing diffusers alone takes seconds)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from turbostream.config import EngineConfig, preset

if not torch.cuda.is_available():
    # Without a GPU, the Triton kernels (--fused-norm, --fused-epilogue) run in Triton's CPU interpreter. It is
    # chosen when triton is first imported, so it is set here, before any test module can import it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the GPU machine: scripts/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_components():
    """tiny-random components on the CPU, fp32, TAESD; shared by every engine in the session."""
    from turbostream.models import load_components

    return load_components("tiny-random", device="cpu", vae="tiny")


@pytest.fixture(scope="session")
def tiny_full_vae_components(tiny_components):
    """tiny-random with the full AutoencoderKL instead of TAESD (same UNet and text encoder)."""
    from turbostream.models import load_vae

    return dataclasses.replace(tiny_components, vae=load_vae("tiny-random", "full"), vae_kind="full")


@pytest.fixture
def own_components():
    """tiny-random components (TAESD) of one test alone, on CUDA where there is one: for tests of options that change
    module classes (the fused kernels), which must not touch the session's shared components."""
    from turbostream.models import load_components

    return load_components("tiny-random", device="cuda" if torch.cuda.is_available() else "cpu", vae="tiny")


@pytest.fixture
def make_engine(tiny_components):
    """Build a CPU engine on the shared tiny components: make_engine(**EngineConfig overrides)."""
    from turbostream.engine import Engine

    def make(components=None, **overrides) -> "Engine":
        cfg: EngineConfig = preset("test", **overrides)
        return Engine(cfg, components or tiny_components)

    return make


@pytest.fixture
def engine(tiny_components):
    """A CPU engine on the shared tiny components with the test preset (64 px, buckets 1, 2, 4)."""
    from turbostream.engine import Engine

    return Engine(preset("test"), tiny_components)


@pytest.fixture
def frame_rng():
    return np.random.default_rng(1234)
