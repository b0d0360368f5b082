"""The pure frame math: SD-Turbo img2img on a batch, from uint8 frames to uint8 frames, in tensor ops only.

    uint8 (b, H, W, 3) -> [-1, 1] -> VAE encode -> z + sigma_0 * noise -> n x (UNet eps, Euler step) -> VAE decode
    -> uint8 (b, H, W, 3)

The math is diffusers' StableDiffusionImg2ImgPipeline with EulerDiscreteScheduler and guidance 0 (tests check it
against the pipeline itself). Every per-frame value (timesteps, sigmas, embeddings, noise) comes in as a tensor, so
the whole call can be captured into a CUDA graph and replayed with new contents in the same buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Probe = Callable[[str, torch.Tensor], None]


def _no_probe(stage: str, tensor: torch.Tensor) -> None:
    pass


class FrameMath:
    """The networks one frame passes through, and how. The three calls may be swapped for compiled wrappers."""

    def __init__(self, unet: Any, vae: Any, vae_kind: str, dtype: torch.dtype) -> None:
        self.unet, self.vae, self.vae_kind, self.dtype = unet, vae, vae_kind, dtype
        self.vae_scaling = float(vae.config.scaling_factor)
        # What the path calls; Engine's --compile replaces them with torch.compile wrappers of the same modules.
        self.unet_call, self.encoder_call, self.decoder_call = unet, vae.encoder, vae.decoder
        # Temporal feature reuse (use_reuse): a reuse.FeatureReuse of the UNet, and what the steps that keep or reuse
        # deep features call (its full and partial forwards, or compiled wrappers of them).
        self.reuse = None
        self.full_call = self.partial_call = None

    def use_reuse(self, reuse: Any) -> None:
        """Enable the "keep" and "reuse" step modes through a reuse.FeatureReuse of this UNet."""
        self.reuse = reuse
        self.full_call, self.partial_call = reuse.full, reuse.partial

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] NCHW -> unscaled latents (the mean of the full VAE's posterior: deterministic per frame)."""
        if self.vae_kind == "tiny":
            return self.encoder_call(x)  # EncoderTiny maps [-1, 1] to TAESD's [0, 1] itself
        return self.vae.encode(x).latent_dist.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in [-1, 1] NCHW."""
        if self.vae_kind == "tiny":
            return self.decoder_call(z)  # DecoderTiny returns [-1, 1]
        return self.vae.decode(z, return_dict=False)[0]

    def eps(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction for latents x at per-sample timesteps t (b,) with embeddings emb (b, T, D)."""
        return self.unet_call(x, t, encoder_hidden_states=emb, return_dict=False)[0]

    def __call__(
        self,
        frames: torch.Tensor | None,
        emb: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
        probe: Probe | None = None,
        *,
        prev: torch.Tensor | None = None,
        feedback: torch.Tensor | None = None,
        latents_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 (b, H, W, 3) frames (None: text-to-image, from pure noise) -> uint8 (b, H, W, 3).

        emb (b, T, D) in the network dtype; noise (b, C, h, w) float32 unit Gaussian; timesteps (n, b) and sigmas
        (n + 1, b) float32, one column per sample, so streams with different schedules share the batch.
        probe(stage, tensor), eager runs only (diagnosis, parity): "latent" (scaled VAE latents), "noisy" (after
        forward diffusion), "eps_k" and "x_k" (the UNet's output and the latents after Euler step k; the last x is
        x0), "image" ([-1, 1] NCHW float from the VAE decoder).

        Feedback (the live-video control): prev (b, C, h, w) float32 latents and feedback (b,) float32 weights f;
        each frame's latent becomes z + f * (prev - z) before noising, selected per row so that a row with f = 0
        keeps z bit for bit (whatever prev holds), and one captured graph serves every mix of weights.
        latents_out (b, C, h, w) float32 receives the final latents (x0): the next frame's prev.
        """
        probe = probe or _no_probe
        latents = self.head(frames, noise, sigmas[0], probe, prev=prev, feedback=feedback)
        for k in range(timesteps.shape[0]):
            latents = self.step(latents, timesteps[k], sigmas[k], sigmas[k + 1], emb, probe, k)
        return self.tail(latents, probe, latents_out=latents_out)

    # The three segments of the path. The engine captures each as its own CUDA graph and replays `step` once per
    # UNet evaluation, so one set of graphs serves every number of evaluations (no capture when a stream asks for
    # another). Eager runs and __call__ compose the same three functions: one definition of the math.

    def head(
        self, frames: torch.Tensor | None, noise: torch.Tensor, sigma0: torch.Tensor, probe: Probe | None = None, *,
        prev: torch.Tensor | None = None, feedback: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 (b, H, W, 3) frames (None: pure noise) -> float32 noisy latents (b, C, h, w) at sigma0 (b,)."""
        probe = probe or _no_probe
        b = noise.shape[0]
        if frames is not None:
            # uint8 NHWC -> [-1, 1] NCHW; the permute yields channels_last strides, which the convolutions want.
            x = frames.permute(0, 3, 1, 2).to(self.dtype).div(127.5).sub(1.0)
            z = self.encode(x).float() * self.vae_scaling
        else:  # text-to-image: the schedule starts from pure noise
            z = torch.zeros_like(noise)
        probe("latent", z)
        if feedback is not None and frames is not None:
            f = feedback.view(b, 1, 1, 1)
            z = torch.where(f > 0, z + f * (prev - z), z)
        # Forward-diffuse to the first timestep with this stream's fixed noise (Euler: x = z + sigma * eps).
        latents = z + noise * sigma0.view(b, 1, 1, 1)
        probe("noisy", latents)
        return latents

    def step(
        self, latents: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
        emb: torch.Tensor, probe: Probe | None = None, k: int = 0, *, deep: torch.Tensor | None = None,
        mode: str = "plain",
    ) -> torch.Tensor:
        """One UNet evaluation and Euler step: float32 latents (b, C, h, w) at sigma (b,) -> latents at sigma_next.

        mode "plain": the UNet as it is; "keep": the whole UNet through self.reuse (the same eps bit for bit), its deep
        features written to `deep`; "reuse": only the UNet's outer blocks, the deep features read from `deep`
        (temporal feature reuse: an approximation).
        """
        probe = probe or _no_probe
        b = latents.shape[0]
        sigma, sigma_next = sigma.view(b, 1, 1, 1), sigma_next.view(b, 1, 1, 1)
        # Euler's input scaling keeps the UNet's input at unit variance whatever the noise level.
        model_in = (latents / (sigma * sigma + 1.0).sqrt()).to(self.dtype)
        if mode == "keep":
            eps = self.full_call(model_in, t, emb, deep_out=deep).float()
        elif mode == "reuse":
            eps = self.partial_call(model_in, t, emb, deep_in=deep).float()
        else:
            eps = self.eps(model_in, t, emb).float()
        # Euler step in fp32 (as diffusers does): x_next = x + eps * (sigma_next - sigma); at sigma_next=0, x0.
        latents = latents + eps * (sigma_next - sigma)
        probe(f"eps_{k}", eps)
        probe(f"x_{k}", latents)
        return latents

    def tail(self, latents: torch.Tensor, probe: Probe | None = None, *,
             latents_out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 clean latents (b, C, h, w) -> uint8 (b, H, W, 3); latents_out, if given, receives the latents."""
        probe = probe or _no_probe
        if latents_out is not None:
            latents_out.copy_(latents)
        image = self.decode((latents / self.vae_scaling).to(self.dtype)).float()
        probe("image", image)
        # [-1, 1] -> uint8 with diffusers' rounding: round((x / 2 + 0.5).clamp(0, 1) * 255).
        return (image / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
