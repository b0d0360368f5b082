"""The Engine: SD-Turbo img2img on batches of frames from many streams, each with its own prompt, strength, steps
and seed; static buffers and CUDA graphs on CUDA, eager on the CPU.

Graphs: three per batch bucket, one per segment of the frame path (frame.FrameMath): head (decode the uint8 frames,
VAE encode, noise), step (one UNet evaluation and its Euler step) and tail (VAE decode, uint8). A call with n UNet
evaluations replays head, step n times, tail. So every number of evaluations is served by the graphs captured at
warmup: a stream that changes its steps or strength never triggers a capture, which would stall every stream for
seconds. The price is two more graph launches per call (microseconds against milliseconds of work). With feature
reuse the step is captured twice more per bucket (its keep and reuse modes), and `frame_graph` adds whole-frame
graphs of the default step count (_frame_graph_key).

Pipelining: submit() stages a batch and enqueues its graphs without waiting; collect() waits for that batch and
hands out its frames. Between the two the GPU works while the caller does host work, such as staging the next
batch (two calls may be in flight). Device buffers are shared by all calls: one CUDA stream orders them, the
engine's own (not the legacy default stream: see _on_own_stream). The pinned host buffers are not ordered by the
stream, so there are two sets (slots), one per call in flight; a slot is reused only after its call was collected,
so neither a staged input nor an output still to be handed out is overwritten.

The live-video controls are data in the same static buffers (streams.py): a transition writes interpolated
embeddings and noise into a stream's rows, feedback writes the stream's previous output latent and its weight. Both
need to know which stream a frame belongs to: run(..., streams=[key, ...]); without keys the engine is stateless.

What it runs is frame.FrameMath (the pure math); what is ours here is how it runs: static buffers, per-sample
timesteps/sigmas/embeddings so mixed streams share one UNet batch, graphs captured at warmup, no host sync inside a
frame.

Threading: an Engine belongs to one thread. CUDA graphs replay on the thread that captured them, and the prompt
and noise caches are not locked; call warmup() and run() from the same (inference) thread.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..codec import fit_frame
from ..config import EngineConfig, StreamParams
from ..models import Components, default_dtype, load_components, resolve_device
from .caches import LRU, encode_prompt, seed_noise
from .compiling import compile_networks
from .cuda import options_key, prepare_cpu, prepare_cuda, refresh_derived_weights
from .frame import FrameMath, Probe
from .kernel_warmup import Launch, precompile, recording
from .prompt_kv import PromptKV
from .reuse import FeatureReuse, UnsupportedUNetError
from .schedule import ScheduleTable
from .streams import StreamStates, blend_embeddings, lerp, slerp
from .triton_support import interpreting

log = logging.getLogger("turbostream.engine")

# One capture at a time in the process: engines of several GPUs (serve --device all) warm up on their own threads at
# once, and CUDA documents captures as safe one after another.
_CAPTURE_LOCK = threading.Lock()
BLEND_CACHE_SIZE = 16  # prompt blends' combined embeddings kept (LRU); recombining one costs a few tensor ops


def _on_own_stream(hand_back: bool = False):
    """Decorator: run an Engine method with the engine's CUDA stream current (nothing changes on the CPU).

    Why a stream of its own: the legacy default stream orders work across the whole process, so a library that
    queues work there from another thread (torchvision's nvJPEG encoder copies its result on it: `serve --jpeg gpu`)
    would wait behind the engine call in flight, and the engine's next call behind it. On entry the engine's stream
    waits for the work the caller queued so far (its inputs, buffers set up in __init__); with hand_back the caller's
    stream waits for the engine's, for methods that return device tensors. submit() does not hand back: its results
    leave through pinned host memory and an event, and a caller's stream waiting for the whole call would bring the
    stall back.
    """

    def wrap(method):
        @functools.wraps(method)
        def on_own_stream(self, *args, **kwargs):
            stream = self.stream
            if stream is None:
                return method(self, *args, **kwargs)
            caller = torch.cuda.current_stream(self.device)
            if caller == stream:  # called from another engine method
                return method(self, *args, **kwargs)
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                result = method(self, *args, **kwargs)
            if hand_back:
                caller.wait_stream(stream)
            return result

        return on_own_stream

    return wrap


@dataclass
class EngineStats:
    """Counters for tests, metrics and logs; plain ints, updated only by the engine's own thread."""

    frames: int = 0
    calls: int = 0
    graph_replays: int = 0
    graphs_captured: int = 0
    text_encoder_runs: int = 0
    kv_projections: int = 0  # prompt_kv: prompts whose cross-attention keys and values were computed
    prompt_cache_evictions: int = 0
    rows_reused: int = 0  # embedding or noise rows that already held what a call needed (no copy)
    reuse_keep_batches: int = 0  # batches run in full that kept deep features for temporal feature reuse
    reuse_partial_batches: int = 0  # batches that reused deep features (the UNet's outer blocks only)
    device_s: float = 0.0  # the device's time on every call collected (Ticket.device_s): its busy seconds
    warmup_s: float = 0.0
    compile_s: float = 0.0
    compile_cache_hit: bool = False
    aot_packages_built: int = 0  # --compile-aot: packages compiled at this start (engine/aot.py)
    aot_packages_loaded: int = 0  # and packages loaded from the compile cache instead
    aot_unavailable: str | None = None  # --compile-aot asked for but packages cannot run here (aot_check.py): why
    aot_format: str | None = None  # --compile-aot: what the networks run as ("aotinductor", "dynamo"); None: not
    capture_s: dict[str, float] = field(default_factory=dict)  # "b{batch}" -> seconds to capture its graphs
    kernel_variants: int = 0  # fused-kernel variants compiled ahead of the capture (kernel_warmup.py)
    kernel_compile_s: float = 0.0  # seconds that took


@dataclass
class _Slot:
    """One call's pinned host buffers: staged inputs and the outputs to hand out. Busy from submit to collect."""

    frames: torch.Tensor  # uint8 (B, H, W, 3)
    steps: torch.Tensor  # float32 (max_steps, 3, B): per UNet evaluation, timestep, sigma, next sigma per row
    feedback: torch.Tensor  # float32 (B,)
    out: torch.Tensor  # uint8 (B, H, W, 3)
    done: torch.cuda.Event | None  # recorded after the call's last copy to the host
    busy: bool = False


@dataclass
class DeepMoves:
    """Temporal feature reuse's device copies around UNet step k of a batch: before(k) and after(k) its step."""

    before: Callable[[int], None] = lambda k: None
    after: Callable[[int], None] = lambda k: None


@dataclass
class Ticket:
    """A submitted call: frames already collected (earlier batches of a large call), and the batch in flight."""

    results: list[np.ndarray | None]
    slot: _Slot
    rows: list[int]  # which results the batch in flight fills, in row order
    collected: bool = False
    # The device's own timeline, set by collect(): seconds the device spent on this call (first copy in to last copy
    # out, CUDA events; on the CPU the submit's compute), and seconds it sat idle between the end of the call
    # submitted before this one and this call's start (None for an engine's first call). A gap of 0 means the call
    # was queued before the device ran out of work.
    device_s: float | None = None
    gap_s: float | None = None
    _marks: tuple = ()  # (started, ended, previous call's ended): CUDA timing events, or perf_counter on the CPU


class Engine:
    """SD-Turbo img2img over batches of frames from many streams. Build, warmup(), then run() from one thread."""

    def __init__(self, config: EngineConfig, components: Components | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = default_dtype(self.device, config.dtype)
        self.is_cuda = self.device.type == "cuda"
        # Every call's device work goes to this stream (_on_own_stream); set-up below still runs on the caller's.
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        t0 = time.perf_counter()
        if components is None:
            components = load_components(
                config.model, device=self.device, dtype=self.dtype, vae=config.vae, taesd=config.taesd,
                loras=config.loras, lora_live=config.lora_live,
            )
        merged = tuple((s["lora"], s["scale"]) for s in components.loras)
        if merged != tuple((spec.source, spec.scale) for spec in config.loras):
            raise ValueError(f"the components carry the LoRAs {list(merged)} but the engine's config asks for "
                             f"{[(spec.source, spec.scale) for spec in config.loras]}: load them with its loras")
        if config.lora_live != (components.lora_live is not None):
            raise ValueError("the engine's config and its components disagree on lora_live: load them with "
                             f"lora_live={config.lora_live}")
        weights_dtype = next(components.unet.parameters()).dtype
        if weights_dtype != self.dtype:
            raise ValueError(f"components are {weights_dtype} but the engine runs {self.dtype}: load them with "
                             f"the engine's dtype ({config.dtype!r} on {self.device})")
        self.components = components
        self.load_s = time.perf_counter() - t0
        self.unet, self.vae, self.text_encoder = components.unet, components.vae, components.text_encoder
        self.schedules = ScheduleTable(components.scheduler.config)
        self.width, self.height = config.width, config.height
        self.latent_shape = (int(self.vae.config.latent_channels), self.height // 8, self.width // 8)
        self.stats = EngineStats()
        self._prompts = LRU(config.prompt_cache_size)
        self._noise = LRU(config.noise_cache_size)
        # Prompt blends apart from the prompt cache: a mix slider dragged through many weights must not evict the
        # texts (and cost text-encoder runs) of other streams.
        self._blends = LRU(BLEND_CACHE_SIZE)
        self._owner: int | None = None
        # By batch bucket: "head", "tail" and one step graph per step mode ("plain"; "keep", "reuse" with feature
        # reuse: see FrameMath.step).
        self._graphs: dict[int, dict[str, torch.cuda.CUDAGraph]] = {}
        self._streams = StreamStates(config.max_stream_states)
        self.clock = time.monotonic  # transitions are timed by it (tests may replace it)
        # What the compile found in the compile cache, and where --compile-aot's packages are (warmup sets both; read
        # by `turbostream warmup`): "off" until then.
        self.compile_cache_state = self.aot_cache = "off"
        # The only place building an engine changes its components or process state (see cuda.py).
        applied = prepare_cuda(components, config) if self.is_cuda else prepare_cpu(components, config)
        self._options = options_key(config)  # what apply_options set on the modules for this engine
        self.math = FrameMath(self.unet, self.vae, components.vae_kind, self.dtype)
        # Temporal feature reuse: a second way through the same UNet (ValueError for a UNet it cannot mirror).
        self.reuse = None
        if config.reuse_enabled:
            try:
                self.reuse = FeatureReuse(self.unet, layers=config.reuse_layers)
            except UnsupportedUNetError:
                raise
            except ValueError as exc:  # the one value checked against this UNet: the cut's layer count
                raise ValueError(f"reuse_layers (--reuse-layers): {exc}") from None
        if self.reuse is not None:
            self.math.use_reuse(self.reuse)
        # prompt_kv: what turns a prompt's embeddings into every cross-attention layer's keys and values (the layout
        # the processors apply_options installed read), and the prompts whose keys and values are kept.
        self.prompt_kv: PromptKV | None = applied["prompt_kv"]
        self._kv = LRU(config.prompt_kv_cache_size)
        self._kv_blends = LRU(BLEND_CACHE_SIZE)  # as _blends: a mix slider must not evict other streams' prompts
        self._alloc_buffers()

    # ------------------------------------------------------------------ set-up

    @property
    def model_name(self) -> str:
        return self.components.name

    @property
    def random_weights(self) -> bool:
        return self.components.random_weights

    @property
    def loras(self) -> tuple:
        """The LoRAs merged into this engine's weights (lora.merge_loras' summaries), in order; () for none."""
        return tuple(self.components.loras)

    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    @property
    def use_graphs(self) -> bool:
        return self.is_cuda and self.config.cuda_graphs

    def _alloc_buffers(self) -> None:
        """Static inputs and outputs at the largest bucket; every graph reads and writes views of them."""
        B, (C, h, w), dev = self.max_batch, self.latent_shape, self.device
        n = self.config.max_steps
        pin = self.is_cuda
        self._slots = [
            _Slot(frames=torch.empty((B, self.height, self.width, 3), dtype=torch.uint8, pin_memory=pin),
                  steps=torch.zeros((n, 3, B), dtype=torch.float32, pin_memory=pin),
                  feedback=torch.zeros((B,), dtype=torch.float32, pin_memory=pin),
                  out=torch.empty((B, self.height, self.width, 3), dtype=torch.uint8, pin_memory=pin),
                  done=torch.cuda.Event() if self.is_cuda else None)
            for _ in range(2)
        ]
        self._next_slot = 0
        self._last_ended = None  # the end mark of the last call submitted (Ticket._marks)
        self._frames = torch.zeros((B, self.height, self.width, 3), dtype=torch.uint8, device=dev)
        self._out = torch.zeros((B, self.height, self.width, 3), dtype=torch.uint8, device=dev)
        # Each row's conditioning (the UNet's encoder_hidden_states): the prompt's embeddings, or with prompt_kv every
        # cross-attention layer's keys and values of them (conditioning()).
        width = self.prompt_kv.width if self.prompt_kv is not None else self.components.text_dim
        self._emb = torch.zeros((B, self.components.max_tokens, width), dtype=self.dtype, device=dev)
        self._noise_buf = torch.zeros((B, C, h, w), dtype=torch.float32, device=dev)
        # Which cached tensor each row of _emb and _noise_buf holds (None: something else), to skip copying it again.
        self._row_emb: list[torch.Tensor | None] = [None] * B
        self._row_noise: list[torch.Tensor | None] = [None] * B
        # Feedback: per-row weight (0: off, exact identity) and previous output latents in; final latents out.
        self._feedback = torch.zeros((B,), dtype=torch.float32, device=dev)
        self._prev = torch.zeros((B, C, h, w), dtype=torch.float32, device=dev)
        self._latents_out = torch.zeros((B, C, h, w), dtype=torch.float32, device=dev)
        # The latents between graph segments: head writes them, each step updates them, tail reads them.
        self._latents = torch.zeros((B, C, h, w), dtype=torch.float32, device=dev)
        # Schedule: _steps[k] holds (timestep, sigma, next sigma) of evaluation k for every row; before each replay
        # of the step graph, row k is copied into _step (what the graph reads): one graph for every k.
        self._steps = torch.zeros((n, 3, B), dtype=torch.float32, device=dev)
        self._step = torch.zeros((3, B), dtype=torch.float32, device=dev)
        # Temporal feature reuse: the deep UNet features of each row, written by a full step that keeps them and read
        # by a partial step; each stream's own copy lives in its StreamState between calls.
        self._deep = self.reuse.empty_deep(B, h, w, dev).zero_() if self.reuse is not None else None
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # The engine's own capture stream, on its own GPU: torch.cuda.graph without stream= uses one stream for the
        # whole process, made on whichever GPU was current where it was first used (a second GPU's engine would
        # capture on the first's).
        self._capture_stream = torch.cuda.Stream(device=dev) if self.use_graphs else None

    # ------------------------------------------------------------------ caches (text encoder, noise)

    @_on_own_stream(hand_back=True)
    @torch.inference_mode()
    def prompt_embeddings(self, prompt: str | tuple) -> torch.Tensor:
        """(tokens, dim) embeddings of a prompt on the device; the text encoder runs only on a cache miss.

        A weighted blend ((text, weight), ...) is the weight-normalized sum of its texts' embeddings; each text is
        cached on its own (prompt cache), the blend in a small cache of its own.
        """
        if not isinstance(prompt, str):
            emb = self._blends.lookup(prompt)
            if emb is None:
                emb = blend_embeddings(prompt, self.prompt_embeddings, self.dtype)
                self._blends.insert(prompt, emb)
            return emb
        emb = self._prompts.lookup(prompt)
        if emb is None:
            emb = encode_prompt(self.components, prompt, self.device, self.dtype)
            self.stats.text_encoder_runs += 1
            self._prompts.insert(prompt, emb)
            self.stats.prompt_cache_evictions = self._prompts.evictions
        return emb

    @_on_own_stream(hand_back=True)
    @torch.inference_mode()
    def conditioning(self, prompt: str | tuple) -> torch.Tensor:
        """What a prompt's rows of the UNet's encoder_hidden_states hold: its (tokens, dim) embeddings, or with
        prompt_kv its (tokens, width) cross-attention keys and values, computed on a miss of their own cache."""
        if self.prompt_kv is None:
            return self.prompt_embeddings(prompt)
        cache = self._kv if isinstance(prompt, str) else self._kv_blends
        kv = cache.lookup(prompt)
        if kv is None:
            kv = self.prompt_kv.project(self.prompt_embeddings(prompt))
            self.stats.kv_projections += 1
            cache.insert(prompt, kv)
        return kv

    @_on_own_stream(hand_back=True)
    def noise(self, seed: int) -> torch.Tensor:
        """(C, h, w) float32 unit Gaussian noise of a seed; drawn on the CPU so a seed means the same on any device."""
        noise = self._noise.lookup(seed)
        if noise is None:
            noise = seed_noise(seed, self.latent_shape, self.device)
            self._noise.insert(seed, noise)
        return noise

    @property
    def prompt_cache_len(self) -> int:
        return len(self._prompts)

    @property
    def prompt_kv_cache_len(self) -> int:
        """Prompts (blends apart) whose cross-attention keys and values are kept (prompt_kv; 0 without)."""
        return len(self._kv)

    @property
    def stream_states(self) -> int:
        """Streams whose controls state (transition, feedback latent) the engine holds."""
        return len(self._streams)

    def release_stream(self, key: Hashable) -> None:
        """Free a stream's state (its device tensors) when the stream ends; call on the engine's thread."""
        self._streams.release(key)

    @_on_own_stream()
    def set_lora_scales(self, scales: Sequence[float]) -> tuple:
        """Change the LoRAs' scales (one per LoRA, in --lora order) for every stream from the next call; returns
        self.loras. Needs lora_live; ValueError for a wrong count or range; call on the engine's thread, between calls.

        The weights change in place (graphs and compiled code read them where they are), on the engine's CUDA stream,
        so a call in flight finishes with the old ones. Then what was made of them is made again: the fused and
        stacked projections at once, prompt embeddings (a text-encoder LoRA) and cross-attention keys and values
        (prompt_kv) when next used, and feature reuse's deep features by a full frame per stream.
        """
        live = self.components.lora_live
        if live is None:
            raise ValueError("the LoRAs' scales are fixed on this engine: start it with lora_live (--lora-live) to "
                             "change them while it runs")
        self._check_thread()
        t0 = time.perf_counter()
        parts = live.set_scales(scales)
        if "unet" in parts:
            refresh_derived_weights(self.unet)
        if "text_encoder" in parts:
            self._prompts.clear()
            self._blends.clear()
        if parts:
            self._kv.clear()  # keys and values of the old embeddings, or of the old to_k and to_v
            self._kv_blends.clear()
            self._row_emb = [None] * len(self._row_emb)  # rows hold tensors of the caches just emptied
            self._streams.forget_deep()
        self.components.loras = tuple({**summary, "scale": scale}
                                      for summary, scale in zip(self.components.loras, live.scales))
        log.debug("LoRA scales %s (%s; %.1f ms on the host)", list(live.scales),
                  ", ".join(sorted(parts)) or "no change", (time.perf_counter() - t0) * 1e3)
        return self.loras

    # ------------------------------------------------------------------ the frame path (traced into the graphs)

    def _head(self, b: int, encode: bool = True, probe: Probe | None = None,
              noise_sigma: float | None = None) -> torch.Tensor:
        """Static buffers [:b] -> float32 noisy latents (b, C, h, w): FrameMath.head on the buffers, capturable.
        noise_sigma: the noise's scale instead of the schedule's first sigma (text-to-image: Schedule.init_sigma)."""
        sigma0 = self._steps[0, 1, :b]
        if noise_sigma is not None:
            sigma0 = torch.full_like(sigma0, noise_sigma)
        return self.math.head(self._frames[:b] if encode else None, self._noise_buf[:b], sigma0, probe,
                              prev=self._prev[:b], feedback=self._feedback[:b])

    def _step_path(self, latents: torch.Tensor, row: torch.Tensor, probe: Probe | None = None,
                   k: int = 0, mode: str = "plain") -> torch.Tensor:
        """Latents (b, C, h, w) -> latents after one UNet evaluation at schedule row (3, B) ([:b] of it is read);
        mode: FrameMath.step's (plain, keep or reuse the deep features in the static rows)."""
        b = latents.shape[0]
        deep = self._deep[:b] if self._deep is not None else None
        return self.math.step(latents, row[0, :b], row[1, :b], row[2, :b], self._emb[:b], probe, k,
                              deep=deep, mode=mode)

    def _tail(self, latents: torch.Tensor, probe: Probe | None = None) -> torch.Tensor:
        """Clean latents (b, C, h, w) -> uint8 (b, H, W, 3); their copy goes to the static latents out (feedback)."""
        return self.math.tail(latents, probe, latents_out=self._latents_out[: latents.shape[0]])

    def _frame_path(self, b: int, n: int, encode: bool = True, probe: Probe | None = None,
                    mode: str = "plain", deep: DeepMoves | None = None,
                    noise_sigma: float | None = None) -> torch.Tensor:
        """Static buffers [:b] -> uint8 (b, H, W, 3) with n UNet evaluations, eagerly: the three segments in a row.
        deep: what moves the streams' deep features in and out of the static rows around each step (reuse);
        noise_sigma: as in _head."""
        self._check_modules()
        latents = self._head(b, encode, probe, noise_sigma)
        for k in range(n):
            if deep is not None:
                deep.before(k)
            latents = self._step_path(latents, self._steps[k], probe, k, mode)
            if deep is not None:
                deep.after(k)
        return self._tail(latents, probe)

    def _check_modules(self) -> None:
        """RuntimeError if another engine built on these components since this one set other options on them."""
        if getattr(self.unet, "_turbostream_options", None) != self._options:
            raise RuntimeError(
                "these components were set up for another engine's options after this engine was built (engines "
                "share modules: the one built last sets them); build this engine again, or give each engine "
                "components of its own")

    # ------------------------------------------------------------------ warmup and capture

    def _check_thread(self) -> None:
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise RuntimeError(
                "Engine used from a second thread: CUDA graphs replay only on the thread that captured them; "
                "run every engine call from the one inference thread"
            )

    @_on_own_stream()
    @torch.inference_mode()
    def warmup(self) -> EngineStats:
        """Compile (if asked) and capture one graph per bucket for the default parameters; timed and logged.

        Call on the thread that will call run(). On the CPU it runs one frame eagerly, so first-call costs land here.
        """
        self._check_thread()
        t0 = time.perf_counter()
        default = self.config.default_params
        slot = self._slots[0]
        self._load_stream_inputs([default], 0, slot)
        if self.config.compile and (self.is_cuda or self.config.compile_aot):
            if not self.is_cuda:  # AOTInductor's packages run on the CPU path too (tests), torch.compile's do not
                log.warning("--compile-aot on the CPU: its packages measured slower than eager frames on a CPU "
                            "(README, scripts/aot_speed.py); it is meant for CUDA")
            self._compile()
        elif self.config.compile:
            log.warning("--compile speeds up the CUDA graph path only; ignored on %s", self.device)
        self._stage_schedule([default], slot)
        if self.use_graphs:
            self._compile_fused_kernels()
            for b in self.config.buckets:
                self._capture(b)
        else:
            self._frame_path(1, default.unet_evals)
            if self.is_cuda:
                torch.cuda.synchronize()
        self.stats.warmup_s = time.perf_counter() - t0
        log.info(
            "warmup %.1f s (compile %.1f s) on %s, %dx%d, buckets %s",
            self.stats.warmup_s, self.stats.compile_s, self.device, self.width, self.height, self.config.buckets,
        )
        return self.stats

    def _compile(self) -> None:
        """--compile / --compile-aot: compiled networks into self.math (compiling.py); timed into self.stats."""
        compile_networks(self)

    def _default_frames(self, b: int) -> None:
        """Eager frames of the default stream at batch b, one per step mode (plain; keep, then reuse, which reads the
        deep features keep wrote), from the static buffers: what compiling and recording need every module to see."""
        default = self.config.default_params
        self._stage_schedule([default] * self.max_batch, self._slots[0])
        for mode in self._step_modes:
            self._frame_path(b, default.unet_evals, mode=mode)

    def _compile_fused_kernels(self) -> None:
        """With fused_norm or fused_epilogue: one eager frame records their launches, and their distinct variants are
        compiled on kernel_compile_threads threads, so the capture after finds them compiled (kernel_warmup.py)."""
        threads = self.config.kernel_compile_threads or min(os.cpu_count() or 1, 16)
        if not (self.config.fused_norm or self.config.fused_epilogue) or threads == 1 or interpreting():
            return  # nothing to compile, compiling one after another asked for, or Triton's interpreter (tests)
        launches = self._fused_launches()
        self.stats.kernel_variants, self.stats.kernel_compile_s = precompile(launches, self.device, threads)

    def _fused_launches(self) -> list[Launch]:
        """One eager frame of the default stream, its fused-kernel launches recorded instead of run (kernel_warmup)."""
        with recording() as launches:
            self._frame_path(1, self.config.default_params.unet_evals)  # its outputs are garbage: nothing keeps them
        return launches

    @property
    def _step_modes(self) -> tuple[str, ...]:
        """The step modes this engine runs (FrameMath.step): plain, and keep and reuse with temporal feature reuse."""
        return ("plain", "keep", "reuse") if self.reuse is not None else ("plain",)

    def _segment(self, b: int, kind: str) -> None:
        """One segment of the path on bucket b, from static buffers to static buffers (what a graph captures):
        "head", "tail", or the step in one of FrameMath.step's modes."""
        if kind == "head":
            self._latents[:b].copy_(self._head(b))
        elif kind == "tail":
            self._out[:b].copy_(self._tail(self._latents[:b]))
        else:
            self._latents[:b].copy_(self._step_path(self._latents[:b], self._step, mode=kind))

    def _capture(self, b: int) -> dict[str, torch.cuda.CUDAGraph]:
        """Warm up on a side stream (3 runs), then capture bucket b's segments, each into its own graph."""
        self._check_modules()
        t0 = time.perf_counter()
        kinds = ("head", *self._step_modes, "tail")
        self._step.copy_(self._steps[0])  # a real schedule row for the warm-up runs
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                for kind in kinds:
                    self._segment(b, kind)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # All graphs share one memory pool: they never run concurrently and each passes its result on in a static
        # buffer (latents, out), so the temporaries of one graph may reuse another's. "thread_local": a capture
        # forbids unsafe calls (cudaMalloc...) in this thread only; the default forbade them in every thread, so
        # another GPU's engine that allocated while this one captured failed, or broke this capture.
        capture = functools.partial(torch.cuda.graph, pool=self._pool, stream=self._capture_stream,
                                    capture_error_mode="thread_local")
        graphs = {}
        with _CAPTURE_LOCK:
            for kind in kinds:
                graph = torch.cuda.CUDAGraph()
                with capture(graph):
                    self._segment(b, kind)
                graphs[kind] = graph
            if self.config.frame_graph:
                # The same kernels as head + n steps + tail replayed one after another (the schedule row copies
                # included), in one graph: what _replay launches for a call of the default evaluation count, plain,
                # and with reuse in its keep and reuse modes when that count is 1 (more steps move deep features
                # between steps: those calls replay the segments).
                n = self.config.default_params.unet_evals
                for mode in self._step_modes if n == 1 else ("plain",):
                    graph = torch.cuda.CUDAGraph()
                    with capture(graph):
                        self._segment(b, "head")
                        for k in range(n):
                            self._step.copy_(self._steps[k])
                            self._segment(b, mode)
                        self._segment(b, "tail")
                    graphs[_frame_graph_key(n, mode)] = graph
        torch.cuda.synchronize(self.device)
        self._graphs[b] = graphs
        self.stats.graphs_captured += len(graphs)
        self.stats.capture_s[f"b{b}"] = time.perf_counter() - t0
        return self._graphs[b]

    def _replay(self, b: int, n: int, mode: str = "plain", deep: DeepMoves | None = None) -> None:
        """Enqueue bucket b's graphs for n UNet evaluations (mode: which step graph, see FrameMath.step); no sync.
        deep: as in _frame_path (device copies between the replays)."""
        graphs = self._graphs.get(b) or self._capture(b)  # every bucket is captured at warmup; this is a fallback
        # EngineConfig.frame_graph: the whole frame in one launch. With reuse (one evaluation: one set of deep
        # features), the streams' features move into the static rows before it and out of them after it: the head
        # and the tail around the step touch neither.
        whole = graphs.get(_frame_graph_key(n, mode)) if deep is None or n == 1 else None
        if whole is not None:
            if deep is not None:
                deep.before(0)
            whole.replay()
            if deep is not None:
                deep.after(0)
            self.stats.graph_replays += 1
            return
        graphs["head"].replay()
        for k in range(n):
            self._step.copy_(self._steps[k])  # device to device, ordered before the replay that reads it
            if deep is not None:
                deep.before(k)
            graphs[mode].replay()
            if deep is not None:
                deep.after(k)
        graphs["tail"].replay()
        self.stats.graph_replays += 1

    # ------------------------------------------------------------------ running frames

    def _stage_schedule(self, params: Sequence[StreamParams], slot: _Slot) -> int:
        """Write each row's schedule (timestep, sigma, next sigma of each evaluation) to the device; one unet_evals."""
        n = params[0].unet_evals
        host = slot.steps
        for i, p in enumerate(params):
            host[:n, :, i] = self.schedules.get(p.steps, n).table
        # Padding rows of a bucket run too: give them a real schedule, not a stale one of another layout.
        host[:, :, len(params) :] = host[:, :, :1]
        self._steps.copy_(host, non_blocking=True)
        return n

    def _load_stream_inputs(
        self, params: Sequence[StreamParams], first: int, slot: _Slot, keys: Sequence[Hashable | None] | None = None,
        now: float = 0.0,
    ) -> None:
        """Copy each stream's prompt conditioning, noise and feedback inputs into the static rows first, first+1, ...

        Without a stream key (or with every control off) a row gets the cached embeddings and noise as they are and
        feedback weight 0. With a key, a transition under way writes interpolated embeddings and slerped noise, and
        feedback > 0 writes the stream's previous output latent and its weight (0 on its first frame).
        """
        host = slot.feedback
        host.zero_()
        for i, p in enumerate(params, start=first):
            emb, noise = self.conditioning(p.prompt), self.noise(p.seed)
            key = keys[i - first] if keys is not None else None
            state = self._streams.get(key) if key is not None else None
            a = state.step(p, now, self.conditioning, self.noise) if state is not None else None
            moving = a is not None
            self._write_row(self._emb, self._row_emb, i, emb,
                            lerp(state.from_emb, emb, a) if moving and state.from_emb is not None else None)
            self._write_row(self._noise_buf, self._row_noise, i, noise,
                            slerp(state.from_noise, noise, a) if moving and state.from_noise is not None else None)
            if state is not None and p.feedback > 0 and state.latent is not None:
                self._prev[i].copy_(state.latent)
                host[i] = p.feedback
        self._feedback.copy_(host, non_blocking=True)

    def _write_row(self, buf: torch.Tensor, held: list[torch.Tensor | None], i: int, cached: torch.Tensor,
                   blend: torch.Tensor | None) -> None:
        """Row i of buf <- a transition's blend, else the cached tensor. A row that holds this very cached tensor
        already (the same stream in the same row as last call, the usual case) is left as it is: nothing else writes
        these rows, and cached tensors are never changed. held[i] is what row i holds (None: a blend)."""
        if blend is not None:
            buf[i].copy_(blend)
            held[i] = None
        elif held[i] is not cached:
            buf[i].copy_(cached)
            held[i] = cached
        else:
            self.stats.rows_reused += 1

    def _keep_latents(self, params: Sequence[StreamParams], keys: Sequence[Hashable | None]) -> None:
        """After a frame: streams with feedback keep its output latents (device copy); the others free theirs."""
        for i, (p, key) in enumerate(zip(params, keys)):
            if key is None or key not in self._streams:
                continue
            state = self._streams.get(key)
            if p.feedback > 0:
                if state.latent is None:
                    state.latent = torch.empty_like(self._latents_out[i])
                state.latent.copy_(self._latents_out[i])
            else:
                state.latent = None

    def _reuse_mode(self, params: Sequence[StreamParams], keys: Sequence[Hashable | None], n: int) -> str:
        """How a batch runs its UNet step: "plain" (no stream reuses), "reuse" (every stream has deep features fresh
        enough: the outer blocks only) or "keep" (in full, and the streams that reuse keep the deep features).

        One mode per batch, so one graph per step: a batch mixing streams due a full frame with streams due a partial
        one runs in full, which also refreshes everyone's deep features (streams batched together fall into step).
        With n UNet evaluations a frame, every step keeps or reuses deep features of its own (_deep_moves).
        """
        if self.reuse is None:
            return "plain"
        wanted = [p.reuse >= 2 and key is not None for p, key in zip(params, keys)]
        if not any(wanted):
            return "plain"
        if all(wanted):
            states = [self._streams.get(key) for key in keys]
            if all(s.deep is not None and s.deep_params == _deep_params(p) and s.deep_age < p.reuse - 1
                   for s, p in zip(states, params)):
                return "reuse"
        return "keep"

    def _deep_moves(self, params: Sequence[StreamParams], keys: Sequence[Hashable | None], mode: str,
                    n: int) -> DeepMoves | None:
        """What moves deep features around each step of a batch: before step k of a partial batch, each stream's
        features of step k into its static row (what the reuse graph reads); after step k of a full batch, the row
        (what the keep graph wrote) into the features of step k of each stream that reuses. Device copies, no sync;
        None for a plain batch. A stream's features are allocated here, n tensors of one row each."""
        if mode == "reuse":
            states = [self._streams.get(key) for key in keys]

            def load(k: int) -> None:
                for i, state in enumerate(states):
                    self._deep[i].copy_(state.deep[k])

            return DeepMoves(before=load)
        if mode == "keep":
            keeping = [(i, self._streams.get(key)) for i, (p, key) in enumerate(zip(params, keys))
                       if p.reuse >= 2 and key is not None and key in self._streams]
            for i, state in keeping:
                if state.deep is None or len(state.deep) != n:
                    state.deep = [torch.empty_like(self._deep[i]) for _ in range(n)]
                state.deep_params = None  # being rewritten: valid again only once the call went through (_keep_deep)

            def store(k: int) -> None:
                for i, state in keeping:
                    state.deep[k].copy_(self._deep[i])

            return DeepMoves(after=store)
        return None

    def _keep_deep(self, params: Sequence[StreamParams], keys: Sequence[Hashable | None], mode: str) -> None:
        """After a batch: streams that reuse date the deep features a full batch stored (_deep_moves) or count one
        more partial frame on theirs; the others free theirs. Features stored in a transition (StreamState.moving: its
        conditioning changes every frame) are valid for no later frame: the next one runs in full as well, so a
        transition is computed in full to its end and the first frame after it is exactly the new look."""
        if self.reuse is None:
            return
        for p, key in zip(params, keys):
            if key is None or key not in self._streams:
                continue
            state = self._streams.get(key)
            if mode == "keep" and p.reuse >= 2:
                state.deep_params, state.deep_age = (None if state.moving else _deep_params(p)), 0
            elif mode == "reuse":
                state.deep_age += 1
            else:
                state.deep, state.deep_params = None, None
        if mode == "keep":
            self.stats.reuse_keep_batches += 1
        elif mode == "reuse":
            self.stats.reuse_partial_batches += 1

    def _bucket(self, b: int) -> int:
        return next(size for size in self.config.buckets if size >= b)

    def validate(self, params: StreamParams) -> StreamParams:
        """params, checked against this engine's limits; ValueError with a user-facing message otherwise."""
        return params.validate(self.config.max_steps, self.config.reuse_enabled)

    @torch.inference_mode()
    def run(
        self, frames: Sequence[np.ndarray], params: Sequence[StreamParams], *, graphs: bool | None = None,
        streams: Sequence[Hashable | None] | None = None,
    ) -> list[np.ndarray]:
        """N frames (uint8 RGB (H, W, 3), any size) with N stream params -> N uint8 RGB (height, width, 3) frames.

        Frames are center-cropped to the engine's aspect and resized first. Streams with the same number of UNet
        evaluations share one batch; larger groups are split at the largest bucket. graphs=False forces eager.
        streams: each frame's stream key (None: no stream), which transitions and feedback need; frames of the
        same stream run in order, and with feedback or feature reuse one per batch, so each sees the latent (and deep
        features) of the one before (_groups, _chunks).
        run() is collect(submit(...)): the call waits for its frames.
        """
        return self.collect(self.submit(frames, params, graphs=graphs, streams=streams))

    @_on_own_stream()
    @torch.inference_mode()
    def submit(
        self, frames: Sequence[np.ndarray], params: Sequence[StreamParams], *, graphs: bool | None = None,
        streams: Sequence[Hashable | None] | None = None,
    ) -> Ticket:
        """Stage and enqueue a call like run()'s without waiting for its last batch; collect(ticket) hands it out.

        At most two calls may be in flight (one per host slot): submitting a third before collecting one raises
        RuntimeError. On the CPU the work happens here and collect() only hands out the frames.
        """
        if len(frames) != len(params) or (streams is not None and len(streams) != len(frames)):
            raise ValueError(f"{len(frames)} frames but {len(params)} parameter sets"
                             + (f" and {len(streams)} stream keys" if streams is not None else ""))
        params = [self.validate(p) for p in params]
        fitted = [fit_frame(f, self.width, self.height) for f in frames]
        self._check_thread()
        index = self._next_slot
        slot = self._slots[index]
        if slot.busy:
            raise RuntimeError("two engine calls are in flight already: collect one before submitting another")
        self._next_slot ^= 1
        use_graphs = self.use_graphs if graphs is None else (graphs and self.use_graphs)
        results: list[np.ndarray | None] = [None] * len(frames)
        keys = list(streams) if streams is not None else [None] * len(frames)
        now = self.clock()
        chunks = [chunk for members in self._groups(params, keys) for chunk in self._chunks(members, keys, params)]
        ticket = Ticket(results, slot, [])
        slot.busy = True
        started = torch.cuda.Event(enable_timing=True) if self.is_cuda and chunks else None
        t_start = time.perf_counter()
        try:
            for j, chunk in enumerate(chunks):
                if j:  # the slot's buffers hold the previous batch: hand it out before staging the next
                    self._hand_out(ticket)
                self._enqueue([fitted[i] for i in chunk], [params[i] for i in chunk], use_graphs,
                              [keys[i] for i in chunk], now, slot, started if j == 0 else None)
                ticket.rows = chunk
        except BaseException:
            self._wait(slot)
            slot.busy = False
            # The next call takes this slot again: the other may hold the call still in flight (the batcher's
            # frame-by-frame retry of this batch comes while it runs).
            self._next_slot = index
            raise
        if chunks:
            if started is not None:
                ended = torch.cuda.Event(enable_timing=True)
                ended.record()  # after the last copy out, like slot.done
            else:
                ended = time.perf_counter()
                started = t_start
            ticket._marks = (started, ended, self._last_ended)
            self._last_ended = ended
        if frames:
            self.stats.calls += 1
            self.stats.frames += len(frames)
        return ticket

    @_on_own_stream()
    @torch.inference_mode()
    def collect(self, ticket: Ticket) -> list[np.ndarray]:
        """Wait for a submitted call and return its frames (uint8 RGB (height, width, 3), in submission order)."""
        if ticket.collected:
            raise RuntimeError("this engine call was collected already")
        self._check_thread()
        try:
            self._hand_out(ticket)
        finally:
            ticket.slot.busy = False
            ticket.collected = True
        if ticket._marks:
            ticket.device_s, ticket.gap_s = _timeline(*ticket._marks)
            ticket._marks = ()  # the previous call's event is not kept alive by this one
            self.stats.device_s += ticket.device_s
        return ticket.results  # type: ignore[return-value]

    @property
    def pipelined(self) -> bool:
        """Whether submit() returns before the work is done (CUDA), so a caller gains by overlapping its host work."""
        return self.is_cuda

    def done(self, ticket: Ticket) -> bool:
        """Whether collect(ticket) would return at once (the device finished the call); never waits."""
        return ticket.collected or ticket.slot.done is None or ticket.slot.done.query()

    @property
    def in_flight(self) -> int:
        """Calls submitted and not yet collected (0, 1 or 2)."""
        return sum(slot.busy for slot in self._slots)

    def _wait(self, slot: _Slot) -> None:
        if slot.done is not None:
            slot.done.synchronize()

    def _hand_out(self, ticket: Ticket) -> None:
        """Wait for the ticket's batch in flight and copy its frames out of the slot into fresh arrays."""
        slot, rows = ticket.slot, ticket.rows
        self._wait(slot)
        for r, i in enumerate(rows):
            ticket.results[i] = slot.out[r].numpy().copy()
        ticket.rows = []

    @staticmethod
    def _groups(params: list[StreamParams], keys: list[Hashable | None]) -> list[list[int]]:
        """The call's frames in groups that can share a batch: those with the same number of UNet evaluations.

        A stream's frames run in its order (each moves its transition, and with feedback or feature reuse reads the
        one before), so when one stream's frames need different numbers of evaluations, grouping by that number would
        run its later frames first: the call is then cut into runs of the same number, in frame order.
        """
        groups: dict[int, list[int]] = {}
        group_of: dict[Hashable, int] = {}
        in_order = False
        for i, (p, key) in enumerate(zip(params, keys)):
            groups.setdefault(p.unet_evals, []).append(i)
            if key is not None and group_of.setdefault(key, p.unet_evals) != p.unet_evals:
                in_order = True
        if not in_order:
            return list(groups.values())
        runs: list[list[int]] = []
        for i, p in enumerate(params):
            if runs and params[runs[-1][-1]].unet_evals == p.unet_evals:
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs

    def _chunks(self, members: list[int], keys: list[Hashable | None],
                params: list[StreamParams]) -> list[list[int]]:
        """Split one group's frames into batches of at most max_batch, in order.

        A stream's frames share a batch only when none of them reads what the one before it left: with feedback or
        feature reuse each frame needs its predecessor's output latents or deep features, so a repeat of such a
        stream starts a new batch (run one after another). Without them (`turbostream run`'s frames of one stream at
        the defaults) a repeat runs in the same batch: its transition state is a function of the call's clock, the
        same for every row, and parameters that differ from the earlier frame's start a new batch too.
        """
        chunks: list[list[int]] = [[]]
        seen: dict[Hashable, StreamParams] = {}
        for i in members:
            key, p = keys[i], params[i]
            earlier = seen.get(key) if key is not None else None
            ordered = earlier is not None and (earlier != p or _reads_previous(p))
            if len(chunks[-1]) >= self.max_batch or ordered:
                chunks.append([])
                seen = {}
            chunks[-1].append(i)
            if key is not None:
                seen[key] = p
        return chunks

    def _enqueue(self, frames: list[np.ndarray], params: list[StreamParams], use_graphs: bool,
                 keys: list[Hashable | None], now: float, slot: _Slot, started: torch.cuda.Event | None = None,
                 ) -> None:
        """Stage one batch into the slot and the static buffers, run it, start its copy out; no host sync on CUDA."""
        b = len(frames)
        # Host side first: pinned staging, cached embeddings and noise, the schedule (their copies are small and
        # queued, no sync), the reuse mode. The frames' upload and the graphs go last, right after `started`: an idle
        # device starts on the call when the host has staged it, so its time (device_s, the load test's busy %) is the
        # device's own work, not the host's staging spent waiting for the launches.
        for i, frame in enumerate(frames):
            slot.frames[i].copy_(torch.from_numpy(frame))
        self._load_stream_inputs(params, 0, slot, keys, now)
        n = self._stage_schedule(params, slot)
        mode = self._reuse_mode(params, keys, n)
        deep = self._deep_moves(params, keys, mode, n)
        if started is not None:
            started.record()
        self._frames[:b].copy_(slot.frames[:b], non_blocking=True)
        if use_graphs:
            # Rows b..bucket-1 hold stale but finite inputs; their outputs are ignored.
            self._replay(self._bucket(b), n, mode, deep)
        else:
            self._out[:b].copy_(self._frame_path(b, n, mode=mode, deep=deep))
        self._keep_latents(params, keys)  # device copies, ordered before the next call's replay
        self._keep_deep(params, keys, mode)
        # The copy out is ordered after this batch and before the next one's tail overwrites self._out; the slot's
        # event says when it (and so every staged input before it) is done.
        slot.out[:b].copy_(self._out[:b], non_blocking=True)
        if slot.done is not None:
            slot.done.record()

    @_on_own_stream()
    @torch.inference_mode()
    def trace(self, frame: np.ndarray, params: StreamParams) -> dict[str, torch.Tensor]:
        """One frame, eagerly, keeping every stage of its path (see _frame_path's probe): float32 CPU copies.

        For parity diagnosis: compare stage by stage with another engine (another dtype, device or settings) and
        find the first one that parts. "output" is the uint8 (H, W, 3) frame run() would return.
        """
        params = self.validate(params)
        slot = self._idle_slot()
        stages: dict[str, torch.Tensor] = {}
        self._frames[:1].copy_(torch.from_numpy(fit_frame(frame, self.width, self.height)))
        self._load_stream_inputs([params], 0, slot)
        n = self._stage_schedule([params], slot)
        out = self._frame_path(1, n, probe=lambda stage, t: stages.__setitem__(stage, t.float().cpu()))
        stages["output"] = out[0].cpu()
        return stages

    @_on_own_stream()
    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        *,
        steps: int = 1,
        seed: int = 0,
        image: np.ndarray | None = None,
        strength: float = 0.5,
    ) -> np.ndarray:
        """One picture, eagerly: text-to-image (image=None, all `steps` evaluated from pure noise) or image-to-image.

        Returns uint8 RGB (height, width, 3). The model card's single-image jobs; not a hot path.
        """
        if image is not None:
            return self.run([image], [StreamParams(prompt, strength, steps, seed)], graphs=False)[0]
        params = StreamParams(prompt, 1.0, steps, seed)
        self.validate(params)
        slot = self._idle_slot()
        self._load_stream_inputs([params], 0, slot)
        self._stage_schedule([params], slot)
        # Pure noise at the scheduler's init_noise_sigma, as diffusers' text-to-image starts (the first sigma itself
        # for SD-Turbo's trailing spacing).
        start = self.schedules.get(steps, steps).init_sigma
        return np.ascontiguousarray(self._frame_path(1, steps, encode=False, noise_sigma=start)[0].cpu().numpy())

    def _idle_slot(self) -> _Slot:
        """A slot for a one-off eager call (trace, generate), which must not overlap pipelined calls."""
        self._check_thread()
        if self.in_flight:
            raise RuntimeError("collect the engine calls in flight first")
        return self._slots[0]


def _frame_graph_key(n: int, mode: str = "plain") -> str:
    """The key of a bucket's whole-frame graph of n UNet evaluations in a step mode (EngineConfig.frame_graph) among
    its graphs."""
    return f"frame{n}" if mode == "plain" else f"frame{n}-{mode}"


def _timeline(started, ended, previous) -> tuple[float, float | None]:
    """(device seconds of a call, idle seconds before it) from its marks: CUDA timing events of a call that was waited
    for (the previous call's end precedes its start on the stream), or perf_counter floats."""
    if isinstance(started, float):
        return ended - started, None if previous is None else max(started - previous, 0.0)
    # collect() waited for the slot's event; `ended` comes right after it on the stream and may not be marked done
    # yet (elapsed_time would raise). The other two precede it.
    ended.synchronize()
    gap = None if previous is None else max(previous.elapsed_time(started), 0.0) / 1e3
    return started.elapsed_time(ended) / 1e3, gap


def _reads_previous(p: StreamParams) -> bool:
    """Whether a stream's frame reads state its previous frame left: output latents (feedback) or deep features."""
    return p.feedback > 0 or p.reuse >= 2


def _deep_params(p: StreamParams) -> tuple:
    """What deep features depend on besides the frame: a change of any of these forces a full frame."""
    return (p.prompt, p.seed, p.steps, p.strength)
