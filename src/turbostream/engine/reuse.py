"""Temporal feature reuse: run the UNet in full, or recompute only its shallow blocks and reuse the deep ones.

DeepCache (Ma et al., 2023) observed that the low-resolution blocks of a diffusion UNet change slowly from one
denoising step to the next, so their output can be cached and only the high-resolution outer blocks recomputed.
Consecutive video frames are alike in the same way, so here the cache spans frames instead of steps: a full frame
runs the whole UNet and keeps the hidden states entering its outer up block(s) (the "deep features"); the frames
between recompute the time embedding, conv_in, the outer down block(s), the outer up block(s) and the output head,
and take everything below from the last full frame. The outer up blocks still see this frame's own skip connections
(from the recomputed outer down blocks), which carry the fine detail; what is reused is the coarse layout.

`layers` moves the cut inside the innermost recomputed up block, as DeepCache's finer "layer" cache points do: a
partial frame then recomputes only that block's last `layers` (resnet, attention) layers, and of the down path only
what makes their skip connections (conv_in and the first layers of the matching down block). In SD-Turbo the
outermost pair (64x64 latents at 512x512) holds 38 % of the UNet's FLOPs (305 of 804 GFLOP): its last up layer
alone is a fifth of that (63), so `layers=1` is the cheapest partial frame and the furthest from a full one.

`full` is diffusers' UNet2DConditionModel.forward (0.42.1) re-sequenced for the configuration SD-Turbo uses (no class
labels, no added conditioning, no ControlNet/adapter residuals, no GLIGEN): the same blocks are called with the same
arguments in the same order, so its eps equals `unet(sample, t, encoder_hidden_states=..., return_dict=False)[0]` bit
for bit. Neither call allocates anything the caller keeps besides its returned eps, syncs the host, or branches on
tensor values, so both can be captured into CUDA graphs; the deep features live in a buffer the caller owns.
"""

from __future__ import annotations

from typing import Any

import torch

# The block types of SD 1.x / 2.x / SD-Turbo, whose call signatures and skip-connection counts this module mirrors.
# Others (K-diffusion blocks, SimpleCrossAttn, 3D/temporal blocks) consume their residuals differently.
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


class UnsupportedUNetError(ValueError):
    """The UNet's configuration is one that FeatureReuse does not mirror (raised at construction)."""


class FeatureReuse:
    """Two ways through one UNet2DConditionModel: `full` (whole forward, keeps deep features) and `partial`.

    depth: how many outer down/up block pairs `partial` recomputes (1 = DeepCache's choice: the highest-resolution
    pair only; more pairs are more faithful and slower). The deep features are the hidden states entering up block
    len(up_blocks) - depth.
    layers: how many of that up block's (resnet, attention) layers `partial` recomputes, counted from its end (None:
    all of them, the whole block). Fewer is faster and further from `full`; the deep features are then the hidden
    states entering the first recomputed layer.
    """

    def __init__(self, unet: Any, depth: int = 1, layers: int | None = None) -> None:
        self.unet = unet
        _check_supported(unet)
        n_up = len(unet.up_blocks)
        # depth == n_up reuses only the mid block's output: still meaningful, but only when there is a mid block.
        max_depth = n_up if unet.mid_block is not None else n_up - 1
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= max_depth:
            raise ValueError(f"depth must be an integer from 1 to {max_depth} for this UNet "
                             f"({n_up} up blocks{'' if unet.mid_block is not None else ', no mid block'}), "
                             f"got {depth!r}")
        self.depth = depth
        self._first_up = n_up - depth  # index of the first recomputed up block
        n_layers = len(unet.up_blocks[self._first_up].resnets)
        if layers is None:
            layers = n_layers
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n_layers:
            raise ValueError(f"layers must be an integer from 1 to {n_layers} for depth {depth} (up block "
                             f"{self._first_up} has {n_layers} layers), got {layers!r}")
        self.layers = layers
        self._split = n_layers - layers  # the first up block's layers before the cut (run by `full` only)
        if self._split and _freeu_enabled(unet.up_blocks[self._first_up]):
            raise UnsupportedUNetError("feature reuse with layers < the whole block does not apply FreeU: disable it")
        # The recomputed up layers consume the first `need` skip connections of the full forward's stack (conv_in's
        # output, then each down block's resnet and downsampler outputs, in order); diffusers pops them from the end,
        # so the outermost up block takes the first ones, and a block's last layer the first of its own.
        self._need = sum(len(up.resnets) for up in unet.up_blocks[self._first_up + 1:]) + layers
        have = 1 + sum(len(d.resnets) + (1 if d.downsamplers is not None else 0) for d in unet.down_blocks[:depth])
        if self._need > have:
            raise UnsupportedUNetError(
                f"the outer {depth} up block(s) take {self._need} skip connections but the outer {depth} down "
                f"block(s) give only {have}: this UNet's blocks are not paired the way SD's are")

    # ------------------------------------------------------------------------------------------------ shapes

    @property
    def deep_dtype(self) -> torch.dtype:
        """The dtype of the deep features: the UNet's."""
        return self.unet.dtype

    def deep_shape(self, batch: int, latent_h: int, latent_w: int) -> tuple[int, int, int, int]:
        """(batch, C, h, w) of the deep features for latents (batch, 4, latent_h, latent_w)."""
        h, w = latent_h, latent_w
        # The deep features sit at the resolution of up block (n - depth)'s output = down block (depth - 1)'s input;
        # each stride-2, padding-1, 3x3 downsampler maps a side s to ceil(s / 2) (diffusers forwards that size to the
        # upsamplers when a side is not a multiple of 2**num_upsamplers, so the up path lands on it too).
        for down in self.unet.down_blocks[: self.depth - 1]:
            if down.downsamplers is not None:
                h, w = (h + 1) // 2, (w + 1) // 2
        # Up blocks upsample at their end: inside the cut block the resolution is still that of its input.
        prev = self.unet.up_blocks[self._first_up - 1] if self._first_up > 0 else None
        if self._split:
            channels = self.unet.up_blocks[self._first_up].resnets[self._split - 1].out_channels
        elif prev is not None:
            channels = prev.resnets[-1].out_channels
        else:
            channels = self.unet.mid_block.resnets[-1].out_channels
        return (batch, channels, h, w)

    def empty_deep(self, batch: int, latent_h: int, latent_w: int, device: torch.device | str | None = None):
        """An uninitialized deep-features buffer in the UNet's dtype, device and memory format.

        channels_last when the UNet's convolutions are (prepare_cuda sets it): `partial` then concatenates tensors of
        one layout, as `full` does, and the convolutions choose the same kernels on both paths.
        """
        weight = self.unet.conv_in.weight
        fmt = torch.channels_last if (weight.is_contiguous(memory_format=torch.channels_last)
                                      and not weight.is_contiguous()) else torch.contiguous_format
        return torch.empty(self.deep_shape(batch, latent_h, latent_w), dtype=self.deep_dtype,
                           device=device if device is not None else weight.device, memory_format=fmt)

    # ------------------------------------------------------------------------------------------------ forward

    def full(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
             deep_out: torch.Tensor) -> torch.Tensor:
        """eps (b, 4, h, w), unbounded, UNet dtype, exactly as unet(...) gives it; deep_out (deep_shape) <- deep features.

        sample (b, 4, h, w) scaled noisy latents in the UNet dtype; timestep a scalar or (b,) tensor (0..999);
        encoder_hidden_states (b, T, D) prompt embeddings in the UNet dtype.
        """
        self._check_deep(deep_out, sample, "deep_out")
        eps, deep = self.full_and_deep(sample, timestep, encoder_hidden_states)
        # copy_ into the caller's static buffer: nothing new for the caller to keep, and a CUDA graph sees one fixed
        # address.
        deep_out.copy_(deep)
        return eps

    def full_and_deep(self, sample: torch.Tensor, timestep: torch.Tensor,
                      encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`full` returning its deep features (deep_shape) instead of writing them: one tensor function (export)."""
        emb, states, stack, upsample_size_needed = self._head(sample, timestep, encoder_hidden_states)
        unet = self.unet
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                states = unet.mid_block(states, emb, encoder_hidden_states=encoder_hidden_states,
                                        attention_mask=None, cross_attention_kwargs=None, encoder_attention_mask=None)
            else:
                states = unet.mid_block(states, emb)
        stack, states = self._up(unet.up_blocks[: self._first_up], states, emb, encoder_hidden_states, stack,
                                 upsample_size_needed, first_index=0)
        if self._split:  # the cut block's layers before the cut; they pop its last skips (no upsampling: not its end)
            res, stack = stack[-self._split:], stack[: -self._split]
            states = self._up_layers(unet.up_blocks[self._first_up], 0, states, emb, encoder_hidden_states, res, None)
        return self._tail(states, emb, encoder_hidden_states, stack, upsample_size_needed), states

    def partial(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                deep_in: torch.Tensor) -> torch.Tensor:
        """eps (b, 4, h, w) approximated: outer blocks on this sample, deep_in (deep_shape, read only) for the rest.

        Same inputs and output as `full`; equal to `full`'s eps when deep_in came from `full` on these same inputs.
        """
        self._check_deep(deep_in, sample, "deep_in")
        # Only as much of the down path as makes the skips the recomputed up layers pop (not, say, the outer down
        # block's downsampler, whose output only deeper up blocks read).
        emb, _, stack, upsample_size_needed = self._head(sample, timestep, encoder_hidden_states, need=self._need)
        return self._tail(deep_in, emb, encoder_hidden_states, stack, upsample_size_needed)

    # ------------------------------------------------------------------------------------------------ pieces

    def _head(self, sample, timestep, encoder_hidden_states, need=None):
        """Time embedding, conv_in and the down path: (emb, hidden states, skip stack, forward sizes?).

        need: stop once the skip stack holds this many entries (whole blocks while they fit, then layer by layer);
        None: every down block.
        """
        unet = self.unet
        # Whether upsamplers must be told their output size: a property of static shapes, not of values.
        upsample_size_needed = any(s % (2 ** unet.num_upsamplers) for s in sample.shape[-2:])
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        states = unet.conv_in(sample)
        stack = (states,)
        for down in unet.down_blocks:
            if need is not None and len(stack) >= need:
                break
            outputs = len(down.resnets) + (down.downsamplers is not None)
            if need is not None and need - len(stack) < outputs:  # only its first layers make needed skips
                states, res = self._down_layers(down, states, emb, encoder_hidden_states, need - len(stack))
            elif getattr(down, "has_cross_attention", False):
                states, res = down(hidden_states=states, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=None, cross_attention_kwargs=None, encoder_attention_mask=None)
            else:
                states, res = down(hidden_states=states, temb=emb)
            stack += res
        return emb, states, stack, upsample_size_needed

    def _up(self, up_blocks, states, emb, encoder_hidden_states, stack, upsample_size_needed, first_index):
        """Run up blocks, popping their skips off the end of the stack as diffusers does: (stack left, states)."""
        for i, up in enumerate(up_blocks, start=first_index):
            res = stack[-len(up.resnets):]
            stack = stack[: -len(up.resnets)]
            upsample_size = self._upsample_size(i, stack, upsample_size_needed)
            if getattr(up, "has_cross_attention", False):
                states = up(hidden_states=states, temb=emb, res_hidden_states_tuple=res,
                            encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=None,
                            upsample_size=upsample_size, attention_mask=None, encoder_attention_mask=None)
            else:
                states = up(hidden_states=states, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        return stack, states

    def _upsample_size(self, i, stack, upsample_size_needed):
        """The output size up block i's upsampler is told (the next skip's, as diffusers' forward passes it) when the
        sides are not multiples of 2 ** num_upsamplers; else None, and for the last block, which has no upsampler."""
        return stack[-1].shape[2:] if upsample_size_needed and i != len(self.unet.up_blocks) - 1 else None

    def _down_layers(self, down, states, emb, encoder_hidden_states, count):
        """A down block's first `count` (resnet, attention) layers, as its forward runs them: (states, outputs)."""
        out = ()
        for j in range(count):
            states = down.resnets[j](states, emb)
            if getattr(down, "has_cross_attention", False):
                states = _attend(down.attentions[j], states, encoder_hidden_states)
            out += (states,)
        return states, out

    def _up_layers(self, up, start, states, emb, encoder_hidden_states, res, upsample_size):
        """An up block's layers start, start+1, ... (one per skip in res, popped from its end), as its forward runs
        them; then its upsamplers if that was its last layer."""
        stop = start + len(res)
        for j in range(start, stop):
            states = torch.cat([states, res[-1]], dim=1)
            res = res[:-1]
            states = up.resnets[j](states, emb)
            if getattr(up, "has_cross_attention", False):
                states = _attend(up.attentions[j], states, encoder_hidden_states)
        if stop == len(up.resnets) and up.upsamplers is not None:
            for upsampler in up.upsamplers:
                states = upsampler(states, upsample_size)
        return states

    def _tail(self, states, emb, encoder_hidden_states, stack, upsample_size_needed):
        """The recomputed up layers (the cut block's from the cut on, then whole blocks) and the output head: eps."""
        unet = self.unet
        first = self._first_up
        if self._split:
            res, stack = stack[-self.layers:], stack[: -self.layers]
            size = self._upsample_size(first, stack, upsample_size_needed)
            states = self._up_layers(unet.up_blocks[first], self._split, states, emb, encoder_hidden_states, res, size)
            first += 1
        stack, states = self._up(unet.up_blocks[first:], states, emb, encoder_hidden_states, stack,
                                 upsample_size_needed, first_index=first)
        if unet.conv_norm_out is not None:
            states = unet.conv_act(unet.conv_norm_out(states))
        return unet.conv_out(states)

    def _check_deep(self, deep: torch.Tensor, sample: torch.Tensor, name: str) -> None:
        # Shapes and dtypes only (host metadata): no sync, safe inside a CUDA graph capture.
        want = self.deep_shape(sample.shape[0], sample.shape[-2], sample.shape[-1])
        if tuple(deep.shape) != want:
            raise ValueError(f"{name} has shape {tuple(deep.shape)}; latents {tuple(sample.shape)} need {want}")
        if deep.dtype != self.deep_dtype:
            raise ValueError(f"{name} is {deep.dtype}; the UNet runs in {self.deep_dtype}")


def _attend(attention: Any, states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """One Transformer2DModel layer of a block, called as the block's own forward calls it (no masks, no kwargs)."""
    return attention(states, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=None,
                     attention_mask=None, encoder_attention_mask=None, return_dict=False)[0]


def _freeu_enabled(block: Any) -> bool:
    """Whether diffusers' FreeU is on for an up block (its forward then rescales states and skips)."""
    return bool(all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2")))


def _check_supported(unet: Any) -> None:
    """UnsupportedUNetError unless the UNet is a UNet2DConditionModel configured the way SD / SD-Turbo is."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise UnsupportedUNetError(f"feature reuse needs a diffusers UNet2DConditionModel, got {type(unet).__name__} "
                                   "(a torch.compile wrapper? pass the module itself)")
    cfg = unet.config
    problems = []
    for key in ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim_type"):
        if cfg.get(key) is not None:
            problems.append(f"{key}={cfg.get(key)!r}")
    if cfg.get("attention_type", "default") != "default":
        problems.append(f"attention_type={cfg.get('attention_type')!r} (GLIGEN)")
    # The modules behind those options, in case a config and its modules disagree.
    if any(getattr(unet, name, None) is not None for name in ("class_embedding", "add_embedding", "encoder_hid_proj",
                                                               "position_net")):
        problems.append("class/added/encoder-projection embeddings present")
    for kind, blocks, allowed in (("down", unet.down_blocks, _DOWN_TYPES), ("up", unet.up_blocks, _UP_TYPES)):
        for block in blocks:
            if type(block).__name__ not in allowed:
                problems.append(f"{kind} block {type(block).__name__}")
    if unet.mid_block is not None and type(unet.mid_block).__name__ not in _MID_TYPES:
        problems.append(f"mid block {type(unet.mid_block).__name__}")
    if len(unet.down_blocks) != len(unet.up_blocks) or len(unet.up_blocks) < 2:
        problems.append(f"{len(unet.down_blocks)} down and {len(unet.up_blocks)} up blocks (needs matching, >= 2)")
    if problems:
        raise UnsupportedUNetError("feature reuse supports the SD / SD-Turbo UNet configuration only; this UNet has: "
                                   + "; ".join(problems))
