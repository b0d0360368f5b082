"""fused_time_proj (engine/time_proj.py): the resnets' time-embedding projections as one stacked GEMM.

On the CPU: the same frames as without it, diffusers' eps from the UNet, feature reuse unchanged, undone for engines
sharing components, a UNet it does not fit refused clearly, and the option reaching the config, CLI and compile cache
key. (tests/test_prompt_kv.py runs compiled networks with it and prompt_kv together.) Its speed is measured on a GPU
by scripts/engine_rows.py (rows fused_time_proj, lean_conditioning, compile_conditioning).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from turbostream.config import EngineConfig, StreamParams, preset
from turbostream.engine import Engine
from turbostream.engine.compile_cache import cache_key
from turbostream.engine.time_proj import ProjectionSlice, set_fused_time_proj


@pytest.fixture
def fresh_components():
    """tiny-random components of this test alone (the option changes the UNet's modules)."""
    from turbostream.models import load_components

    return load_components("tiny-random", device="cpu", vae="tiny")


def _frames(n: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def _diff(a, b) -> int:
    return int(np.abs(np.stack(a).astype(np.int16) - np.stack(b).astype(np.int16)).max())


def _eps(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.inference_mode():
        return unet(x, torch.tensor([999.0, 250.0]), encoder_hidden_states=emb, return_dict=False)[0]


def test_the_unet_computes_diffusers_eps_and_the_change_is_undone(fresh_components):
    unet = fresh_components.unet
    theirs, names = _eps(unet), set(unet.state_dict())
    resnets = [m for m in unet.modules() if getattr(m, "time_emb_proj", None) is not None]
    assert set_fused_time_proj(unet, True) == len(resnets) > 0
    assert set_fused_time_proj(unet, True) == len(resnets)  # idempotent
    assert all(type(r.time_emb_proj) is ProjectionSlice and r.skip_time_act for r in resnets)
    channels = sum(r.time_emb_proj.out_features for r in resnets)
    assert unet.time_embedding.stacked_proj.weight.shape == (channels, unet.time_embedding.linear_2.out_features)
    # Each output is the same dot product as the resnet's own Linear: fp32 on the CPU agrees to rounding.
    torch.testing.assert_close(_eps(unet), theirs, atol=1e-5, rtol=1e-5)
    # The original parameters are kept (and the state dict has one more Linear); undone, nothing of it is left.
    assert set(unet.state_dict()) == names | {"time_embedding.stacked_proj.weight", "time_embedding.stacked_proj.bias"}
    assert set_fused_time_proj(unet, False) == 0
    assert set(unet.state_dict()) == names and type(unet.time_embedding).__name__ == "TimestepEmbedding"
    assert all(type(r.time_emb_proj) is nn.Linear and not r.skip_time_act for r in resnets)
    assert torch.equal(_eps(unet), theirs)


def test_engine_frames_are_those_without_it_and_a_plain_engine_undoes_it(fresh_components):
    frames = _frames(3)
    params = [StreamParams(f"prompt {i}", seed=i) for i in range(3)]
    plain = Engine(preset("test"), fresh_components).run(frames, params)
    got = Engine(preset("test", fused_time_proj=True), fresh_components).run(frames, params)
    assert type(fresh_components.unet.time_embedding).__name__ == "StackedTimestepEmbedding"
    assert _diff(got, plain) <= 1
    again = Engine(preset("test"), fresh_components).run(frames, params)
    assert type(fresh_components.unet.time_embedding).__name__ == "TimestepEmbedding"
    assert np.array_equal(np.stack(again), np.stack(plain))


def test_feature_reuse_full_and_partial_frames_are_those_without_it(fresh_components):
    frames = _frames(4, seed=11)

    def frames_of(**options):
        engine = Engine(preset("test", feature_reuse=True, **options), fresh_components)
        out = [engine.run([f], [StreamParams("a", reuse=3)], streams=["s"])[0] for f in frames]
        assert engine.stats.reuse_partial_batches == 2  # full, partial, partial, full
        return out

    assert _diff(frames_of(fused_time_proj=True), frames_of()) <= 1


def test_a_unet_that_transforms_its_time_embedding_is_refused_clearly(fresh_components):
    unet = fresh_components.unet
    unet.time_embed_act = nn.SiLU()  # what some UNets apply to the embedding before the blocks
    processors = dict(unet.attn_processors)
    with pytest.raises(ValueError, match="fused_time_proj: this UNet adds to or transforms its time embedding"):
        Engine(preset("test", fused_time_proj=True, attention="math"), fresh_components)
    assert unet.attn_processors == processors  # checked before the engine changed any module
    unet.time_embed_act = None
    unet.down_blocks[0].resnets[0].nonlinearity = nn.GELU()
    with pytest.raises(ValueError, match="do not all apply one activation"):
        set_fused_time_proj(unet, True)
    assert type(unet.time_embedding).__name__ == "TimestepEmbedding"  # refused before anything changed


def test_option_reaches_config_cli_and_compile_cache_key():
    from turbostream.cli.options import add_engine_options, engine_config

    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    assert engine_config(parser.parse_args(["--device", "cpu", "--fused-time-proj"])).fused_time_proj is True
    assert engine_config(parser.parse_args(["--device", "cpu"])).fused_time_proj is False
    off = cache_key(EngineConfig(), "GPU", torch.float16)
    assert "fused_time_proj" not in off
    assert cache_key(EngineConfig(fused_time_proj=True), "GPU", torch.float16) == {**off, "fused_time_proj": True}
