"""The `turbostream` command: serve, run, generate, bench.

Engine options are shared by every subcommand (add_engine_options); each subcommand's own options sit in its
_add_<name> function and its work in the module it names, imported only when that subcommand runs (importing
diffusers costs seconds).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import DEFAULT_MODEL, DEFAULT_TAESD, EngineConfig, RunConfig, ServerConfig, StreamParams, parse_size


class UserError(Exception):
    """A problem the user can fix; printed as one message, exit status 2, no traceback."""


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _buckets(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"buckets must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 64:
        raise argparse.ArgumentTypeError(f"buckets must be batch sizes between 1 and 64, got {text!r}")
    return sizes


def add_engine_options(parser: argparse.ArgumentParser, *, stream_options: bool = True) -> None:
    """Options that build the engine (and, with stream_options, a stream's default parameters)."""
    d, p = EngineConfig.__dataclass_fields__, StreamParams()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, local diffusers folder, 'random' (full SD-Turbo size, random weights: benchmarks) "
                        "or 'tiny-random' (small, CPU tests) (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: %(default)s)")
    g.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                   help="auto: float16 on CUDA, float32 on the CPU (default: %(default)s)")
    g.add_argument("--size", type=_size, default=(512, 512), metavar="N|WxH",
                   help="engine size; multiples of 64 up to 1024 (default: 512)")
    g.add_argument("--vae", choices=("tiny", "full"), default=d["vae"].default,
                   help="tiny: TAESD (fast); full: the model's own AutoencoderKL (default: %(default)s)")
    g.add_argument("--taesd", default=DEFAULT_TAESD, help="hub id or folder of the tiny VAE (default: %(default)s)")
    g.add_argument("--buckets", type=_buckets, default=d["buckets"].default, metavar="1,2,4,8",
                   help="batch sizes captured as CUDA graphs (default: 1,2,4,8)")
    g.add_argument("--compile", action="store_true", help="torch.compile before graph capture (minutes of warmup)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run the CUDA path eagerly (debugging, comparison)")
    if stream_options:
        s = parser.add_argument_group("stream")
        s.add_argument("--prompt", default=p.prompt, help="prompt (default: %(default)r)")
        s.add_argument("--strength", type=float, default=p.strength, help="0 < strength <= 1 (default: %(default)s)")
        s.add_argument("--steps", type=int, default=p.steps, help="schedule length; UNet runs int(steps*strength) "
                       "times (default: %(default)s)")
        s.add_argument("--seed", type=int, default=p.seed, help="noise seed (default: %(default)s)")
        parser.set_defaults(stream_options=True)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed options; UserError with the reason if they do not fit together."""
    try:
        # Commands with stream options (serve, run) set the engine's default stream; others (generate, bench)
        # pass their own parameters per call and keep the stock defaults.
        default = StreamParams()
        if getattr(args, "stream_options", False):
            default = StreamParams(args.prompt, args.strength, args.steps, args.seed).validate()
        return EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, width=args.size[0], height=args.size[1], vae=args.vae,
            taesd=args.taesd, buckets=args.buckets, compile=args.compile, cuda_graphs=args.cuda_graphs,
            default_params=default,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def build_engine(args: argparse.Namespace):
    """Load the model and build the engine (not warmed up); model-loading problems become UserError."""
    from .engine import Engine
    from .models import ModelLoadError

    cfg = engine_config(args)
    try:
        return Engine(cfg)
    except (ModelLoadError, ValueError) as exc:
        raise UserError(str(exc)) from None


# ------------------------------------------------------------------------------------------------ subcommands


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="side-by-side benchmark: diffusers pipeline vs this engine (eager, graphs)")
    add_engine_options(p, stream_options=False)
    p.add_argument("--iters", type=int, default=30, help="timed calls per measurement (default: %(default)s)")
    p.add_argument("--burn-in", type=int, default=5, help="untimed calls before each measurement (default: %(default)s)")
    p.add_argument("--compile-buckets", type=_buckets, default=(1, 4), metavar="1,4",
                   help="batch sizes compiled and captured with --compile (each costs a compile; default: 1,4)")
    p.add_argument("--skip-diffusers", action="store_true", help="leave out the diffusers pipeline baseline")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def _add_serve(sub) -> None:
    d = ServerConfig()
    p = sub.add_parser("serve", help="WebSocket server and browser client (interactive streams and viewers)")
    add_engine_options(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=d.host, help="address to bind (default: %(default)s, this machine only)")
    g.add_argument("--port", type=int, default=d.port, help="port; 0 picks a free one (default: %(default)s)")
    g.add_argument("--token", default=d.token, help="require this token on /ws (?token=...)")
    g.add_argument("--control-token", default=d.control_token, help="lets /view clients change the prompt")
    g.add_argument("--allow-origin", dest="allow_origins", action="append", default=[], metavar="ORIGIN",
                   help="also accept WebSocket connections from this Origin (repeatable; same origin always)")
    g.add_argument("--max-clients", type=int, default=d.max_clients, help="interactive streams (default: %(default)s)")
    g.add_argument("--max-viewers", type=int, default=d.max_viewers, help="viewers (default: %(default)s)")
    g.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help="largest message accepted (default: %(default)s)")
    g.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality, help="output JPEG quality (default: %(default)s)")
    g.add_argument("--source", default=d.source, metavar="SRC",
                   help="stylize a server-side source (camera index, file, URL) and broadcast it to /view")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve_main

    return serve_main(args)


def _add_run(sub) -> None:
    d = RunConfig()
    p = sub.add_parser("run", help="headless capture loop: camera, file, URL or folder -> window, file or folder")
    add_engine_options(p)
    g = p.add_argument_group("run")
    g.add_argument("--input", "-i", required=True, metavar="SRC",
                   help="camera index (0), video file, RTSP/HTTP URL or folder of images")
    g.add_argument("--output", "-o", dest="outputs", action="append", required=True, metavar="DST",
                   help="'window', a video file (.mp4/.avi) or a folder of images; repeat for several")
    g.add_argument("--max-frames", type=int, default=d.max_frames, metavar="N", help="stop after N frames")
    g.add_argument("--realtime", action="store_true",
                   help="treat a file like a live source: keep only the newest frame, drop the rest")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_main

    return run_main(args)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="one picture: text-to-image, or image-to-image with --image")
    add_engine_options(p, stream_options=False)
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--image", metavar="IN", help="input image (image-to-image); without it, text-to-image")
    p.add_argument("--output", "-o", required=True, metavar="OUT.png", help="output file (with --count: OUT-N.png)")
    p.add_argument("--steps", type=int, default=None, help="steps (default: 1 text-to-image, 2 image-to-image)")
    p.add_argument("--strength", type=float, default=0.5, help="image-to-image strength (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first picture (default: %(default)s)")
    p.add_argument("--count", type=int, default=1, help="pictures, seeds seed, seed+1, ... (default: %(default)s)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .runner import generate_main

    return generate_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turbostream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_run(sub)
    _add_generate(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"turbostream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("turbostream: interrupted", file=sys.stderr)
        return 130


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False, markup=False)],
    )
    for noisy in ("httpx", "urllib3", "diffusers", "transformers", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
