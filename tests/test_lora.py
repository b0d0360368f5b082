"""--lora: LoRAs merged into the weights at load, checked against diffusers running the same LoRA unmerged (PEFT)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from turbostream.config import MAX_LORAS, LoraSpec, StreamParams, preset
from turbostream.engine import Engine
from turbostream.errors import ModelLoadError
from turbostream.lora import merge_loras
from turbostream.models import diffusers_pipeline, load_components
from turbostream.parity import parity_stats
from turbostream.reference import ReferencePipeline, reference_components

peft = pytest.importorskip("peft")  # the reference runs LoRAs through PEFT, as diffusers does

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "time_emb_proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
PARAMS = [StreamParams("a red fox", 0.5, 2, 3), StreamParams("a lighthouse", 0.7, 2, 11)]


def _frames(n: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def _inject(module: torch.nn.Module, config, seed: int) -> dict:
    """PEFT LoRA layers (random A and B, small enough to keep pictures in range) into module; their state dict."""
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    inject_adapter_in_model(config, module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.2)
    return get_peft_model_state_dict(module)


def _scale(module: torch.nn.Module, scale: float) -> None:
    from peft.tuners.lora import LoraLayer

    for m in module.modules():
        if isinstance(m, LoraLayer):
            m.scale_layer(scale)


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
    """A LoRA of the UNet (attention, feed-forward, 3x3 convs, time projections) and the text encoder, alpha != rank
    and a pattern alpha for the convs, saved as diffusers saves one; and fresh components running it unmerged."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    ref = reference_components("tiny-random")
    unet_cfg = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"conv1": 2}, target_modules=UNET_TARGETS,
                          init_lora_weights=False)
    text_cfg = LoraConfig(r=2, lora_alpha=1, target_modules=TEXT_TARGETS, init_lora_weights=False)
    unet_layers = _inject(ref.unet, unet_cfg, 1)
    text_layers = _inject(ref.text_encoder, text_cfg, 2)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=text_cfg.to_dict())
    return folder / "pytorch_lora_weights.safetensors", ref


def _engine(*loras) -> Engine:
    return Engine(preset("test", loras=loras))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_merged_lora_matches_diffusers_running_it_unmerged(peft_lora, scale):
    path, ref = peft_lora
    _scale(ref.unet, scale)
    _scale(ref.text_encoder, scale)
    try:
        expected = ReferencePipeline(ref).run(_frames(), PARAMS)  # diffusers encodes the prompts through the LoRA
    finally:
        _scale(ref.unet, 1 / scale)
        _scale(ref.text_encoder, 1 / scale)
    engine = _engine(LoraSpec(str(path), scale))
    ours = engine.run(_frames(), PARAMS)
    assert parity_stats(ours, expected)["max"] <= 2
    plain = _engine().run(_frames(), PARAMS)
    assert np.abs(np.stack(plain).astype(int) - np.stack(ours)).mean() > 5  # the LoRA really changes the frames
    summary = engine.components.loras[0]
    assert summary["unet_layers"] > 40 and summary["text_encoder_layers"] == 5 * 2  # tiny CLIP: 2 layers
    assert summary["scale"] == scale


def test_merging_leaves_every_module_as_it_was_and_scale_zero_changes_nothing(peft_lora):
    path, _ = peft_lora
    plain = load_components("tiny-random", device="cpu")
    merged = load_components("tiny-random", device="cpu", loras=[f"{path}:0"])
    for a, b in ((plain.unet, merged.unet), (plain.text_encoder, merged.text_encoder)):
        assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    half = load_components("tiny-random", device="cpu", loras=[f"{path}:0.5"])
    full = load_components("tiny-random", device="cpu", loras=[str(path)])
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    w0, w1, w2 = (c.unet.state_dict()[name] for c in (plain, half, full))
    torch.testing.assert_close(w2 - w0, 2 * (w1 - w0))  # the product is added in proportion to the scale
    assert (w2 - w0).abs().max() > 0.1
    twice = load_components("tiny-random", device="cpu", loras=[str(path), f"{path}:-1"])  # LoRAs add up, in order
    torch.testing.assert_close(twice.unet.state_dict()[name], w0, atol=1e-5, rtol=0)


def _kohya(parts: dict[str, tuple], alpha: float, rank: int = 4, seed: int = 0) -> dict:
    """A kohya-ss (A1111, ComfyUI) LoRA: {key prefix: (root module, layer names)} -> lora_down/lora_up/alpha keys."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, (root, names) in parts.items():
        for name in names:
            w = root.get_submodule(name).weight
            key = f"{prefix}_{name.removeprefix('text_model.').replace('.', '_')}"  # kohya: text_model_encoder_...
            state[f"{key}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *[1] * (w.ndim - 2), generator=g) * 0.3
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def test_a_kohya_lora_merges_as_diffusers_loads_it(tmp_path):
    """kohya-ss's layout with its network alpha, for the UNet: diffusers' own load_lora_weights runs it unmerged."""
    ref = reference_components("tiny-random")
    names = [n for n, m in ref.unet.named_modules()
             if n.endswith(("attn1.to_q", "attn2.to_v", "attn1.to_out.0", "ff.net.2")) or n.endswith("resnets.0.conv1")]
    path = tmp_path / "style.safetensors"
    save_file(_kohya({"lora_unet": (ref.unet, names)}, alpha=2.0), path)
    pipe = diffusers_pipeline(ref)
    pipe.load_lora_weights(str(path), adapter_name="style")
    expected = ReferencePipeline(ref).run(_frames(seed=4), PARAMS)
    engine = _engine(LoraSpec(str(path), 1.0))
    assert engine.components.loras[0]["unet_layers"] == len(names)
    assert parity_stats(engine.run(_frames(seed=4), PARAMS), expected)["max"] <= 2
    assert np.abs(np.stack(_engine().run(_frames(seed=4), PARAMS)).astype(int) - np.stack(expected)).mean() > 5


@pytest.mark.gpu
def test_a_merged_lora_passes_the_parity_rule_in_fp16_on_cuda(tmp_path):
    """The GPU-correctness rule with a LoRA: the fp16 engine (graphs, the LoRA merged in float32 on the device, then
    rounded once) against diffusers running it unmerged in fp32 (R) and in fp16 (P16), through load_lora_weights."""
    from turbostream.parity import parity_verdict

    ref = reference_components("tiny-random", device="cuda")
    names = [n for n, m in ref.unet.named_modules()
             if n.endswith(("attn1.to_q", "attn2.to_v", "attn1.to_out.0", "ff.net.2")) or n.endswith("resnets.0.conv1")]
    path = tmp_path / "style.safetensors"
    save_file(_kohya({"lora_unet": (ref.unet, names)}, alpha=2.0), path)
    frames = [np.ascontiguousarray(np.repeat(np.repeat(f, 2, 0), 2, 1)) for f in _frames(seed=6)]  # 128 px
    outputs = {}
    for dtype in (torch.float32, torch.float16):
        comps = ref if dtype == torch.float32 else reference_components("tiny-random", device="cuda", dtype=dtype)
        diffusers_pipeline(comps).load_lora_weights(str(path), adapter_name="style")
        outputs[dtype] = ReferencePipeline(comps).run(frames, PARAMS)
    engine = Engine(preset("test", device="cuda", dtype="float16", width=128, height=128, buckets=(1, 2),
                           loras=(LoraSpec(str(path), 1.0),)))
    engine.warmup()
    ours = engine.run(frames, PARAMS)
    assert engine.stats.graph_replays >= 1
    verdict = parity_verdict(parity_stats(ours, outputs[torch.float32]), parity_stats(outputs[torch.float16],
                                                                                        outputs[torch.float32]))
    assert verdict["pass"], verdict


def _merge_the_same(tmp_path, part: str, first: dict, second: dict, layers: int) -> None:
    """Two LoRA files (state dicts) merge into the same weights of `part`, `layers` layers each, and change them."""
    plain = getattr(load_components("tiny-random", device="cpu"), part).state_dict()
    a, b = (load_components("tiny-random", device="cpu", loras=[_write(tmp_path / f"{i}.safetensors", state)])
            for i, state in enumerate((first, second)))
    assert a.loras[0][f"{part}_layers"] == layers == b.loras[0][f"{part}_layers"]
    merged = getattr(b, part).state_dict()
    for key, value in getattr(a, part).state_dict().items():
        torch.testing.assert_close(value, merged[key])
    assert any(not torch.equal(v, plain[k]) for k, v in merged.items())


def test_a_kohya_text_encoder_lora_takes_its_alpha(tmp_path):
    """The text encoder's kohya keys (lora_te_...) and alphas: the same merge as PEFT's layout with B scaled by alpha/r
    beforehand (diffusers' text-encoder path needs a newer PEFT than this machine has, so weights are compared)."""
    comps = load_components("tiny-random", device="cpu")
    names = [n for n, _ in comps.text_encoder.named_modules()  # what kohya-ss trains: attention and MLP
             if n.endswith(("_proj", "fc1", "fc2")) and ".layers." in n]
    kohya = _kohya({"lora_te_text_model": (comps.text_encoder, names)}, alpha=1.0, seed=5)
    peft_layout = {}
    for name in names:
        key = f"lora_te_text_model_{name.removeprefix('text_model.').replace('.', '_')}"
        peft_layout[f"text_encoder.{name}.lora_A.weight"] = kohya[f"{key}.lora_down.weight"]
        peft_layout[f"text_encoder.{name}.lora_B.weight"] = kohya[f"{key}.lora_up.weight"] * (1.0 / 4)
    _merge_the_same(tmp_path, "text_encoder", kohya, peft_layout, len(names))


def _unet_pairs(suffixes: tuple[str, ...], seed: int, rank: int = 4):
    """(layer name, down (r, in), up (out, r)) of random matrices for each Linear of tiny-random's UNet so named."""
    g = torch.Generator().manual_seed(seed)
    for name, module in load_components("tiny-random", device="cpu").unet.named_modules():
        if name.endswith(suffixes):
            out_features, in_features = module.weight.shape
            yield name, torch.randn(rank, in_features, generator=g), torch.randn(out_features, rank, generator=g)


def test_diffusers_first_lora_layout_without_the_unet_prefix_merges_the_same(tmp_path):
    """diffusers' first LoRA files (attention processors' weights: ...processor.to_q_lora.down.weight, no "unet."
    prefix) merge as the same matrices in today's layout do."""
    old, new = {}, {}
    for name, down, up in _unet_pairs(("attn1.to_q", "attn2.to_out.0"), seed=7):
        proc, layer = name.rsplit(".", 1) if not name.endswith("to_out.0") else (name[:-len(".to_out.0")], "to_out")
        old.update({f"{proc}.processor.{layer}_lora.down.weight": down, f"{proc}.processor.{layer}_lora.up.weight": up})
        new.update({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up})
    _merge_the_same(tmp_path, "unet", old, new, len(new) // 2)


def test_an_alpha_kept_among_the_weights_scales_its_layer(tmp_path):
    """"<layer>.alpha" beside "<layer>.lora_A.weight" (some converters write alphas so) is that layer's alpha."""
    inline, scaled = {}, {}
    for name, down, up in _unet_pairs(("attn1.to_k", "ff.net.2"), seed=9):
        inline.update({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up,
                       f"unet.{name}.alpha": torch.tensor(1.0)})
        scaled.update({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up / 4})
    _merge_the_same(tmp_path, "unet", inline, scaled, len(scaled) // 2)


def test_a_file_too_large_for_a_lora_is_refused_before_it_is_read(tiny, tmp_path, monkeypatch):
    import turbostream.lora as lora

    path = tmp_path / "model.safetensors"
    _write(path, {"unet.x.lora_A.weight": torch.ones(64, 64)})
    monkeypatch.setattr(lora, "MAX_LORA_BYTES", 1024)
    _expect_error(tiny, str(path), "more than any LoRA", "checkpoint")
    _expect_error(tiny, str(tmp_path), "more than any LoRA", "model.safetensors")  # the folder's one file


def _write(path, state, metadata=None):
    save_file(state, path, metadata=metadata)
    return str(path)


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny-random", device="cpu")


def _expect_error(tiny, source, *words):
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    with pytest.raises(ModelLoadError) as info:
        merge_loras(tiny.unet, tiny.text_encoder, [source], model="tiny-random")
    message = str(info.value)
    assert all(w in message for w in words), message
    after = tiny.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a refused LoRA changes nothing
    return message


def test_loras_that_cannot_fit_are_refused_with_the_reason(tiny, tmp_path):
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w = tiny.unet.get_submodule(to_q).weight
    good = {f"unet.{to_q}.lora_A.weight": torch.ones(2, w.shape[1]),
            f"unet.{to_q}.lora_B.weight": torch.ones(w.shape[0], 2)}
    _expect_error(tiny, str(tmp_path / "nowhere.safetensors"), "no such file")
    (tmp_path / "empty").mkdir()
    _expect_error(tiny, str(tmp_path / "empty"), "holds no .safetensors")
    (tmp_path / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        _write(tmp_path / "two" / name, good)
    _expect_error(tiny, str(tmp_path / "two"), "2 weight files", "name one")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    _expect_error(tiny, str(tmp_path / "junk.safetensors"), "could not read it")
    sdxl = {**good, "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 32),
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 2)}
    _expect_error(tiny, _write(tmp_path / "sdxl.safetensors", sdxl), "text_encoder_2", "SDXL")
    wide = {f"unet.{to_q}.lora_A.weight": torch.ones(2, w.shape[1] + 8),
            f"unet.{to_q}.lora_B.weight": torch.ones(w.shape[0], 2)}
    _expect_error(tiny, _write(tmp_path / "wide.safetensors", wide), "do not fit", "another model")
    absent = {"unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.ones(2, 4),
              "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight": torch.ones(4, 2)}
    _expect_error(tiny, _write(tmp_path / "absent.safetensors", absent), "is not in the model", "another model")
    half = {f"unet.{to_q}.lora_A.weight": torch.ones(2, w.shape[1])}
    _expect_error(tiny, _write(tmp_path / "half.safetensors", half), "only one of its two")
    dora = {**good, f"unet.{to_q}.lora_magnitude_vector": torch.ones(w.shape[0])}
    _expect_error(tiny, _write(tmp_path / "dora.safetensors", dora), "DoRA")
    _expect_error(tiny, _write(tmp_path / "model.safetensors", {"conv_in.weight": torch.ones(3)}), "no LoRA weights")
    loha = {**good, f"unet.{to_q}.lora_hada_w1_a": torch.ones(2, 2)}
    _expect_error(tiny, _write(tmp_path / "loha.safetensors", loha), "not a LoRA layer", "LoHa")
    bad_text = {**good, "text_encoder.encoder.layers.7.self_attn.q_proj.lora_A.weight": torch.ones(2, 32),
                "text_encoder.encoder.layers.7.self_attn.q_proj.lora_B.weight": torch.ones(32, 2)}
    _expect_error(tiny, _write(tmp_path / "bad_text.safetensors", bad_text), "text_encoder layer", "not in the model")
    # The good one merges (so the refusals above were for the reasons named, not for the layout).
    summaries, live = merge_loras(tiny.unet, tiny.text_encoder, [_write(tmp_path / "good.safetensors", good) + ":0"])
    assert summaries[0]["unet_layers"] == 1 and live is None


def test_lora_specs_read_a_scale_after_the_last_colon():
    assert LoraSpec.parse("style.safetensors") == LoraSpec("style.safetensors", 1.0)
    assert LoraSpec.parse("style.safetensors:0.8") == LoraSpec("style.safetensors", 0.8)
    assert LoraSpec.parse("user/repo:-0.5") == LoraSpec("user/repo", -0.5)
    assert LoraSpec.parse("C:\\loras\\ink.safetensors") == LoraSpec("C:\\loras\\ink.safetensors", 1.0)
    assert LoraSpec.parse("C:\\loras\\ink.safetensors:0.7") == LoraSpec("C:\\loras\\ink.safetensors", 0.7)
    for bad in ("x:11", "x:nan", "x:inf", ":0.5"):
        with pytest.raises(ValueError):
            LoraSpec.parse(bad)
    with pytest.raises(ValueError, match=f"at most {MAX_LORAS}"):
        preset("test", loras=tuple(f"x{i}.safetensors" for i in range(MAX_LORAS + 1)))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "turbostream", *args], capture_output=True, text=True, timeout=240,
                          cwd=cwd)


@pytest.mark.slow
def test_generate_with_a_lora_draws_another_picture_and_bad_ones_get_one_line(peft_lora, tmp_path):
    path, _ = peft_lora
    common = ["generate", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--prompt", "a red fox",
              "--seed", "3"]
    plain = _cli(*common, "-o", str(tmp_path / "plain.png"))
    styled = _cli(*common, "--lora", f"{path}:0.8", "-o", str(tmp_path / "styled.png"), "-v")
    assert plain.returncode == 0 and styled.returncode == 0, plain.stderr + styled.stderr
    assert f"LoRA {path} (scale 0.8) merged" in styled.stderr
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("plain", "styled"))
    assert np.abs(a - b).mean() > 5
    missing = _cli(*common, "--lora", str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    bad_scale = _cli(*common, "--lora", f"{path}:20", "-o", str(tmp_path / "x.png"))
    assert bad_scale.returncode == 2 and "scale must be between -10 and 10" in bad_scale.stderr
    assert "--lora" not in _cli("bench", "--help").stdout  # bench times the model; a merged LoRA costs nothing


def test_the_lora_file_layout_this_test_writes_is_diffusers(peft_lora):
    """The fixture's file carries diffusers' adapter metadata (the alphas the merge must honour)."""
    from safetensors import safe_open

    path, _ = peft_lora
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8 and meta["unet.alpha_pattern"] == {"conv1": 2}
    assert meta["text_encoder.lora_alpha"] == 1


def test_clients_are_shown_a_loras_name_never_the_servers_paths():
    from turbostream.lora import display_name

    assert display_name("/srv/loras/ink-wash.safetensors") == "ink-wash"
    assert display_name("~/trained/ink/pytorch_lora_weights.safetensors") == "ink"
    assert display_name("C:\\loras\\ink.safetensors") == "ink"
    assert display_name("/srv/loras/ink-wash") == "ink-wash"  # a folder
    assert display_name("user/ink-wash-sd-turbo") == "user/ink-wash-sd-turbo"
    assert display_name("user/repo/styles/ink.safetensors") == "user/repo/styles/ink.safetensors"


def test_the_ready_message_names_the_merged_loras(peft_lora):
    """Every connection's first message lists each LoRA's name and scale (and the page shows them: test_browser)."""
    import asyncio

    from websockets.asyncio.client import connect

    from turbostream.config import ServerConfig
    from turbostream.serve import TurboServer

    path, _ = peft_lora
    engine = _engine(LoraSpec(str(path), 0.8), LoraSpec(str(path), -0.2))

    async def main():
        server = TurboServer(engine, ServerConfig(port=0))
        await server.start()
        try:
            assert await server.wait_ready(30)
            async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
                return json.loads(await ws.recv())
        finally:
            await server.stop()

    ready = asyncio.run(asyncio.wait_for(main(), 60))
    assert ready["type"] == "ready"
    name = path.parent.name  # diffusers' pytorch_lora_weights.safetensors: its folder names it
    assert ready["loras"] == [{"name": name, "scale": 0.8}, {"name": name, "scale": -0.2}]


def test_a_lora_that_is_not_there_is_said_before_the_model_loads():
    """A local file or folder that does not exist is one line from the option check; a hub id goes to the hub."""
    from turbostream.lora import looks_local, missing

    for local in ("style.safetensors", "loras/style.safetensors", "./x", "/nowhere/x", "~/x.safetensors",
                  "C:\\loras\\ink.safetensors", "D:/loras/ink.safetensors"):
        assert looks_local(local), local
        assert missing(LoraSpec(local)) == f"--lora {local}: no such file or folder"
    for hub in ("user/repo", "user/repo/style.safetensors", "user/repo/sub/style.safetensors"):
        assert not looks_local(hub) and missing(LoraSpec(hub)) is None, hub
    result = _cli("generate", "x", "--model", "tiny-random", "--device", "cpu", "--lora", "nowhere.safetensors:0.5",
                  "-o", "x.png")
    assert result.returncode == 2 and "--lora nowhere.safetensors: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_options_that_derive_from_the_weights_see_the_merged_ones(peft_lora):
    """The merge comes before the engine prepares its modules: the prompts' cross-attention keys and values
    (--prompt-kv) and the stacked time projections (--fused-time-proj), both copied from the weights, carry the LoRA."""
    path, _ = peft_lora
    spec = LoraSpec(str(path), 0.8)
    plain = _engine(spec).run(_frames(seed=2), PARAMS)
    derived = Engine(preset("test", loras=(spec,), prompt_kv=True, fused_time_proj=True)).run(_frames(seed=2), PARAMS)
    assert parity_stats(derived, plain)["max"] <= 1
    assert np.abs(np.stack(_engine().run(_frames(seed=2), PARAMS)).astype(int) - np.stack(plain)).mean() > 5


@pytest.mark.slow
def test_compiled_artifacts_built_without_a_lora_serve_an_engine_with_one(peft_lora, tmp_path, monkeypatch):
    """--compile-aot's artifacts read the live weights, so the compile cache is not keyed by the LoRA: artifacts built
    without one are loaded (nothing built) by an engine with one, and its frames are that LoRA's."""
    from turbostream.engine.aot import DynamoArtifacts

    path, _ = peft_lora
    config = dict(device="cpu", width=64, height=64, buckets=(1,), compile_cache=str(tmp_path), compile=True,
                  compile_aot=True, aot_format="dynamo")
    built = Engine(preset("test", **config))
    assert built.warmup().aot_packages_built == 3

    def no_build(self, path, *args):
        raise AssertionError(f"an engine with a LoRA must load the artifacts built without one, not build {path.name}")

    monkeypatch.setattr(DynamoArtifacts, "_build", no_build)
    spec = LoraSpec(str(path), 0.8)
    ahead = Engine(preset("test", loras=(spec,), **config))
    stats = ahead.warmup()
    assert (stats.aot_packages_built, stats.aot_packages_loaded) == (0, 3)
    expected = _engine(spec).run(_frames(seed=8), PARAMS)
    assert parity_stats(ahead.run(_frames(seed=8), PARAMS), expected)["max"] <= 1


def test_an_engine_refuses_components_that_carry_other_loras_than_its_config(peft_lora, tiny_components):
    path, _ = peft_lora
    with pytest.raises(ValueError, match="carry the LoRAs"):
        Engine(preset("test", loras=(str(path),)), tiny_components)  # components loaded without it
    merged = load_components("tiny-random", device="cpu", loras=[f"{path}:0.5"])
    with pytest.raises(ValueError, match="carry the LoRAs"):
        Engine(preset("test"), merged)
    assert Engine(preset("test", loras=(f"{path}:0.5",)), merged).loras == merged.loras


def test_a_hub_lora_that_cannot_be_had_says_what_to_do_about_a_lora(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    message = _expect_error(tiny, "someone/ink-wash-lora:0.7",
                            "LoRA someone/ink-wash-lora: it is not in the Hugging Face cache",
                            "HF_HUB_OFFLINE is set", "Give the LoRA's file instead")
    assert "--model" not in message  # the model's advice is not the LoRA's


@pytest.mark.slow
def test_a_hub_lora_in_the_cache_loads_offline(peft_lora, tmp_path):
    """An installation that downloaded `--lora user/repo` once starts again offline: the LoRA comes from the Hugging
    Face cache (the repo's one weight file, whatever its name, or the file named)."""
    import os
    import shutil

    path, _ = peft_lora
    snapshot = tmp_path / "hub" / "models--someone--ink-wash" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    shutil.copy(path, snapshot / "ink-wash-v2.safetensors")
    (tmp_path / "hub" / "models--someone--ink-wash" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--ink-wash" / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    common = [sys.executable, "-m", "turbostream", "generate", "a fox", "--model", "tiny-random", "--device", "cpu",
              "--size", "64", "-o", str(tmp_path / "fox.png")]
    for source in ("someone/ink-wash:0.8", "someone/ink-wash/ink-wash-v2.safetensors:0.8"):
        result = subprocess.run([*common, "--lora", source], capture_output=True, text=True, timeout=240, env=env)
        assert result.returncode == 0, result.stderr
        assert f"LoRA {source.rsplit(':', 1)[0]} (scale 0.8) merged" in result.stderr, result.stderr
    result = subprocess.run([*common, "--lora", "someone/other"], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 2 and "LoRA someone/other: it is not in the Hugging Face cache" in result.stderr
