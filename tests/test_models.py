"""Model resolution: local folders in the diffusers layout, hub ids, and the clear errors when weights are missing."""

from __future__ import annotations

import numpy as np
import pytest

from turbostream.config import StreamParams, preset
from turbostream.models import ModelLoadError, load_components, load_vae


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_components):
    """tiny-random saved as a diffusers folder (unet/, text_encoder/, tokenizer/, scheduler/, vae/) plus a TAESD."""
    root = tmp_path_factory.mktemp("models")
    model, taesd = root / "sd-turbo-tiny", root / "taesd-tiny"
    c = tiny_components
    c.unet.save_pretrained(model / "unet")
    c.text_encoder.save_pretrained(model / "text_encoder")
    c.tokenizer.save_pretrained(model / "tokenizer")
    c.scheduler.save_pretrained(model / "scheduler")
    load_vae("tiny-random", "full").save_pretrained(model / "vae")
    c.vae.save_pretrained(taesd)
    return model, taesd


def test_local_folder_loads_through_the_real_loading_code(saved_model, tiny_components):
    from turbostream.engine import Engine

    model, taesd = saved_model
    comps = load_components(str(model), device="cpu", vae="tiny", taesd=str(taesd))
    assert not comps.random_weights and comps.vae_kind == "tiny"
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ours = Engine(preset("test", model=str(model)), comps).run([frame], [StreamParams("a boat")])[0]
    theirs = Engine(preset("test"), tiny_components).run([frame], [StreamParams("a boat")])[0]
    # Same weights, same pictures (up to float rounding of a differently laid-out load).
    assert np.abs(ours.astype(int) - theirs).max() <= 1
    full = load_components(str(model), device="cpu", vae="full")
    assert full.vae_kind == "full" and type(full.vae).__name__ == "AutoencoderKL"


def test_folder_missing_parts_names_them(saved_model, tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError) as err:
        load_components(str(tmp_path), device="cpu")
    text = str(err.value)
    assert "lacks text_encoder/, tokenizer/, scheduler/" in text and "--model random" in text


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_components(str(tmp_path / "nowhere"), device="cpu")


def test_single_file_checkpoint_says_it_is_not_supported(tmp_path):
    """A .safetensors file (as other tools download SD-Turbo) is a file, not a missing folder."""
    checkpoint = tmp_path / "sd_turbo.safetensors"
    checkpoint.write_bytes(b"x" * 100)
    with pytest.raises(ModelLoadError) as err:
        load_components(str(checkpoint), device="cpu")
    text = str(err.value)
    assert "single-file checkpoints (.safetensors, .ckpt) are not supported" in text
    assert "a folder in the diffusers layout or a Hugging Face hub id" in text and "no such folder" not in text


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        load_components("stabilityai/sd-turbo", device="cpu")
    text = str(err.value)
    assert "Could not load 'stabilityai/sd-turbo': it is not in the Hugging Face cache" in text
    assert "HF_HUB_OFFLINE is set" in text and "--model /path/to/sd-turbo" in text and "--model random" in text


def test_unreachable_hub_fails_fast_with_a_clear_error(monkeypatch, tmp_path):
    """No minutes of per-file retries: one probe, then one message."""
    import huggingface_hub

    def unreachable(self, repo, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ModelLoadError) as err:
        load_components("stabilityai/sd-turbo", device="cpu")
    text = str(err.value)
    assert "the hub is unreachable (Name or service not known), and the Hugging Face cache has no copy" in text


def test_missing_taesd_suggests_full_vae(saved_model, tmp_path):
    model, _ = saved_model
    with pytest.raises(ModelLoadError, match="--vae full"):
        load_components(str(model), device="cpu", vae="tiny", taesd=str(tmp_path / "no-taesd"))


def test_cli_prints_one_message_without_traceback(tmp_path, capsys):
    from turbostream.cli import main

    code = main(["bench", "--model", str(tmp_path / "missing"), "--device", "cpu", "--size", "64"])
    err = capsys.readouterr().err
    assert code == 2
    assert "turbostream: error: Could not load model" in err and "Traceback" not in err


def test_random_configs_are_the_sd_turbo_architecture():
    """The full-size random model: parameter counts of SD-Turbo's UNet (865.9 M) and OpenCLIP-H text tower."""
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    cfg_dir = Path(__import__("turbostream").__file__).parent / "model_configs" / "random"
    unet_cfg = json.loads((cfg_dir / "unet.json").read_text())
    import torch

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 865.9
    te = json.loads((cfg_dir / "text_encoder.json").read_text())
    shape = (te["hidden_size"], te["num_hidden_layers"], te["num_attention_heads"], te["hidden_act"])
    assert shape == (1024, 23, 16, "gelu")
    sched = json.loads((cfg_dir / "scheduler.json").read_text())
    assert sched["timestep_spacing"] == "trailing" and sched["steps_offset"] == 1
