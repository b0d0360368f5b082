"""Options every subcommand shares: the engine's (model, device, size, ...) and a stream's (prompt, strength, ...)."""

from __future__ import annotations

import argparse
import logging

from ..config import (
    AOT_FORMATS,
    ATTENTION_BACKENDS,
    COMPILE_MODES,
    DEFAULT_MODEL,
    DEFAULT_TAESD,
    DTYPE_NAMES,
    MAX_FEEDBACK,
    MAX_LORAS,
    MAX_REUSE,
    VAE_KINDS,
    EngineConfig,
    LoraSpec,
    StreamParams,
    parse_prompt,
    check_compile_mode,
    parse_size,
)
from ..errors import UserError

log = logging.getLogger("turbostream")


def size(text: str) -> tuple[int, int]:
    """argparse type: '512' or '768x512' -> (width, height)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def buckets(text: str) -> tuple[int, ...]:
    """argparse type: '1,2,4,8' -> (1, 2, 4, 8), each a batch size between 1 and 64."""
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"buckets must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 64:
        raise argparse.ArgumentTypeError(f"buckets must be batch sizes between 1 and 64, got {text!r}")
    return sizes


def lora_spec(text: str) -> LoraSpec:
    try:
        return LoraSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("lora ")) from None


def compile_mode(text: str) -> str:
    """argparse type: a torch.compile mode --compile may use (the cudagraph modes are refused, with the reason)."""
    try:
        return check_compile_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """-v works after the subcommand too (`turbostream serve -v`); SUPPRESS keeps one given before it."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")


def add_engine_options(parser: argparse.ArgumentParser, *, stream_options: bool = True, lora: bool = True,
                       lora_live: bool = False) -> None:
    """Options that build the engine (and, with stream_options, a stream's default parameters; --lora unless told
    not: bench times the model's cost, which a merged LoRA does not change; --lora-live for serve and run, which
    can change their scales while running)."""
    d, p = EngineConfig.__dataclass_fields__, StreamParams()
    add_common_options(parser)
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, local diffusers folder, 'random' (full SD-Turbo size, random weights: benchmarks) "
                        "or 'tiny-random' (small, CPU tests) (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu; serve also takes a list, one engine "
                   "each (cuda:0,cuda:1 or cpu,cpu), or all: every GPU (default: %(default)s)")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                   help="auto: float16 on CUDA, float32 on the CPU (default: %(default)s)")
    g.add_argument("--size", type=size, default=(512, 512), metavar="N|WxH",
                   help="engine size; multiples of 64 up to 1024 (default: 512)")
    g.add_argument("--vae", choices=VAE_KINDS, default=d["vae"].default,
                   help="tiny: TAESD (fast); full: the model's own AutoencoderKL (default: %(default)s)")
    g.add_argument("--taesd", default=DEFAULT_TAESD, help="hub id or folder of the tiny VAE (default: %(default)s)")
    if lora:
        g.add_argument("--lora", action="append", type=lora_spec, default=[], metavar="FILE[:SCALE]",
                       help="merge a LoRA into the model's weights at load (changes the output, costs no time a "
                            "frame): a .safetensors file, a folder holding one, or a hub id (user/repo, or "
                            f"user/repo/file.safetensors); SCALE defaults to 1. Repeat for up to {MAX_LORAS}")
    if lora and lora_live:
        g.add_argument("--lora-live", action="store_true",
                       help="let the LoRAs' scales change while it runs, for every stream: over OSC (--osc-port: "
                            "/turbostream/lora), from /view with the control token (serve --control-token) or on run's "
                            "prompt line (/lora); keeps each adapted layer's weights from before the LoRAs beside the "
                            "model (the log says how many MiB)")
    g.add_argument("--buckets", type=buckets, default=d["buckets"].default, metavar="1,2,4,8",
                   help="batch sizes captured as CUDA graphs (default: 1,2,4,8)")
    g.add_argument("--compile", action="store_true", help="torch.compile before graph capture (minutes of warmup; "
                   "kept in the compile cache, so the next start with the same settings is faster)")
    g.add_argument("--compile-cache", metavar="DIR", default="",
                   help="folder of the compile cache (default: $TURBOSTREAM_CACHE/compile, else "
                        "$XDG_CACHE_HOME/turbostream/compile, else ~/.cache/turbostream/compile)")
    g.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const=None,
                   help="compile from scratch every start, and keep nothing")
    g.add_argument("--compile-mode", type=compile_mode, default=d["compile_mode"].default, metavar="MODE",
                   help=f"torch.compile mode with --compile: {' or '.join(COMPILE_MODES)} (autotuned kernels, a "
                        "longer compile); reduce-overhead and max-autotune are refused: they capture CUDA graphs of "
                        "their own, and the engine captures the frame itself (default: %(default)s)")
    g.add_argument("--compile-dynamic", action="store_true",
                   help="with --compile: batch 1 compiled for itself and every larger bucket in one graph with a "
                        "symbolic batch size (two compiles instead of one per bucket: a shorter start; the larger "
                        "buckets' kernels are not specialized to each batch size)")
    g.add_argument("--compile-aot", action="store_true",
                   help="compile ahead of time instead (implies --compile): the first start builds each network per "
                        "bucket into the compile cache, later starts load them in seconds without tracing; for CUDA "
                        "(the CPU path runs them, but slower than eager); not with --fp8. What is built: "
                        "--aot-format")
    g.add_argument("--aot-format", choices=AOT_FORMATS, default=d["aot_format"].default,
                   help="with --compile-aot: aotinductor: torch.export + AOTInductor packages; a child process first "
                        "checks that they load here, and where they do not, the log says why and a CUDA engine "
                        "builds dynamo's instead. dynamo: torch.compile's own ahead-of-time artifacts (no shared "
                        "library to load) (default: %(default)s)")
    g.add_argument("--attention", choices=ATTENTION_BACKENDS, default=d["attention"].default,
                   help="scaled-dot-product attention backend of the UNet: auto lets PyTorch choose; the others pin "
                        "one (efficient and cudnn need CUDA; flash on CUDA needs fp16/bf16, on the CPU it runs in "
                        "float32). The output changes by rounding only; "
                        "a backend that cannot run here is an error at start-up (default: %(default)s)")
    g.add_argument("--prompt-kv", action="store_true",
                   help="compute each prompt's cross-attention keys and values once, when it is first used, instead "
                        "of in every UNet evaluation (16 GEMMs fewer per evaluation for SD-Turbo; 3.8 MB of GPU memory "
                        "per prompt kept, at most 32 prompts and 16 blends). The output changes by rounding only")
    g.add_argument("--fused-time-proj", action="store_true",
                   help="the UNet resnets' time-embedding projections (for SD-Turbo 22 SiLUs and 22 small GEMMs of the "
                        "same embedding) as one SiLU and one stacked GEMM per UNet evaluation. The output changes by "
                        "rounding only")
    g.add_argument("--fp8", action="store_true",
                   help="CHANGES THE OUTPUT: float8 (e4m3) Linear layers in the UNet's transformer blocks through "
                        "torchao (pip install torchao); CUDA with compute capability 8.9+ (Ada, Hopper) only. One "
                        "activation scale covers a whole batch, so a frame also depends (within fp8 rounding) on "
                        "the frames batched with it")
    g.add_argument("--skip-unit-rescale", action=argparse.BooleanOptionalAction,
                   default=d["skip_unit_rescale"].default,
                   help="leave out the UNet's divisions by 1.0 (diffusers' output scale factors): fewer kernels, "
                        "bit-identical output; --no-skip-unit-rescale runs them (default: on)")
    g.add_argument("--fused-norm", action="store_true",
                   help="the UNet's (and the full VAE's) GroupNorm+SiLU in Triton kernels of turbostream's own (2 "
                        "kernels instead of 4 each; CUDA and Triton only; not with --compile, which fuses them "
                        "itself). The output changes by rounding only")
    g.add_argument("--fused-epilogue", action="store_true",
                   help="TAESD's conv biases, skip adds and ReLUs in one Triton kernel per conv (3 elementwise passes "
                        "per block instead of 7; CUDA and Triton only; not with --compile). The output changes by "
                        "rounding only")
    g.add_argument("--kernel-compile-threads", type=int, default=d["kernel_compile_threads"].default, metavar="N",
                   help="threads that compile --fused-norm's and --fused-epilogue's kernel variants before the first "
                        "capture: 0 = one per CPU core (at most 16), 1 = none ahead, the capture compiles them one "
                        "after another (default: %(default)s)")
    g.add_argument("--frame-graph", action="store_true",
                   help="also capture one CUDA graph per bucket of a whole frame with the default step count (one "
                        "launch a call; with --reuse and one UNet evaluation a frame, its full and partial frames too; "
                        "other step counts use the per-step graphs); bit-identical output, one more capture per "
                        "bucket at start-up (three with --reuse)")
    if stream_options:  # only commands with --reuse (serve, run, warmup) build partial frames
        g.add_argument("--reuse-layers", type=int, default=d["reuse_layers"].default, metavar="N",
                       help="with --reuse: how many layers of the UNet's outermost up block a partial frame "
                            "recomputes (SD-Turbo: 1 to 3). Fewer is faster and further from a full frame; the "
                            "default recomputes the whole block (and the outermost down block)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run the CUDA path eagerly (debugging, comparison)")
    if stream_options:
        s = parser.add_argument_group("stream")
        s.add_argument("--prompt", default=p.prompt, help="prompt, or a JSON blend of up to 4 weighted prompts such as "
                       "'[[\"a watercolor\", 0.7], [\"a pencil sketch\", 0.3]]' (default: %(default)r)")
        s.add_argument("--strength", type=float, default=p.strength, help="0 < strength <= 1 (default: %(default)s)")
        s.add_argument("--steps", type=int, default=p.steps, help="schedule length; UNet runs int(steps*strength) "
                       "times (default: %(default)s)")
        s.add_argument("--seed", type=int, default=p.seed, help="noise seed (default: %(default)s)")
        s.add_argument("--similarity", type=float, default=p.similarity, metavar="S",
                       help="let input frames more similar than S to the last one the engine ran skip it (about "
                            "0.9-0.99): the chance rises from 0 at S to 1 for an identical frame, and the last "
                            "output answers a skipped one (default: 0: off)")
        s.add_argument("--transition", dest="transition_s", type=float, default=p.transition_s, metavar="SECONDS",
                       help="after a prompt or seed change, blend from the old to the new over this many seconds "
                            "(default: 0: jump)")
        s.add_argument("--feedback", type=float, default=p.feedback, metavar="F",
                       help=f"blend this much of the previous output into each new frame, 0 to {MAX_FEEDBACK:g}: "
                            "less flicker, some trailing (default: 0: off)")
        s.add_argument("--reuse", type=int, default=p.reuse, metavar="N",
                       help=f"temporal feature reuse, 2 to {MAX_REUSE}: run the whole UNet every N frames and only its "
                            "outer blocks on the frames between, reusing the deep features of the last full frame. "
                            "Changes the output (an approximation that lags fast motion): trades fidelity for speed. "
                            "N >= 2 also makes the engine capture reuse's graphs at start-up, so that streams may "
                            "change their own reuse later; without it they cannot (default: 0: off)")
        parser.set_defaults(stream_options=True)


# The fields of StreamParams and EngineConfig as their options are spelled: those classes word their errors in their
# own terms (the wire protocol's JSON names the same fields), a command line's errors name what the user typed.
OPTION_OF_FIELD = {
    "prompt": "--prompt", "strength": "--strength", "steps": "--steps", "seed": "--seed",
    "similarity": "--similarity", "transition_s": "--transition", "feedback": "--feedback", "reuse": "--reuse",
    "kernel_compile_threads": "--kernel-compile-threads", "reuse_layers": "--reuse-layers", "buckets": "--buckets",
    "dtype": "--dtype", "vae": "--vae", "attention": "--attention", "aot_format": "--aot-format",
}


def in_option_terms(message: str) -> str:
    """'strength must be in (0, 1], got 2.0' -> '--strength must be ...': an error led by a field, as its option."""
    name, sep, rest = message.partition(" ")
    option = OPTION_OF_FIELD.get(name)
    return f"{option} {rest}" if option and sep else message


def stream_params(args: argparse.Namespace) -> StreamParams:
    """The stream options (serve, run) as checked StreamParams; ValueError with the reason."""
    return StreamParams(parse_prompt(args.prompt), args.strength, args.steps, args.seed, similarity=args.similarity,
                        transition_s=args.transition_s, feedback=args.feedback, reuse=args.reuse).validate()


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed options; UserError with the reason if they do not fit together (no model loaded)."""
    try:
        # Commands with stream options (serve, run) set the engine's default stream; others (generate, bench)
        # pass their own parameters per call and keep the stock defaults.
        default = StreamParams()
        if getattr(args, "stream_options", False):
            default = stream_params(args)
        reuse_layers = getattr(args, "reuse_layers", None)
        if reuse_layers is not None and default.reuse < 2:
            raise ValueError("--reuse-layers needs temporal feature reuse: --reuse N with N >= 2 "
                             "(serve, run, warmup)")
        if args.compile_aot and args.fp8:
            raise ValueError("--compile-aot does not cover --fp8 yet: use --compile with it")
        fused = [flag for flag, on in (("--fused-norm", args.fused_norm), ("--fused-epilogue", args.fused_epilogue))
                 if on]
        if fused and (args.compile or args.compile_aot):
            raise ValueError(f"{' and '.join(fused)} {'are' if len(fused) > 1 else 'is'} for the path without "
                             "--compile: torch.compile fuses these kernels itself (choose one)")
        if args.kernel_compile_threads != EngineConfig.__dataclass_fields__["kernel_compile_threads"].default \
                and not fused:
            raise ValueError("--kernel-compile-threads sets how many threads compile the kernels of --fused-norm and "
                             "--fused-epilogue; without either it has nothing to do")
        if args.frame_graph and not args.cuda_graphs:
            raise ValueError("--frame-graph captures one more CUDA graph per bucket; with --no-cuda-graphs nothing is "
                             "captured (choose one)")
        cfg = EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, width=args.size[0], height=args.size[1], vae=args.vae,
            taesd=args.taesd, buckets=args.buckets, compile=args.compile or args.compile_aot,
            cuda_graphs=args.cuda_graphs, compile_cache=args.compile_cache, compile_mode=args.compile_mode,
            compile_dynamic=args.compile_dynamic, compile_aot=args.compile_aot, aot_format=args.aot_format,
            attention=args.attention, prompt_kv=args.prompt_kv, fused_time_proj=args.fused_time_proj,
            fp8=args.fp8, skip_unit_rescale=args.skip_unit_rescale, fused_norm=args.fused_norm,
            fused_epilogue=args.fused_epilogue, kernel_compile_threads=args.kernel_compile_threads,
            frame_graph=args.frame_graph, reuse_layers=reuse_layers, loras=tuple(getattr(args, "lora", ())),
            lora_live=getattr(args, "lora_live", False), default_params=default,
        )
        if cfg.compile_mode != "default" and not cfg.compile:
            raise ValueError(f"--compile-mode {cfg.compile_mode} needs --compile")
        if cfg.compile_dynamic and not cfg.compile:
            raise ValueError("--compile-dynamic needs --compile")
        if cfg.aot_format != "aotinductor" and not cfg.compile_aot:
            raise ValueError(f"--aot-format {cfg.aot_format} needs --compile-aot")
        from ..lora import missing
        from ..models import no_cuda_reason, resolve_device

        for spec in cfg.loras:
            if problem := missing(spec):  # said now, not after the model's minutes of loading
                raise ValueError(problem)

        device = resolve_device(cfg.device)  # --device cuda without a GPU: said now, not after minutes of loading
        if device.type == "cpu" and cfg.device.strip().lower() == "auto" and cfg.model != "tiny-random" \
                and not getattr(args, "warned_no_cuda", False):
            log.warning("no CUDA GPU: running on the CPU, seconds a frame for SD-Turbo (%s)", no_cuda_reason())
            args.warned_no_cuda = True  # a command checks its options more than once (run: 3 times), says it once
        if cfg.fp8:
            from ..engine.cuda import check_fp8

            check_fp8(device)  # no CUDA, an older GPU or no torchao: said before loading too
        from ..engine.triton_support import triton_problem

        for flag, on in (("--fused-norm", cfg.fused_norm), ("--fused-epilogue", cfg.fused_epilogue)):
            if on and (problem := triton_problem(device)):
                raise ValueError(f"{flag} cannot run here: {problem}")
        return cfg
    except ValueError as exc:
        raise UserError(in_option_terms(str(exc))) from None


def build_engine(args: argparse.Namespace):
    """Load the model and build the engine (not warmed up); model-loading problems become UserError."""
    from ..engine import Engine

    cfg = engine_config(args)
    try:
        return Engine(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
