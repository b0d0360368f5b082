"""--lora-live: LoRA scales changed while the engine runs give the frames a fresh start at those scales would."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from turbostream.config import StreamParams, preset
from turbostream.engine import Engine
from turbostream.engine.cuda import refresh_derived_weights
from turbostream.engine.time_proj import set_fused_time_proj
from turbostream.models import load_components

UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "time_emb_proj", "ff.net.2")
TEXT_LAYERS = ("q_proj", "v_proj", "fc1")
PARAMS = [StreamParams("a red fox", 0.5, 2, 3), StreamParams("a lighthouse", 0.7, 2, 11)]


def _frames(n: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def _lora(path, seed: int = 0, rank: int = 2) -> str:
    """A LoRA in the PEFT layout of the UNet's attention, feed-forward, 3x3 convs and time projections and the text
    encoder's attention and MLP, random matrices large enough to change the pictures."""
    comps = load_components("tiny-random", device="cpu")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for part, root, ends in (("unet", comps.unet, UNET_LAYERS), ("text_encoder", comps.text_encoder, TEXT_LAYERS)):
        for name, module in root.named_modules():
            if name.endswith(ends) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                w = module.weight
                state[f"{part}.{name}.lora_A.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
                state[f"{part}.{name}.lora_B.weight"] = torch.randn(w.shape[0], rank, *[1] * (w.ndim - 2),
                                                                    generator=g) * 0.3
    save_file(state, str(path))
    return str(path)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("live")
    return _lora(folder / "ink.safetensors", 0), _lora(folder / "chalk.safetensors", 1)


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_scales_changed_live_give_the_frames_of_a_fresh_start_at_those_scales(loras):
    """Back and forth, with the options that copy the weights (stacked time projections) or cache what is made of
    them (prompt embeddings through a text-encoder LoRA, prompt_kv's keys and values): bit for bit a fresh start."""
    ink, chalk = loras
    options = dict(prompt_kv=True, fused_time_proj=True)
    live = Engine(preset("test", loras=(f"{ink}:0.2", f"{chalk}:0"), lora_live=True, **options))
    before = live.run(_frames(), PARAMS)
    runs = live.stats.text_encoder_runs
    for scales in ([1.0, 0.0], [-0.5, 0.7], [0.9, 0.7]):
        assert [x["scale"] for x in live.set_lora_scales(scales)] == scales
    after = live.run(_frames(), PARAMS)
    assert live.stats.text_encoder_runs == runs + 2  # the prompts were encoded again, through the new weights
    fresh = Engine(preset("test", loras=(f"{ink}:0.9", f"{chalk}:0.7"), **options))  # merged at load, not live
    assert all(np.array_equal(x, y) for x, y in zip(after, fresh.run(_frames(), PARAMS)))
    assert _same_weights(live.unet, fresh.unet) and _same_weights(live.text_encoder, fresh.text_encoder)
    assert np.abs(np.stack(after).astype(int) - np.stack(before)).mean() > 5  # the change shows
    live.set_lora_scales([0.2, 0.0])
    assert all(np.array_equal(x, y) for x, y in zip(live.run(_frames(), PARAMS), before))  # and goes back exactly
    assert [(x["name"], x["scale"]) for x in live.loras] == [("ink", 0.2), ("chalk", 0.0)]


def test_half_precision_weights_do_not_drift_however_often_the_scale_moves(loras):
    """Each change recomputes a layer from its weights before the LoRA: after a fader's worth of changes the fp16
    weights are those of a fresh load at the last scale, where adding differences would round once per change."""
    ink, _ = loras
    moved = load_components("tiny-random", device="cpu", dtype=torch.float16, loras=[f"{ink}:0.3"], lora_live=True)
    rng = np.random.default_rng(0)
    for scale in rng.uniform(-2, 2, 200):
        moved.lora_live.set_scales([float(scale)])
    moved.lora_live.set_scales([0.3])
    fresh = load_components("tiny-random", device="cpu", dtype=torch.float16, loras=[f"{ink}:0.3"])
    assert _same_weights(moved.unet, fresh.unet) and _same_weights(moved.text_encoder, fresh.text_encoder)


def test_fused_and_stacked_projections_follow_a_live_change(loras):
    """On CUDA the engine runs fused QKV projections (copies of to_q, to_k, to_v) and, with fused_time_proj, one
    stacked time projection: both are refreshed from the changed weights, in place (graphs read them there)."""
    ink, _ = loras
    comps = load_components("tiny-random", device="cpu", loras=[f"{ink}:0.5"], lora_live=True)
    comps.unet.fuse_qkv_projections()
    set_fused_time_proj(comps.unet, True)
    attn = comps.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    cross = comps.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    stacked = comps.unet.time_embedding.stacked_proj
    where = (attn.to_qkv.weight.data_ptr(), cross.to_kv.weight.data_ptr(), stacked.weight.data_ptr())
    old = attn.to_qkv.weight.clone()
    comps.lora_live.set_scales([-1.0])
    assert torch.equal(attn.to_qkv.weight, old)  # stale until refreshed
    assert refresh_derived_weights(comps.unet) > 0
    assert torch.equal(attn.to_qkv.weight, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    assert torch.equal(cross.to_kv.weight, torch.cat([cross.to_k.weight, cross.to_v.weight]))
    first = comps.unet.down_blocks[0].resnets[0].time_emb_proj
    assert torch.equal(stacked.weight[:first.out_features], first.weight)
    assert (attn.to_qkv.weight.data_ptr(), cross.to_kv.weight.data_ptr(), stacked.weight.data_ptr()) == where


def test_feature_reuse_runs_a_full_frame_after_a_change(loras):
    """Deep features kept from before a change were computed with the old weights: every stream recomputes them."""
    ink, _ = loras
    engine = Engine(preset("test", loras=(f"{ink}:0.5",), lora_live=True, feature_reuse=True))
    p = StreamParams("a red fox", 0.5, 2, 3, reuse=4)
    engine.run(_frames(1), [p], streams=["a"])
    engine.run(_frames(1, seed=1), [p], streams=["a"])
    partial = engine.stats.reuse_partial_batches
    assert partial == 1
    engine.set_lora_scales([1.0])
    engine.run(_frames(1, seed=2), [p], streams=["a"])
    assert engine.stats.reuse_partial_batches == partial  # a full frame, keeping new deep features
    engine.run(_frames(1, seed=3), [p], streams=["a"])
    assert engine.stats.reuse_partial_batches == partial + 1


def test_scales_that_cannot_apply_are_refused_and_change_nothing(loras, tiny_components):
    ink, chalk = loras
    with pytest.raises(ValueError, match="start it with lora_live"):
        Engine(preset("test")).set_lora_scales([])
    with pytest.raises(ValueError, match="name at least one"):
        preset("test", lora_live=True)
    with pytest.raises(ValueError, match="fp8"):
        preset("test", loras=(ink,), lora_live=True, fp8=True)
    with pytest.raises(ValueError, match="disagree on lora_live"):
        Engine(preset("test", loras=(ink,), lora_live=True), load_components("tiny-random", loras=[ink]))
    engine = Engine(preset("test", loras=(ink, f"{chalk}:0.5"), lora_live=True))
    weights = {k: v.clone() for k, v in engine.unet.state_dict().items()}
    for scales, words in (([1.0], "expected 2 LoRA scale"), ([1.0, 11.0], "between -10 and 10"),
                          ([1.0, float("nan")], "between"), ([True, 1.0], "must be a number"),
                          (["0.5", 1.0], "must be a number")):
        with pytest.raises(ValueError, match=words):
            engine.set_lora_scales(scales)
    assert [x["scale"] for x in engine.loras] == [1.0, 0.5]
    assert all(torch.equal(v, engine.unet.state_dict()[k]) for k, v in weights.items())
    errors = []
    thread = threading.Thread(target=lambda: _catch(errors, engine.set_lora_scales, [0.0, 0.0]))
    thread.start()
    thread.join()
    assert errors and "second thread" in errors[0]  # the engine's thread only: graphs may be replaying


def _catch(errors: list, call, *args) -> None:
    try:
        call(*args)
    except RuntimeError as exc:
        errors.append(str(exc))
