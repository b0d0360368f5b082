"""The UNet's conditioning work done once instead of in every evaluation: --prompt-kv and --fused-time-proj.

prompt_kv (engine/prompt_kv.py): each prompt's cross-attention keys and values computed once, read by the UNet.
fused_time_proj (engine/time_proj.py): the resnets' time-embedding projections as one stacked GEMM.

On the CPU, for each: the output is the engine's without the option (the same math), diffusers' eps from the UNet
(prompt_kv in the QKV-fused layout the CUDA path uses too), transitions (prompt_kv), feature reuse and compiled
networks work with it, it is undone for engines sharing components, what it does not fit is refused clearly, its
cache is bounded (prompt_kv), and it reaches the config, the CLI and the compile cache key. Their speed is measured
on a GPU by scripts/engine_rows.py (rows prompt_kv, lean_prompt_kv, compile_prompt_kv, fused_time_proj,
lean_conditioning, compile_conditioning); scripts/op_count.py counts what they remove (tests/test_op_count.py).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from turbostream.cli import main
from turbostream.config import EngineConfig, StreamParams, preset
from turbostream.engine import Engine
from turbostream.engine.attention import TurboAttnProcessor, set_attention
from turbostream.engine.compile_cache import cache_key
from turbostream.engine.prompt_kv import PromptKV
from turbostream.engine.time_proj import ProjectionSlice, set_fused_time_proj


@pytest.fixture
def fresh_components():
    """tiny-random components of this test alone (the options change the UNet's modules)."""
    from turbostream.models import load_components

    return load_components("tiny-random", device="cpu", vae="tiny")


def _frames(n: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def _diff(a, b) -> int:
    return int(np.abs(np.stack(a).astype(np.int16) - np.stack(b).astype(np.int16)).max())


def _reuse_frames(components, **options) -> list[np.ndarray]:
    """A reuse-3 stream's frames: full, partial, partial, full."""
    engine = Engine(preset("test", feature_reuse=True, **options), components)
    out = [engine.run([f], [StreamParams("a", reuse=3)], streams=["s"])[0] for f in _frames(4, seed=11)]
    assert engine.stats.reuse_partial_batches == 2
    return out


# ---------------------------------------------------------------------------------------------------- prompt_kv

def _unet(unet, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return unet(x, torch.tensor([999.0, 500.0]), encoder_hidden_states=cond, return_dict=False)[0]


def test_prompt_kv_engine_output_is_the_output_without_it(fresh_components):
    frames = _frames(3)
    params = [StreamParams(f"prompt {i}", seed=i) for i in range(3)]
    plain = Engine(preset("test"), fresh_components).run(frames, params)
    engine = Engine(preset("test", prompt_kv=True), fresh_components)
    got = engine.run(frames, params)
    # tiny-random's 4 cross-attention layers, keys and values of 32, 32, 32 and 64 channels side by side.
    assert tuple(engine._emb.shape) == (4, 77, 2 * (32 + 32 + 32 + 64))
    assert engine.stats.kv_projections == 3
    # The same projections, computed per prompt instead of per batch: fp32 on the CPU gives the same frames.
    assert _diff(got, plain) <= 1
    procs = [p for p in fresh_components.unet.attn_processors.values()]
    assert sum(p.kv is not None for p in procs) == 4 and all(isinstance(p, TurboAttnProcessor) for p in procs)
    # Undone by the next engine without it (engines may share components).
    again = Engine(preset("test"), fresh_components).run(frames, params)
    assert all(p.kv is None for p in fresh_components.unet.attn_processors.values())
    assert np.array_equal(np.stack(again), np.stack(plain))


def test_prompt_kv_in_the_qkv_fused_layout_gives_diffusers_eps_and_embeddings_still_do(fresh_components):
    """The CUDA path fuses QKV (prepare_cuda): keys and values come from to_kv. A UNet with prompt_kv's processors
    computes diffusers' eps from the conditioning, and from plain embeddings too (the bench's diffusers pipeline and
    the parity reference may run on the same modules)."""
    unet = fresh_components.unet
    unet.fuse_qkv_projections()
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, fresh_components.text_dim, generator=g)
    theirs = _unet(unet, emb, x)  # diffusers' FusedAttnProcessor2_0
    kv = PromptKV(unet, fresh_components.text_dim)
    set_attention(unet, "auto", skip_unit_rescale=False, prompt_kv=kv)
    cond = kv.project(emb)
    assert cond.shape == (2, 77, kv.width)
    torch.testing.assert_close(_unet(unet, cond, x), theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(_unet(unet, emb, x), theirs)


def test_a_unet_whose_keys_and_values_are_as_wide_as_its_embeddings_is_refused(fresh_components):
    width = PromptKV(fresh_components.unet, fresh_components.text_dim).width
    with pytest.raises(ValueError, match="as wide as its embeddings"):
        PromptKV(fresh_components.unet, width)


def test_prompt_kv_cache_is_bounded_and_a_kept_prompt_is_not_projected_again(fresh_components):
    engine = Engine(preset("test", prompt_kv=True, prompt_kv_cache_size=2), fresh_components)
    frame = _frames(1)
    for i in range(5):
        engine.run(frame, [StreamParams(f"prompt {i}")])
    assert engine.prompt_kv_cache_len == 2 and engine.stats.kv_projections == 5
    engine.run(frame, [StreamParams("prompt 4")])
    engine.run(frame, [StreamParams("prompt 4")])
    assert engine.stats.kv_projections == 5
    assert engine.prompt_kv_cache_len == 2
    # Blends are kept apart (as their embeddings are): a mix slider dragged through many weights projects each
    # blend once and evicts no prompt's keys and values.
    for w in (0.2, 0.4, 0.6, 0.8, 0.4):
        engine.run(frame, [StreamParams((("prompt 0", w), ("prompt 1", 1 - w)))])
    assert engine.stats.kv_projections == 9 and len(engine._kv_blends) == 4
    engine.run(frame, [StreamParams("prompt 4")])
    assert engine.stats.kv_projections == 9 and engine.prompt_kv_cache_len == 2
    # Without the option nothing is kept there.
    plain = Engine(preset("test"), fresh_components)
    plain.run(frame, [StreamParams("prompt 0")])
    assert plain.prompt_kv_cache_len == 0 and plain.stats.kv_projections == 0


def test_a_transition_blends_keys_and_values_as_it_blends_embeddings(fresh_components):
    """The projections are linear, so halfway through a prompt transition the frame is the one without prompt_kv."""
    frame = _frames(1, seed=3)

    def halfway(**options) -> np.ndarray:
        engine = Engine(preset("test", **options), fresh_components)
        now = [0.0]
        engine.clock = lambda: now[0]
        engine.run(frame, [StreamParams("a red fox", transition_s=2.0)], streams=["s"])
        now[0] = 10.0
        engine.run(frame, [StreamParams("a blue whale", transition_s=2.0)], streams=["s"])
        now[0] = 11.0
        return engine.run(frame, [StreamParams("a blue whale", transition_s=2.0)], streams=["s"])

    plain, with_kv = halfway(), halfway(prompt_kv=True)
    assert _diff(with_kv, plain) <= 1
    # and the transition moved the frame: it is neither end
    end = Engine(preset("test", prompt_kv=True), fresh_components).run(frame, [StreamParams("a blue whale")])
    assert _diff(with_kv, end) > 0


def test_prompt_kv_feature_reuse_full_and_partial_frames_are_those_without_it(fresh_components):
    assert _diff(_reuse_frames(fresh_components, prompt_kv=True), _reuse_frames(fresh_components)) <= 1


@pytest.mark.parametrize("fmt", ["dynamo", "aotinductor"])
def test_compiled_networks_read_the_conditioning(tmp_path, fresh_components, fmt):
    """--compile-aot's networks (torch.compile's ahead-of-time artifacts, or torch.export + AOTInductor packages) of
    a UNet whose processors read the conditioning and whose resnets read the stacked time projections: within a
    level of the engine without either option."""
    frames = _frames(2, seed=5)
    params = [StreamParams("a", seed=1), StreamParams("b", seed=2)]
    config = dict(model="tiny-random", device="cpu", width=64, height=64, buckets=(2,), compile_cache=str(tmp_path))
    plain = Engine(EngineConfig(**config), fresh_components)
    plain.warmup()
    expected = plain.run(frames, params)
    compiled = Engine(EngineConfig(**config, prompt_kv=True, fused_time_proj=True, compile=True, compile_aot=True,
                                   aot_format=fmt), fresh_components)
    compiled.warmup()
    assert compiled.stats.aot_packages_built == 3 and compiled.stats.aot_format == fmt  # UNet, TAESD's two halves
    unet = fresh_components.unet
    assert sum(p.kv is not None for p in unet.attn_processors.values()) == 4
    assert type(unet.time_embedding).__name__ == "StackedTimestepEmbedding"
    assert compiled._emb.shape[-1] == compiled.prompt_kv.width  # what the packages were built for and read
    assert _diff(compiled.run(frames, params), expected) <= 1


def test_prompt_kv_reaches_config_cli_and_compile_cache_key(capsys):
    from turbostream.cli.options import add_engine_options, engine_config

    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    assert engine_config(parser.parse_args(["--device", "cpu", "--prompt-kv"])).prompt_kv is True
    assert engine_config(parser.parse_args(["--device", "cpu"])).prompt_kv is False
    off = cache_key(EngineConfig(), "GPU", torch.float16)
    assert "prompt_kv" not in off  # keys (and cache files) of configurations without it are unchanged
    assert cache_key(EngineConfig(prompt_kv=True), "GPU", torch.float16) == {**off, "prompt_kv": True}
    with pytest.raises(ValueError, match="cache sizes"):
        EngineConfig(prompt_kv=True, prompt_kv_cache_size=0)
    for command in ("serve", "run", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--prompt-kv" in capsys.readouterr().out


def test_a_layer_that_normalizes_the_embeddings_first_is_refused(fresh_components):
    """Its keys and values would not be linear in the embeddings, which transitions rely on."""
    from diffusers.models.attention_processor import Attention

    name, attn = next((n, m) for n, m in fresh_components.unet.named_modules()
                      if isinstance(m, Attention) and m.is_cross_attention)
    attn.norm_cross = torch.nn.LayerNorm(fresh_components.text_dim)
    with pytest.raises(ValueError, match=f"prompt_kv: cross-attention {name} normalizes the embeddings first"):
        Engine(preset("test", prompt_kv=True), fresh_components)


# ---------------------------------------------------------------------------------------------------- fused_time_proj


def _eps(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.inference_mode():
        return unet(x, torch.tensor([999.0, 250.0]), encoder_hidden_states=emb, return_dict=False)[0]


def test_fused_time_proj_unet_computes_diffusers_eps_and_is_undone(fresh_components):
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


def test_the_stacked_weights_follow_the_resnets_and_outlive_an_undo(fresh_components):
    """Weights loaded after the option was applied reach the stacked Linear when it is applied again; undoing it
    keeps the Linear alive (CUDA graphs captured with it read its memory), and applying again reuses it."""
    unet = fresh_components.unet
    set_fused_time_proj(unet, True)
    stacked = unet.time_embedding.stacked_proj
    proj = unet.down_blocks[0].resnets[0].time_emb_proj
    with torch.no_grad():
        proj.weight.mul_(3.0)  # as a weight reload would change it
    set_fused_time_proj(unet, True)  # an engine built now
    assert unet.time_embedding.stacked_proj is stacked
    torch.testing.assert_close(stacked.weight[: proj.out_features], proj.weight, atol=0, rtol=0)
    fused = _eps(unet)
    set_fused_time_proj(unet, False)
    torch.testing.assert_close(fused, _eps(unet), atol=1e-5, rtol=1e-5)  # the new weights, both ways
    assert stacked.weight.abs().sum() > 0  # still allocated, still filled
    set_fused_time_proj(unet, True)
    assert unet.time_embedding.stacked_proj is stacked


def test_fused_time_proj_engine_frames_are_those_without_it_and_a_plain_engine_undoes_it(fresh_components):
    frames = _frames(3)
    params = [StreamParams(f"prompt {i}", seed=i) for i in range(3)]
    plain = Engine(preset("test"), fresh_components).run(frames, params)
    got = Engine(preset("test", fused_time_proj=True), fresh_components).run(frames, params)
    assert type(fresh_components.unet.time_embedding).__name__ == "StackedTimestepEmbedding"
    assert _diff(got, plain) <= 1
    again = Engine(preset("test"), fresh_components).run(frames, params)
    assert type(fresh_components.unet.time_embedding).__name__ == "TimestepEmbedding"
    assert np.array_equal(np.stack(again), np.stack(plain))


def test_fused_time_proj_feature_reuse_full_and_partial_frames_are_those_without_it(fresh_components):
    assert _diff(_reuse_frames(fresh_components, fused_time_proj=True), _reuse_frames(fresh_components)) <= 1


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


def test_fused_time_proj_reaches_config_cli_and_compile_cache_key():
    from turbostream.cli.options import add_engine_options, engine_config

    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    assert engine_config(parser.parse_args(["--device", "cpu", "--fused-time-proj"])).fused_time_proj is True
    assert engine_config(parser.parse_args(["--device", "cpu"])).fused_time_proj is False
    off = cache_key(EngineConfig(), "GPU", torch.float16)
    assert "fused_time_proj" not in off
    assert cache_key(EngineConfig(fused_time_proj=True), "GPU", torch.float16) == {**off, "fused_time_proj": True}


def test_an_engine_whose_shared_modules_were_reset_refuses_eager_frames_clearly(fresh_components):
    """Engines built one after another share components; the one built last sets the modules. An earlier engine with
    other options would run them (with prompt_kv, fail on a shape): it says so instead."""
    frame = _frames(1)
    first = Engine(preset("test", prompt_kv=True, fused_time_proj=True), fresh_components)
    first.run(frame, [StreamParams("a")])
    second = Engine(preset("test"), fresh_components)
    second.run(frame, [StreamParams("a")])
    with pytest.raises(RuntimeError, match="set up for another engine's options after this engine was built"):
        first.run(frame, [StreamParams("a")])
    same = Engine(preset("test"), fresh_components)  # the same options: both run
    same.run(frame, [StreamParams("a")])
    assert np.array_equal(second.run(frame, [StreamParams("a")])[0], same.run(frame, [StreamParams("a")])[0])
    again = Engine(preset("test", prompt_kv=True, fused_time_proj=True), fresh_components)
    assert again.run(frame, [StreamParams("a")])[0].shape == (64, 64, 3)
    # An engine refused at build time changes no module: the engine built before it still runs.
    fresh_components.unet.time_embed_act = nn.SiLU()  # what fused_time_proj refuses
    with pytest.raises(ValueError, match="fused_time_proj"):
        Engine(preset("test", fused_time_proj=True), fresh_components)
    fresh_components.unet.time_embed_act = None
    with pytest.raises(ValueError, match="attention backend 'efficient' cannot run here"):
        Engine(preset("test", attention="efficient"), fresh_components)
    assert again.run(frame, [StreamParams("a")])[0].shape == (64, 64, 3)
