"""GroupNorm with its SiLU in two Triton kernels, in the activations' own layout (EngineConfig.fused_norm).

Why: eager F.group_norm makes a CUDA input NCHW-contiguous (ATen's group_norm), so a channels_last activation is
copied to NCHW, normalized, and the next conv copies it back; the SiLU after it is one more pass. That is 4 kernels
and 4 trips through memory for each of the UNet's 61 GroupNorms per evaluation (on the H200 the compiled frame,
which fuses these among others, took two thirds of the graphs-only frame's time at batch 1). Here it is 2 kernels:
block statistics, then normalize + affine + SiLU, reading and writing the input's layout. A resnet's norm2 also
takes the conv bias and the time embedding before it (two more elementwise passes in eager).
torch.compile fuses the same on its own, so this is for the path without --compile (which refuses the two together).

Numerics: statistics in float32 as PyTorch's kernel keeps them, summed from the group's first value (a mean large
against the spread costs no precision); each block's mean and sum of squared deviations are
merged with Chan's formula (no E[x^2] - E[x]^2 cancellation), in a fixed order without atomics, so the same input
gives the same bits (CUDA graphs replay it exactly). The output is (x - mean) * rstd*weight + bias: PyTorch's CUDA
kernel folds the mean into one shift (a*x + b), which loses precision when the mean is large against the spread.
The SiLU is applied in float32 before the one rounding to the output dtype (eager rounds after the norm and again
after the SiLU), so the output moves from eager's by rounding only.

Tests run these kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets
before triton is imported), and compile them ahead of time for NVIDIA GPUs without one.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_warmup import record
from .triton_support import check_against, interpreting

# Elements of one block tile (rows of pixels x the channels of one group): enough work per program to hide memory
# latency, few enough registers that a tile of the UNet's widest groups (80 channels) still fits.
TILE_ELEMENTS = 4096


def check_kernels(device: torch.device | str, dtype: torch.dtype) -> None:
    """ValueError (clear) unless the kernels run on `device` in `dtype` and agree with PyTorch there (check_against).
    Compiles them (a second or two, once per machine: Triton caches them on disk)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 8, 8, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, generator=g).to(device, dtype), torch.randn(64, generator=g).to(device, dtype)
    shift = torch.randn(2, 64, generator=g).to(device, dtype)
    want = F.silu(F.group_norm(x.float() + shift.float()[:, :, None, None] + b.float()[None, :, None, None], 32,
                               w.float(), b.float(), 1e-5))
    check_against(device, lambda: group_norm(x, 32, w, b, 1e-5, silu=True, shift=shift, channel_shift=b), want,
                  "PyTorch's GroupNorm")


def _kernels() -> tuple[Any, Any, Any]:
    """(triton, block_stats, normalize); the import defines the kernels, so it comes after the tests' choice of
    interpreter (and costs nothing on an engine without fused_norm)."""
    import triton

    from . import group_norm_kernels as k

    return triton, k.block_stats, k.normalize


def _flat_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(n, c, pixel) strides when H and W can be walked as one pixel index (NCHW or channels_last), else None."""
    if t.stride(2) != t.shape[3] * t.stride(3):
        return None
    return t.stride(0), t.stride(1), t.stride(3)


# The kernels index in 32-bit integers (Triton's type for program ids and small arguments): a tensor of more elements
# (a batch of 32 at 512x512 with 256 channels: the full VAE's last decoder block) would wrap to a negative offset.
MAX_ELEMENTS = 2**31 - 1


def fusable(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None) -> bool:
    """Whether group_norm() runs the kernels for x (else it falls back to PyTorch's ops, same result)."""
    return (x.dim() == 4 and weight is not None and x.shape[1] % num_groups == 0 and 0 < x.numel() <= MAX_ELEMENTS
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and (x.is_cuda or interpreting()) and _flat_strides(x) is not None)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False, shift: torch.Tensor | None = None,
               channel_shift: torch.Tensor | None = None) -> torch.Tensor:
    """F.group_norm(x + shift + channel_shift, num_groups, weight, bias, eps), then F.silu if asked.

    x: (N, C, H, W) in any value range; shift: (N, C) or None, channel_shift: (C,) or None, added to x before the
    statistics (a resnet's time embedding and the previous conv's bias: two elementwise passes less). The output has
    x's dtype and memory format. Runs the Triton kernels where fusable(), PyTorch's ops otherwise.
    """
    n, c = x.shape[:2]
    if shift is not None and (shift.shape != (n, c) or shift.stride(1) != 1):
        raise ValueError(f"shift must be ({n}, {c}) with contiguous channels, got {tuple(shift.shape)}")
    if channel_shift is not None and (channel_shift.shape != (c,) or channel_shift.stride(0) != 1):
        raise ValueError(f"channel_shift must be ({c},) and contiguous, got {tuple(channel_shift.shape)}")
    if not fusable(x, num_groups, weight):
        if shift is not None:
            x = x + shift[:, :, None, None]
        if channel_shift is not None:
            x = x + channel_shift[None, :, None, None]
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y) if silu else y
    triton, block_stats, normalize = _kernels()
    h, w = x.shape[2:]
    hw, cpg = h * w, c // num_groups
    block_cpg = triton.next_power_of_2(cpg)
    block_hw = min(triton.next_power_of_2(hw), max(1, TILE_ELEMENTS // block_cpg))
    blocks = triton.cdiv(hw, block_hw)
    if bias is None:
        bias = torch.zeros_like(weight)
    y = torch.empty_like(x)  # same strides as x (channels_last stays channels_last)
    part = torch.empty(n * num_groups * blocks * 3, device=x.device, dtype=torch.float32)
    grid = (n * num_groups, blocks)
    # A kernel argument must be a tensor even when its constexpr switch leaves it unread.
    a = shift if shift is not None else x
    b = channel_shift if channel_shift is not None else x
    shifts = {"SHIFT_A": shift is not None, "SHIFT_B": channel_shift is not None}
    sx, sa = _flat_strides(x), a.stride(0)
    launches = (
        (block_stats, (x, a, b, part, hw, cpg, num_groups, blocks, *sx, sa),
         dict(**shifts, BLOCK_HW=block_hw, BLOCK_CPG=block_cpg)),
        (normalize, (x, a, b, y, weight, bias, part, hw, cpg, num_groups, blocks, eps, *sx, sa, *_flat_strides(y)),
         dict(**shifts, SILU=silu, BLOCK_P=triton.next_power_of_2(blocks), BLOCK_HW=block_hw, BLOCK_CPG=block_cpg)),
    )
    for kernel, args, kwargs in launches:
        if not record(kernel, grid, args, kwargs):  # warm-up may record the launch to compile it ahead (kernel_warmup)
            kernel[grid](*args, **kwargs)
    return y


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm through group_norm(); same parameters and state dict (modules are switched by class)."""

    silu = False

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None,
                channel_shift: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu, shift, channel_shift)


class FusedGroupNormSiLU(FusedGroupNorm):
    """GroupNorm followed by SiLU in the same pass (the module it follows must not apply the SiLU again)."""

    silu = True


@functools.cache  # one class for the process: module types are compared by identity
def _fused_resnet_class() -> type:
    from diffusers.models.resnet import ResnetBlock2D

    class FusedNormResnetBlock2D(ResnetBlock2D):
        """ResnetBlock2D (diffusers 0.42) for the blocks SD-Turbo has, its norm1 and norm2 FusedGroupNormSiLU: the
        SiLU after each is in the norm's kernel, and so are conv1's bias and the time embedding, which norm2 adds
        before its statistics. Like LeanResnetBlock2D it leaves out the division by 1.0."""

        def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            hidden_states = self.norm1(input_tensor)  # GroupNorm + SiLU
            # conv1 without its bias: the bias and the projected time embedding are added inside norm2's kernel,
            # instead of two elementwise passes over the activations.
            hidden_states = self.conv1._conv_forward(hidden_states, self.conv1.weight, None)
            temb_shift = None
            if self.time_emb_proj is not None:
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)  # the time embedding's SiLU stays a module of its own
                temb_shift = self.time_emb_proj(temb)  # (N, C)
            hidden_states = self.norm2(hidden_states, temb_shift, self.conv1.bias)  # + shifts, GroupNorm + SiLU
            hidden_states = self.conv2(self.dropout(hidden_states))
            if self.conv_shortcut is not None:
                input_tensor = self.conv_shortcut(input_tensor)
            return input_tensor + hidden_states

    return FusedNormResnetBlock2D


def _resnet_fusable(module: Any) -> bool:
    """A ResnetBlock2D whose norms the fused class can take (the configuration every SD / SD-Turbo resnet has)."""
    return (module.output_scale_factor == 1.0 and module.upsample is None and module.downsample is None
            and module.time_embedding_norm == "default" and isinstance(module.nonlinearity, nn.SiLU)
            and type(module.conv1) is nn.Conv2d and module.conv1.bias is not None
            and type(module.norm1) in (nn.GroupNorm, FusedGroupNormSiLU)
            and type(module.norm2) in (nn.GroupNorm, FusedGroupNormSiLU))


def set_fused_norm(model: Any, on: bool, resnet_class: type) -> int:
    """Switch a UNet's or a full VAE's GroupNorms to the fused kernels (on) or back; returns how many are fused.

    On: each eligible resnet becomes FusedNormResnetBlock2D with GroupNorm+SiLU norms; an output norm followed by
    its model's conv_act SiLU (the UNet's, the VAE encoder's and decoder's) takes that SiLU (conv_act becomes
    Identity); every other GroupNorm (the transformers' input norms) becomes FusedGroupNorm. The VAE attention's
    group_norm sees (N, C, tokens) tensors and is left as it is. Off: the resnets become `resnet_class` (diffusers'
    ResnetBlock2D, or the lean one without /1.0) and everything else is undone. Parameters and the state dict are
    untouched either way: only classes change.
    """
    fused = _fused_resnet_class()
    for module in list(model.modules()):  # a list: conv_act is replaced on the way
        if on and type(module) is not fused and type(module).__name__ in ("ResnetBlock2D", "LeanResnetBlock2D") \
                and _resnet_fusable(module):
            module.__class__ = fused
            module.norm1.__class__ = module.norm2.__class__ = FusedGroupNormSiLU
        elif not on and type(module) is fused:
            module.__class__ = resnet_class
            module.norm1.__class__ = module.norm2.__class__ = nn.GroupNorm
        # An output norm: GroupNorm, then its owner's conv_act (SiLU), called one after the other in its forward.
        norm_out, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
        if on and type(norm_out) is nn.GroupNorm and isinstance(act, nn.SiLU):
            norm_out.__class__ = FusedGroupNormSiLU
            module.conv_act = nn.Identity()
        elif not on and type(norm_out) is FusedGroupNormSiLU:
            norm_out.__class__ = nn.GroupNorm
            module.conv_act = nn.SiLU()
    attention_norms = {id(m.group_norm) for m in model.modules() if isinstance(getattr(m, "group_norm", None),
                                                                                 nn.GroupNorm)}
    for module in model.modules():
        if on and type(module) is nn.GroupNorm and id(module) not in attention_norms:
            module.__class__ = FusedGroupNorm
        elif not on and type(module) is FusedGroupNorm:
            module.__class__ = nn.GroupNorm
    return sum(isinstance(m, FusedGroupNorm) for m in model.modules())
