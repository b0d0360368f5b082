"""A conv's bias, a skip add and a ReLU in one pass after cuDNN's conv: TAESD's blocks (EngineConfig.fused_epilogue).

Why: PyTorch runs a cuDNN conv, then adds its bias in a kernel of its own. Each of TAESD's 20 blocks (10 in the
encoder, 10 in the decoder, 64 channels at up to 512x512) then runs a ReLU after its first two convs, and after the
third an add of the skip path and a ReLU: 7 elementwise passes over the activations per block, the largest tensors
of the frame. Here its convs run without their bias, and one kernel per conv adds the bias (and the skip, and the
ReLU) in place: 3 passes. The sums are taken in float32 and rounded once (eager rounds after each), so the output
moves by rounding only. torch.compile fuses these itself, so this is for the path without --compile.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_warmup import record
from .triton_support import check_against, interpreting

BLOCK = 1024  # elements per program of the elementwise kernel


def _kernel() -> tuple[Any, Any]:
    """(triton, bias_act); imported on first use, after the tests' choice of interpreter."""
    import triton

    from . import epilogue_kernels

    return triton, epilogue_kernels.bias_act


def _channel_stride(t: torch.Tensor) -> int | None:
    """How far apart one element's channel neighbours are in a dense (N, C, H, W) tensor: 1 (channels_last), H*W
    (NCHW); None if neither layout is dense."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return 1
    if t.is_contiguous():
        return t.shape[2] * t.shape[3]
    return None


def fusable(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None) -> bool:
    """Whether bias_act() runs the kernel for x (else PyTorch's ops, the same result up to rounding)."""
    # The kernel's offsets are 32-bit (program id x BLOCK): past 2^31 elements they would wrap.
    return (x.dim() == 4 and bias is not None and bias.shape == (x.shape[1],) and bias.is_contiguous()
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and 0 < x.numel() <= 2**31 - 1 - BLOCK
            and (x.is_cuda or interpreting()) and _channel_stride(x) is not None
            and (residual is None or (residual.shape == x.shape and residual.stride() == x.stride()
                                      and residual.dtype == x.dtype)))


def bias_act(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
             relu: bool = False) -> torch.Tensor:
    """relu(x + bias[c] + residual) for a conv's output x (N, C, H, W), any value range; the ReLU and residual if
    asked. Written into x where fusable() (x must be a fresh output nobody else reads), returned either way."""
    if not fusable(x, bias, residual):
        x = x + bias[None, :, None, None]
        if residual is not None:
            x = x + residual
        return F.relu(x) if relu else x
    triton, kernel = _kernel()
    n = x.numel()
    grid = (triton.cdiv(n, BLOCK),)
    args = (x, bias, residual if residual is not None else x, n, x.shape[1], _channel_stride(x))
    kwargs = {"HAS_RES": residual is not None, "RELU": relu, "BLOCK": BLOCK}
    if not record(kernel, grid, args, kwargs):  # warm-up may record the launch to compile it ahead (kernel_warmup)
        kernel[grid](*args, **kwargs)
    return x


class ConvBiasReLU(nn.Conv2d):
    """nn.Conv2d followed by ReLU: the conv without its bias, then bias_act (same parameters, switched by class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(self._conv_forward(x, self.weight, None), self.bias, relu=True)


@functools.cache  # one class for the process: module types are compared by identity
def _fused_block_class() -> type:
    from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock

    class FusedAutoencoderTinyBlock(AutoencoderTinyBlock):
        """AutoencoderTinyBlock (diffusers 0.42) whose third conv's bias, the skip add and the final ReLU are one
        bias_act; its first two conv + ReLU pairs are ConvBiasReLU (the ReLUs Identity)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            layers = self.conv
            h = x
            for i in range(len(layers) - 1):
                h = layers[i](h)
            last = layers[len(layers) - 1]
            out = last._conv_forward(h, last.weight, None)
            return bias_act(out, last.bias, residual=self.skip(x), relu=True)

    return AutoencoderTinyBlock, FusedAutoencoderTinyBlock


def _block_fusable(block: Any) -> bool:
    """TAESD's block as diffusers builds it: its convs with biases, a ReLU to fuse, a skip that returns a fresh or
    the input tensor (Identity, or a 1x1 conv)."""
    last = block.conv[len(block.conv) - 1]
    return (type(block.fuse) is nn.ReLU and type(last) is nn.Conv2d and last.bias is not None
            and type(block.skip) in (nn.Identity, nn.Conv2d))


def set_fused_epilogue(model: Any, on: bool) -> int:
    """Switch TAESD's blocks (and any conv + ReLU pair in an nn.Sequential of `model`) to bias_act (on) or back;
    returns how many convs end in bias_act. Parameters and the state dict are untouched: classes change, and the
    ReLUs folded into a conv become Identity (nn.ReLU again when off)."""
    plain, fused = _fused_block_class()
    for module in list(model.modules()):  # a list: Sequential entries are replaced on the way
        if on and type(module) is plain and _block_fusable(module):
            module.__class__ = fused
        elif not on and type(module) is fused:
            module.__class__ = plain
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, act = module[i], module[i + 1]
                if on and type(conv) is nn.Conv2d and conv.bias is not None and type(act) is nn.ReLU:
                    conv.__class__ = ConvBiasReLU
                    module[i + 1] = nn.Identity()
                elif not on and type(conv) is ConvBiasReLU:
                    conv.__class__ = nn.Conv2d
                    module[i + 1] = nn.ReLU()
    return sum(type(m) in (ConvBiasReLU, fused) for m in model.modules())


def check_kernel(device: torch.device | str, dtype: torch.dtype) -> None:
    """ValueError (clear) unless the kernel runs on `device` in `dtype` and agrees with PyTorch there (check_against)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    bias, res = torch.randn(8, generator=g).to(device, dtype), torch.randn_like(x.float()).to(dtype)
    want = F.relu(x.float() + bias.float()[None, :, None, None] + res.float())
    check_against(device, lambda: bias_act(x.clone(), bias, residual=res, relu=True), want, "PyTorch")
