"""Shared fixtures: tiny random models are built once per session (importing diffusers alone takes seconds)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from turbostream.config import EngineConfig, StreamParams, preset

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
def own_components_fp32(own_components, monkeypatch):
    """own_components in float32 with TF32 off (on CUDA the default is float16, and cuDNN rounds float32 convs to
    TF32 by default): for comparisons that allow float32 rounding only."""
    own_components.unet.float()
    own_components.vae.float()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 matmuls are exact unless asked otherwise
    return own_components


@pytest.fixture
def cuda_option_parity(monkeypatch):
    """On CUDA: parity(vae, **options) runs tiny-random at 128x128 in CUDA graphs three ways (float32 without TF32:
    the reference R; float16 as it is: P; float16 with the EngineConfig options: E) and returns the project's parity
    verdict on E (turbostream.parity: each of mean/p99/max of |E-R| within max(2 x that of |P-R|, 2 levels)), with
    the statistics. A float16 option is judged by how far it moves from float32 next to how far float16 does,
    not by a fixed number of levels from P: through random weights one rounding can move a level or two more."""
    from turbostream.engine import Engine
    from turbostream.models import load_components
    from turbostream.parity import parity_stats, parity_verdict

    rng = np.random.default_rng(8)
    frames = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(3)]
    params = [StreamParams(p, seed=i) for i, p in enumerate(("a", "b", "c"))]

    def outputs(vae: str, dtype: str, **options) -> list[np.ndarray]:
        comps = load_components("tiny-random", device="cuda", vae=vae, dtype=getattr(torch, dtype))
        engine = Engine(preset("test", device="cuda", dtype=dtype, width=128, height=128, buckets=(1, 4), vae=vae,
                               **options), comps)
        engine.warmup()
        out = engine.run(frames, params)
        assert engine.stats.graph_replays >= 1
        return out

    def parity(vae: str, **options) -> dict:
        with monkeypatch.context() as m:
            m.setattr(torch.backends.cudnn, "allow_tf32", False)
            ref = outputs(vae, "float32")
        e16, p16 = parity_stats(outputs(vae, "float16", **options), ref), parity_stats(outputs(vae, "float16"), ref)
        return {**parity_verdict(e16, p16), "e16": e16, "p16": p16}

    return parity


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
