"""LoRA weights merged into the UNet and the text encoder when they load (`--lora FILE[:SCALE]`, repeatable).

A LoRA adds a low-rank product to a layer's weight: W' = W + scale * (alpha / r) * B @ A, with A (r, in) and B (out,
r) (for a convolution, A holds the kernel and B is 1x1). Merging it into W once, before the engine prepares the
modules, leaves every module as it was: the same Linear and Conv2d layers, so the CUDA graphs, torch.compile's
artifacts (which read the live weights), the fused QKV projections and the Triton kernels see nothing new, and a
frame costs what it cost without a LoRA. Nothing can be changed per stream: a merged LoRA is every stream's.

Live scales (`--lora-live`, LiveLoras): each adapted layer's weight from before any LoRA is kept, and a change of
scale recomputes the layer from it (W = W0 + sum of scale_i * alpha_i/r_i * B_i @ A_i, in float32, rounded once), so
the weights after any number of changes are those a fresh load at the new scales merges. Adding the difference to
the merged weight instead would round once per change: a fader moved for an evening would walk fp16 weights away.

diffusers reads the file (`lora_state_dict`: the diffusers/PEFT layout and kohya-ss's, which A1111 and ComfyUI
use) and renames its keys to PEFT's (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`); the merge itself is the line
above, done here rather than by injecting PEFT adapters and fusing them, which would make PEFT a dependency of every
install and, for the text encoder, tie it to transformers' PEFT version floor. tests/test_lora.py checks the merged
engine against diffusers' own pipeline running the same LoRA unmerged, through PEFT.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

import torch

from .config import LoraSpec, check_loras
from .errors import ModelLoadError

log = logging.getLogger("turbostream.models")

LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Layers of the UNet and the text encoder a LoRA may adapt, by the key prefix diffusers gives them.
PARTS = ("unet", "text_encoder")
UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding")
# The largest LoRA file read: SD LoRAs of rank 256 are under 1 GiB; a file past this is most likely a whole model's
# checkpoint, which would be read into memory whole before its keys show it holds no LoRA.
MAX_LORA_BYTES = 2 << 30


def merge_loras(unet: torch.nn.Module, text_encoder: torch.nn.Module, loras, model: str = "",
                live: bool = False) -> tuple[list[dict], LiveLoras | None]:
    """Merge the LoRAs into the modules' weights: (one summary per LoRA (layers merged per part), and with `live` the
    LiveLoras that can change their scales later, else None). Every LoRA is read and every layer checked before any
    weight changes; then each layer gets the sum of its LoRAs' products, in float32, rounded once.

    ModelLoadError when a LoRA cannot be read, holds no LoRA weights, or adapts layers this model does not have (a
    LoRA made for another model: SDXL, or SD 1.5 on SD 2.1's UNet)."""
    specs = check_loras(loras)
    summaries, plans = [], []
    for spec in specs:
        t0 = time.perf_counter()
        state, alphas, metadata = _read(spec)
        by_part = {part: _plan(part, root, _layers(part, root, state, alphas), spec, metadata.get(part) or {}, model)
                   for part, root in (("unet", unet), ("text_encoder", text_encoder))}
        counts = {part: len(plan) for part, plan in by_part.items()}
        if not any(counts.values()):
            raise ModelLoadError(f"LoRA {spec.source}: no LoRA weights for a UNet or a text encoder in it")
        plans.append(by_part)
        summaries.append({"lora": spec.source, "name": display_name(spec.source), "scale": spec.scale,
                          "unet_layers": counts["unet"], "text_encoder_layers": counts["text_encoder"],
                          "seconds": round(time.perf_counter() - t0, 3)})
    t0 = time.perf_counter()
    merged = LiveLoras(specs, plans, keep=live)
    seconds = time.perf_counter() - t0
    for spec, summary in zip(specs, summaries):
        summary["seconds"] = round(summary["seconds"] + seconds / len(specs), 3)  # reading it and its share of merging
        log.info("LoRA %s merged: %d layers of the UNet, %d of the text encoder (%.2f s)", spec.shown,
                 summary["unet_layers"], summary["text_encoder_layers"], summary["seconds"])
    if not live:
        return summaries, None
    log.info("LoRA scales live: %d layers kept as they were before the LoRAs (%.0f MiB beside the model)",
             len(merged.layers), merged.kept_bytes / 2**20)
    return summaries, merged


class AdaptedLayer:
    """One layer the LoRAs adapt: each LoRA's factors and, kept for live scales, its weight (and bias) from before."""

    def __init__(self, part: str, module: torch.nn.Module, keep: bool) -> None:
        self.part, self.module = part, module
        self.weight = module.weight.detach().clone() if keep else None  # W0: the layer as it loaded
        self.bias: torch.Tensor | None = None  # its bias from before, kept once a LoRA adapts it
        self.terms: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, float]] = []

    def add(self, index: int, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, factor: float) -> None:
        """LoRA number `index` adapts this layer by factor * B @ A (factor: alpha / r, without the scale)."""
        device = self.module.weight.device
        up, down = (m.flatten(1).to(device, torch.float32) for m in (b, a))
        if bias is not None:
            bias = bias.to(device, torch.float32)
            if self.bias is None and self.weight is not None:  # kept for live scales
                self.bias = self.module.bias.detach().clone()
        self.terms.append((index, up, down, bias, factor))

    def merge(self, scales: tuple[float, ...]) -> None:
        """The module's weight (and bias) := W0 + each LoRA's scale * factor * B @ A, in float32, rounded once. W0 is
        the kept weight, or without one the module's own (a float32 weight then changes in place: no temporary)."""
        weight = self.module.weight
        start = self.weight if self.weight is not None else weight
        in_place = self.weight is None and weight.dtype == torch.float32 and weight.is_contiguous()
        total = weight.view(weight.shape[0], -1) if in_place else \
            start.reshape(weight.shape[0], -1).to(torch.float32, copy=True)
        has_bias = any(term[3] is not None for term in self.terms)
        bias = (self.bias if self.bias is not None else self.module.bias).to(torch.float32, copy=True) \
            if has_bias else None
        with torch.inference_mode() if weight.is_inference() else torch.no_grad():
            for index, up, down, lora_bias, factor in self.terms:
                if scales[index] == 0.0:
                    continue  # adds exactly nothing
                total.addmm_(up, down, alpha=scales[index] * factor)
                if lora_bias is not None:
                    bias = bias + (scales[index] * factor) * lora_bias
            if not in_place:
                weight.copy_(total.view(weight.shape))
            if bias is not None:
                self.module.bias.copy_(bias)

    @property
    def kept_bytes(self) -> int:
        kept = [t for t in (self.weight, self.bias) if t is not None]
        kept += [t for _, up, down, bias, _ in self.terms for t in (up, down, bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in kept)


class LiveLoras:
    """LoRAs merged into their layers; with `keep` (merge_loras' live), so that their scales can change while the
    model runs (`--lora-live`); without, set_scales must not be called (merge_loras keeps such an object to itself).

    set_scales() rewrites, in place, every layer a changed LoRA adapts, from the weight it had before any LoRA: the
    result is the weights a fresh load at those scales merges, bit for bit (in float16/bfloat16 too: both round the
    float32 sum once). The caller owns what is derived from the weights (fused projections, cached prompt
    embeddings): Engine.set_lora_scales refreshes them.
    """

    def __init__(self, specs: tuple[LoraSpec, ...], plans: list[dict[str, list[tuple]]], keep: bool = True) -> None:
        self.specs = tuple(specs)
        self.scales = tuple(spec.scale for spec in specs)
        layers: dict[int, AdaptedLayer] = {}  # by the module's id: two LoRAs of one layer share its entry
        for index, by_part in enumerate(plans):
            for part, plan in by_part.items():
                for module, a, b, bias, factor in plan:
                    layer = layers.get(id(module))
                    if layer is None:
                        layer = layers[id(module)] = AdaptedLayer(part, module, keep)
                    layer.add(index, a, b, bias, factor)
        self.layers = list(layers.values())
        for layer in self.layers:
            layer.merge(self.scales)

    @property
    def kept_bytes(self) -> int:
        """Memory kept beside the model: the adapted layers' weights before the LoRAs, and the LoRAs' factors."""
        return sum(layer.kept_bytes for layer in self.layers)

    def check(self, scales) -> tuple[float, ...]:
        """The scales as a tuple of floats, one per LoRA; ValueError (saying which) for a wrong count or range."""
        scales = tuple(scales)
        if len(scales) != len(self.specs):
            raise ValueError(f"expected {len(self.specs)} LoRA scale(s), one per --lora, got {len(scales)}")
        checked = []
        for spec, scale in zip(self.specs, scales):
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise ValueError(f"LoRA {display_name(spec.source)}: the scale must be a number, got {scale!r}")
            checked.append(LoraSpec(spec.source, float(scale)).scale)  # LoraSpec checks the range
        return tuple(checked)

    def set_scales(self, scales) -> set[str]:
        """Recompute every layer a LoRA whose scale changes adapts; the parts changed ("unet", "text_encoder")."""
        scales = self.check(scales)
        changed = {i for i, (old, new) in enumerate(zip(self.scales, scales)) if old != new}
        self.scales = scales
        parts = set()
        for layer in self.layers:
            if any(term[0] in changed for term in layer.terms):
                layer.merge(scales)
                parts.add(layer.part)
        return parts


# --------------------------------------------------------------------------------------------- reading


def looks_local(source: str) -> bool:
    """Whether a --lora source names a file or folder here rather than a hub id: a path's start (/, ./, ../, ~, a
    drive letter), or a weight file with at most one folder before it (a hub file has two: user/repo/x.safetensors).
    """
    from .models import _looks_like_path

    if _looks_like_path(source) or source.startswith("\\") or re.match(r"[A-Za-z]:[\\/]", source):
        return True
    return source.endswith(LORA_SUFFIXES) and source.replace("\\", "/").count("/") < 2


def display_name(source: str) -> str:
    """What clients are shown of a LoRA: a local file's name without its suffix (its folder's, for diffusers'
    pytorch_lora_weights), a folder's name, or the hub id as given; never the server's paths."""
    if not looks_local(source):
        return source
    path = Path(source.replace("\\", "/")).expanduser()
    if path.suffix in LORA_SUFFIXES:
        return path.parent.name if path.stem == "pytorch_lora_weights" and path.parent.name else path.stem
    return path.name or source


def missing(spec: LoraSpec) -> str | None:
    """Why a LoRA given as a local file or folder cannot be read (it is not there), said before the model loads."""
    if looks_local(spec.source) and not Path(spec.source).expanduser().exists():
        return f"--lora {spec.source}: no such file or folder"
    return None


def _weight_file(folder: Path, shown: str) -> Path | None:
    """A LoRA folder's weight file: pytorch_lora_weights.safetensors (diffusers' name), else its only one; None if it
    holds none, ModelLoadError if it holds several."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(LORA_SUFFIXES))
    if "pytorch_lora_weights.safetensors" in files:
        return folder / "pytorch_lora_weights.safetensors"
    if len(files) > 1:
        raise ModelLoadError(f"LoRA {shown}: the folder holds {len(files)} weight files ({', '.join(files[:4])}); "
                             f"name one: --lora {folder / files[0]}")
    return folder / files[0] if files else None


def _cached(repo: str, weight: str | None) -> Path | None:
    """The hub LoRA's file in the Hugging Face cache (the file named, or the repo's one weight file), or None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no readable cache): the hub is asked instead
        return None
    if weight is not None:
        return folder / weight if (folder / weight).is_file() else None
    return _weight_file(folder, f"{repo} (its copy in the Hugging Face cache, {folder})")


def _locate(spec: LoraSpec) -> tuple[str, dict]:
    """Where diffusers reads the LoRA: (a folder or a hub id, lora_state_dict's keyword arguments). A hub LoRA in
    the Hugging Face cache is read from there when the hub is offline or unreachable."""
    from .models import _hub_preflight, hub_cache_line

    path = Path(spec.source).expanduser()
    if path.is_file():
        if path.stat().st_size > MAX_LORA_BYTES:
            raise ModelLoadError(f"LoRA {spec.source}: {path.stat().st_size / 2**30:.1f} GiB is more than any LoRA "
                                 f"(at most {MAX_LORA_BYTES >> 30} GiB read): is it a model's checkpoint?")
        return str(path.parent), {"weight_name": path.name, "local_files_only": True}
    if path.is_dir():
        found = _weight_file(path, spec.source)
        if found is None:
            raise ModelLoadError(f"LoRA {spec.source}: the folder holds no .safetensors (or .bin) file")
        return _locate(LoraSpec(str(found), spec.scale))
    if problem := missing(spec):
        raise ModelLoadError(problem)
    # A hub id, or a hub id with the file's path in the repo: user/repo/style.safetensors.
    parts = spec.source.split("/")
    repo, weight = spec.source, None
    if len(parts) > 2 and parts[-1].endswith(LORA_SUFFIXES):
        repo, weight = "/".join(parts[:2]), "/".join(parts[2:])
    cached = _cached(repo, weight)
    try:
        local = _hub_preflight(repo, weight or (cached.name if cached else "pytorch_lora_weights.safetensors"))
    except ModelLoadError as exc:  # its advice is about --model: say what to do about a LoRA instead
        reason = str(exc).split("\n")[0].removeprefix(f"Could not load {repo!r}: ")
        raise ModelLoadError(
            f"LoRA {spec.source}: {reason}\n{hub_cache_line()}\nGive the LoRA's file instead (--lora "
            "/path/to/style.safetensors[:SCALE]), or connect this machine to the hub") from None
    if local and cached is not None:
        return _locate(LoraSpec(str(cached), spec.scale))
    return repo, {"local_files_only": local, **({"weight_name": weight} if weight else {})}


def _read(spec: LoraSpec) -> tuple[dict, dict, dict]:
    """(state dict with part prefixes, network alphas by key, PEFT metadata by part) as diffusers reads the file."""
    from diffusers import StableDiffusionPipeline

    from .models import _short

    source, kwargs = _locate(spec)
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"LoRA {spec.source}: could not read it: {_short(exc)}") from exc
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"LoRA {spec.source}: the file holds no weights")
    if not any("lora" in k for k in state):
        raise ModelLoadError(f"LoRA {spec.source}: it holds no LoRA weights (a model's own weights? --model takes "
                             "those, as a folder in the diffusers layout)")
    if not any(k.split(".")[0] in (*PARTS, "text_encoder_2") for k in state) \
            and all(k.split(".")[0] in UNET_BLOCKS for k in state):
        # diffusers' first LoRA files (attention processors' weights) name UNet layers without the "unet." prefix.
        state = {f"unet.{k}": v for k, v in state.items()}
        alphas = {f"unet.{k}": v for k, v in (alphas or {}).items()}
    others = sorted({k.split(".")[0] for k in state} - set(PARTS))
    if others:
        hint = " (a second text encoder: a LoRA for SDXL)" if "text_encoder_2" in others else ""
        raise ModelLoadError(f"LoRA weights for parts this model does not have: {', '.join(others[:4])}{hint}")
    by_part: dict[str, dict] = {}
    for key, value in (metadata or {}).items():
        part, _, name = key.partition(".")
        by_part.setdefault(part, {})[name] = value
    return state, dict(alphas or {}), by_part


def _layers(part: str, root: torch.nn.Module, state: dict, alphas: dict) -> dict[str, dict]:
    """One part's LoRA layers: {layer name in `root`: {"A", "B", optional "bias", "alpha"}}, keys in PEFT's form."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    def convert(entries: dict) -> dict:
        if not entries:
            return {}
        if part == "unet":
            return convert_unet_state_dict_to_peft(entries)
        converted = convert_state_dict_to_peft(convert_state_dict_to_diffusers(entries))
        if not hasattr(root, "text_model"):  # transformers 5 flattened CLIPTextModel; older LoRAs name text_model.
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        return converted

    prefix = f"{part}."
    mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # Some converters keep a layer's alpha among its weights, as "<layer>.alpha": taken out before the renaming.
    inline_alphas = {k[:-len(".alpha")]: v for k, v in mine.items() if k.endswith(".alpha")}
    mine = {k: v for k, v in mine.items() if not k.endswith(".alpha")}
    # Renamed as a whole (the renaming infers the layout from all keys at once), each value tagged with its original
    # key, so that a network alpha (keyed as its layer's down weight plus ".alpha") finds its layer afterwards.
    originals = list(mine)
    renamed = {new: originals[tag] for new, tag in convert({k: i for i, k in enumerate(originals)}).items()}
    layers: dict[str, dict] = {}
    name_of: dict[str, str] = {}
    for key, original in renamed.items():
        if "lora_magnitude_vector" in key or "dora_scale" in key:
            raise ModelLoadError("DoRA weights (a magnitude vector per layer) are not supported: only plain LoRA")
        match = re.fullmatch(r"(.+)\.lora_([AB])\.(weight|bias)", key)
        if match is None or (match.group(3) == "bias" and match.group(2) == "A"):
            raise ModelLoadError(f"a weight of the LoRA is not a LoRA layer's: {prefix}{key} (LoHa, LoKr and other "
                                 "adapters are not supported)")
        name, which, kind = match.groups()
        layers.setdefault(name, {})["bias" if kind == "bias" else which] = mine[original]
        name_of[original] = name
    for key, alpha in alphas.items():  # network alphas (kohya-ss)
        if key.startswith(prefix) and key.endswith(".alpha"):
            name = name_of.get(key[len(prefix):-len(".alpha")])
            if name is not None:
                layers[name]["alpha"] = float(alpha)
    for name, alpha in inline_alphas.items():
        if name not in layers:
            raise ModelLoadError(f"the LoRA has an alpha for {prefix}{name} but no weights for that layer")
        layers[name]["alpha"] = float(torch.as_tensor(alpha).reshape(-1)[0])
    return layers


# --------------------------------------------------------------------------------------------- merging


def _peft_alpha(name: str, config: dict) -> float | None:
    """The alpha PEFT's metadata gives a layer (its alpha_pattern first, then lora_alpha); None if it gives none."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return float(alpha)
    alpha = config.get("lora_alpha")
    return None if alpha is None else float(alpha)


def _plan(part: str, root: torch.nn.Module, layers: dict[str, dict], spec: LoraSpec, config: dict,
          model: str) -> list[tuple]:
    """Every layer checked against the model, with the factor its product is merged with at scale 1: (module, A, B,
    bias, alpha / r). ModelLoadError for the first that does not fit; nothing is changed here."""
    if config.get("use_dora"):
        raise ModelLoadError(f"LoRA {spec.source}: DoRA weights are not supported: only plain LoRA")
    alphas_given = [layer["alpha"] for layer in layers.values() if "alpha" in layer]
    # A layer without an alpha of its own takes the most common one given (as diffusers does); none given: alpha = r.
    common_alpha = max(set(alphas_given), key=alphas_given.count) if alphas_given else None
    plan = []
    for name, layer in sorted(layers.items()):
        where = f"LoRA {spec.source}: {part} layer {name}"
        if "A" not in layer or "B" not in layer:
            raise ModelLoadError(f"{where} has only one of its two matrices")
        try:
            module = root.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"{where} is not in the model: is the LoRA for another model than {model or 'this'} "
                                 "(SDXL's, say)?") from None
        weight = getattr(module, "weight", None)
        a, b = layer["A"], layer["B"]
        rank = a.shape[0]
        if not isinstance(weight, torch.Tensor) or b.ndim < 2 or b.shape[1] != rank \
                or (b.shape[0], *a.shape[1:]) != tuple(weight.shape) or any(s != 1 for s in b.shape[2:]):
            raise ModelLoadError(f"{where}: its matrices {tuple(b.shape)} x {tuple(a.shape)} do not fit the layer's "
                                 f"{tuple(getattr(weight, 'shape', ()))}: is the LoRA for another model than "
                                 f"{model or 'this'} (SD 1.5's on SD 2.1's layers, say)?")
        bias = layer.get("bias")
        if bias is not None and getattr(module, "bias", None) is None:
            raise ModelLoadError(f"{where} has a bias, the layer none")
        alpha = _peft_alpha(name, config)
        if alpha is None:
            alpha = layer.get("alpha", common_alpha if common_alpha is not None else rank)
        factor = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        plan.append((module, a, b, bias, factor))
    return plan
