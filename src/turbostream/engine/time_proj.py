"""Every resnet's time-embedding projection as one GEMM (EngineConfig.fused_time_proj).

Each of SD-Turbo's 22 resnets takes the UNet's time embedding (b, 1280), applies its own SiLU to it and its own
Linear to its channel count: 22 SiLUs of the same tensor and 22 small GEMMs per UNet evaluation, each a kernel launch
of a few microseconds at batch 1. Here the time embedding applies the SiLU once and one Linear whose weight is the 22
weights stacked (1280 -> 20,160 for SD-Turbo), and each resnet takes its own columns of the result (a view): 2 kernels
instead of 44. The same math: each output is the same dot product, so it moves by rounding at most (the GEMM may
sum in another order).

How, without touching the UNet's forward: the time embedding module's class becomes one whose forward also does the
SiLU and the stacked projection (what the UNet hands every block as `temb` is then the projections side by side);
each resnet's time_emb_proj becomes a ProjectionSlice (its weight kept, unused) and its skip_time_act is set, so the
resnet's own code takes its slice where it did SiLU and Linear before. Its parameters and state dict stay; the
stacked weight is one more parameter (time_embedding.stacked_proj: 52 MB in fp16 for SD-Turbo), filled from the
resnets' weights each time the option is applied (so it follows weights loaded since). Undone by
set_fused_time_proj(unet, False); the stacked Linear itself is kept with the UNet (unregistered), so CUDA graphs an
engine captured with it never read freed memory, and applying the option again reuses it. Unregistered, it does not
follow a later unet.to(...) while the option is off; the next apply then makes a new one where the UNet is.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn


class ProjectionSlice(nn.Linear):
    """A resnet's time_emb_proj whose output the stacked projection computed already: its columns of the input."""

    slice_offset: int = 0

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        """(b, stacked width) projections side by side -> (b, out_features), a view."""
        return stacked[:, self.slice_offset:self.slice_offset + self.out_features]


@functools.cache  # one class for the process: module types are compared by identity (and guarded by dynamo)
def _stacked_class() -> type:
    from diffusers.models.embeddings import TimestepEmbedding

    class StackedTimestepEmbedding(TimestepEmbedding):
        """diffusers' TimestepEmbedding, then the resnets' SiLU once and their projections as one Linear."""

        def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
            emb = super().forward(sample, condition)  # (b, time_embed_dim)
            return self.stacked_proj(self.stacked_act(emb))  # (b, sum of the resnets' channels)

    return TimestepEmbedding, StackedTimestepEmbedding


def _projected_resnets(unet: Any) -> list[Any]:
    return [m for m in unet.modules() if getattr(m, "time_emb_proj", None) is not None]


def check_unet(unet: Any) -> None:
    """ValueError unless every block gets the time embedding straight from the time embedding module and only the
    resnets use it, each through SiLU and its time_emb_proj (SD and SD-Turbo's UNets)."""
    plain, stacked = _stacked_class()
    if type(unet.time_embedding) not in (plain, stacked) or unet.time_embed_act is not None \
            or unet.class_embedding is not None or unet.config.addition_embed_type is not None:
        raise ValueError("fused_time_proj: this UNet adds to or transforms its time embedding before the blocks")
    resnets = _projected_resnets(unet)
    acts = {type(r.nonlinearity) for r in resnets}
    if not resnets or len(acts) != 1 or any(type(r.time_emb_proj) not in (nn.Linear, ProjectionSlice)
                                            or (r.skip_time_act and type(r.time_emb_proj) is nn.Linear)
                                            for r in resnets):
        raise ValueError("fused_time_proj: this UNet's resnets do not all apply one activation and a Linear to the "
                         "time embedding")


KEPT = "_turbostream_stacked_time_proj"  # the UNet's instance attribute holding the stacked Linear (unregistered)


def _stacked_linear(unet: Any, resnets: list[Any]) -> nn.Linear:
    """The UNet's stacked Linear (made once, then reused while it fits), filled from the resnets' weights now."""
    projs = [r.time_emb_proj for r in resnets]
    first = projs[0].weight
    width = sum(p.out_features for p in projs)
    linear = unet.__dict__.get(KEPT)
    if linear is None or linear.weight.shape != (width, first.shape[1]) or linear.weight.dtype != first.dtype \
            or linear.weight.device != first.device:
        linear = nn.Linear(first.shape[1], width, device=first.device, dtype=first.dtype).requires_grad_(False)
        unet.__dict__[KEPT] = linear  # not a submodule: in the state dict only while the option is on
    # A Linear first made under inference mode holds inference tensors, which only inference mode may update.
    with torch.inference_mode() if linear.weight.is_inference() else torch.no_grad():
        offset = 0
        for p in projs:  # row by row into the one buffer, which CUDA graphs captured earlier may be reading
            linear.weight[offset:offset + p.out_features].copy_(p.weight)
            if p.bias is not None:
                linear.bias[offset:offset + p.out_features].copy_(p.bias)
            else:
                linear.bias[offset:offset + p.out_features].zero_()
            offset += p.out_features
    return linear


def refresh_stacked(unet: Any) -> bool:
    """Copy the resnets' projection weights into the stacked one again (after they changed in place: a LoRA's live
    scale); whether the option is on (else there is nothing to copy)."""
    _, stacked = _stacked_class()
    if type(unet.time_embedding) is not stacked:
        return False
    _stacked_linear(unet, _projected_resnets(unet))  # the same Linear, filled in place (graphs read it)
    return True


def set_fused_time_proj(unet: Any, on: bool) -> int:
    """Stack the resnets' time-embedding projections into one (on) or undo it; returns how many are stacked."""
    plain, stacked = _stacked_class()
    resnets = _projected_resnets(unet)
    if not on:
        if type(unet.time_embedding) is stacked:
            unet.time_embedding.__class__ = plain
            del unet.time_embedding.stacked_proj, unet.time_embedding.stacked_act  # kept in unet.__dict__[KEPT]
            for r in resnets:
                r.time_emb_proj.__class__ = nn.Linear
                del r.time_emb_proj.slice_offset
                r.skip_time_act = False
        return 0
    check_unet(unet)  # stacked already or not: what it takes must still hold
    if type(unet.time_embedding) is stacked:
        unet.__dict__[KEPT] = unet.time_embedding.stacked_proj  # the one in use (moved with the UNet, if it was)
    linear = _stacked_linear(unet, resnets)  # allocated before any module changes
    if type(unet.time_embedding) is stacked:
        unet.time_embedding.stacked_proj = linear  # the same one, unless it no longer fit the resnets' weights
        return len(resnets)
    offset = 0
    for r in resnets:
        r.time_emb_proj.__class__ = ProjectionSlice
        r.time_emb_proj.slice_offset = offset
        r.skip_time_act = True  # the stacked embedding's SiLU ran already
        offset += r.time_emb_proj.out_features
    embedding = unet.time_embedding
    embedding.__class__ = stacked
    embedding.stacked_proj = linear
    embedding.stacked_act = type(resnets[0].nonlinearity)()
    return len(resnets)
