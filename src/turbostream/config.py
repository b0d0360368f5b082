"""Every default of turbostream in one place: engine settings, per-stream parameters, server limits, size parsing.

Other modules read their defaults from here; the CLI's option defaults come from these dataclasses too. Nothing here
imports torch or the rest of turbostream, so reading a default costs nothing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "stabilityai/sd-turbo"
DEFAULT_TAESD = "madebyollin/taesd"
DEFAULT_PROMPT = "an oil painting, thick brush strokes, vivid colors"

# Limits on what one stream may ask for. SD-Turbo is distilled for 1-4 steps; more is allowed but rarely useful.
MAX_STEPS = 10
MAX_ENGINE_STEPS = 50  # the most an engine may be configured for (EngineConfig.max_steps)
MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**32 - 1
# Live-video controls (README: "Live-video controls"). A weighted prompt blend holds at most MAX_BLEND_PROMPTS
# prompts, each held to MAX_PROMPT_CHARS; transitions last at most MAX_TRANSITION_S; feedback stays below 1 (at 1 the
# input would be ignored for good).
MAX_BLEND_PROMPTS = 4
MAX_TRANSITION_S = 60.0
MAX_FEEDBACK = 0.95
# A still scene with `similarity` on is refreshed after at most this many skipped frames in a row (StreamDiffusion's
# max_skip_frame), so a slow drift or a prompt the skip would hide still shows.
MAX_CONSECUTIVE_SKIPS = 10
# Temporal feature reuse (engine/reuse.py): a full UNet pass every `reuse` frames, the ones between recompute only the
# outer blocks. Past 8 the reused deep features are more than a quarter second old at 30 fps: the picture lags motion.
MAX_REUSE = 8
# The UNet downsamples latents three times and the VAE by 8: sides must be multiples of 64.
SIZE_MULTIPLE = 64
MAX_SIDE = 1024
# The one list of dtype and VAE names (the CLI's choices, EngineConfig's checks, models.DTYPES' keys).
DTYPE_NAMES = ("auto", "float16", "bfloat16", "float32")
VAE_KINDS = ("tiny", "full")
# --aot-format (what --compile-aot builds): AOTInductor packages, or torch.compile's ahead-of-time artifacts
# (engine/aot.py).
AOT_FORMATS = ("aotinductor", "dynamo")
# What each format runs the networks as, in logs and reports.
AOT_FORMAT_NAMES = {"aotinductor": "AOTInductor packages", "dynamo": "torch.compile AOT artifacts"}
# The engine's attention backend for scaled_dot_product_attention: "auto" leaves the choice to PyTorch (as before);
# the others pin one of its backends (torch.nn.attention.SDPBackend) for every attention layer of the UNet.
ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
# torch.compile modes --compile may use. "default" is torch's default mode. The modes that capture CUDA graphs of
# their own are refused (see check_compile_mode): the engine already captures the whole frame into one graph.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
# `turbostream bench --compile` compiles and captures these batch sizes (each costs a compile): 8 is the throughput
# bucket the targets name (compiled batch 8 at 300 frames/s and more).
BENCH_COMPILE_BUCKETS = (1, 4, 8)


def check_compile_mode(mode: str) -> str:
    """mode if --compile may use it, else ValueError saying why (the cudagraph modes) or what to choose."""
    if mode in CUDAGRAPH_COMPILE_MODES:
        raise ValueError(
            f"compile mode {mode!r} is not allowed: it makes torch.compile capture CUDA graphs of its own "
            "(cudagraph trees), and the engine already captures the whole frame into CUDA graphs of its own; the "
            "two do not nest. Use 'max-autotune-no-cudagraphs' for autotuned kernels, or 'default'")
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


# A prompt: one text, or a weighted blend of a few texts ((text, weight), ...) whose embeddings are mixed by the
# normalized weights (installations crossfade between looks this way).
Prompt = str | tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class StreamParams:
    """What one stream asks of the engine; immutable, so a config change builds a new one.

    The live-video controls (similarity, transition_s, feedback) and feature reuse default to off: with all of them
    at 0 a stream's output is exactly what it was before they existed.
    """

    prompt: Prompt = DEFAULT_PROMPT  # a text, or [[text, weight], ...] (kept as a tuple of pairs)
    strength: float = 0.5  # fraction of the schedule that is re-noised: 0.5 of 2 steps = one UNet evaluation
    steps: int = 2  # length of the full trailing schedule the img2img run is cut from
    seed: int = 0  # fixed per-stream noise, reused every frame (less flicker)
    similarity: float = 0.0  # 0: off; else frames more alike (cosine) may skip the engine: 0 at it, sure if identical
    transition_s: float = 0.0  # blend from the old prompt/seed to the new one over this many seconds
    feedback: float = 0.0  # weight of the previous output's latent blended into the new frame's latent
    # 0 or 1: off, every frame runs the whole UNet. N >= 2: a full UNet pass every N frames; the N - 1 frames between
    # reuse its deep (low-resolution) features and recompute only the outer blocks: faster, an approximation.
    reuse: int = 0

    def __post_init__(self) -> None:
        # JSON gives a blend as lists; keep it as tuples (hashable: prompt caches key on it). Never raises: a
        # malformed value stays as it is and validate() says what is wrong with it.
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(tuple(e) if isinstance(e, list) else e for e in self.prompt))

    @property
    def unet_evals(self) -> int:
        """UNet evaluations per frame: int(steps * strength), as diffusers' img2img computes it."""
        return min(int(self.steps * self.strength), self.steps)

    def validate(self, max_steps: int = MAX_STEPS, reuse: bool = True) -> StreamParams:
        """Return self, or raise ValueError with a message a user can act on.

        max_steps and reuse are the engine's: its step limit, and whether it applies temporal feature reuse.
        """
        if isinstance(self.prompt, str):
            _check_prompt_text(self.prompt, "prompt")
        else:
            _check_blend(self.prompt)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise ValueError(f"steps must be an integer, got {self.steps!r}")
        if not 1 <= self.steps <= max_steps:
            raise ValueError(f"steps must be between 1 and {max_steps}, got {self.steps}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise ValueError(f"strength must be a number, got {self.strength!r}")
        if not (_finite(self.strength) and 0.0 < self.strength <= 1.0):
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.unet_evals < 1:
            raise ValueError(
                f"steps x strength must be at least 1 (got {self.steps} x {self.strength} = "
                f"{self.steps * self.strength:g}): no UNet evaluation would run; raise steps or strength"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        _check_number("similarity", self.similarity, 0.0, 1.0, "0 (off) or a threshold below 1, about 0.9 to 0.99",
                      high_open=True)
        _check_number("transition_s", self.transition_s, 0.0, MAX_TRANSITION_S, f"seconds, 0 to {MAX_TRANSITION_S:g}")
        _check_number("feedback", self.feedback, 0.0, MAX_FEEDBACK, f"0 (off) to {MAX_FEEDBACK:g}")
        if isinstance(self.reuse, bool) or not isinstance(self.reuse, int) or not 0 <= self.reuse <= MAX_REUSE:
            raise ValueError(f"reuse must be an integer from 0 to {MAX_REUSE} (0 or 1: off, every frame fully computed; "
                             f"N: a full UNet pass every N frames), got {self.reuse!r}")
        if self.reuse >= 2 and not reuse:
            raise ValueError("feature reuse is off on this engine (its graphs are captured only when it is started "
                             "with --reuse N): reuse must be 0 or 1 here")
        return self

    def updated(self, limits: tuple[int, bool] = (MAX_ENGINE_STEPS, True), /, **changes) -> StreamParams:
        """A copy with some fields changed, checked against `limits`, the engine's (max_steps, reuse) as
        stream_limits(engine) gives them (by default the widest any engine has); unknown fields raise ValueError too.
        Positional, so a field named "limits" in `changes` is an unknown field, not the limits."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown stream parameter(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes).validate(*limits)


def _check_prompt_text(text, name: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    try:
        # JSON escapes and command lines can carry half a surrogate pair ("\ud800"): a str in Python, but no text
        # the tokenizer can encode. Accepted, it would fail the engine on every frame of the stream and make
        # every batch it joins run twice (whole, then frame by frame).
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text: unpaired surrogate at character {exc.start}") from None


def _check_blend(blend) -> None:
    """A weighted blend: 1..MAX_BLEND_PROMPTS pairs (text, weight >= 0), weights summing to a finite positive."""
    usage = 'a string, or a list of [text, weight] pairs such as [["a watercolor", 0.7], ["a pencil sketch", 0.3]]'
    if not isinstance(blend, tuple) or not blend:
        raise ValueError(f"prompt must be {usage}; got {type(blend).__name__ if blend != () else 'an empty list'}")
    if len(blend) > MAX_BLEND_PROMPTS:
        raise ValueError(f"a prompt blend holds at most {MAX_BLEND_PROMPTS} prompts, got {len(blend)}")
    for i, entry in enumerate(blend):
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise ValueError(f"prompt blend entry {i + 1} must be a [text, weight] pair; the prompt must be {usage}")
        text, weight = entry
        _check_prompt_text(text, f"prompt blend entry {i + 1}'s text")
        if isinstance(weight, bool) or not _finite(weight) or weight < 0:
            raise ValueError(f"prompt blend entry {i + 1}'s weight must be a number >= 0, got {weight!r}")
    total = sum(float(w) for _, w in blend)  # two weights near 1e308 add up to inf: refused, never NaN weights
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"the weights of a prompt blend must add up to a finite number above 0, got {total:g}")


def _check_number(name: str, value, low: float, high: float, what: str, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number ({what}), got {value!r}")
    if not (_finite(value) and low <= value and (value < high if high_open else value <= high)):
        raise ValueError(f"{name} must be {what}; got {value}")


def _finite(value) -> bool:
    """A finite int or float (an int too large for a float, from JSON's unbounded integers, is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def blend_weights(prompt: Prompt) -> tuple[tuple[str, float], ...]:
    """((text, normalized weight), ...) of a validated prompt; a plain text is ((text, 1.0),)."""
    if isinstance(prompt, str):
        return ((prompt, 1.0),)
    total = sum(float(w) for _, w in prompt)
    return tuple((text, float(w) / total) for text, w in prompt)


def parse_prompt(text: str) -> Prompt:
    """A command-line prompt: plain text, or a JSON blend when it starts with '[' (ValueError if that is not JSON)."""
    if not text.lstrip().startswith("["):
        return text
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"a prompt starting with '[' is read as a JSON blend such as "
                         f"'[[\"a watercolor\", 0.7], [\"a pencil sketch\", 0.3]]': {exc}") from None
    return StreamParams(prompt=value).prompt


def parse_size(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (768, 512) as (width, height); checked against the model's limits."""
    if isinstance(text, tuple):
        width, height = text
    elif isinstance(text, int):
        width = height = text
    else:
        parts = str(text).lower().replace(" ", "").split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"size must be N or WxH (for example 512 or 768x512), got {text!r}") from None
        if len(nums) == 1:
            width = height = nums[0]
        elif len(nums) == 2:
            width, height = nums
        else:
            raise ValueError(f"size must be N or WxH (for example 512 or 768x512), got {text!r}")
    for side in (width, height):
        if side <= 0 or side % SIZE_MULTIPLE or side > MAX_SIDE:
            raise ValueError(
                f"size {width}x{height}: each side must be a multiple of {SIZE_MULTIPLE} between "
                f"{SIZE_MULTIPLE} and {MAX_SIDE}"
            )
    return width, height


def stream_limits(engine: Any) -> tuple[int, bool]:
    """(max_steps, reuse enabled) of an engine, for StreamParams.validate; the defaults for one without a config."""
    cfg = getattr(engine, "config", None)
    return getattr(cfg, "max_steps", MAX_STEPS), getattr(cfg, "reuse_enabled", True)


# --lora: LoRAs merged into the model's weights when it loads (lora.py).
MAX_LORAS = 8  # more than any look needs; each costs a read and a merge at start-up
MAX_LORA_SCALE = 10.0  # typical scales are 0.3..1.5; a negative scale subtracts a LoRA


@dataclass(frozen=True)
class LoraSpec:
    """One --lora: a file, a folder holding one LoRA file, or a hub id (optionally with the file's path in the repo),
    and the scale its product is merged with."""

    source: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise ValueError("lora needs a file, a folder or a hub id")
        if not math.isfinite(self.scale) or abs(self.scale) > MAX_LORA_SCALE:
            raise ValueError(f"lora scale must be between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, "
                             f"got {self.scale!r} ({self.source})")

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """'style.safetensors' (scale 1), 'style.safetensors:0.8', 'user/repo:0.5', 'C:\\loras\\x.safetensors:0.7'.

        The text after the last ':' is the scale when it reads as a number; otherwise the whole text is the source
        (a Windows drive letter's colon is followed by a backslash, never a number)."""
        source, sep, tail = text.rpartition(":")
        if sep and not source.strip():
            raise ValueError(f"lora needs a file, a folder or a hub id before the scale, got {text!r}")
        if sep:
            try:
                scale = float(tail)
            except ValueError:  # no number after the colon: part of the source
                return cls(text)
            return cls(source, scale)
        return cls(text)

    @property
    def shown(self) -> str:
        return f"{self.source} (scale {self.scale:g})"


def check_loras(loras) -> tuple[LoraSpec, ...]:
    """The LoRAs as a tuple of LoraSpec (from specs or 'FILE[:SCALE]' texts); ValueError past MAX_LORAS."""
    specs = tuple(s if isinstance(s, LoraSpec) else LoraSpec.parse(str(s)) for s in loras)
    if len(specs) > MAX_LORAS:
        raise ValueError(f"at most {MAX_LORAS} LoRAs (--lora), got {len(specs)}")
    return specs


@dataclass
class EngineConfig:
    """How the engine is built: which weights, where, at what size, and which fast paths."""

    model: str = DEFAULT_MODEL  # hub id, local folder, "random" (full size) or "tiny-random" (tests)
    device: str = "auto"  # "auto" takes cuda when available, else cpu
    dtype: str = "auto"  # "auto": float16 on CUDA, float32 on the CPU; or float16, bfloat16, float32
    width: int = 512
    height: int = 512
    vae: str = "tiny"  # "tiny": TAESD (AutoencoderTiny); "full": the model's own AutoencoderKL
    taesd: str = DEFAULT_TAESD  # hub id or local folder of the tiny VAE
    buckets: tuple[int, ...] = (1, 2, 4, 8)  # batch sizes captured as CUDA graphs at warmup
    cuda_graphs: bool = True  # False runs the CUDA path eagerly (for comparison and debugging)
    compile: bool = False  # torch.compile the UNet and VAE before capture (minutes of warmup)
    # Where --compile keeps what it built, so the next start with the same configuration reuses it (None: off).
    # "" means the default folder (engine/compile_cache.py: ~/.cache/turbostream/compile).
    compile_cache: str | None = ""
    # torch.compile's mode with --compile (COMPILE_MODES); "default" is what --compile always did.
    compile_mode: str = "default"
    # With compile: let torch.compile make the batch size symbolic after the first bucket (its automatic dynamic
    # shapes), so batch 1 is compiled for itself and every larger bucket shares one graph: two compiles instead of
    # one per bucket (scripts/compile_buckets.py times both: 1.74x faster for buckets 1,2,4,8 on the CPU). The larger
    # buckets' fused kernels are then not specialized to each batch size. Off: one static compile per bucket.
    compile_dynamic: bool = False
    # With compile: build the UNet and TAESD ahead of time (torch.export + AOTInductor, engine/aot.py) into packages
    # kept in the compile cache, which later starts load without running dynamo or inductor at all (torch.compile's
    # cache still traces the UNet at every start: about half a minute). For CUDA; the CPU path runs the packages too,
    # slower than eager (README). Works with feature reuse (its full and partial forwards are packages too); not with
    # fp8 (torchao's tensors are not exported here).
    # Like compile_mode and compile_dynamic, it means nothing without compile.
    compile_aot: bool = False
    # What compile_aot builds (AOT_FORMATS): "aotinductor" packages (a shared library each), or "dynamo":
    # torch.compile's own ahead-of-time artifacts (Python; engine/aot.py's DynamoArtifacts), which also skip dynamo
    # at later starts and load no shared library of AOTInductor's. Where AOTInductor's packages cannot run (a child
    # process checks first: engine/aot_check.py), a CUDA engine builds "dynamo" artifacts instead.
    aot_format: str = "aotinductor"
    # SDPA backend of the UNet's attention (ATTENTION_BACKENDS); "auto": PyTorch's choice, as before. Another backend
    # rounds differently (small differences); one that cannot run here is an error when the engine is built.
    attention: str = "auto"
    # Each prompt's cross-attention keys and values computed once, when the prompt is first used, instead of in every
    # UNet evaluation (engine/prompt_kv.py): 16 GEMMs fewer per evaluation for SD-Turbo (32 without QKV fusion), the
    # same math (rounding only). Costs 3.8 MB of device memory per cached prompt at SD-Turbo's size
    # (prompt_kv_cache_size of them, and up to 16 prompt blends) and one projection per new prompt.
    prompt_kv: bool = False
    # The UNet's 22 resnet time-embedding projections (each a SiLU and a small Linear of the same embedding) as one
    # SiLU and one stacked Linear (engine/time_proj.py): 2 kernels instead of 44 per evaluation, rounding only.
    fused_time_proj: bool = False
    # float8 (e4m3) Linear layers in the UNet's transformer blocks through torchao (CUDA, compute capability 8.9+):
    # changes the output (weights and activations are rounded to 8 bits), unlike every other option here.
    fp8: bool = False
    # Leave out the UNet's divisions by 1.0 (diffusers' resnet output_scale_factor and attention
    # rescale_output_factor): one elementwise kernel per block less, bit-identical output. On by default since the
    # H200 measured it (batch 1 10.40 -> 9.78 ms, batch 8 188.6 -> 193.3 frames/s in one run; no start-up cost).
    skip_unit_rescale: bool = True
    # The UNet's GroupNorms (and the SiLU after most of them) in Triton kernels of our own (engine/group_norm.py): 2
    # kernels each instead of 4, in the activations' channels_last layout. For the path without compile (torch.compile
    # fuses them itself; the two together are refused); CUDA with Triton only. Output changes by rounding only.
    fused_norm: bool = False
    # TAESD's conv biases, skip adds and ReLUs in one Triton pass per conv (engine/epilogue.py): 3 elementwise passes
    # per block instead of 7, on the frame's largest tensors. Like fused_norm: without compile, CUDA with Triton only;
    # the output changes by rounding only.
    fused_epilogue: bool = False
    # Threads that compile the fused kernels' variants before the first capture (engine/kernel_warmup.py): 0 = one per
    # CPU core (at most 16), 1 = none ahead (the capture compiles them one after another, as before).
    kernel_compile_threads: int = 0
    # Also capture, per bucket, one CUDA graph of a whole frame with the default stream's number of UNet evaluations
    # (head, every step and tail: one launch a call instead of 2 + evaluations, and no host work between them, so a
    # busy host cannot stall the device inside a call). With feature reuse and one evaluation a frame, its full and
    # partial frames get one each too. Other step counts replay the segment graphs as before; the output is
    # bit-identical. Costs one more capture per bucket at warmup (three with reuse).
    frame_graph: bool = False
    # Temporal feature reuse (engine/reuse.py) needs two more step graphs per bucket, captured at warmup: on when
    # asked here or when the default stream uses it (--reuse N, N >= 2); streams may then change their `reuse`.
    feature_reuse: bool = False
    # How many layers of the UNet's outermost up block a partial frame of feature reuse recomputes, counted from its
    # end (engine/reuse.py): None, all of them (the whole block pair); fewer is faster and further from a full frame
    # (SD-Turbo: 1 to 3). Needs feature reuse on; the engine refuses a count its UNet does not have.
    reuse_layers: int | None = None
    # LoRAs merged into the UNet's and the text encoder's weights when the model loads (lora.py): lora.LoraSpec
    # entries, or 'FILE[:SCALE]' texts (checked and turned into LoraSpec here). Change the output; cost no time a frame.
    loras: tuple = ()
    # Keep what changing the LoRAs' scales while the engine runs takes (Engine.set_lora_scales; OSC /turbostream/lora):
    # every adapted layer's weight from before the LoRAs, beside the model (lora.LiveLoras).
    lora_live: bool = False
    max_steps: int = MAX_STEPS
    prompt_cache_size: int = 64  # prompt embeddings kept (LRU); the text encoder runs only on a miss
    prompt_kv_cache_size: int = 32  # with prompt_kv: prompts whose keys and values are kept (LRU)
    noise_cache_size: int = 256  # per-seed noise tensors kept (LRU)
    # Streams whose controls state (transition, feedback latent) is kept (LRU); the batcher frees a stream's state
    # when it closes, so this bound only matters to callers that never do.
    max_stream_states: int = 256
    default_params: StreamParams = field(default_factory=StreamParams)

    def __post_init__(self) -> None:
        self.width, self.height = parse_size((self.width, self.height))
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.vae not in VAE_KINDS:
            raise ValueError(f"vae must be one of {', '.join(VAE_KINDS)}, got {self.vae!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        check_compile_mode(self.compile_mode)
        if self.aot_format not in AOT_FORMATS:
            raise ValueError(f"aot_format must be one of {', '.join(AOT_FORMATS)}, got {self.aot_format!r}")
        if self.compile and self.compile_aot and self.fp8:
            raise ValueError("compile_aot does not cover fp8 yet: use compile (torch.compile) with it")
        for name in ("fused_norm", "fused_epilogue"):
            if getattr(self, name) and self.compile:
                raise ValueError(f"{name} is for the path without compile: torch.compile fuses these kernels itself "
                                 "(choose one)")
        if not 0 <= self.kernel_compile_threads <= 256:
            raise ValueError(f"kernel_compile_threads must be 0 (one per core) to 256, got {self.kernel_compile_threads}")
        self.loras = check_loras(self.loras)
        if self.lora_live and not self.loras:
            raise ValueError("lora_live (--lora-live) changes the scales of LoRAs: name at least one (--lora FILE, "
                             "at scale 0 to fade it in later)")
        if self.lora_live and self.fp8:
            raise ValueError("lora_live does not work with fp8: fp8 rounds the UNet's weights to 8 bits once, at "
                             "start-up (choose one)")
        buckets = tuple(sorted(set(int(b) for b in self.buckets)))
        if not buckets or buckets[0] < 1 or buckets[-1] > 64:
            raise ValueError(f"buckets must be batch sizes between 1 and 64, got {self.buckets!r}")
        self.buckets = buckets
        if not 1 <= self.max_steps <= MAX_ENGINE_STEPS:
            raise ValueError(f"max_steps must be between 1 and {MAX_ENGINE_STEPS}, got {self.max_steps}")
        if min(self.prompt_cache_size, self.prompt_kv_cache_size, self.noise_cache_size, self.max_stream_states) < 1:
            raise ValueError("cache sizes must be at least 1")
        self.default_params.validate(self.max_steps)  # reuse: on when the default stream asks (reuse_enabled)
        if self.reuse_layers is not None:
            if isinstance(self.reuse_layers, bool) or not isinstance(self.reuse_layers, int) or self.reuse_layers < 1:
                raise ValueError(f"reuse_layers must be a whole number of at least 1, got {self.reuse_layers!r}")
            if not self.reuse_enabled:
                raise ValueError("reuse_layers is for temporal feature reuse, which is off on this engine (turn it on "
                                 "with reuse N >= 2 for the default stream, or feature_reuse)")

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    @property
    def reuse_enabled(self) -> bool:
        """Whether this engine applies temporal feature reuse (and captures its graphs)."""
        return self.feature_reuse or self.default_params.reuse >= 2

    @property
    def torch_compile_dynamic(self) -> bool | None:
        """torch.compile's `dynamic`: None (automatic dynamic shapes) with compile_dynamic, else False (static)."""
        return None if self.compile_dynamic else False

    @property
    def torch_compile_mode(self) -> str | None:
        """The `mode` argument for torch.compile: None for "default" (torch's own default), else the mode."""
        return None if self.compile_mode == "default" else self.compile_mode


# Named starting points, gpt-fast style; the CLI starts from "sd-turbo" and applies its options on top.
PRESETS: dict[str, EngineConfig] = {
    "sd-turbo": EngineConfig(),
    "bench": EngineConfig(model="random"),
    "test": EngineConfig(model="tiny-random", device="cpu", width=64, height=64, buckets=(1, 2, 4)),
}


def preset(name: str, **overrides) -> EngineConfig:
    """A fresh copy of a preset with some fields replaced (validated again)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class Limits:
    """Every ceiling of `turbostream serve`, in one place (README: "Limits"); tests shrink them instead of patching.

    What happens past each one is in its comment; none of them can be exceeded by what a client sends.
    """

    max_clients: int = 8  # interactive /ws streams at once (warming ones too); past it: server_full, close 1013
    max_viewers: int = 64  # /view/ws connections at once; past it: server_full, close 1013
    max_message_bytes: int = 4 * 2**20  # one message (fits a 1024x1024 JPEG at high quality); past it: close 1009
    max_text_bytes: int = 64 * 1024  # one text message, in UTF-8 bytes (a config is a few hundred); bad_message
    max_image_side: int = 4096  # declared JPEG width or height, checked before decoding; image_too_large
    # Declared pixels per byte of JPEG data beyond which the data cannot hold the image: Huffman coding spends at
    # least one bit per 8x8 block (512 pixels a byte; cv2's flattest progressive grayscale reaches 255). A forged
    # header on a few hundred bytes would otherwise be "decoded" at its full declared size (libjpeg fills missing
    # data with gray): 48 MiB and a quarter second of a codec worker for 4096x4096, per message. Past it: bad_image.
    max_pixels_per_byte: int = 1024
    # Start-of-scan markers in one JPEG. A progressive JPEG is a handful of scans (libjpeg writes 10 for colour); each
    # scan costs a pass over the whole image, so a few hundred KiB of near-empty scans declaring 4096x4096 cost
    # seconds to minutes of a codec worker. Counted before decoding (microseconds); past it: bad_image.
    max_jpeg_scans: int = 64
    # Bytes buffered for a socket before a send waits for it: about two 512x512 JPEGs. Past it, the reader is slow
    # and its newer results replace the one waiting (dropped) instead of piling up.
    write_limit_bytes: int = 128 * 1024
    # Bytes waiting in one socket's send buffer. Our own sends wait at write_limit_bytes (plus one message), so only
    # the answers to what a peer sends (pongs to a ping flood) can pass this: the socket is closed at once.
    max_send_buffer_bytes: int = 2 * 2**20
    # Pings a peer may send: a burst of max_ping_burst, then max_pings_per_s on average (browsers send none; client
    # libraries one every few seconds). Every ping costs a parse and a pong; past it, the socket is closed at once.
    max_ping_burst: int = 20
    max_pings_per_s: float = 2.0
    # Small messages a peer may send (text and binary, and fragments, under 1 KiB: configs, floods; a client's
    # frames are larger and not counted): a burst of max_message_burst, then max_messages_per_s on average. A client
    # sends a config or two per frame at most: tens a second. Without it, one socket read of 256 KiB could queue
    # 43,000 empty messages, handled one after another while every other client waited. Past it, the socket is
    # closed at once. The burst is also what a flooding connection costs the event loop before it is closed
    # (parsing ~200-900 frames: a few ms).
    max_message_burst: int = 200
    max_messages_per_s: float = 500.0
    # websockets' receive buffer in messages (high-water mark): with 4 MiB messages, 4 keeps a flooding client to
    # 16 MiB before TCP flow control pushes back on it.
    max_queue_messages: int = 4
    # Keepalive: a ping every ping_interval_s; no pong within as long again and the connection is closed. This is
    # what frees the place of a peer that vanished without a FIN or RST (a pulled cable, a sleeping laptop).
    ping_interval_s: float = 20.0
    # How long a new connection may take to complete its HTTP request / WebSocket handshake; a socket that connects
    # and says nothing (or half a request) holds a descriptor until then, and no client place.
    open_timeout_s: float = 10.0
    # Sockets whose HTTP request is being read (no token seen yet): past it, a new socket waits its turn unread (its
    # bytes stay in the kernel) until one of them ends, within open_timeout_s; the sockets at once, waiting ones
    # included, are bounded by max_clients + max_viewers + this. With the header limits below, memory before
    # authentication is at most about
    # max_pending_handshakes x (max_header_count + 1) x max_header_line_bytes (64 x 33 x 8 KiB = 16.5 MiB).
    max_pending_handshakes: int = 64
    max_header_count: int = 32  # HTTP headers in one request; past it: 431
    max_header_line_bytes: int = 8192  # one request or header line; past it: 431
    # How long a closing handshake may take before the socket is dropped (a peer that no longer reads never ends it).
    close_timeout_s: float = 5.0
    # The same for a peer refused at the start (a wrong token, a full server, no source to view): it has had its
    # reason, and a short wait means refusals cannot hold sockets (a peer without the token that never answers the
    # close held one for close_timeout_s, and its place among max_clients + max_viewers + max_pending_handshakes).
    refused_close_timeout_s: float = 0.5
    # On SIGTERM/SIGINT: how long connections get to answer the close (1001) and the inference thread to finish its
    # batch before the server stops without them. Exit within a few seconds, whatever is running.
    shutdown_grace_s: float = 2.0
    # A lost live source (--source camera or URL) is opened again after source_retry_s, doubling while it keeps
    # failing, up to source_retry_max_s between attempts, for as long as the server runs.
    source_retry_s: float = 1.0
    source_retry_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_clients < 1 or self.max_viewers < 0:
            raise ValueError("max clients must be at least 1 and max viewers at least 0")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max message bytes must be at least 1024, got {self.max_message_bytes}")
        if not 64 <= self.max_image_side <= 16384:
            raise ValueError(f"max image side must be between 64 and 16384, got {self.max_image_side}")
        if self.max_send_buffer_bytes < self.write_limit_bytes + 64 * 1024:
            raise ValueError(f"max send buffer bytes ({self.max_send_buffer_bytes}) must exceed the write limit "
                             f"({self.write_limit_bytes}) by 64 KiB at least: our own sends fill it that far")
        for name in ("max_text_bytes", "max_pixels_per_byte", "max_jpeg_scans", "write_limit_bytes",
                     "max_queue_messages", "max_pending_handshakes", "max_header_count", "max_header_line_bytes",
                     "max_ping_burst", "max_message_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in ("ping_interval_s", "open_timeout_s", "close_timeout_s", "refused_close_timeout_s",
                     "source_retry_s", "source_retry_max_s", "max_pings_per_s", "max_messages_per_s",
                     "shutdown_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', ' ')} must be positive, got {getattr(self, name)}")


@dataclass
class ServerConfig:
    """`turbostream serve`: network, security and output defaults a careful user would want; limits in `limits`."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    token: str | None = None  # required on /ws when set (/ws?token=...)
    control_token: str | None = None  # lets a viewer change the broadcast's prompt (/view?control=...)
    allow_origins: tuple[str, ...] = ()  # extra allowed Origins ("*": any); the server's own origin is always allowed
    jpeg_quality: int = 85
    stats_interval_s: float = 1.0
    source: str | None = None  # server-side capture broadcast to viewers
    limits: Limits = field(default_factory=Limits)
    # Load balancers (addresses or networks) whose X-Forwarded-For is believed, and whose handshakes the server
    # cannot serve are refused with HTTP 503 before the upgrade, so the balancer can retry another replica.
    trusted_proxies: tuple[str, ...] = ()
    # Move the warm process's objects out of the garbage collector's reach once the engines are ready (heap.py):
    # no full collection walks the model's half million objects, stalling every stream, while clients stream.
    freeze_heap: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be between 1 and 100, got {self.jpeg_quality}")
        if not self.stats_interval_s > 0:
            raise ValueError(f"stats interval must be positive, got {self.stats_interval_s}")
        self.allow_origins = tuple(self.allow_origins)
        self.trusted_proxies = tuple(self.trusted_proxies)
        for spec in self.trusted_proxies:
            try:
                ipaddress.ip_network(spec.strip(), strict=False)
            except ValueError:
                raise ValueError(f"trusted proxy {spec!r} is not an IP address or network (e.g. 127.0.0.1, "
                                 "10.0.0.0/8)") from None


@dataclass
class RunConfig:
    """`turbostream run`: the headless capture loop."""

    input: str = "0"  # camera index, video file, URL or image folder
    outputs: tuple[str, ...] = ("window",)
    max_frames: int | None = None
    realtime: bool = False  # files: drop stale frames like a live source instead of processing every frame
    jpeg_quality: int = 95  # image-folder outputs
    fallback_fps: float = 30.0  # output video rate when the source reports none (image folders, some cameras)
    queue_frames: int = 8  # in-order (file) hand-offs between reader, engine and writers: frames held at most
    reconnect_attempts: int = 3  # live sources that stop delivering: reopen attempts (0.5 s, 1 s, 2 s apart)
    open_timeout_s: float = 10.0  # network sources: opening, and each read, give up after this long
