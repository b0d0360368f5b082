"""The parity reference: diffusers' StableDiffusionImg2ImgPipeline on fresh components that no Engine has touched.

An Engine fuses QKV projections, sets channels_last and turns TF32 on for the modules and globals it is given, so a
pipeline sharing them is no reference. Here every reference loads its own components, runs the pipeline as diffusers
ships it (noise from one CPU generator per sample, exactly as the engine draws it), and in float32 runs with TF32 off
and math attention (exact_fp32).
Two deviations from a plain pipeline call:
- the full VAE encodes to its posterior's mean (as the engine does) by handing the pipeline the scaled latents as
  `image`, which diffusers' img2img takes as-is when they have 4 channels;
- the noise is drawn in float32 and cast to the pipeline's dtype (as the engine draws it), where diffusers draws it in
  the pipeline's dtype. On PyTorch versions whose CPU normal sampler works in the output dtype, a float16 draw is
  another sample than the float32 draw of the same seed, not its rounding (diffusers issue 11056), so a float16
  pipeline would start from other noise than the float32 reference and its frames would differ wholesale: parity
  compares arithmetic on the same noise. noise_dtype=None keeps diffusers' own draw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import PIL.Image
import torch

from .config import DEFAULT_TAESD, StreamParams
from .models import Components, diffusers_pipeline, load_components, resolve_device


def reference_components(
    model: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, vae: str = "tiny",
    taesd: str = DEFAULT_TAESD, seed: int = 0,
) -> Components:
    """Freshly loaded components for a reference: the same weights an Engine loads for `model` (same seed)."""
    device = resolve_device(device) if isinstance(device, str) else device
    return load_components(model, device=device, dtype=dtype, vae=vae, taesd=taesd, seed=seed)


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """True float32 matmuls and convolutions inside (TF32 off for both); the previous settings are restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """The fp32 reference's arithmetic: TF32 off and SDPA on its math backend (plain fp32 matmuls); restored after."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with tf32_off(), sdpa_kernel(SDPBackend.MATH):
        yield


class NonFiniteError(AssertionError):
    """A NaN or an infinity where a picture or latent should be: never rounded away into a uint8 frame."""


def assert_finite(name: str, tensor: torch.Tensor | np.ndarray) -> None:
    """Raise NonFiniteError naming `name` and counting the bad values unless every value is finite."""
    t = torch.as_tensor(tensor)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{name}: {int(t.isnan().sum())} NaN and {int(t.isinf().sum())} infinite values "
                             f"of {t.numel()} ({tuple(t.shape)}, {t.dtype})")


def _engine_prepared(components: Components) -> bool:
    """True when an Engine (or anyone) fused the UNet's QKV projections, made its weights channels_last, or put
    modules or attention processors of turbostream's own into it (a reference on those would check the engine
    against itself)."""
    unet = components.unet
    weight = unet.conv_in.weight
    fused = any(getattr(m, "fused_projections", False) for m in unet.modules())
    ours = any(type(m).__module__.startswith("turbostream") for m in unet.modules()) or any(
        type(p).__module__.startswith("turbostream") for p in unet.attn_processors.values())
    return fused or ours or (weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())


class ReferencePipeline:
    """diffusers' img2img on its own components; run() returns uint8 (H, W, 3) frames with diffusers' rounding."""

    def __init__(self, components: Components, noise_dtype: torch.dtype | None = torch.float32) -> None:
        from diffusers import StableDiffusionImg2ImgPipeline

        if _engine_prepared(components):
            raise ValueError("these components were prepared by an Engine (fused QKV, channels_last or its own "
                             "modules): load fresh ones with reference_components() for the reference")
        self.components = components
        self.pipe = diffusers_pipeline(components, pipeline_class=StableDiffusionImg2ImgPipeline)
        self.pipe.set_progress_bar_config(disable=True)
        self.noise_dtype = noise_dtype  # the dtype the noise is drawn in (None: the pipeline's, as diffusers does)
        self.dtype = next(components.unet.parameters()).dtype
        self.device = next(components.unet.parameters()).device

    def _precision(self):
        return exact_fp32() if self.dtype == torch.float32 else contextlib.nullcontext()

    @torch.inference_mode()
    def run(
        self, frames: Sequence[np.ndarray], params: Sequence[StreamParams], prompt_embeds: torch.Tensor | None = None,
    ) -> list[np.ndarray]:
        """uint8 RGB (H, W, 3) frames (H, W multiples of 64) -> uint8 RGB frames; seeds give the engine's noise.

        prompt_embeds: (N, tokens, dim), or None to let diffusers encode each params.prompt with this reference's own
        text encoder. Frames run in groups of equal (steps, strength), as one pipeline call each.
        """
        if len(frames) != len(params):
            raise ValueError(f"{len(frames)} frames but {len(params)} parameter sets")
        results: list[np.ndarray | None] = [None] * len(frames)
        groups: dict[tuple[int, float], list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.validate().steps, p.strength), []).append(i)
        with self._precision():
            for (steps, strength), idx in groups.items():
                emb = None if prompt_embeds is None else prompt_embeds[idx].to(self.device, self.dtype)
                outs = self._call([frames[i] for i in idx], [params[i] for i in idx], emb, steps, strength)
                for i, out in zip(idx, outs):
                    results[i] = out
        return results  # type: ignore[return-value]

    def _call(self, frames, params, emb, steps: int, strength: float) -> list[np.ndarray]:
        pipe, vae = self.pipe, self.components.vae
        gens = [torch.Generator("cpu").manual_seed(p.seed) for p in params]
        images = [PIL.Image.fromarray(np.ascontiguousarray(f)) for f in frames]
        if self.components.vae_kind == "full":
            # The posterior's mean, scaled, per sample as diffusers encodes with a list of generators; a 4-channel
            # `image` skips the pipeline's own encode and scaling (prepare_latents: init_latents = image).
            x = pipe.image_processor.preprocess(images).to(self.device, self.dtype)  # [-1, 1] NCHW
            image = torch.cat([vae.encode(x[i : i + 1]).latent_dist.mode() for i in range(len(x))])
            image = image * vae.config.scaling_factor
            assert_finite("reference latent", image)
        else:
            image = images  # TAESD has no posterior: the pipeline encodes the PIL images itself
        prompt = None if emb is not None else [p.prompt for p in params]
        with _noise_drawn_in(self.noise_dtype):
            latents = pipe(
                prompt=prompt, prompt_embeds=emb, image=image, num_inference_steps=steps, strength=strength,
                guidance_scale=0.0, generator=gens, output_type="latent",
            ).images
        assert_finite("reference x0 latents", latents)
        # The pipeline's own last lines (no safety checker): decode, then postprocess to [0, 1] floats.
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=gens)[0]
        assert_finite("reference decoded image ([-1, 1])", decoded)
        out = pipe.image_processor.postprocess(decoded, output_type="np", do_denormalize=[True] * len(decoded))
        assert_finite("reference image ([0, 1])", out)
        return [(img * 255).round().astype(np.uint8) for img in out]  # numpy_to_pil's rounding


@contextlib.contextmanager
def _noise_drawn_in(draw_dtype: torch.dtype | None) -> Iterator[None]:
    """Inside, diffusers' img2img draws its noise in draw_dtype and casts it to the dtype it asked for (None: as is).

    It swaps a module global for the call: one reference call at a time, as tests, the bench and the scripts run them.
    """
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img

    if draw_dtype is None:
        yield
        return
    draw = img2img.randn_tensor

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        noise = draw(shape, generator=generator, device=device, dtype=draw_dtype, layout=layout)
        return noise if dtype is None else noise.to(dtype)

    img2img.randn_tensor = randn_tensor
    try:
        yield
    finally:
        img2img.randn_tensor = draw
