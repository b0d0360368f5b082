"""The Engine: SD-Turbo img2img on batches of frames from many streams, each with its own prompt, strength, steps
and seed; static buffers and one CUDA graph per (batch bucket, UNet evaluations) on CUDA, eager on the CPU.

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

import logging
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..codec import fit_frame
from ..config import EngineConfig, StreamParams
from ..models import Components, default_dtype, load_components, resolve_device
from .caches import LRU, encode_prompt, seed_noise
from .compile_cache import CompileCache, default_folder
from .cuda import prepare_cpu, prepare_cuda
from .frame import FrameMath, Probe
from .schedule import ScheduleTable
from .streams import StreamStates, blend_embeddings, lerp, slerp

log = logging.getLogger("turbostream.engine")

BLEND_CACHE_SIZE = 16  # prompt blends' combined embeddings kept (LRU); recombining one costs a few tensor ops


@dataclass
class EngineStats:
    """Counters for tests, metrics and logs; plain ints, updated only by the engine's own thread."""

    frames: int = 0
    calls: int = 0
    graph_replays: int = 0
    graphs_captured: int = 0
    text_encoder_runs: int = 0
    prompt_cache_evictions: int = 0
    warmup_s: float = 0.0
    compile_s: float = 0.0
    compile_cache_hit: bool = False
    capture_s: dict[str, float] = field(default_factory=dict)  # "b{batch}n{evals}" -> seconds


class Engine:
    """SD-Turbo img2img over batches of frames from many streams. Build, warmup(), then run() from one thread."""

    def __init__(self, config: EngineConfig, components: Components | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = default_dtype(self.device, config.dtype)
        self.is_cuda = self.device.type == "cuda"
        t0 = time.perf_counter()
        if components is None:
            components = load_components(
                config.model, device=self.device, dtype=self.dtype, vae=config.vae, taesd=config.taesd
            )
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
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._streams = StreamStates(config.max_stream_states)
        self.clock = time.monotonic  # transitions are timed by it (tests may replace it)
        # The only place building an engine changes its components or process state (see cuda.py).
        if self.is_cuda:
            prepare_cuda(components)
        else:
            prepare_cpu()
        self.math = FrameMath(self.unet, self.vae, components.vae_kind, self.dtype)
        self._alloc_buffers()

    # ------------------------------------------------------------------ set-up

    @property
    def model_name(self) -> str:
        return self.components.name

    @property
    def random_weights(self) -> bool:
        return self.components.random_weights

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
        self._frames_host = torch.empty((B, self.height, self.width, 3), dtype=torch.uint8, pin_memory=pin)
        self._out_host = torch.empty((B, self.height, self.width, 3), dtype=torch.uint8, pin_memory=pin)
        self._sched_host = torch.zeros((2 * n + 1, B), dtype=torch.float32, pin_memory=pin)
        self._frames = torch.zeros((B, self.height, self.width, 3), dtype=torch.uint8, device=dev)
        self._out = torch.zeros((B, self.height, self.width, 3), dtype=torch.uint8, device=dev)
        self._emb = torch.zeros((B, self.components.max_tokens, self.components.text_dim), dtype=self.dtype, device=dev)
        self._noise_buf = torch.zeros((B, C, h, w), dtype=torch.float32, device=dev)
        # Feedback: per-row weight (0: off, exact identity) and previous output latents in; final latents out.
        self._feedback_host = torch.zeros((B,), dtype=torch.float32, pin_memory=pin)
        self._feedback = torch.zeros((B,), dtype=torch.float32, device=dev)
        self._prev = torch.zeros((B, C, h, w), dtype=torch.float32, device=dev)
        self._latents_out = torch.zeros((B, C, h, w), dtype=torch.float32, device=dev)
        # Rows 0..n-1: timesteps of each UNet evaluation; rows n..2n: sigmas (one more, the last is the target).
        self._sched = torch.zeros((2 * n + 1, B), dtype=torch.float32, device=dev)
        self._done = torch.cuda.Event() if self.is_cuda else None
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # ------------------------------------------------------------------ caches (text encoder, noise)

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
    def stream_states(self) -> int:
        """Streams whose controls state (transition, feedback latent) the engine holds."""
        return len(self._streams)

    def release_stream(self, key: Hashable) -> None:
        """Free a stream's state (its device tensors) when the stream ends; call on the engine's thread."""
        self._streams.release(key)

    # ------------------------------------------------------------------ the frame path (traced into the graphs)

    def _frame_path(self, b: int, n: int, encode: bool = True, probe: Probe | None = None) -> torch.Tensor:
        """Static buffers [:b] -> uint8 (b, H, W, 3) with n UNet evaluations (FrameMath on the buffers): capturable."""
        return self.math(
            self._frames[:b] if encode else None, self._emb[:b], self._noise_buf[:b],
            self._sched[:n, :b], self._sched[n : 2 * n + 1, :b], probe,
            prev=self._prev[:b], feedback=self._feedback[:b], latents_out=self._latents_out[:b],
        )

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

    @torch.inference_mode()
    def warmup(self) -> EngineStats:
        """Compile (if asked) and capture one graph per bucket for the default parameters; timed and logged.

        Call on the thread that will call run(). On the CPU it runs one frame eagerly, so first-call costs land here.
        """
        self._check_thread()
        t0 = time.perf_counter()
        default = self.config.default_params
        self._load_stream_inputs([default], 0)
        if self.is_cuda and self.config.compile:
            self._compile()
        elif self.config.compile:
            log.warning("--compile speeds up the CUDA graph path only; ignored on %s", self.device)
        if self.use_graphs:
            for b in self.config.buckets:
                self._capture(b, default.unet_evals)
        else:
            self._stage_schedule([default])
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
        """torch.compile the UNet and the VAE's encoder/decoder; compilation itself happens at the first warm run."""
        t0 = time.perf_counter()
        cache = None
        if self.config.compile_cache is not None:
            cache = CompileCache(self.config.compile_cache or default_folder(), {
                "gpu": torch.cuda.get_device_name(self.device), "model": self.config.model, "vae": self.config.vae,
                "dtype": str(self.dtype), "size": [self.width, self.height], "buckets": list(self.config.buckets),
                "unet_evals": self.config.default_params.unet_evals,
            })
            self.stats.compile_cache_hit = cache.load()
        self.math.unet_call = torch.compile(self.unet, fullgraph=False, dynamic=False)
        if self.components.vae_kind == "tiny":
            self.math.encoder_call = torch.compile(self.vae.encoder, dynamic=False)
            self.math.decoder_call = torch.compile(self.vae.decoder, dynamic=False)
        # Compile every bucket now (eager runs on the compiled modules), so the timing below is the compile cost.
        n = self.config.default_params.unet_evals
        self._stage_schedule([self.config.default_params] * self.max_batch)
        for b in self.config.buckets:
            self._frame_path(b, n)
        torch.cuda.synchronize()
        self.stats.compile_s = time.perf_counter() - t0
        log.info("torch.compile: %.1f s for buckets %s (compile cache %s)", self.stats.compile_s, self.config.buckets,
                 "hit" if self.stats.compile_cache_hit else "off" if cache is None else "miss")
        if cache is not None and not self.stats.compile_cache_hit:
            cache.save()

    def _capture(self, b: int, n: int) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (3 runs), then capture bucket b with n UNet evaluations into a graph."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._out[:b].copy_(self._frame_path(b, n))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # All graphs share one memory pool: they never run concurrently and every output is copied into
        # self._out, so the temporaries of one graph may reuse another's.
        with torch.cuda.graph(graph, pool=self._pool):
            self._out[:b].copy_(self._frame_path(b, n))
        torch.cuda.synchronize()
        self._graphs[(b, n)] = graph
        self.stats.graphs_captured += 1
        self.stats.capture_s[f"b{b}n{n}"] = time.perf_counter() - t0
        if self.stats.warmup_s:  # after warmup: a stream asked for a new number of UNet evaluations
            log.info("captured graph for batch %d, %d UNet evaluations in %.2f s", b, n, time.perf_counter() - t0)
        return graph

    # ------------------------------------------------------------------ running frames

    def _stage_schedule(self, params: Sequence[StreamParams]) -> int:
        """Write per-sample timesteps and sigmas into the static schedule buffer; all params share unet_evals."""
        n = params[0].unet_evals
        host = self._sched_host
        for i, p in enumerate(params):
            host[: 2 * n + 1, i] = self.schedules.get(p.steps, n).column
        # Padding rows of a bucket run too: give them a real schedule, not a stale one of another layout.
        host[:, len(params) :] = host[:, :1]
        self._sched.copy_(host, non_blocking=True)
        return n

    def _load_stream_inputs(
        self, params: Sequence[StreamParams], first: int, keys: Sequence[Hashable | None] | None = None,
        now: float = 0.0,
    ) -> None:
        """Copy each stream's prompt embeddings, noise and feedback inputs into the static rows first, first+1, ...

        Without a stream key (or with every control off) a row gets the cached embeddings and noise as they are and
        feedback weight 0. With a key, a transition under way writes interpolated embeddings and slerped noise, and
        feedback > 0 writes the stream's previous output latent and its weight (0 on its first frame).
        """
        host = self._feedback_host
        host.zero_()
        for i, p in enumerate(params, start=first):
            emb, noise = self.prompt_embeddings(p.prompt), self.noise(p.seed)
            key = keys[i - first] if keys is not None else None
            state = self._streams.get(key) if key is not None else None
            a = state.step(p, now, self.prompt_embeddings, self.noise) if state is not None else None
            if a is not None and state.from_emb is not None:
                self._emb[i].copy_(lerp(state.from_emb, emb, a))
            else:
                self._emb[i].copy_(emb)
            if a is not None and state.from_noise is not None:
                self._noise_buf[i].copy_(slerp(state.from_noise, noise, a))
            else:
                self._noise_buf[i].copy_(noise)
            if state is not None and p.feedback > 0 and state.latent is not None:
                self._prev[i].copy_(state.latent)
                host[i] = p.feedback
        self._feedback.copy_(host, non_blocking=True)

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

    def _bucket(self, b: int) -> int:
        return next(size for size in self.config.buckets if size >= b)

    def validate(self, params: StreamParams) -> StreamParams:
        """params, checked against this engine's limits; ValueError with a user-facing message otherwise."""
        return params.validate(self.config.max_steps)

    @torch.inference_mode()
    def run(
        self, frames: Sequence[np.ndarray], params: Sequence[StreamParams], *, graphs: bool | None = None,
        streams: Sequence[Hashable | None] | None = None,
    ) -> list[np.ndarray]:
        """N frames (uint8 RGB (H, W, 3), any size) with N stream params -> N uint8 RGB (height, width, 3) frames.

        Frames are center-cropped to the engine's aspect and resized first. Streams with the same number of UNet
        evaluations share one batch; larger groups are split at the largest bucket. graphs=False forces eager.
        streams: each frame's stream key (None: no stream), which transitions and feedback need; frames of the
        same stream run in order, one per batch, so each sees the latent of the one before.
        """
        if len(frames) != len(params) or (streams is not None and len(streams) != len(frames)):
            raise ValueError(f"{len(frames)} frames but {len(params)} parameter sets"
                             + (f" and {len(streams)} stream keys" if streams is not None else ""))
        if not frames:
            return []
        params = [self.validate(p) for p in params]
        fitted = [fit_frame(f, self.width, self.height) for f in frames]
        self._check_thread()
        use_graphs = self.use_graphs if graphs is None else (graphs and self.use_graphs)
        results: list[np.ndarray | None] = [None] * len(frames)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.unet_evals, []).append(i)
        keys = list(streams) if streams is not None else [None] * len(frames)
        now = self.clock()
        for members in groups.values():
            for chunk in self._chunks(members, keys):
                outs = self._run_chunk([fitted[i] for i in chunk], [params[i] for i in chunk], use_graphs,
                                       [keys[i] for i in chunk], now)
                for i, out in zip(chunk, outs):
                    results[i] = out
        self.stats.calls += 1
        self.stats.frames += len(frames)
        return results  # type: ignore[return-value]

    def _chunks(self, members: list[int], keys: list[Hashable | None]) -> list[list[int]]:
        """Split one group's frames into batches of at most max_batch, in order, with a stream at most once each."""
        chunks: list[list[int]] = [[]]
        seen: set = set()
        for i in members:
            if len(chunks[-1]) >= self.max_batch or (keys[i] is not None and keys[i] in seen):
                chunks.append([])
                seen = set()
            chunks[-1].append(i)
            if keys[i] is not None:
                seen.add(keys[i])
        return chunks

    def _run_chunk(self, frames: list[np.ndarray], params: list[StreamParams], use_graphs: bool,
                   keys: list[Hashable | None] | None = None, now: float = 0.0) -> list[np.ndarray]:
        b = len(frames)
        keys = keys if keys is not None else [None] * b
        # Host side first: pinned staging, cached embeddings and noise (device-to-device copies, no sync).
        for i, frame in enumerate(frames):
            self._frames_host[i].copy_(torch.from_numpy(frame))
        self._frames[:b].copy_(self._frames_host[:b], non_blocking=True)
        self._load_stream_inputs(params, 0, keys, now)
        n = self._stage_schedule(params)
        if use_graphs:
            bucket = self._bucket(b)  # rows b..bucket-1 hold stale but finite inputs; their outputs are ignored
            graph = self._graphs.get((bucket, n)) or self._capture(bucket, n)
            graph.replay()
            self.stats.graph_replays += 1
        else:
            self._out[:b].copy_(self._frame_path(b, n))
        self._keep_latents(params, keys)  # device copies, ordered before the next call's replay
        # Copy out before the next replay overwrites self._out; the one sync of the call waits for it.
        self._out_host[:b].copy_(self._out[:b], non_blocking=True)
        if self.is_cuda:
            self._done.record()
            self._done.synchronize()
        return [self._out_host[i].numpy().copy() for i in range(b)]

    @torch.inference_mode()
    def trace(self, frame: np.ndarray, params: StreamParams) -> dict[str, torch.Tensor]:
        """One frame, eagerly, keeping every stage of its path (see _frame_path's probe): float32 CPU copies.

        For parity diagnosis: compare stage by stage with another engine (another dtype, device or settings) and
        find the first one that parts. "output" is the uint8 (H, W, 3) frame run() would return.
        """
        params = self.validate(params)
        self._check_thread()
        stages: dict[str, torch.Tensor] = {}
        self._frames_host[0].copy_(torch.from_numpy(fit_frame(frame, self.width, self.height)))
        self._frames[:1].copy_(self._frames_host[:1])
        self._load_stream_inputs([params], 0)
        n = self._stage_schedule([params])
        out = self._frame_path(1, n, probe=lambda stage, t: stages.__setitem__(stage, t.float().cpu()))
        stages["output"] = out[0].cpu()
        return stages

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
        self._check_thread()
        self._load_stream_inputs([params], 0)
        self._stage_schedule([params])
        self._out[:1].copy_(self._frame_path(1, steps, encode=False))
        self._out_host[:1].copy_(self._out[:1])
        return self._out_host[0].numpy().copy()
