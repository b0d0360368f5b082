"""Temporal feature reuse (engine/reuse.py): full == diffusers' forward bit for bit, partial == full on the same
inputs, partial on a changed input is a bounded approximation; the `reuse` stream parameter is validated everywhere."""

from __future__ import annotations

import pytest
import torch

from turbostream.engine.reuse import FeatureReuse, UnsupportedUNetError


@pytest.fixture(scope="module")
def tiny_fp16_unet():
    """tiny-random's UNet in fp16 on the CPU (its own copy: the session components stay fp32)."""
    from turbostream.models import load_components

    return load_components("tiny-random", device="cpu", dtype=torch.float16).unet


def _inputs(unet, batch: int, h: int = 8, w: int = 8, seed: int = 0):
    """(latents, per-sample timesteps, embeddings) in the UNet's dtype; timesteps differ per row."""
    g = torch.Generator().manual_seed(seed)
    dtype = unet.dtype
    x = torch.randn(batch, unet.config.in_channels, h, w, generator=g).to(dtype)
    t = torch.tensor([999.0, 499.0, 10.0, 250.0][:batch])
    emb = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(dtype)
    return x, t, emb


def _unet_eps(unet, x, t, emb):
    return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_full_equals_unet_and_partial_on_same_inputs_equals_full(tiny_components, tiny_fp16_unet, dtype, batch):
    unet = tiny_components.unet if dtype == "float32" else tiny_fp16_unet
    reuse = FeatureReuse(unet)
    x, t, emb = _inputs(unet, batch)
    with torch.no_grad():
        want = _unet_eps(unet, x, t, emb)
        deep = reuse.empty_deep(batch, 8, 8)
        got = reuse.full(x, t, emb, deep)
        again = reuse.partial(x, t, emb, deep)
    assert got.dtype == unet.dtype and got.shape == x.shape
    assert torch.equal(got, want)
    assert torch.equal(again, want)


def test_depth_two_and_scalar_timestep_match_too(tiny_components):
    # tiny-random has two block pairs: depth 2 reuses only the mid block's output. A 0-d timestep is broadcast to the
    # batch, as diffusers does.
    unet = tiny_components.unet
    reuse = FeatureReuse(unet, depth=2)
    x, _, emb = _inputs(unet, 2)
    t = torch.tensor(999.0)
    with torch.no_grad():
        want = _unet_eps(unet, x, t, emb)
        deep = reuse.empty_deep(2, 8, 8)
        assert torch.equal(reuse.full(x, t, emb, deep), want)
        assert torch.equal(reuse.partial(x, t, emb, deep), want)
    assert reuse.deep_shape(2, 8, 8) == (2, 64, 4, 4)  # the mid block's output: 64 channels at half resolution


@pytest.mark.parametrize("depth,layers,shape,need", [(1, 1, (2, 32, 8, 8), 1), (1, 2, (2, 64, 8, 8), 2),
                                                     (2, 1, (2, 64, 4, 4), 3), (2, 2, (2, 64, 4, 4), 4)])
def test_a_cut_inside_the_up_block_matches_too(tiny_components, depth, layers, shape, need):
    # tiny-random's outer up block has 2 layers (resnet + attention), its outer down block 1 and a downsampler. With
    # layers=1 the deep features are the states after the up block's first layer (32 channels), and a partial frame
    # needs only conv_in's output as a skip; layers=2 is the whole block (the default).
    unet = tiny_components.unet
    reuse = FeatureReuse(unet, depth=depth, layers=layers)
    assert reuse.layers == layers and reuse.deep_shape(2, 8, 8) == shape and reuse._need == need
    x, t, emb = _inputs(unet, 2)
    with torch.no_grad():
        want = _unet_eps(unet, x, t, emb)
        deep = reuse.empty_deep(2, 8, 8)
        assert torch.equal(reuse.full(x, t, emb, deep), want)
        assert torch.equal(reuse.partial(x, t, emb, deep), want)
    assert FeatureReuse(unet, depth=depth).layers == 2  # None: the whole block


def test_a_later_cut_recomputes_less_and_moves_the_output_more(tiny_components):
    """layers=1 runs fewer modules in a partial frame (counted by forward hooks) than the whole block, and on a changed
    input lands further from full recomputation: the trade the option makes."""
    unet = tiny_components.unet
    x, t, emb = _inputs(unet, 3)
    moved = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    calls: list[str] = []
    names = {m: n for n, m in unet.named_modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(names[m]))
             for m in unet.modules() if type(m).__name__ in ("LeanResnetBlock2D", "ResnetBlock2D",
                                                             "Transformer2DModel", "Downsample2D")]
    errors, ran = {}, {}
    try:
        with torch.no_grad():
            exact = _unet_eps(unet, moved, t, emb)
            for layers in (1, 2):
                reuse = FeatureReuse(unet, layers=layers)
                deep = reuse.empty_deep(3, 8, 8)
                reuse.full(x, t, emb, deep)  # the "previous frame"
                calls.clear()
                errors[layers] = float((reuse.partial(moved, t, emb, deep) - exact).abs().mean())
                ran[layers] = sorted(calls)
    finally:
        for h in hooks:
            h.remove()
    assert ran[1] == ["up_blocks.1.attentions.1", "up_blocks.1.resnets.1"]
    # The whole block, and of the down path only what makes its skips: not the downsampler, whose output only the
    # deeper up block reads.
    assert ran[2] == ["down_blocks.0.attentions.0", "down_blocks.0.resnets.0", "up_blocks.1.attentions.0",
                      "up_blocks.1.attentions.1", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]
    assert 0 < errors[2] < errors[1]


def test_partial_on_a_changed_input_is_a_bounded_approximation(tiny_components):
    unet = tiny_components.unet
    reuse = FeatureReuse(unet)
    x, t, emb = _inputs(unet, 3)
    g = torch.Generator().manual_seed(7)
    step = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        deep = reuse.empty_deep(3, 8, 8)
        stale = reuse.full(x, t, emb, deep)  # the "previous frame"
        errors = []
        for size in (0.01, 0.1):
            moved = x + size * step  # the "next frame"
            exact = reuse.full(moved, t, emb, reuse.empty_deep(3, 8, 8))
            approx = reuse.partial(moved, t, emb, deep)
            err = (approx - exact).abs()
            assert err.max() > 0  # deep features really came from the old input: the output moved
            # The recomputed outer blocks follow the change: closer to the exact output than the stale output is.
            assert err.mean() < (stale - exact).abs().mean()
            errors.append(err.max().item())
    # Measured on tiny-random (eps spans about +-2.6): max error 0.031 for a 0.01 step and 0.31 for a 0.1 step (0.24 to
    # 0.30 over other seeds); the bounds leave twice that, and the error grows with the change.
    assert errors[0] < 0.08 and errors[1] < 0.6
    assert errors[0] < errors[1]


def test_deep_out_is_written_in_place_and_nothing_returned_aliases_it(tiny_components):
    unet = tiny_components.unet
    reuse = FeatureReuse(unet)
    x, t, emb = _inputs(unet, 2)
    deep = torch.full(reuse.deep_shape(2, 8, 8), float("nan"), dtype=unet.dtype)
    address = deep.data_ptr()
    with torch.no_grad():
        eps = reuse.full(x, t, emb, deep)
        assert deep.data_ptr() == address and torch.isfinite(deep).all()  # written, not replaced
        kept = deep.clone()
        eps2 = reuse.partial(x, t, emb, deep)
        assert torch.equal(deep, kept)  # partial only reads the deep features
        # The second full pass writes the buffer again (same values for the same inputs) and leaves earlier outputs
        # alone: the returned eps is the caller's own tensor, not a view of anything the module keeps or reuses.
        eps_before = eps.clone()
        reuse.full(x + 1.0, t, emb, deep)
        assert not torch.equal(deep, kept)
    assert torch.equal(eps, eps_before)
    for out in (eps, eps2):
        assert out.untyped_storage().data_ptr() != deep.untyped_storage().data_ptr()
        assert out.untyped_storage().data_ptr() not in (x.untyped_storage().data_ptr(),
                                                         emb.untyped_storage().data_ptr())
    assert eps.untyped_storage().data_ptr() != eps2.untyped_storage().data_ptr()


def test_the_engine_s_module_changes_stay_exact(tiny_components):
    # prepare_cuda (the engine's CUDA preparation) makes the UNet channels_last and fuses QKV; empty_deep follows the
    # layout so partial concatenates like full does. The same two module changes here, without prepare_cuda's global
    # backend flags, on fresh components (the session ones must stay unprepared); then the engine options that swap
    # the attention processor and the resnets' forward (apply_options): FeatureReuse calls the blocks as they are.
    from turbostream.config import preset
    from turbostream.engine.cuda import apply_options
    from turbostream.models import load_components

    comps = load_components("tiny-random", device="cpu")
    comps.unet.to(memory_format=torch.channels_last)
    comps.unet.fuse_qkv_projections()
    applied = apply_options(comps, preset("test", attention="math", skip_unit_rescale=True))
    assert applied["attention_modules"] > 0 and applied["lean_resnets"] > 0
    reuse = FeatureReuse(comps.unet)
    x, t, emb = _inputs(comps.unet, 2)
    deep = reuse.empty_deep(2, 8, 8)
    assert deep.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = _unet_eps(comps.unet, x, t, emb)
        assert torch.equal(reuse.full(x, t, emb, deep), want)
        assert torch.equal(reuse.partial(x, t, emb, deep), want)


def test_bad_buffers_and_depths_are_refused_with_clear_errors(tiny_components):
    unet = tiny_components.unet
    reuse = FeatureReuse(unet)
    x, t, emb = _inputs(unet, 2)
    with pytest.raises(ValueError, match=r"deep_out has shape \(1, 64, 8, 8\).*need \(2, 64, 8, 8\)"):
        reuse.full(x, t, emb, torch.empty(1, 64, 8, 8))
    with pytest.raises(ValueError, match="deep_in is torch.float16; the UNet runs in torch.float32"):
        reuse.partial(x, t, emb, torch.empty(2, 64, 8, 8, dtype=torch.float16))
    for depth in (0, 3, 1.0, True):
        with pytest.raises(ValueError, match="depth must be an integer from 1 to 2"):
            FeatureReuse(unet, depth=depth)
    for layers in (0, 3, 1.0, True, "1"):
        with pytest.raises(ValueError, match=r"layers must be an integer from 1 to 2 for depth 1 \(up block 1 has 2 "):
            FeatureReuse(unet, layers=layers)


def test_unsupported_unets_are_refused_at_construction():
    from diffusers import UNet2DConditionModel

    from turbostream.models import _read_config

    cfg = _read_config("tiny-random", "unet")
    with pytest.raises(UnsupportedUNetError, match="num_class_embeds=10"):
        FeatureReuse(UNet2DConditionModel.from_config({**cfg, "num_class_embeds": 10}))
    with pytest.raises(UnsupportedUNetError, match="up block SimpleCrossAttnUpBlock2D"):
        FeatureReuse(UNet2DConditionModel.from_config(
            {**cfg, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "SimpleCrossAttnUpBlock2D"]}))
    with pytest.raises(UnsupportedUNetError, match="needs a diffusers UNet2DConditionModel, got Linear"):
        FeatureReuse(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_full_sd_turbo_architecture_matches_at_a_small_size():
    """The `random` model (SD-Turbo's UNet: 4 block pairs, 865 M parameters) at 64 px, latents 8x8, every depth."""
    from diffusers import UNet2DConditionModel

    from turbostream.models import _read_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_read_config("random", "unet")).eval().requires_grad_(False)
    x, t, emb = _inputs(unet, 2)
    with torch.no_grad():
        want = _unet_eps(unet, x, t, emb)
        for depth, shape in ((1, (2, 640, 8, 8)), (2, (2, 1280, 4, 4)), (3, (2, 1280, 2, 2)), (4, (2, 1280, 1, 1))):
            reuse = FeatureReuse(unet, depth=depth)
            assert reuse.deep_shape(2, 8, 8) == shape
            deep = reuse.empty_deep(2, 8, 8)
            assert torch.equal(reuse.full(x, t, emb, deep), want)
            assert torch.equal(reuse.partial(x, t, emb, deep), want)
        # Cuts inside SD-Turbo's outermost up block (3 layers): after its first and second layers (320 channels).
        for layers in (1, 2):
            reuse = FeatureReuse(unet, layers=layers)
            assert reuse.deep_shape(2, 8, 8) == (2, 320, 8, 8)
            deep = reuse.empty_deep(2, 8, 8)
            assert torch.equal(reuse.full(x, t, emb, deep), want)
            assert torch.equal(reuse.partial(x, t, emb, deep), want)
        # A side that is not a multiple of 8 (12 = 1.5 x 8): diffusers forwards upsample sizes; so does reuse.
        x12, _, _ = _inputs(unet, 2, h=12)
        want12 = _unet_eps(unet, x12, t, emb)
        reuse = FeatureReuse(unet, depth=3)
        deep = reuse.empty_deep(2, 12, 8)
        assert deep.shape == (2, 1280, 3, 2)
        assert torch.equal(reuse.full(x12, t, emb, deep), want12)
        assert torch.equal(reuse.partial(x12, t, emb, deep), want12)


# ------------------------------------------------------------------------------------------------ the `reuse` parameter

BAD_REUSE = [-1, 9, 100, 2.0, 2.5, True, "2", None, float("nan")]


def test_reuse_is_off_by_default_and_takes_0_to_8():
    from turbostream.config import MAX_REUSE, StreamParams

    assert StreamParams().reuse == 0 and MAX_REUSE == 8
    for n in range(MAX_REUSE + 1):
        assert StreamParams(reuse=n).validate().reuse == n


@pytest.mark.parametrize("value", BAD_REUSE)
def test_bad_reuse_values_are_refused_by_validate(value):
    from turbostream.config import StreamParams

    with pytest.raises(ValueError, match=r"reuse must be an integer from 0 to 8 \(0 or 1: off"):
        StreamParams(reuse=value).validate()


@pytest.mark.parametrize("value", BAD_REUSE)
def test_bad_reuse_values_in_a_config_message_get_bad_config(value):
    from turbostream.config import StreamParams
    from turbostream.serve.protocol import ProtocolError, apply_config

    before = StreamParams(reuse=3)
    with pytest.raises(ProtocolError) as caught:
        apply_config(before, {"reuse": value}, max_steps=10)
    assert caught.value.code == "bad_config" and "reuse must be an integer from 0 to 8" in caught.value.message
    assert apply_config(before, {"reuse": 4}, max_steps=10).reuse == 4


def test_reuse_over_a_real_socket_is_echoed_listed_and_refused_when_bad(engine, make_engine):
    import json

    from test_server import next_of_type, open_client, run, serving

    async def main():
        async with serving(engine) as server:  # started without --reuse: reuse >= 2 is refused, 0 and 1 are not
            ws, ready = await open_client(server)
            assert ready["limits"]["feature_reuse"] is False
            await ws.send(json.dumps({"type": "config", "reuse": 4}))
            error = await next_of_type(ws, "error")
            assert error["code"] == "bad_config" and "feature reuse is off on this engine" in error["message"]
            await ws.send(json.dumps({"type": "config", "reuse": 1}))
            assert (await next_of_type(ws, "config"))["reuse"] == 1
        async with serving(make_engine(feature_reuse=True)) as server:
            ws, ready = await open_client(server)
            assert ready["limits"]["feature_reuse"] is True
            assert ready["params"]["reuse"] == 0  # listed with the other parameters, off
            await ws.send(json.dumps({"type": "config", "reuse": 4}))
            assert (await next_of_type(ws, "config"))["reuse"] == 4
            await ws.send(json.dumps({"type": "config", "reuse": 9, "seed": 5}))
            error = await next_of_type(ws, "error")
            assert error["code"] == "bad_config" and "reuse must be an integer from 0 to 8" in error["message"]
            await ws.send(json.dumps({"type": "config"}))
            echo = await next_of_type(ws, "config")
            assert (echo["reuse"], echo["seed"]) == (4, 0)  # the bad message changed nothing, its seed neither

    run(main())


def test_reuse_from_osc_the_prompt_line_and_the_command_line():
    import argparse

    from turbostream.cli import serve as cli_serve
    from turbostream.cli.options import engine_config
    from turbostream.config import StreamParams
    from turbostream.control.osc import PARAM_ADDRESSES, BadArguments, fields_for
    from turbostream.errors import UserError
    from turbostream.io.sources import CaptureThread
    from turbostream.control.prompt_line import PromptLine
    from turbostream.pipeline import Pipeline

    assert "reuse" in PARAM_ADDRESSES
    assert fields_for("reuse", [3.0]) == {"reuse": 3}  # TouchDesigner sends floats; integral ones are fine
    with pytest.raises(BadArguments, match="expected an integer"):
        fields_for("reuse", [2.5])

    pipeline = Pipeline(type("E", (), {"max_batch": 1})(), CaptureThread("0"), [], StreamParams(prompt="a"))
    line = PromptLine(pipeline)
    assert "reuse 3" in line.apply("/reuse 3")
    assert pipeline.params.reuse == 3
    with pytest.raises(ValueError, match="reuse must be an integer from 0 to 8"):
        line.apply("/reuse 12")
    with pytest.raises(ValueError, match="needs a number"):
        line.apply("/reuse often")

    parser = argparse.ArgumentParser()
    cli_serve.add_parser(parser.add_subparsers())
    base = ["serve", "--model", "tiny-random", "--device", "cpu"]
    assert engine_config(parser.parse_args(base)).default_params.reuse == 0
    assert engine_config(parser.parse_args([*base, "--reuse", "4"])).default_params.reuse == 4
    with pytest.raises(UserError, match="reuse must be an integer from 0 to 8"):
        engine_config(parser.parse_args([*base, "--reuse", "9"]))
    # The help says what the option costs: the output changes.
    text = " ".join(parser._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert "Changes the output" in text and "trades fidelity for speed" in text


# ------------------------------------------------------------------------------------------------ scripts/reuse_speed.py


def test_reuse_speed_script_reports_speed_and_distance(tmp_path):
    """The measurement script on tiny-random at 64 px, in a subprocess as a user runs it: its JSON holds every field,
    with values that make sense (reuse moves the output, off does not, full frames are exact)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "reuse.json"
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "reuse_speed.py"), "--model", "tiny-random", "--device", "cpu",
         "--size", "64", "--frames", "12", "--reuse", "2,3", "--repeats", "1", "--burn-in", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("command", "date", "device", "device_name", "torch", "diffusers", "model", "random_weights", "note",
                "size", "dtype", "depth", "deep_shape", "frames", "repeats", "burn_in", "rows"):
        assert key in r, key
    assert r["model"] == "tiny-random" and r["random_weights"] is True and "random weights" in r["note"]
    assert r["device"] == "cpu" and r["device_name"].startswith("cpu") and r["torch"] == torch.__version__
    assert r["size"] == "64x64" and r["frames"] == 12 and r["deep_shape"] == [1, 64, 8, 8]
    assert "--reuse 2,3" in r["command"] and r["date"][:2] == "20"
    assert r["off_equals_plain_unet"] is True  # "off" is the UNet's own forward, bit for bit
    rows = {row["setting"]: row for row in r["rows"]}
    assert list(rows) == ["off", "reuse 2", "reuse 3"]
    off = rows["off"]
    assert off["ms_partial_frame"] is None and off["speedup_vs_off"] == 1.0
    assert off["distance_all_frames"] == {"mean": 0.0, "p99": 0.0, "max": 0.0, "frames": 12}
    for n in (2, 3):
        row = rows[f"reuse {n}"]
        assert row["reuse"] == n and row["full_frames_identical"] is True
        assert 0 < row["ms_full_frame"] < 5000 and 0 < row["ms_partial_frame"] < 5000 and 0 < row["ms_avg_frame"]
        assert row["distance_partial_frames"]["frames"] == 12 - len(range(0, 12, n))
        part, every = row["distance_partial_frames"], row["distance_all_frames"]
        # Reuse moves the output a little: more than nothing, far less than the 0..255 range, and the full frames
        # (distance 0) pull the all-frames mean below the partial frames' mean.
        assert 0 < part["mean"] < 20 and part["mean"] <= part["p99"] <= part["max"] <= 255
        assert every["mean"] < part["mean"] and every["max"] == part["max"]
        assert 0 < row["latent_rel_l2_partial_frames"] < 0.5
    # A staler cache moves the output further (every third frame full instead of every second).
    assert rows["reuse 3"]["distance_partial_frames"]["mean"] > rows["reuse 2"]["distance_partial_frames"]["mean"]
    assert "| reuse 2 |" in proc.stdout  # the markdown table a README quotes


def test_reuse_speed_script_compares_cuts_side_by_side(tmp_path):
    """--layers all,1: each setting for both cuts in the same passes; full frames exact for both, and the later cut's
    partial frames further from full recomputation. A cut the UNet does not have is a usage error."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "reuse.json"
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    base = [sys.executable, str(root / "scripts" / "reuse_speed.py"), "--model", "tiny-random", "--device", "cpu",
            "--size", "64", "--frames", "8", "--reuse", "4", "--repeats", "1", "--burn-in", "1"]
    proc = subprocess.run([*base, "--layers", "all,1", "--json", str(out)], capture_output=True, text=True,
                          timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["off_equals_plain_unet"] is True and r["deep_shapes"] == {"2": [1, 64, 8, 8], "1": [1, 32, 8, 8]}
    rows = {row["setting"]: row for row in r["rows"]}
    assert list(rows) == ["off", "reuse 4, layers all", "reuse 4, layers 1"]
    whole, cut = rows["reuse 4, layers all"], rows["reuse 4, layers 1"]
    assert (whole["layers"], cut["layers"]) == (2, 1)
    assert whole["full_frames_identical"] is True and cut["full_frames_identical"] is True
    assert 0 < whole["distance_partial_frames"]["mean"] < cut["distance_partial_frames"]["mean"] < 20
    bad = subprocess.run([*base, "--layers", "3"], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "layers must be an integer from 1 to 2" in bad.stderr
