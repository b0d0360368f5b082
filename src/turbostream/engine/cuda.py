"""The one place where building an engine changes modules or process-wide state, and why each change is made.

prepare_cuda() rewrites the given components in place (channels_last, fused QKV) and flips global backend flags
(cuDNN autotuning, TF32 matmuls): anything else built on the same components afterwards runs the engine's kernels,
not diffusers' defaults. That is why the parity reference (reference.py) always loads components of its own.

apply_options() makes the modules match the engine options that change them (EngineConfig.attention, prompt_kv,
skip_unit_rescale, fused_time_proj, fused_norm, fused_epilogue, fp8); prepare_cuda/prepare_cpu call it with the
engine's config. It is idempotent, and all but fp8 are undone by a config without them, so engines built one after
another may share components (fp8 cannot be undone: the weights are rounded to 8 bits in place). The modules then
have the options of the engine built last (options_key, kept on the UNet): an engine built earlier with other options
refuses eager frames then, with a clear error, as they would run the new options. Its CUDA graphs keep replaying the
kernels they captured, and the memory they read stays allocated. An engine refused at build time changes nothing.
(Two component sets that share a VAE but not a UNet are not told apart: nothing here builds them.)
"""

from __future__ import annotations

import os
from typing import Any

import torch

# float8 matmuls (torch._scaled_mm) exist from Ada (8.9) and Hopper (9.0) on.
FP8_MIN_CAPABILITY = (8, 9)


def process_settings(device_type: str) -> dict:
    """The process-wide torch settings every engine runs under, set: on CUDA cuDNN autotuning and TF32 matmuls, on
    the CPU a thread pool that leaves one core to decoding, encoding and the event loop. What they are now, for a
    benchmark's record (it sets them before its first row, so that every row, its baselines' too, runs under them)."""
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        cores = os.cpu_count() or 1
        if cores > 1:
            # With every core in torch's pool, a busy neighbour thread made CPU calls swing from 5 ms to seconds
            # (OpenMP workers waiting on each other).
            torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - 1)))
    return {"torch_threads": torch.get_num_threads(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def prepare_cuda(components: Any, config: Any = None) -> dict | None:
    """channels_last convs, fused QKV projections, cuDNN autotuning, TF32 matmuls; idempotent (engines may share).
    With a config, its options too: apply_options' result (None without)."""
    process_settings("cuda")
    for module in (components.unet, components.vae):
        module.to(memory_format=torch.channels_last)
    if not getattr(components.unet, "_turbostream_fused", False):
        # One projection GEMM for Q, K and V instead of three: fewer, larger kernels (diffusers' own API).
        components.unet.fuse_qkv_projections()
        components.unet._turbostream_fused = True
    return apply_options(components, config) if config is not None else None


def refresh_derived_weights(unet: Any) -> int:
    """Copy the UNet's weights into what was made of them, after they changed in place (a LoRA's live scale): the fused
    QKV (and KV) projections and the stacked time projections. In place, so CUDA graphs and compiled code that read
    them see the new values. Returns how many fused projections were refreshed."""
    from .time_proj import refresh_stacked

    fused = 0
    for module in unet.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for name, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
            target = getattr(module, name, None)
            if target is None:
                continue
            sources = [getattr(module, part) for part in parts]
            with torch.inference_mode() if target.weight.is_inference() else torch.no_grad():
                torch.cat([p.weight for p in sources], out=target.weight)
                if target.bias is not None:
                    torch.cat([p.bias for p in sources], out=target.bias)
            fused += 1
    refresh_stacked(unet)
    return fused


def prepare_cpu(components: Any = None, config: Any = None) -> dict | None:
    """Leave one core to decoding, encoding and the event loop (the CPU path's torch thread pool); with components
    and a config, their options too: apply_options' result (None without)."""
    process_settings("cpu")
    return apply_options(components, config) if components is not None and config is not None else None


def apply_options(components: Any, config: Any) -> dict:
    """Make the UNet and VAE match config's attention, prompt_kv, skip_unit_rescale, fused_time_proj, fused_norm,
    fused_epilogue and fp8; ValueError (clear) if one cannot run here.

    Call after prepare_cuda's QKV fusion (the attention processor keeps it) and before the first frame. Returns what
    was applied: {"attention", "attention_modules", "lean_resnets", "fp8_linears", "fused_norms",
    "vae_fused_norms", "fused_epilogues", "prompt_kv" (the PromptKV layout the processors read, or None),
    "prompt_kv_layers", "stacked_time_projections"}.
    """
    from .attention import attention_modules, check_backend, resnet_class, set_attention, set_unit_rescale
    from .epilogue import check_kernel, set_fused_epilogue
    from .group_norm import check_kernels, set_fused_norm
    from .prompt_kv import PromptKV
    from .time_proj import set_fused_time_proj

    unet = components.unet
    param = next(unet.parameters())  # the UNet's device and dtype (the VAE's are the same)
    tokens = (config.height // 8) * (config.width // 8)
    check_backend(config.attention, unet, tokens, components.max_tokens)  # before anything changes
    quantized = getattr(unet, "_turbostream_fp8", 0)
    if quantized and not config.fp8:
        raise ValueError("these components were quantized to fp8 by an engine built with fp8, which cannot be "
                         "undone: load fresh components for an engine without fp8")
    if config.fp8 and not quantized:
        check_fp8(param.device)
    for name, check in (("fused_norm", check_kernels), ("fused_epilogue", check_kernel)):
        if getattr(config, name):
            try:
                check(param.device, param.dtype)
            except ValueError as exc:
                raise ValueError(f"{name} cannot run here: {exc}") from None
    kv = PromptKV(unet, components.text_dim) if getattr(config, "prompt_kv", False) else None
    # First, as it checks the UNet and allocates (52 MB for SD-Turbo) before it changes anything: if it refuses, the
    # modules, and their key, are as they were.
    stacked = set_fused_time_proj(unet, getattr(config, "fused_time_proj", False))
    # Every check passed: the modules change from here on.
    unet._turbostream_options = None  # until every option below is in place
    set_attention(unet, config.attention, config.skip_unit_rescale, kv)
    lean = set_unit_rescale(unet, config.skip_unit_rescale)
    fused = set_fused_norm(unet, config.fused_norm, resnet_class(config.skip_unit_rescale))
    vae_fused = set_fused_norm(components.vae, config.fused_norm, resnet_class(False))  # TAESD has none: 0
    epilogues = set_fused_epilogue(components.vae, config.fused_epilogue)  # TAESD's blocks; the full VAE has none
    if config.fp8 and not quantized:
        unet._turbostream_fp8 = quantize_fp8(unet)
    unet._turbostream_options = options_key(config)  # Engine checks it before eager frames
    return {"attention": config.attention, "attention_modules": len(attention_modules(unet)), "lean_resnets": lean,
            "fp8_linears": getattr(unet, "_turbostream_fp8", 0), "fused_norms": fused,
            "vae_fused_norms": vae_fused, "fused_epilogues": epilogues,
            "prompt_kv": kv, "prompt_kv_layers": len(kv.layers) if kv is not None else 0,
            "stacked_time_projections": stacked}


def options_key(config: Any) -> tuple:
    """The values of config's options that apply_options sets on the modules: equal keys, equal modules."""
    return tuple(getattr(config, name, None) for name in (
        "attention", "prompt_kv", "skip_unit_rescale", "fused_time_proj", "fused_norm", "fused_epilogue", "fp8"))


def check_fp8(device: torch.device | str) -> None:
    """ValueError unless fp8 can run on `device`: CUDA with compute capability 8.9 or newer, and torchao importable."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"fp8 needs a CUDA GPU with compute capability {FP8_MIN_CAPABILITY[0]}."
                         f"{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper); the engine runs on {device}")
    if not torch.cuda.is_available():
        raise ValueError("fp8 needs a CUDA GPU, and CUDA is not available here")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ValueError(f"fp8 needs compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer "
                         f"(Ada, Hopper); {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
    load_torchao()


def load_torchao() -> tuple[Any, Any]:
    """(quantize_, the float8 dynamic-activation float8-weight config) from torchao; ValueError naming the install."""
    try:
        from torchao.quantization import quantize_
    except Exception as exc:  # noqa: BLE001 - missing, or built for another torch: either way the same advice
        raise ValueError(f"fp8 needs torchao, which cannot be imported here ({type(exc).__name__}: {exc}): "
                         f"pip install torchao (a release made for torch {torch.__version__.split('+')[0]})") from None
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig
    except ImportError:  # torchao before 0.9 had only the function form
        from torchao.quantization import float8_dynamic_activation_float8_weight

        return quantize_, float8_dynamic_activation_float8_weight()
    try:
        # torchao would otherwise change torch._inductor's global settings (slower compiles for every engine in the
        # process); process-wide settings are this module's to choose.
        return quantize_, Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False)
    except TypeError:
        return quantize_, Float8DynamicActivationFloat8WeightConfig()


def fp8_linear(module: torch.nn.Module, name: str) -> bool:
    """The Linear layers fp8 quantizes: those of the UNet's transformer blocks (projections, attention, feed-forward).

    Their GEMMs are the UNet's largest; the time-embedding Linears run on (batch, 320..1280) and would only gain
    quantize overhead. float8 GEMMs need both sizes divisible by 16.
    """
    return (isinstance(module, torch.nn.Linear) and "attentions." in name
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def quantize_fp8(unet: torch.nn.Module) -> int:
    """Quantize the UNet's transformer Linears to float8 e4m3 (dynamic activation scales) in place; returns how many."""
    quantize_, fp8_config = load_torchao()
    count = sum(fp8_linear(m, name) for name, m in unet.named_modules())
    quantize_(unet, fp8_config, filter_fn=fp8_linear)
    return count
