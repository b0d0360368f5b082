"""The UNet's attention and resnet blocks as the engine options want them (cuda.apply_options sets them up).

- A pinned SDPA backend (EngineConfig.attention): TurboAttnProcessor calls F.scaled_dot_product_attention inside
  torch.nn.attention.sdpa_kernel([backend]). The context runs in Python at every call, so it holds in eager runs, while
  a CUDA graph is captured (the kernel picked then is the one the graph replays) and while torch.compile traces (dynamo
  records the context; the backend's kernel is chosen at trace time).
- Precomputed cross-attention keys and values (EngineConfig.prompt_kv, prompt_kv.py): a cross-attention layer's
  processor reads its keys and values from the conditioning the engine hands the UNet instead of projecting the
  prompt embeddings again.
- No divisions by 1.0 (EngineConfig.skip_unit_rescale): diffusers divides every attention output by
  `rescale_output_factor` and every resnet output by `output_scale_factor`, both 1.0 in SD-Turbo; each division is one
  more elementwise kernel over the whole activation. x / 1.0 == x exactly, so leaving them out changes no bit.

The processor keeps diffusers' QKV fusion (FusedAttnProcessor2_0: one to_qkv GEMM for self-attention, to_q and one
to_kv GEMM for cross-attention) when the module is fused, and the three plain projections otherwise. Its math is that
of diffusers 0.42's AttnProcessor2_0 / FusedAttnProcessor2_0, line for line (tests compare them bit for bit).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import ATTENTION_BACKENDS
from .prompt_kv import KVSlot, PromptKV, cross_kv

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_backend(name: str) -> SDPBackend | None:
    """The SDPBackend of an attention option name; None for "auto" (PyTorch's own choice)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    return None if name == "auto" else BACKENDS[name]


class TurboAttnProcessor:
    """diffusers' SDPA attention with a pinned backend (None: PyTorch's choice) and optionally no /1.0 at the end."""

    def __init__(self, backend: SDPBackend | None = None, skip_unit_rescale: bool = False,
                 kv: KVSlot | None = None) -> None:
        self.backend = backend
        self.skip_unit_rescale = skip_unit_rescale
        # A cross-attention layer with prompt_kv: where its precomputed keys and values lie in the conditioning.
        self.kv = kv

    def __repr__(self) -> str:
        kv = ", prompt_kv" if self.kv is not None else ""  # one text for every cross-attention layer
        return f"TurboAttnProcessor(backend={self.backend}, skip_unit_rescale={self.skip_unit_rescale}{kv})"

    def _sdpa(self) -> contextlib.AbstractContextManager:
        return sdpa_kernel([self.backend]) if self.backend is not None else contextlib.nullcontext()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        fused = getattr(attn, "fused_projections", False)
        slot = self.kv
        if slot is not None and encoder_hidden_states is not None and encoder_hidden_states.shape[-1] == slot.width:
            # prompt_kv: the conditioning holds this layer's keys and values already (computed once per prompt); plain
            # embeddings (another width) are projected below as usual.
            query = attn.to_q(hidden_states)
            key, value = cross_kv(slot, encoder_hidden_states)
        elif encoder_hidden_states is None and fused and hasattr(attn, "to_qkv"):
            qkv = attn.to_qkv(hidden_states)  # FusedAttnProcessor2_0: one GEMM for Q, K and V
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if fused and hasattr(attn, "to_kv"):
                kv = attn.to_kv(encoder_hidden_states)  # fused cross-attention: one GEMM for K and V
                key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
            else:
                key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        with self._sdpa():
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if not (self.skip_unit_rescale and attn.rescale_output_factor == 1.0):
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def attention_modules(unet: Any) -> list[Any]:
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def set_attention(unet: Any, backend: str, skip_unit_rescale: bool, prompt_kv: PromptKV | None = None) -> None:
    """Make the UNet's attention processors match the options: diffusers' own for ("auto", False, no prompt_kv), ours
    otherwise (with prompt_kv, each cross-attention layer's processor knows where its keys and values lie).

    The processors in place the first time ours are installed (diffusers' FusedAttnProcessor2_0 after the engine's
    QKV fusion) are kept on the UNet and put back for ("auto", False), so engines sharing components may differ.
    """
    pinned = sdpa_backend(backend)
    saved = getattr(unet, "_turbostream_default_processors", None)
    if pinned is None and not skip_unit_rescale and prompt_kv is None:
        if saved is not None:
            unet.set_attn_processor(saved)
            unet._turbostream_default_processors = None
        return
    if saved is None:
        unet._turbostream_default_processors = dict(unet.attn_processors)
    unet.set_attn_processor(TurboAttnProcessor(pinned, skip_unit_rescale))
    if prompt_kv is not None:
        for name, attn in prompt_kv.layers:
            attn.set_processor(TurboAttnProcessor(pinned, skip_unit_rescale, prompt_kv.slots[name]))


def check_backend(backend: str, unet: Any, tokens: int, text_tokens: int) -> None:
    """Run the backend once at the UNet's attention shapes (batch 1); ValueError with PyTorch's reasons if it cannot.

    Called when the engine is built, so a backend this GPU, dtype or head size does not support is a clear error
    before warm-up, not a failure in the middle of a stream. tokens: latent positions at full resolution (the
    longest self-attention); text_tokens: the prompt embedding's length (cross-attention).
    """
    pinned = sdpa_backend(backend)
    if pinned is None:
        return
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    shapes = sorted({(m.heads, m.inner_dim // m.heads) for m in attention_modules(unet)})
    for heads, head_dim in shapes:
        for kv_len in (tokens, text_tokens):
            # The layout the processor hands SDPA: a split of one projection, viewed per head and transposed.
            q = torch.zeros(1, tokens, heads * head_dim, device=device, dtype=dtype)
            kv = torch.zeros(1, kv_len, 2 * heads * head_dim, device=device, dtype=dtype)
            k, v = torch.split(kv, heads * head_dim, dim=-1)
            q, k, v = (t.view(1, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([pinned]):
                        F.scaled_dot_product_attention(q, k, v)
                except RuntimeError as exc:
                    reasons = "; ".join(dict.fromkeys(str(w.message).strip() for w in caught)) or str(exc)
                    if device.type != "cuda" and backend in ("efficient", "cudnn"):
                        reasons = f"{backend} is a CUDA backend (on the CPU: math or flash)"
                    raise ValueError(
                        f"attention backend {backend!r} cannot run here ({device}, {str(dtype).replace('torch.', '')}, "
                        f"{heads} heads of {head_dim}, {tokens} x {kv_len} tokens): {reasons.rstrip('.')}. Choose another of "
                        f"{', '.join(ATTENTION_BACKENDS)} ('auto' lets PyTorch choose)") from None


@functools.cache  # one class for the process: module types are compared by identity (and guarded by dynamo)
def _lean_resnet_class():
    from diffusers.models.resnet import ResnetBlock2D

    class LeanResnetBlock2D(ResnetBlock2D):
        """ResnetBlock2D (diffusers 0.42) for the blocks SD-Turbo has (no up/down sampling, "default" time
        embedding norm, output_scale_factor 1.0), without the final division by 1.0."""

        def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            hidden_states = self.nonlinearity(self.norm1(input_tensor))
            hidden_states = self.conv1(hidden_states)
            if self.time_emb_proj is not None:
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)
                temb = self.time_emb_proj(temb)[:, :, None, None]
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.nonlinearity(self.norm2(hidden_states))
            hidden_states = self.conv2(self.dropout(hidden_states))
            if self.conv_shortcut is not None:
                if self.training:
                    input_tensor = input_tensor.contiguous()
                input_tensor = self.conv_shortcut(input_tensor)
            return input_tensor + hidden_states

    return ResnetBlock2D, LeanResnetBlock2D


def set_unit_rescale(unet: Any, skip: bool) -> int:
    """Swap the UNet's eligible ResnetBlock2D modules to the lean class (skip) or back; returns how many are lean."""
    plain, lean = _lean_resnet_class()
    count = 0
    for module in unet.modules():
        if type(module) is lean and not skip:
            module.__class__ = plain
        elif type(module) is plain and skip and _lean_eligible(module):
            module.__class__ = lean
        count += type(module) is lean
    return count


def resnet_class(lean: bool) -> type:
    """The resnet class set_unit_rescale gives eligible blocks: the lean one (lean) or diffusers' ResnetBlock2D."""
    return _lean_resnet_class()[1 if lean else 0]


def _lean_eligible(module: Any) -> bool:
    return (module.output_scale_factor == 1.0 and module.upsample is None and module.downsample is None
            and module.time_embedding_norm == "default")
