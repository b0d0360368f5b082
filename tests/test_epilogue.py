"""--fused-epilogue: the Triton bias + skip + ReLU kernel (engine/epilogue.py) against PyTorch, and TAESD's surgery.

Without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py before triton is
imported); on a GPU machine the same tests run it on CUDA. Kernel tests assert fusable(), so a fallback to
PyTorch's ops cannot pass for the kernel. Its ahead-of-time compile for NVIDIA GPUs, and what both fused options
share (refusals, errors), are in tests/test_fused_options.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from turbostream.config import StreamParams, preset
from turbostream.engine import Engine
from turbostream.engine.cuda import apply_options
from turbostream.engine.epilogue import ConvBiasReLU, bias_act, fusable, set_fused_epilogue
from turbostream.engine.triton_support import interpreting

pytest.importorskip("triton", reason="--fused-epilogue needs Triton (pip install triton; Linux x86_64 wheels)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
assert DEVICE == "cuda" or interpreting(), "conftest.py sets TRITON_INTERPRET=1 on machines without CUDA"


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float16, 4e-3)])
def test_kernel_adds_bias_and_skip_and_applies_relu_in_place(layout, dtype, tol):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 12, 7, 9, generator=g) * 3).to(DEVICE, dtype).contiguous(memory_format=layout)
    bias = torch.randn(12, generator=g).to(DEVICE, dtype)
    skip = torch.randn(2, 12, 7, 9, generator=g).to(DEVICE, dtype).contiguous(memory_format=layout)
    for residual in (None, skip):
        for relu in (False, True):
            want = x.double() + bias.double()[None, :, None, None] + (0 if residual is None else residual.double())
            want = F.relu(want) if relu else want
            assert fusable(x, bias, residual)
            out = x.clone()
            got = bias_act(out, bias, residual=residual, relu=relu)
            assert got is out and got.is_contiguous(memory_format=layout)  # written into the conv's output
            assert (got.double() - want).abs().max().item() <= tol * max(1.0, want.abs().max().item() / 4)


@pytest.mark.skipif(DEVICE != "cpu", reason="meta tensors pass fusable()'s device check only in the interpreter")
def test_tensors_past_32_bit_offsets_fall_back_to_pytorch():
    """The kernel's offsets are 32-bit: TAESD's 64 channels at 1024x1024 in a batch of 32 is 2^31 elements and must
    take PyTorch's ops (shapes only: meta tensors, nothing allocated)."""
    bias = torch.zeros(64)
    shape = (1024, 1024)
    assert fusable(torch.empty(31, 64, *shape, dtype=torch.float16, device="meta"), bias)
    assert not fusable(torch.empty(32, 64, *shape, dtype=torch.float16, device="meta"), bias)


def test_a_skip_in_another_layout_falls_back_to_pytorch():
    x = torch.randn(1, 6, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    bias, skip = torch.randn(6, device=DEVICE), torch.randn(1, 6, 5, 5, device=DEVICE)  # NCHW skip
    assert not fusable(x, bias, skip) and not fusable(x[:, :, ::2], bias)
    want = F.relu(x + bias[None, :, None, None] + skip)
    got = bias_act(x.clone(), bias, residual=skip, relu=True)
    assert torch.allclose(got, want, atol=1e-6)


def _coder_out(vae):
    g = torch.Generator().manual_seed(2)
    image = (torch.rand(1, 3, 64, 64, generator=g) * 2 - 1).to(DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        latents = vae.encoder(image)
        return latents, vae.decoder(latents)


def test_taesd_surgery_fuses_every_block_and_is_undone(own_components_fp32):
    own_components = own_components_fp32
    vae = own_components.vae
    blocks = sum(type(m).__name__ == "AutoencoderTinyBlock" for m in vae.modules())
    relus = sum(type(m) is torch.nn.ReLU for m in vae.modules())
    plain = _coder_out(vae)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    applied = apply_options(own_components, preset("test", fused_epilogue=True, device=DEVICE))
    convs = sum(type(m) is ConvBiasReLU for m in vae.modules())
    assert convs == 2 * blocks + 1  # two per block, and the decoder's first conv and its ReLU
    assert applied["fused_epilogues"] == convs + blocks and blocks > 0
    # Left: each block's `fuse` ReLU, which the fused block's forward applies inside its last bias_act.
    assert sum(type(m) is torch.nn.ReLU for m in vae.modules()) == blocks
    fused = _coder_out(vae)
    # float32: rounding only. On CUDA cuDNN may pick another algorithm for a conv without its bias (another order of
    # its sums), and the difference passes through every later conv.
    tol = 1e-5 if DEVICE == "cpu" else 1e-4
    for a, b in zip(fused, plain):
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
    assert set_fused_epilogue(vae, True) == applied["fused_epilogues"]  # idempotent
    assert apply_options(own_components, preset("test", device=DEVICE))["fused_epilogues"] == 0
    # A ReLU module at each place again; a block's two were one shared module before, now they are two.
    assert sum(type(m) is torch.nn.ReLU for m in vae.modules()) == relus + blocks
    assert all(torch.equal(a, b) for a, b in zip(_coder_out(vae), plain))


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU engine's fused path (on CUDA: the gpu test below)")
def test_engine_with_fused_epilogue_within_one_level_and_undone(own_components):
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    params = [StreamParams("ink", strength=0.5, steps=2, seed=s) for s in (1, 2)]
    plain = Engine(preset("test", buckets=(2,)), own_components).run(frames, params)
    fused = Engine(preset("test", buckets=(2,), fused_epilogue=True), own_components).run(frames, params)
    assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(fused, plain)) <= 1
    again = Engine(preset("test", buckets=(2,)), own_components).run(frames, params)
    assert all(np.array_equal(a, b) for a, b in zip(again, plain))


@pytest.mark.gpu
def test_fused_epilogue_in_cuda_graphs_keeps_parity(cuda_option_parity):
    """The compiled kernel inside the engine's CUDA graphs, fp16, TAESD: within the parity rule against float32,
    next to float16 without it."""
    result = cuda_option_parity("tiny", fused_epilogue=True)
    assert result["pass"], result
