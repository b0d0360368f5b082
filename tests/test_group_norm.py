"""--fused-norm: the Triton GroupNorm(+SiLU) kernels (engine/group_norm.py) against PyTorch's ops, and the UNet surgery.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py before triton is
imported); on a GPU machine the same tests run them on CUDA. Their ahead-of-time compile for NVIDIA GPUs, and what
both fused options share (refusals, errors), are in tests/test_fused_options.py. Every kernel test asserts that the
kernel path ran (fusable), so a fallback to PyTorch's ops cannot pass for the kernels.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from turbostream.config import StreamParams, preset
from turbostream.engine import Engine
from turbostream.engine.attention import resnet_class, set_unit_rescale
from turbostream.engine.group_norm import (
    FusedGroupNorm,
    FusedGroupNormSiLU,
    fusable,
    group_norm,
    set_fused_norm,
)
from turbostream.engine.triton_support import interpreting

pytest.importorskip("triton", reason="--fused-norm needs Triton (pip install triton; Linux x86_64 wheels)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
assert DEVICE == "cuda" or interpreting(), "conftest.py sets TRITON_INTERPRET=1 on machines without CUDA"


def _reference(x, groups, w, b, eps, silu):
    # NCHW: PyTorch's channels_last CPU kernel takes E[x^2] - E[x]^2 even in float64 (2 units off at a mean of 1e5).
    y = F.group_norm(x.double().contiguous(), groups, w.double(), b.double(), eps)
    return F.silu(y) if silu else y


@pytest.mark.parametrize(("shape", "groups", "layout", "dtype", "tol"), [
    ((2, 64, 8, 8), 32, torch.channels_last, torch.float32, 1e-5),  # tiny-random's widest norm
    ((1, 40, 40, 40), 10, torch.channels_last, torch.float32, 1e-5),  # 1600 pixels: two blocks a group, merged
    ((2, 30, 5, 7), 3, torch.contiguous_format, torch.float32, 1e-5),  # NCHW, 10 channels a group (not a power of 2)
    ((1, 320, 16, 16), 32, torch.channels_last, torch.float16, 4e-3),  # SD's first level: fp16 rounding (1 ulp at 4)
])
@pytest.mark.parametrize("silu", [False, True])
def test_kernels_match_pytorch_group_norm_and_silu(shape, groups, layout, dtype, tol, silu):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g) * 3 + 2).to(DEVICE, dtype).contiguous(memory_format=layout)
    w = (torch.randn(shape[1], generator=g) + 1).to(DEVICE, dtype)
    b = torch.randn(shape[1], generator=g).to(DEVICE, dtype)
    assert fusable(x, groups, w)
    y = group_norm(x, groups, w, b, 1e-5, silu=silu)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=layout)
    err = (y.double() - _reference(x, groups, w, b, 1e-5, silu)).abs().max().item()
    assert err <= tol, err
    assert torch.equal(group_norm(x, groups, w, b, 1e-5, silu=silu), y)  # no atomics: the same bits again


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_shifts_are_added_before_the_statistics(layout):
    """A resnet's norm2 takes its time embedding (per sample and channel) and conv bias (per channel) as shifts."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 24, 9, 9, generator=g).to(DEVICE).contiguous(memory_format=layout)
    w, b = torch.randn(24, generator=g).to(DEVICE), torch.randn(24, generator=g).to(DEVICE)
    temb, bias = (torch.randn(3, 24, generator=g) * 4).to(DEVICE), torch.randn(24, generator=g).to(DEVICE)
    assert fusable(x, 6, w)
    for shift, channel_shift in ((temb, bias), (temb, None), (None, bias)):
        moved = x + (0 if shift is None else shift[:, :, None, None]) + (
            0 if channel_shift is None else channel_shift[None, :, None, None])
        y = group_norm(x, 6, w, b, 1e-5, silu=True, shift=shift, channel_shift=channel_shift)
        assert (y.double() - _reference(moved, 6, w, b, 1e-5, True)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"shift must be \(3, 24\)"):
        group_norm(x, 6, w, b, 1e-5, shift=temb[:, :12])
    with pytest.raises(ValueError, match=r"channel_shift must be \(24,\)"):
        group_norm(x, 6, w, b, 1e-5, channel_shift=temb)


@pytest.mark.parametrize("mean", [1e3, 1e5])
def test_statistics_survive_a_large_mean(mean):
    """Values mean +- 0.01 in float32. E[x^2] - E[x]^2 would lose the variance entirely; raw float32 sums lose the
    mean's last bits (a block sums to 4e6 at 1000, and on the GPU that moved the output by 1 % of the spread); sums
    taken from the group's first value keep both."""
    g = torch.Generator().manual_seed(5)
    x = (mean + 0.01 * torch.randn(1, 8, 48, 48, generator=g)).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    y = group_norm(x, 2, w, b, 1e-6)
    # x's own float32 rounding is in the reference too (it normalizes the same values in float64).
    assert (y.double() - _reference(x, 2, w, b, 1e-6, False)).abs().max().item() < 1e-5


def test_unfusable_inputs_fall_back_to_pytorch():
    x = torch.randn(2, 6, 5, 5, device=DEVICE)
    w, b = torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE)
    no_affine = group_norm(x, 3, None, None, 1e-5)
    assert not fusable(x, 3, None) and torch.equal(no_affine, F.group_norm(x, 3, None, None, 1e-5))
    strided = x[:, :, :, ::2]  # W stride 2: H and W are not one pixel index
    assert not fusable(strided, 3, w)
    assert torch.equal(group_norm(strided, 3, w, b, 1e-5, silu=True), F.silu(F.group_norm(strided, 3, w, b, 1e-5)))
    shift = torch.randn(2, 6, device=DEVICE)
    assert torch.equal(group_norm(strided, 3, w, b, 1e-5, shift=shift, channel_shift=b),
                       F.group_norm(strided + shift[:, :, None, None] + b[None, :, None, None], 3, w, b, 1e-5))


@pytest.mark.skipif(DEVICE != "cpu", reason="meta tensors pass fusable()'s device check only in the interpreter")
def test_tensors_past_32_bit_offsets_fall_back_to_pytorch():
    """The kernels' offsets are 32-bit: the full VAE's last decoder norm (256 channels at 512x512) at batch 32 has
    2^31 elements and must take PyTorch's ops (shapes only: meta tensors, nothing allocated)."""
    w = torch.ones(256)
    assert fusable(torch.empty(31, 256, 512, 512, dtype=torch.float16, device="meta"), 32, w)
    assert not fusable(torch.empty(32, 256, 512, 512, dtype=torch.float16, device="meta"), 32, w)


def _unet_out(components) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(1, 77, components.text_dim, generator=g).to(DEVICE)
    with torch.inference_mode():
        return components.unet(x, torch.tensor([500.0], device=DEVICE), encoder_hidden_states=emb,
                               return_dict=False)[0]


def test_unet_surgery_fuses_every_group_norm_and_is_undone(own_components_fp32):
    own_components = own_components_fp32
    unet = own_components.unet.to(memory_format=torch.channels_last)
    norms = sum(type(m) is torch.nn.GroupNorm for m in unet.modules())
    plain = _unet_out(own_components)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    assert set_fused_norm(unet, True, resnet_class(False)) == norms
    resnets = [m for m in unet.modules() if type(m).__name__ == "FusedNormResnetBlock2D"]
    assert resnets and all(type(r.norm1) is FusedGroupNormSiLU and type(r.norm2) is FusedGroupNormSiLU for r in resnets)
    assert type(unet.conv_norm_out) is FusedGroupNormSiLU and isinstance(unet.conv_act, torch.nn.Identity)
    assert any(type(m) is FusedGroupNorm for m in unet.modules())  # the transformers' input norms, no SiLU
    assert set_fused_norm(unet, True, resnet_class(False)) == norms  # idempotent
    fused = _unet_out(own_components)
    # float32: rounding only (on CUDA also another cuDNN algorithm for conv1 without its bias)
    assert (fused - plain).abs().max().item() <= 1e-4 * max(1.0, plain.abs().max().item())
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    # Off again, and the lean class when no /1.0 is asked: diffusers' output exactly.
    assert set_fused_norm(unet, False, resnet_class(True)) == 0
    assert all(type(r).__name__ == "LeanResnetBlock2D" for r in resnets)
    assert torch.equal(_unet_out(own_components), plain)
    assert set_unit_rescale(unet, False) == 0
    assert sum(type(m) is torch.nn.GroupNorm for m in unet.modules()) == norms
    assert isinstance(unet.conv_act, torch.nn.SiLU) and torch.equal(_unet_out(own_components), plain)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU engine's fused path (on CUDA: tests/test_engine_gpu.py)")
def test_engine_with_fused_norm_within_one_level_and_undone_for_the_next(own_components):
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    params = [StreamParams("a watercolor", strength=0.5, steps=2, seed=s) for s in (1, 2)]  # one UNet evaluation
    plain = Engine(preset("test", buckets=(2,)), own_components).run(frames, params)
    fused_engine = Engine(preset("test", buckets=(2,), fused_norm=True), own_components)
    assert any(isinstance(m, FusedGroupNorm) for m in own_components.unet.modules())
    fused = fused_engine.run(frames, params)
    assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(fused, plain)) <= 1
    again = Engine(preset("test", buckets=(2,)), own_components).run(frames, params)  # undone by the next engine
    assert not any(isinstance(m, FusedGroupNorm) for m in own_components.unet.modules())
    assert all(np.array_equal(a, b) for a, b in zip(again, plain))


@pytest.mark.gpu
def test_kernels_on_cuda_at_every_sd_turbo_norm_shape():
    """The compiled kernels (not the interpreter) at each (channels, resolution) the SD-Turbo UNet normalizes at
    512x512, fp16 channels_last, batch 1 and 8: within fp16 rounding of float64, and the same bits twice."""
    shapes = [(320, 64), (640, 32), (960, 64), (960, 32), (1280, 16), (1920, 16), (2560, 8), (1280, 8), (640, 64)]
    g = torch.Generator().manual_seed(11)
    for batch in (1, 8):
        for channels, side in shapes:
            x = torch.randn(batch, channels, side, side, generator=g).mul(2).add(0.5).half().cuda()
            x = x.contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(channels, generator=g).half().cuda(), torch.randn(channels, generator=g).half().cuda()
            for silu in (False, True):
                y = group_norm(x, 32, w, b, 1e-5, silu=silu)
                ref = _reference(x, 32, w, b, 1e-5, silu)
                # one fp16 rounding of values up to ~4 * |weight| + |bias| (ulp 2^-8 at 4..8, 2^-7 at 8..16)
                assert (y.double() - ref).abs().max().item() <= 2 ** -7 * (1 + ref.abs().max().item() / 8), (
                    batch, channels, side, silu)
                assert torch.equal(group_norm(x, 32, w, b, 1e-5, silu=silu), y)



def test_speed_script_runs_the_kernels_and_reports_each_shape(tmp_path):
    """scripts/group_norm_speed.py (gpu_check.sh rows times it on the GPU): a dry run through the interpreter."""
    import json
    import subprocess
    import sys

    out = tmp_path / "norm.json"
    cmd = [sys.executable, "scripts/group_norm_speed.py", "--device", DEVICE, "--quick", "--batches", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["part"], r["channels"], r["what"]) for r in rows] == [
        ("unet", 64, "bias + temb + norm + silu"), ("unet", 64, "norm + silu"),
        ("unet", 128, "bias + temb + norm + silu"), ("unet", 128, "norm + silu"),
        ("vae", 64, "bias + norm + silu"), ("vae", 64, "norm + silu")]
    # On CUDA the script runs float16: eager rounds after the shifts, the norm and the SiLU, the kernel once, at values
    # up to ~10 (one float16 step is 2^-7 at 8..16); float32 on the CPU.
    tol = 1e-3 if DEVICE == "cpu" else 2 ** -5
    assert all(r["eager_ms"] > 0 and r["fused_ms"] > 0 and r["max_abs_diff"] <= tol for r in rows), rows
    if DEVICE == "cpu":
        no_triton = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                                   env=dict(os.environ, TRITON_INTERPRET="0"))
        assert no_triton.returncode == 2 and "the fused kernels cannot run on cpu" in no_triton.stderr


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU engine's fused path (on CUDA: tests/test_engine_gpu.py)")
def test_full_vae_norms_are_fused_too_and_undone():
    """--vae full: the AutoencoderKL's resnets, its encoder's and decoder's output norms take the same kernels; its
    attention's group_norm (on token tensors) is left alone."""
    from turbostream.engine.cuda import apply_options
    from turbostream.models import load_components

    comps = load_components("tiny-random", device=DEVICE, vae="full")
    vae_norms = sum(type(m) is torch.nn.GroupNorm for m in comps.vae.modules())
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    params = [StreamParams("a pencil sketch", strength=0.5, steps=2, seed=4)]
    plain = Engine(preset("test", buckets=(1,), vae="full"), comps).run(frames, params)
    applied = apply_options(comps, preset("test", vae="full", fused_norm=True))
    assert applied["vae_fused_norms"] == vae_norms - 2 > 0  # all but the encoder's and decoder's attention norms
    assert type(comps.vae.decoder.conv_norm_out) is FusedGroupNormSiLU
    assert isinstance(comps.vae.encoder.conv_act, torch.nn.Identity)
    for coder in (comps.vae.encoder, comps.vae.decoder):
        assert type(coder.mid_block.attentions[0].group_norm) is torch.nn.GroupNorm
    fused = Engine(preset("test", buckets=(1,), vae="full", fused_norm=True), comps).run(frames, params)
    assert int(np.abs(fused[0].astype(int) - plain[0]).max()) <= 1
    assert apply_options(comps, preset("test", vae="full"))["vae_fused_norms"] == 0
    assert sum(type(m) is torch.nn.GroupNorm for m in comps.vae.modules()) == vae_norms
    assert isinstance(comps.vae.decoder.conv_act, torch.nn.SiLU)
    assert np.array_equal(Engine(preset("test", buckets=(1,), vae="full"), comps).run(frames, params)[0], plain[0])


@pytest.mark.gpu
@pytest.mark.parametrize("vae", ["full", "tiny"])
def test_fused_norm_in_cuda_graphs_keeps_parity(cuda_option_parity, vae):
    """The compiled kernels inside the engine's CUDA graphs, fp16, with the full VAE (its norms fused too) and TAESD:
    within the parity rule against float32, next to float16 without them."""
    result = cuda_option_parity(vae, fused_norm=True)
    assert result["pass"], result
