"""Resolving `--model` into diffusers components: hub id, local folder, `random` or `tiny-random`.

Real weights come from the Hugging Face hub (its cache, with download progress) or a local folder in the diffusers
layout. `random` builds the full SD-Turbo architecture from configs shipped in this package, with random weights:
its compute cost is the real model's, so benchmarks on it are real timings, but its pictures are noise, never a
stylization. `tiny-random` is the same classes at small sizes, for tests on a CPU.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .config import DEFAULT_TAESD, VAE_KINDS
from .errors import ModelLoadError

log = logging.getLogger("turbostream.models")

RANDOM_MODELS = ("random", "tiny-random")
_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Subfolders of a diffusers model folder that turbostream reads (vae only with --vae full).
_REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Components:
    """The parts of an SD-Turbo img2img pipeline that turbostream drives itself."""

    name: str  # what --model said
    unet: Any  # UNet2DConditionModel
    text_encoder: Any  # CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    scheduler: Any  # EulerDiscreteScheduler (its config; the engine derives its own schedules)
    vae: Any  # AutoencoderTiny (vae_kind "tiny") or AutoencoderKL ("full"); set by load_vae
    vae_kind: str  # "tiny" or "full"
    random_weights: bool  # True for random / tiny-random: output is not a stylization
    # What load_components merged into the UNet and the text encoder (lora.merge_loras' summaries), in order.
    loras: tuple = ()
    # With lora_live: what changes the LoRAs' scales later (lora.LiveLoras; Engine.set_lora_scales), else None.
    lora_live: Any = None

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)


def diffusers_pipeline(components: Components, vae: Any = None, pipeline_class: Any = None) -> Any:
    """A diffusers Stable Diffusion pipeline (StableDiffusionPipeline unless pipeline_class says otherwise) on these
    components, with `vae` in place of theirs if given, and no safety checker (SD-Turbo has none, and a pipeline
    built without one must be told so)."""
    if pipeline_class is None:
        from diffusers import StableDiffusionPipeline as pipeline_class
    return pipeline_class(
        vae=components.vae if vae is None else vae, text_encoder=components.text_encoder,
        tokenizer=components.tokenizer, unet=components.unet, scheduler=components.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def no_cuda_reason() -> str:
    """Why torch sees no CUDA GPU, with what to do: a CPU-only build (PyPI's torch on Windows, or the CPU index)
    needs the CUDA build; a CUDA build that finds none points at the driver or CUDA_VISIBLE_DEVICES."""
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build: for a GPU install the CUDA build from the "
                "index PyTorch's install selector names (pip install torch --index-url "
                "https://download.pytorch.org/whl/cu128, for example)")
    return (f"this torch (CUDA {torch.version.cuda}) finds no usable GPU: check the NVIDIA driver (nvidia-smi) and "
            "CUDA_VISIBLE_DEVICES")


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; a named device is checked, with a clear error if absent. Case and
    surrounding spaces do not matter (`CPU`, ` cuda:0`), as in serve's device lists."""
    device = device.strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but {no_cuda_reason()}; or use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def default_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """'auto': fp16 on CUDA (the model's fp16 variant), fp32 on the CPU (fp16 is slow there); else the named one."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def load_components(
    model: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    vae: str = "tiny",
    taesd: str = DEFAULT_TAESD,
    seed: int = 0,
    loras: tuple = (),
    lora_live: bool = False,
) -> Components:
    """Load or build every component on `device` in `dtype`, in eval mode; raise ModelLoadError if impossible.

    loras: LoRAs (lora.LoraSpec, or 'FILE[:SCALE]' texts) merged into the UNet's and the text encoder's weights;
    lora_live: keep what changing their scales later takes (Components.lora_live)."""
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = dtype or default_dtype(device)
    if vae not in VAE_KINDS:
        raise ValueError(f"vae must be one of {', '.join(VAE_KINDS)}, got {vae!r}")
    if model in RANDOM_MODELS:
        comps = _build_random(model, device=device, dtype=dtype, seed=seed)
    else:
        comps = _load_pretrained(model, device=device, dtype=dtype)
    comps.vae = load_vae(model, vae, device=device, dtype=dtype, taesd=taesd, seed=seed)
    comps.vae_kind = vae
    for module in (comps.unet, comps.text_encoder):
        module.eval().requires_grad_(False)
    if loras:
        from .lora import merge_loras

        summaries, comps.lora_live = merge_loras(comps.unet, comps.text_encoder, loras, model=model, live=lora_live)
        comps.loras = tuple(summaries)
    return comps


def load_vae(
    model: str,
    kind: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    taesd: str = DEFAULT_TAESD,
    seed: int = 0,
):
    """The VAE of `model`: kind 'tiny' (TAESD, AutoencoderTiny) or 'full' (the model's AutoencoderKL); eval mode."""
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = dtype or default_dtype(device)
    if kind not in VAE_KINDS:
        raise ValueError(f"vae must be one of {', '.join(VAE_KINDS)}, got {kind!r}")
    if model in RANDOM_MODELS:
        vae = _build_random_vae(model, kind, device=device, dtype=dtype, seed=seed)
    else:
        vae = _load_pretrained_vae(model, kind, device=device, dtype=dtype, taesd=taesd)
    return vae.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- random weights


def _read_config(model: str, part: str) -> dict:
    return json.loads((_CONFIG_DIR / model / f"{part}.json").read_text())


@lru_cache(maxsize=1)
def byte_level_clip_tokenizer():
    """A CLIPTokenizer that works offline: every byte is a token (no merges), 514 ids in all.

    Random weights have no learned vocabulary to honour, so any stable text -> ids map serves; this one uses CLIP's
    own byte-to-unicode alphabet and special tokens, pads to CLIP's 77 tokens, and needs no download.
    """
    from transformers import CLIPTokenizer

    # GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest to code points from 256 up.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _spread_init(*modules: torch.nn.Module) -> None:
    """Variance-preserving init for tiny-random, so its pictures span 0..255 and depend on frame, prompt and seed.

    Default inits shrink the signal layer by layer; tiny-random's output would be a near-constant dark image, and
    tests could not tell two streams apart. The full-size `random` model keeps the default init (its values do not
    matter to timings, and small activations stay finite in fp16).
    """
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)
        last = getattr(getattr(module, "decoder", None), "layers", None)
        if last is not None:  # TAESD's decoder: centre its output at mid-grey instead of black
            last[-1].bias.data.fill_(0.5)


def _build_random(model: str, *, device: torch.device, dtype: torch.dtype, seed: int) -> Components:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    # Build on the target device: initialising 1.3 B parameters there is seconds on a GPU, much longer on a CPU.
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(_read_config(model, "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_read_config(model, "text_encoder")))
    if model == "tiny-random":
        _spread_init(unet)
    if dtype != torch.float32:
        unet, text_encoder = unet.to(dtype=dtype), text_encoder.to(dtype=dtype)
    log.info("model %r: random weights; its output is noise, not a stylization", model)
    return Components(
        name=model,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=byte_level_clip_tokenizer(),
        scheduler=EulerDiscreteScheduler.from_config(_read_config(model, "scheduler")),
        vae=None,
        vae_kind="",
        random_weights=True,
    )


def _build_random_vae(model: str, kind: str, *, device: torch.device, dtype: torch.dtype, seed: int):
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(seed + 1)
    with torch.device(device):
        if kind == "tiny":
            vae = AutoencoderTiny.from_config(_read_config(model, "taesd"))
        else:
            vae = AutoencoderKL.from_config(_read_config(model, "vae"))
    if model == "tiny-random" and kind == "tiny":
        _spread_init(vae)
    return vae.to(dtype=dtype) if dtype != torch.float32 else vae


# --------------------------------------------------------------------------------------------- real weights


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).exists()


def hub_cache_line() -> str:
    """Where the Hugging Face cache is, and whether HF_HUB_OFFLINE kept a download from being tried."""
    cache = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return f"Hugging Face cache: {cache}{' (HF_HUB_OFFLINE is set: no download was tried)' if _hub_offline() else ''}."


def _advice() -> str:
    return (
        f"{hub_cache_line()}\n"
        "What to do:\n"
        "  - pass a local folder in the diffusers layout (unet/, text_encoder/, tokenizer/, scheduler/, vae/): "
        "--model /path/to/sd-turbo\n"
        "  - or point HF_HOME at a cache that already holds the model, or connect this machine to the hub\n"
        "  - or, to benchmark or test without weights: --model random (full size) or --model tiny-random; "
        "random weights produce noise, not stylized video"
    )


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


def _resolve_source(model: str, needed: tuple[str, ...]) -> tuple[str, str]:
    """(model, a description of where it comes from); ModelLoadError for a missing or incomplete local folder."""
    path = Path(model).expanduser()
    if path.is_dir():
        source = f"local folder {path.resolve()}"
        missing = [sub for sub in needed if not (path / sub).is_dir()]
        if missing:
            raise ModelLoadError(
                f"Could not load model {model!r}: the {source} lacks {', '.join(f'{m}/' for m in missing)}.\n"
                + _advice()
            )
        return str(path), source
    if path.is_file():
        # A single-file checkpoint (.safetensors, .ckpt) as other tools download them: diffusers' folders only here.
        raise ModelLoadError(
            f"Could not load model {model!r}: it is a file, and single-file checkpoints (.safetensors, .ckpt) are "
            "not supported: give a folder in the diffusers layout or a Hugging Face hub id instead.\n" + _advice()
        )
    if _looks_like_path(model):
        raise ModelLoadError(f"Could not load model {model!r}: no such folder.\n" + _advice())
    return model, f"Hugging Face hub id {model!r}"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _hub_preflight(repo: str, probe_file: str) -> bool:
    """Check a hub id before loading; return local_files_only. ModelLoadError, fast, when it cannot work.

    Without this, an unreachable hub costs minutes of retries per file before the first error reaches the user.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(repo, probe_file), str)
    if _hub_offline():
        if not cached:
            raise ModelLoadError(f"Could not load {repo!r}: it is not in the Hugging Face cache.\n" + _advice())
        return True
    try:
        HfApi().model_info(repo, timeout=10)
        return False
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"Could not load {repo!r}: the hub has no such model, or it needs a login (`hf auth login`): "
            f"{_short(exc)}\n" + _advice()
        ) from exc
    except HfHubHTTPError as exc:  # the hub answered with an error: a cached copy still serves
        reason = _short(exc)
    except Exception as exc:  # noqa: BLE001 - any network failure (DNS, refused, timeout, proxy) means "unreachable"
        reason = f"the hub is unreachable ({_short(exc)})"
    if cached:
        log.warning("%s; using the cached copy of %s", reason, repo)
        return True
    raise ModelLoadError(f"Could not load {repo!r}: {reason}, and the Hugging Face cache has no copy.\n" + _advice())


def _pretrained(cls, repo: str, sub: str | None, dtype: torch.dtype, local_only: bool = False):
    """cls.from_pretrained, trying the fp16 variant first when loading in fp16."""
    args = dict(subfolder=sub, local_files_only=local_only) if sub else dict(local_files_only=local_only)
    if dtype == torch.float16:
        try:
            return cls.from_pretrained(repo, variant="fp16", torch_dtype=dtype, **args)
        except (OSError, ValueError) as exc:
            log.info("no fp16 variant of %s/%s (%s); loading the default weights", repo, sub or "", _short(exc))
    return cls.from_pretrained(repo, torch_dtype=dtype, **args)


def _load_pretrained(model: str, *, device: torch.device, dtype: torch.dtype) -> Components:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    repo, source = _resolve_source(model, _REQUIRED_SUBFOLDERS)
    local = source.startswith("local") or _hub_preflight(repo, "unet/config.json")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer", local_files_only=local)
        scheduler = EulerDiscreteScheduler.from_pretrained(repo, subfolder="scheduler", local_files_only=local)
        text_encoder = _pretrained(CLIPTextModel, repo, "text_encoder", dtype, local)
        unet = _pretrained(UNet2DConditionModel, repo, "unet", dtype, local)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load model {model!r} from the {source}: {_short(exc)}\n" + _advice()) from exc
    return Components(
        name=model,
        unet=unet.to(device),
        text_encoder=text_encoder.to(device),
        tokenizer=tokenizer,
        scheduler=scheduler,
        vae=None,
        vae_kind="",
        random_weights=False,
    )


def _load_pretrained_vae(model: str, kind: str, *, device: torch.device, dtype: torch.dtype, taesd: str):
    from diffusers import AutoencoderKL, AutoencoderTiny

    if kind == "full":
        repo, source = _resolve_source(model, ("vae",))
        local = source.startswith("local") or _hub_preflight(repo, "vae/config.json")
        try:
            return _pretrained(AutoencoderKL, repo, "vae", dtype, local).to(device)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"Could not load the VAE of {model!r} from the {source}: {_short(exc)}\n"
                                 + _advice()) from exc
    try:
        repo, source = _resolve_source(taesd, ())
        local = source.startswith("local") or _hub_preflight(repo, "config.json")
        return AutoencoderTiny.from_pretrained(repo, torch_dtype=dtype, local_files_only=local).to(device)
    except (OSError, ValueError, ModelLoadError) as exc:
        reason = str(exc).split("\n")[0] if isinstance(exc, ModelLoadError) else _short(exc)
        raise ModelLoadError(
            f"Could not load the tiny VAE {taesd!r}: {reason}\n"
            "Pass --taesd /path/to/taesd (a local copy of madebyollin/taesd), or use the model's own VAE with "
            "--vae full.\n" + _advice()
        ) from exc
