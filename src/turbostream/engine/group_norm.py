"""GroupNorm with its SiLU in two Triton kernels, in the activations' own layout (EngineConfig.fused_norm).

Why: eager F.group_norm on a channels_last activation first copies it to NCHW, normalizes, and the next conv copies
it back; the SiLU after it is one more pass. That is 4 kernels and 4 trips through memory for each of the UNet's 61
GroupNorms per evaluation, and at batch 1 the graphs-only frame is bound by such small memory-bound kernels. Here
it is 2 kernels: block statistics, then normalize + affine + SiLU, reading and writing the input's layout.
torch.compile fuses the same on its own, so this is for the path without --compile (which refuses the two together).

Numerics: statistics in float32 as PyTorch's kernel keeps them; each block's mean and sum of squared deviations are
merged with Chan's formula (no E[x^2] - E[x]^2 cancellation), in a fixed order without atomics, so the same input
gives the same bits (CUDA graphs replay it exactly). The output is (x - mean) * rstd*weight + bias: PyTorch's CUDA
kernel folds the mean into one shift (a*x + b), which cancels catastrophically when the mean is large against the
spread. The SiLU is applied in float32 before the one rounding to the output dtype (eager rounds after the norm and
again after the SiLU), so the output moves from eager's by rounding only.

Tests run these kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before the first call).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Elements of one block tile (rows of pixels x the channels of one group): enough work per program to hide memory
# latency, few enough registers that a tile of the UNet's widest groups (80 channels) still fits.
TILE_ELEMENTS = 4096


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1): the tests' way to run them."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_problem(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on `device` (None when they can): they need Triton, and CUDA or its interpreter."""
    if torch.device(device).type != "cuda" and not interpreting():
        return "it runs Triton kernels, which need a CUDA GPU"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"it needs Triton, which cannot be imported here ({exc}): pip install triton"
    return None


@functools.cache  # the kernels are defined at first use, after the tests chose the interpreter
def _kernels() -> tuple[Any, Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def block_stats(x_ptr, part_ptr, HW, CPG, G, P, stride_n, stride_c, stride_hw,
                    BLOCK_HW: tl.constexpr, BLOCK_CPG: tl.constexpr):
        """Program (n*G + g, p): count, mean and sum of squared deviations of one block of group g in sample n."""
        ng = tl.program_id(0)
        p = tl.program_id(1)
        n = ng // G
        g = ng % G
        hw = p * BLOCK_HW + tl.arange(0, BLOCK_HW)
        c = tl.arange(0, BLOCK_CPG)
        mask = (hw < HW)[:, None] & (c < CPG)[None, :]
        ptrs = x_ptr + n * stride_n + (g * CPG + c)[None, :] * stride_c + hw[:, None] * stride_hw
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
        d = tl.where(mask, x - mean, 0.0)
        m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        out = part_ptr + (ng * P + p) * 3
        tl.store(out, count)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)

    @triton.jit
    def normalize(x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, HW, CPG, G, P, eps,
                  sx_n, sx_c, sx_hw, sy_n, sy_c, sy_hw,
                  SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_CPG: tl.constexpr):
        """Program (n*G + g, p): merge group g's block statistics, then write a*x + b (and its SiLU) for block p."""
        ng = tl.program_id(0)
        p = tl.program_id(1)
        n = ng // G
        g = ng % G
        blocks = tl.arange(0, BLOCK_P)
        have = blocks < P
        part = part_ptr + (ng * P + blocks) * 3
        counts = tl.load(part, mask=have, other=0.0)
        means = tl.load(part + 1, mask=have, other=0.0)
        m2s = tl.load(part + 2, mask=have, other=0.0)
        total = tl.sum(counts, axis=0)
        mean = tl.sum(counts * means, axis=0) / total
        spread = tl.where(have, means - mean, 0.0)
        var = (tl.sum(m2s, axis=0) + tl.sum(counts * spread * spread, axis=0)) / total
        rstd = 1.0 / tl.sqrt(var + eps)
        hw = p * BLOCK_HW + tl.arange(0, BLOCK_HW)
        c = tl.arange(0, BLOCK_CPG)
        cmask = c < CPG
        mask = (hw < HW)[:, None] & cmask[None, :]
        ch = g * CPG + c
        x = tl.load(x_ptr + n * sx_n + ch[None, :] * sx_c + hw[:, None] * sx_hw, mask=mask, other=0.0)
        w = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
        y = (x.to(tl.float32) - mean) * (rstd * w)[None, :] + b[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + n * sy_n + ch[None, :] * sy_c + hw[:, None] * sy_hw, y.to(y_ptr.dtype.element_ty), mask=mask)

    return triton, block_stats, normalize


def _flat_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(n, c, pixel) strides when H and W can be walked as one pixel index (NCHW or channels_last), else None."""
    if t.stride(2) != t.shape[3] * t.stride(3):
        return None
    return t.stride(0), t.stride(1), t.stride(3)


def fusable(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None) -> bool:
    """Whether group_norm() runs the kernels for x (else it falls back to PyTorch's ops, same result)."""
    return (x.dim() == 4 and weight is not None and x.shape[1] % num_groups == 0 and x.numel() > 0
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and (x.is_cuda or interpreting()) and _flat_strides(x) is not None)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps), then F.silu if asked; x (N, C, H, W) in any value range.

    The output has x's dtype and memory format. Runs the Triton kernels where fusable(), PyTorch's ops otherwise.
    """
    if not fusable(x, num_groups, weight):
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y) if silu else y
    triton, block_stats, normalize = _kernels()
    n, c, h, w = x.shape
    hw, cpg = h * w, c // num_groups
    block_cpg = triton.next_power_of_2(cpg)
    block_hw = min(triton.next_power_of_2(hw), max(1, TILE_ELEMENTS // block_cpg))
    blocks = triton.cdiv(hw, block_hw)
    if bias is None:
        bias = torch.zeros_like(weight)
    y = torch.empty_like(x)  # same strides as x (channels_last stays channels_last)
    part = torch.empty(n * num_groups * blocks * 3, device=x.device, dtype=torch.float32)
    grid = (n * num_groups, blocks)
    block_stats[grid](x, part, hw, cpg, num_groups, blocks, *_flat_strides(x),
                      BLOCK_HW=block_hw, BLOCK_CPG=block_cpg)
    normalize[grid](x, y, weight, bias, part, hw, cpg, num_groups, blocks, eps, *_flat_strides(x), *_flat_strides(y),
                    SILU=silu, BLOCK_P=triton.next_power_of_2(blocks), BLOCK_HW=block_hw, BLOCK_CPG=block_cpg)
    return y


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm through group_norm(); same parameters and state dict (modules are switched by class)."""

    silu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)


class FusedGroupNormSiLU(FusedGroupNorm):
    """GroupNorm followed by SiLU in the same pass (the module it follows must not apply the SiLU again)."""

    silu = True


@functools.cache  # one class for the process: module types are compared by identity
def _fused_resnet_class() -> type:
    from diffusers.models.resnet import ResnetBlock2D

    class FusedNormResnetBlock2D(ResnetBlock2D):
        """ResnetBlock2D (diffusers 0.42) for the blocks SD-Turbo has, its norm1 and norm2 FusedGroupNormSiLU: the
        SiLU after each is in the norm's kernel. Like LeanResnetBlock2D it leaves out the division by 1.0."""

        def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            hidden_states = self.conv1(self.norm1(input_tensor))  # norm1: GroupNorm + SiLU
            if self.time_emb_proj is not None:
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)  # the time embedding's SiLU stays a module of its own
                temb = self.time_emb_proj(temb)[:, :, None, None]
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.conv2(self.dropout(self.norm2(hidden_states)))  # norm2: GroupNorm + SiLU
            if self.conv_shortcut is not None:
                input_tensor = self.conv_shortcut(input_tensor)
            return input_tensor + hidden_states

    return FusedNormResnetBlock2D


def _resnet_fusable(module: Any) -> bool:
    """A ResnetBlock2D whose norms the fused class can take (the configuration every SD / SD-Turbo resnet has)."""
    return (module.output_scale_factor == 1.0 and module.upsample is None and module.downsample is None
            and module.time_embedding_norm == "default" and isinstance(module.nonlinearity, nn.SiLU)
            and type(module.norm1) in (nn.GroupNorm, FusedGroupNormSiLU)
            and type(module.norm2) in (nn.GroupNorm, FusedGroupNormSiLU))


def set_fused_norm(unet: Any, on: bool, resnet_class: type) -> int:
    """Switch the UNet's GroupNorms to the fused kernels (on) or back; returns how many GroupNorms are fused.

    On: each eligible resnet becomes FusedNormResnetBlock2D with GroupNorm+SiLU norms, the transformers' GroupNorms
    FusedGroupNorm, and the output norm takes the UNet's final SiLU (conv_act becomes Identity). Off: the resnets
    become `resnet_class` (diffusers' ResnetBlock2D, or the lean one without /1.0) and everything else is undone.
    Parameters and the state dict are untouched either way: only classes change.
    """
    fused = _fused_resnet_class()
    for module in unet.modules():
        if on and type(module) is not fused and type(module).__name__ in ("ResnetBlock2D", "LeanResnetBlock2D") \
                and _resnet_fusable(module):
            module.__class__ = fused
            module.norm1.__class__ = module.norm2.__class__ = FusedGroupNormSiLU
        elif not on and type(module) is fused:
            module.__class__ = resnet_class
            module.norm1.__class__ = module.norm2.__class__ = nn.GroupNorm
    # The output norm: GroupNorm then the UNet's conv_act (SiLU), called one after the other in its forward.
    norm_out, act = getattr(unet, "conv_norm_out", None), getattr(unet, "conv_act", None)
    if on and type(norm_out) is nn.GroupNorm and isinstance(act, nn.SiLU):
        norm_out.__class__ = FusedGroupNormSiLU
        unet.conv_act = nn.Identity()
    elif not on and type(norm_out) is FusedGroupNormSiLU:
        norm_out.__class__ = nn.GroupNorm
        unet.conv_act = nn.SiLU()
    # Every other GroupNorm (the transformers' input norms): no activation follows it.
    for module in unet.modules():
        if on and type(module) is nn.GroupNorm:
            module.__class__ = FusedGroupNorm
        elif not on and type(module) is FusedGroupNorm:
            module.__class__ = nn.GroupNorm
    return sum(isinstance(m, FusedGroupNorm) for m in unet.modules())
