"""StreamDiffusion on the bench's own components: the realtime SD-Turbo pipeline `turbostream bench` measures against.

StreamDiffusion (https://github.com/cumulo-autumn/StreamDiffusion) is the project most people run for realtime
SD-Turbo img2img. Its PyPI release (0.1.1) pins diffusers 0.24, but its pipeline (`streamdiffusion.StreamDiffusion`)
runs unchanged on the diffusers this project uses, so it is installed without its pins and built here, as its own
wrapper builds it, on the very UNet, text encoder and TAESD the bench gives diffusers and the engine:

    pip install --no-deps streamdiffusion==0.1.1

It runs without TensorRT (acceleration "none": PyTorch's own attention), as it would on a machine where TensorRT is not
installed; its TensorRT path needs NVIDIA's TensorRT packages and an engine build per GPU, which this bench does not do.
One call is what its wrapper's img2img does: a PIL image in, `StreamDiffusion.__call__` (preprocess to [-1, 1], TAESD
encode, the UNet, TAESD decode, and its own CUDA-event timing with a device sync), then the [-1, 1] tensor to a PIL
image (diffusers' VaeImageProcessor.postprocess: the same denormalize, copy and rounding as its wrapper's own
postprocess_image). Its wrapper also runs the preprocessing once before __call__, which runs it again on the tensor;
the bench leaves that first pass out, if anything in its favour. That __call__ creates CUDA events, so it runs on
CUDA only.

Two settings, each a row:
- `same_work`: one denoising step at t=499 (t_index 25 of 50 LCM steps), the work of turbostream's default (2 steps
  at strength 0.5: one UNet evaluation at t=499, TAESD): the fair speed comparison. Its frames are not ours (its
  LCM boundary-condition step is not diffusers' Euler step), so no parity is claimed, only the cost of a frame.
- `demo`: what its realtime-img2img demo runs for SD-Turbo: t_index [35, 45] (t=299 and t=99) as a stream batch
  (the UNet runs a batch of 2, one frame at each step, so every output frame got two UNet evaluations).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

STREAMDIFFUSION_VERSION = "0.1.1"
INSTALL = f"pip install --no-deps streamdiffusion=={STREAMDIFFUSION_VERSION}"
STEPS = 50  # its LCM schedule's length, as its demos prepare it


@dataclasses.dataclass(frozen=True)
class Setting:
    """One StreamDiffusion configuration the bench times."""

    key: str
    t_index_list: tuple[int, ...]  # indices into its 50-step LCM schedule (999, 979, ..., 19)
    what: str


SETTINGS = (
    Setting("same_work", (25,), "one denoising step at t=499: the work of turbostream's default frame"),
    Setting("demo", (35, 45), "its realtime-img2img demo's SD-Turbo setting: t=299 and t=99 as a stream batch of 2"),
)


def installed_version() -> str | None:
    """The installed streamdiffusion's version (what the bench records), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamdiffusion")
    except PackageNotFoundError:
        return None


def unavailable(device: torch.device) -> str | None:
    """Why StreamDiffusion cannot be timed here (not installed, no CUDA), or None when it can."""
    try:
        import streamdiffusion  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "streamdiffusion":
            return f"streamdiffusion is not installed; to time it: {INSTALL}"
        return f"streamdiffusion cannot be imported ({e}); it was made for: {INSTALL}"
    except Exception as e:  # noqa: BLE001 - another project failing to import against this diffusers
        return f"streamdiffusion cannot be imported ({type(e).__name__}: {e}); it was made for: {INSTALL}"
    if device.type != "cuda":
        return "StreamDiffusion's __call__ times itself with CUDA events: it runs on CUDA only"
    return None


def build(comps: Any, vae: Any, setting: Setting, width: int, height: int, prompt: str) -> Any:
    """A prepared `streamdiffusion.StreamDiffusion` on comps' UNet, text encoder and tokenizer and the given VAE
    (AutoencoderTiny: TAESD), guidance 0 (its cfg_type "none"), its 50-step LCM schedule; nothing timed yet."""
    from streamdiffusion import StreamDiffusion

    from .models import diffusers_pipeline

    stream = StreamDiffusion(diffusers_pipeline(comps, vae), t_index_list=list(setting.t_index_list),
                             torch_dtype=comps.unet.dtype, width=width, height=height, use_denoising_batch=True,
                             frame_buffer_size=1, cfg_type="none")
    stream.prepare(prompt=prompt, num_inference_steps=STEPS, guidance_scale=0.0)
    return stream


def timesteps(stream: Any) -> list[int]:
    """The UNet timesteps one call of a prepared stream evaluates (one per t_index)."""
    return [int(t) for t in stream.sub_timesteps]


def call(stream: Any, image: Any) -> Any:
    """One frame as its wrapper's img2img makes it: PIL image in, PIL image out (CUDA only, see the docstring)."""
    out = stream(image)  # its __call__: (1, 3, H, W) in [-1, 1] on the device, after a device sync
    return stream.image_processor.postprocess(out, output_type="pil")[0]
