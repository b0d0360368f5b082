"""Cross-attention keys and values computed once per prompt, not in every UNet evaluation (EngineConfig.prompt_kv).

Every cross-attention layer of the UNet (SD-Turbo: 16) projects the same prompt embeddings to its keys and values in
every evaluation: one GEMM per layer with QKV fusion (two without), on the same (77, 1024) input each time. The
prompt of a stream changes seldom, so these projections are done when a prompt is first used and kept with it; the
UNet then reads them instead of computing them (16 to 32 kernels fewer per evaluation, the same math).

How they reach the layers without changing the UNet's forward: the engine hands the UNet, in place of the embeddings
(b, 77, D), the keys and values of every layer side by side (b, 77, width): per layer, in module order, its keys
(inner) then its values (inner), which is exactly what its fused to_kv projection returns. Each layer's processor
(attention.TurboAttnProcessor with `kv`) reads its own columns as views. An input of the embeddings' own width (the
bench's diffusers pipeline, the parity reference, run on the same modules) is projected as usual, so a UNet with these
processors still computes diffusers' output for plain embeddings.

Transitions blend a stream's conditioning linearly (streams.lerp); the projections are linear maps (affine with a
bias), so blending keys and values is blending the embeddings and projecting them (up to rounding). A layer that
normalizes the embeddings first (norm_cross; not in SD or SD-Turbo) would break that, and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVSlot:
    """Where one cross-attention layer's keys and values lie in the conditioning tensor's last dimension."""

    offset: int  # keys in [offset, offset + inner), values in [offset + inner, offset + 2 * inner)
    inner: int
    width: int  # the whole conditioning width (every layer's keys and values)


class PromptKV:
    """The UNet's cross-attention layers and what their keys and values of a prompt are (project)."""

    def __init__(self, unet: Any, text_dim: int) -> None:
        from diffusers.models.attention_processor import Attention

        self.layers: list[tuple[str, Any]] = [
            (name, m) for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention
        ]
        if not self.layers:
            raise ValueError("prompt_kv: this UNet has no cross-attention layers")
        if getattr(unet, "encoder_hid_proj", None) is not None or \
                getattr(unet.config, "addition_embed_type", None) in ("text", "text_image"):
            raise ValueError("prompt_kv: this UNet uses the embeddings before its cross-attention layers (a projection "
                             "or an added embedding); not supported")
        offsets, offset = [], 0
        for name, attn in self.layers:
            if attn.norm_cross:
                # Its keys and values would not be linear in the embeddings, and transitions blend them linearly.
                raise ValueError(f"prompt_kv: cross-attention {name} normalizes the embeddings first; not supported")
            offsets.append(offset)
            offset += 2 * attn.to_k.out_features
        self.width = offset
        if self.width == text_dim:
            # The processors tell conditioning from embeddings by width: with the two equal they could not.
            raise ValueError(f"prompt_kv: this UNet's keys and values are as wide as its embeddings ({text_dim})")
        self.slots = {name: KVSlot(off, attn.to_k.out_features, self.width)
                      for (name, attn), off in zip(self.layers, offsets)}

    @torch.inference_mode()
    def project(self, emb: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., T, D) in the UNet dtype -> conditioning (..., T, width): every layer's keys and values.

        Each layer computes what its processor would from these embeddings (to_kv, or to_k and to_v).
        """
        parts = []
        for _, attn in self.layers:
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_kv"):
                parts.append(attn.to_kv(emb))
            else:
                parts.extend((attn.to_k(emb), attn.to_v(emb)))
        return torch.cat(parts, dim=-1)


def cross_kv(slot: KVSlot, conditioning: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This layer's (keys, values), each (b, T, inner), as views of conditioning (b, T, width)."""
    start = slot.offset
    return (conditioning[..., start:start + slot.inner],
            conditioning[..., start + slot.inner:start + 2 * slot.inner])
