"""Engine options that change modules or compilation (issue 12): attention backend, compile mode, fp8, no /1.0.

On the CPU: each option's effect on the output (none, rounding, or refused with a clear error), that the options are
undone for engines sharing components, and the compile cache key. Their speed is measured on a GPU by
scripts/engine_rows.py (scripts/gpu_check.sh rows).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from turbostream.cli import main
from turbostream.config import EngineConfig, StreamParams, preset
from turbostream.engine import Engine
from turbostream.engine.attention import TurboAttnProcessor, set_attention, set_unit_rescale
from turbostream.engine.compile_cache import cache_key
from turbostream.engine.cuda import check_fp8, load_torchao


@pytest.fixture
def fresh_components():
    """tiny-random components of this test alone (the options change modules; the session's stay untouched)."""
    from turbostream.models import load_components

    return load_components("tiny-random", device="cpu", vae="tiny")


def _frames_params(n: int = 3):
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]
    return frames, [StreamParams(f"prompt {i}", seed=i) for i in range(n)]


def _unet_out(unet, text_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, text_dim, generator=g)
    with torch.inference_mode():
        return unet(x, torch.tensor([999.0, 500.0]), encoder_hidden_states=emb, return_dict=False)[0]


def test_math_attention_matches_auto_and_auto_restores_diffusers_processors(fresh_components):
    frames, params = _frames_params()
    processors = {type(p) for p in fresh_components.unet.attn_processors.values()}
    # auto with the /1.0 divisions is diffusers' own processor (the default leaves them out: ours, bit-identical)
    auto = np.stack(Engine(preset("test", skip_unit_rescale=False), fresh_components).run(frames, params))
    math = np.stack(Engine(preset("test", attention="math"), fresh_components).run(frames, params))
    assert {type(p) for p in fresh_components.unet.attn_processors.values()} == {TurboAttnProcessor}
    # math and PyTorch's own choice on the CPU (its flash kernel) differ by rounding at most: within 1 level.
    assert np.abs(math.astype(int) - auto).max() <= 1
    again = np.stack(Engine(preset("test", skip_unit_rescale=False), fresh_components).run(frames, params))
    assert {type(p) for p in fresh_components.unet.attn_processors.values()} == processors
    assert np.array_equal(again, auto)


def test_processor_is_diffusers_fused_attention_bit_for_bit(fresh_components):
    """The CUDA path's layout (QKV fused, as prepare_cuda does): our processor is FusedAttnProcessor2_0's math."""
    unet = fresh_components.unet
    unet.fuse_qkv_projections()
    theirs = _unet_out(unet, fresh_components.text_dim)
    set_attention(unet, "auto", skip_unit_rescale=True)
    assert {type(p) for p in unet.attn_processors.values()} == {TurboAttnProcessor}
    assert torch.equal(_unet_out(unet, fresh_components.text_dim), theirs)
    set_attention(unet, "math", skip_unit_rescale=False)
    assert torch.allclose(_unet_out(unet, fresh_components.text_dim), theirs, atol=1e-5, rtol=1e-4)


def test_skip_unit_rescale_is_bit_identical_and_undone(fresh_components):
    unet = fresh_components.unet
    plain = _unet_out(unet, fresh_components.text_dim)
    lean = set_unit_rescale(unet, True)
    assert lean == sum(type(m).__name__ == "ResnetBlock2D" or type(m).__name__ == "LeanResnetBlock2D"
                       for m in unet.modules()) and lean > 0
    set_attention(unet, "auto", skip_unit_rescale=True)
    assert torch.equal(_unet_out(unet, fresh_components.text_dim), plain)
    assert set_unit_rescale(unet, False) == 0
    assert not any(type(m).__name__ == "LeanResnetBlock2D" for m in unet.modules())
    frames, params = _frames_params(2)
    before = Engine(preset("test", skip_unit_rescale=False), fresh_components).run(frames, params)
    assert not any(type(m).__name__ == "LeanResnetBlock2D" for m in fresh_components.unet.modules())
    engine = Engine(preset("test"), fresh_components)  # the default leaves the divisions out
    assert any(type(m).__name__ == "LeanResnetBlock2D" for m in engine.unet.modules())
    after = engine.run(frames, params)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_processor_and_lean_blocks_trace_into_one_graph(fresh_components):
    """torch.compile traces the pinned backend's context and the lean resnet without a graph break."""
    unet = fresh_components.unet
    unet.fuse_qkv_projections()
    set_attention(unet, "math", skip_unit_rescale=True)
    set_unit_rescale(unet, True)
    eager = _unet_out(unet, fresh_components.text_dim)
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="eager", fullgraph=True)  # fullgraph: a graph break would raise
    assert torch.equal(_unet_out(compiled, fresh_components.text_dim), eager)
    torch._dynamo.reset()


def test_backend_that_cannot_run_is_a_clear_error_when_the_engine_is_built(fresh_components):
    with pytest.raises(ValueError, match="attention backend 'efficient' cannot run here.*CUDA backend"):
        Engine(preset("test", attention="efficient"), fresh_components)
    # Nothing was changed by the refused engine: the next one runs diffusers' own processors.
    assert TurboAttnProcessor not in {type(p) for p in fresh_components.unet.attn_processors.values()}


def test_invalid_option_values_are_clear_errors():
    with pytest.raises(ValueError, match="attention must be one of auto, flash, efficient, cudnn, math"):
        EngineConfig(attention="xformers")
    with pytest.raises(ValueError, match="reduce-overhead.*captures the whole frame into CUDA graphs of its own"):
        EngineConfig(compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="compile mode must be one of default, max-autotune-no-cudagraphs"):
        EngineConfig(compile_mode="fast")
    assert EngineConfig().torch_compile_mode is None
    assert EngineConfig(compile_mode="max-autotune-no-cudagraphs").torch_compile_mode == "max-autotune-no-cudagraphs"


@pytest.mark.parametrize("argv, message", [
    (["--attention", "xformers"], "invalid choice: 'xformers'"),
    (["--compile", "--compile-mode", "reduce-overhead"], "captures the whole frame"),
    (["--compile-mode", "max-autotune-no-cudagraphs"], "would do nothing here"),  # generate compiles nothing
    (["warmup", "--compile-mode", "max-autotune-no-cudagraphs"], "needs --compile"),
    (["--fp8"], "fp8 needs a CUDA GPU with compute capability 8.9"),
    # The stream's and engine's own checks, worded as the options the user typed rather than the fields they set.
    (["warmup", "--strength", "2"], "error: --strength must be in (0, 1], got 2.0"),
    (["warmup", "--transition", "-1"], "error: --transition must be seconds, 0 to 60"),
    (["warmup", "--prompt", "[]"], "error: --prompt must be"),
    (["warmup", "--fused-norm", "--kernel-compile-threads", "999"], "error: --kernel-compile-threads must be 0"),
    # Options that would do nothing together are refused rather than silently ignored.
    (["warmup", "--kernel-compile-threads", "4"], "--kernel-compile-threads sets how many threads compile the "
                                                  "kernels of --fused-norm and --fused-epilogue; without either"),
    (["warmup", "--frame-graph", "--no-cuda-graphs"], "with --no-cuda-graphs nothing is captured"),
    (["warmup", "--compile", "--fused-norm", "--fused-epilogue"], "--fused-norm and --fused-epilogue are for the "
                                                                  "path without --compile"),
])
def test_cli_refuses_bad_options_before_loading(tmp_path, capsys, argv, message):
    common = ["--model", "tiny-random", "--device", "cpu", "--size", "64"]
    if argv[0] == "warmup":
        argv = ["warmup", *common, *argv[1:]]
    else:
        argv = ["generate", "a boat", *common, "-o", str(tmp_path / "x.png"), *argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals (a bad choice or type) exit 2 from the parser
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_device_names_are_read_in_any_case(capsys):
    """`--device CPU` (or ' Cuda:0 ') names the same device in every command, as serve's device lists always did."""
    from turbostream.models import resolve_device

    assert resolve_device(" CPU ") == torch.device("cpu") and resolve_device("Auto").type in ("cpu", "cuda")
    assert main(["warmup", "--model", "tiny-random", "--size", "64", "--device", "CPU"]) == 0
    assert "on cpu" in capsys.readouterr().err


def test_fp8_is_refused_off_cuda_and_names_torchao_when_missing(monkeypatch, fresh_components):
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU with compute capability 8.9 or newer.*runs on cpu"):
        check_fp8("cpu")
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU"):
        Engine(preset("test", fp8=True), fresh_components)
    monkeypatch.setitem(sys.modules, "torchao", None)  # an import of torchao now fails, installed or not
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ValueError, match="fp8 needs torchao.*pip install torchao"):
        load_torchao()


def test_compile_cache_key_keeps_the_default_and_names_the_mode():
    cfg = dataclasses.replace(preset("bench"), skip_unit_rescale=False)  # the defaults before skip_unit_rescale was on
    legacy = {"gpu": "GPU", "model": "random", "vae": "tiny", "dtype": "torch.float16", "size": [512, 512],
              "buckets": [1, 2, 4, 8], "unet_evals": 1}
    assert cache_key(cfg, "GPU", torch.float16) == legacy  # existing cache files stay valid for what they compiled
    # Today's default compiles the UNet without the /1.0 divisions: a file of the old default is not its hit.
    assert cache_key(preset("bench"), "GPU", torch.float16) == {**legacy, "skip_unit_rescale": True}
    tuned = cache_key(dataclasses.replace(cfg, compile_mode="max-autotune-no-cudagraphs"), "GPU", torch.float16)
    assert tuned == {**legacy, "compile_mode": "max-autotune-no-cudagraphs"}
    both = cache_key(dataclasses.replace(cfg, attention="flash", fp8=True), "GPU", torch.float16)
    assert both == {**legacy, "attention": "flash", "fp8": True}
    # Feature reuse compiles two more forwards: a cache saved without them must not count as a hit with them.
    reusing = cache_key(dataclasses.replace(cfg, feature_reuse=True), "GPU", torch.float16)
    assert reusing == {**legacy, "reuse_enabled": True}
    # Where feature reuse cuts the UNet changes the partial forward that is compiled.
    cut = cache_key(dataclasses.replace(cfg, feature_reuse=True, reuse_layers=1), "GPU", torch.float16)
    assert cut == {**legacy, "reuse_enabled": True, "reuse_layers": 1}
    # A symbolic batch size compiles other graphs than one static graph per bucket.
    dynamic = cache_key(dataclasses.replace(cfg, compile=True, compile_dynamic=True), "GPU", torch.float16)
    assert dynamic == {**legacy, "compile_dynamic": True}


def test_compile_dynamic_needs_compile_and_reaches_the_config():
    import argparse

    from turbostream.cli.options import add_engine_options, engine_config
    from turbostream.errors import UserError

    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    cfg = engine_config(parser.parse_args(["--device", "cpu", "--compile", "--compile-dynamic"]))
    assert cfg.compile_dynamic and cfg.torch_compile_dynamic is None  # torch.compile's automatic dynamic shapes
    plain = engine_config(parser.parse_args(["--device", "cpu", "--compile"]))
    assert not plain.compile_dynamic and plain.torch_compile_dynamic is False  # one static graph per bucket
    with pytest.raises(UserError, match="--compile-dynamic needs --compile"):
        engine_config(parser.parse_args(["--device", "cpu", "--compile-dynamic"]))


def test_reuse_layers_needs_reuse_and_reaches_the_config():
    import argparse

    from turbostream.cli.options import add_engine_options, engine_config
    from turbostream.errors import UserError

    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    cfg = engine_config(parser.parse_args(["--device", "cpu", "--reuse", "3", "--reuse-layers", "1"]))
    assert cfg.reuse_enabled and cfg.reuse_layers == 1
    assert engine_config(parser.parse_args(["--device", "cpu", "--reuse", "3"])).reuse_layers is None  # whole block
    with pytest.raises(UserError, match="--reuse-layers needs temporal feature reuse: --reuse N with N >= 2"):
        engine_config(parser.parse_args(["--device", "cpu", "--reuse-layers", "1"]))
    with pytest.raises(UserError, match="^--reuse-layers must be a whole number of at least 1, got 0"):
        engine_config(parser.parse_args(["--device", "cpu", "--reuse", "2", "--reuse-layers", "0"]))
    bare = argparse.ArgumentParser()  # generate and bench: no stream options, so no --reuse to go with it
    add_engine_options(bare, stream_options=False)
    assert not hasattr(bare.parse_args([]), "reuse")
    assert "--reuse-layers" not in bare.format_help()  # it could only ever be refused there
    with pytest.raises(SystemExit):
        bare.parse_args(["--device", "cpu", "--reuse-layers", "2"])
    assert engine_config(bare.parse_args(["--device", "cpu"])).reuse_layers is None
    for bad in (0, -1, True, 1.0):
        with pytest.raises(ValueError, match="reuse_layers must be a whole number"):
            preset("test", feature_reuse=True, reuse_layers=bad)
    with pytest.raises(ValueError, match="reuse_layers is for temporal feature reuse, which is off"):
        preset("test", reuse_layers=1)


def test_frame_graph_reaches_the_config_and_changes_nothing_off_cuda(fresh_components, frame_rng):
    """--frame-graph sets EngineConfig.frame_graph (off by default); without CUDA graphs (the CPU) it has nothing to
    capture and the frames are those of an engine without it."""
    import argparse

    from turbostream.cli.options import add_engine_options, engine_config

    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    base = ["--model", "tiny-random", "--device", "cpu", "--size", "64"]
    assert engine_config(parser.parse_args([*base, "--frame-graph"])).frame_graph is True
    assert engine_config(parser.parse_args(base)).frame_graph is False
    frame = frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    plain, framed = Engine(preset("test"), fresh_components), Engine(preset("test", frame_graph=True), fresh_components)
    assert np.array_equal(plain.run([frame], [StreamParams()])[0], framed.run([frame], [StreamParams()])[0])


def test_no_gpu_is_explained_by_the_torch_build_and_auto_on_the_cpu_is_said(monkeypatch, caplog):
    """PyPI's torch on Windows is a CPU-only build: `--device cuda` advised `--device cpu` to a user with a GPU, and
    `--device auto` ran SD-Turbo on the CPU with no word of why."""
    import argparse
    import logging

    from turbostream.cli.options import add_engine_options, engine_config
    from turbostream.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match=r"is a CPU-only build: for a GPU install the CUDA build .*--index-url "
                                         r"https://download.pytorch.org/whl/cu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ValueError, match=r"CUDA 12.8\) finds no usable GPU: check the NVIDIA driver"):
        resolve_device("cuda:0")
    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    with caplog.at_level(logging.WARNING, "turbostream"):
        assert engine_config(parser.parse_args(["--model", "random"])).device == "auto"
        engine_config(parser.parse_args(["--model", "tiny-random"]))  # the plumbing model: no warning
        engine_config(parser.parse_args(["--model", "random", "--device", "cpu"]))  # asked for: no warning
        args = parser.parse_args(["--model", "random"])
        for _ in range(3):  # run checks its options three times (its own checks, the summary's, build_engine)
            engine_config(args)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(w.startswith("no CUDA GPU: running on the CPU") for w in warnings), warnings
