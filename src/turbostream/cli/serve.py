"""`turbostream serve`: options, then listen at once (/healthz says 503), load and warm the engine on the inference
thread, serve until SIGINT, SIGTERM or SIGHUP (unless ignored; cli/signals.py) (exit 0), closing every connection with
1001."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal

from ..config import Limits, ServerConfig
from ..errors import UserError
from ..io.sources import parse_source, quiet_opencv
from ..serve.devices import device_labels, parse_devices
from ..serve.http import is_loopback_host
from ..serve.server import TurboServer, default_capture
from .controls import add_control_options, controls_from_args
from .options import add_engine_options, build_engine, engine_config
from .signals import on_signal, stop_signals

log = logging.getLogger("turbostream.server")


# The tokens may come from the environment: a command line is readable by every user of the machine (ps, /proc).
TOKEN_ENV = "TURBOSTREAM_TOKEN"
CONTROL_TOKEN_ENV = "TURBOSTREAM_CONTROL_TOKEN"


def add_parser(sub) -> None:
    d, limits = ServerConfig(), Limits()
    p = sub.add_parser("serve", help="WebSocket server and browser client (interactive streams and viewers)")
    add_engine_options(p, lora_live=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=d.host, help="address to bind (default: %(default)s, this machine only)")
    g.add_argument("--port", type=int, default=d.port, help="port; 0 picks a free one (default: %(default)s)")
    g.add_argument("--token", default=os.environ.get(TOKEN_ENV, d.token),
                   help=f"require this token on /ws and /view/ws (?token=...); default: ${TOKEN_ENV} where set "
                        "(an environment variable, unlike an option, is not shown to other users by ps)")
    g.add_argument("--control-token", default=os.environ.get(CONTROL_TOKEN_ENV, d.control_token),
                   help=f"lets /view clients change the prompt; default: ${CONTROL_TOKEN_ENV} where set")
    g.add_argument("--allow-origin", dest="allow_origins", action="append", default=[], metavar="ORIGIN",
                   help="also accept WebSocket connections from this Origin (repeatable; same origin always)")
    g.add_argument("--trusted-proxy", dest="trusted_proxies", action="append", default=[], metavar="ADDR",
                   help="a load balancer's address or network (repeatable): its X-Forwarded-For names the client, "
                        "and /ws handshakes it sends that cannot be served get HTTP 503 (retry elsewhere)")
    g.add_argument("--max-clients", type=int, default=limits.max_clients, help="interactive streams (default: %(default)s)")
    g.add_argument("--max-viewers", type=int, default=limits.max_viewers, help="viewers (default: %(default)s)")
    g.add_argument("--max-message-bytes", type=int, default=limits.max_message_bytes,
                   help="largest message accepted (default: %(default)s)")
    g.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality, help="output JPEG quality (default: %(default)s)")
    g.add_argument("--jpeg", choices=("cpu", "gpu", "hybrid"), default="cpu",
                   help="where client JPEGs are decoded and results encoded: cpu (libjpeg-turbo through simplejpeg), "
                        "gpu (nvJPEG through torchvision, on the first CUDA device; JPEGs it refuses go to the CPU; it "
                        "repeats 4:2:0 chroma where libjpeg-turbo interpolates, so colours differ at sharp colour "
                        "edges, and its JPEGs are 4:4:4, larger), or hybrid (decode on the GPU while its decoder is "
                        "free, else on the CPU; encode on the CPU); default: %(default)s")
    g.add_argument("--source", default=d.source, metavar="SRC",
                   help="stylize a server-side source (camera index, video file, URL or folder of images) and broadcast "
                        "it to /view")
    g.add_argument("--publish", action="append", default=[], metavar="URL",
                   help="also stream the broadcast to rtmp://, srt://, rtsp:// or udp:// (H.264 through ffmpeg); "
                        "repeatable; needs --source")
    g.add_argument("--publish-fps", type=float, default=30.0, metavar="FPS",
                   help="frame rate of --publish streams (default: %(default)g)")
    g.add_argument("--loop", action="store_true",
                   help="play a --source video file or folder again from its start at its end, for ever "
                        "(installations); its --publish streams then carry no sound")
    g.add_argument("--no-audio", dest="audio", action="store_false",
                   help="leave a --source video file's sound out of its --publish streams (by default they carry it)")
    add_control_options(p, "the broadcast (needs --source)")
    p.set_defaults(func=main)


def server_config(args) -> ServerConfig:
    """ServerConfig from `turbostream serve` options; ValueError with the reason if one is out of range."""
    limits = Limits(max_clients=args.max_clients, max_viewers=args.max_viewers,
                    max_message_bytes=args.max_message_bytes)
    for option, env, value in (("--token", TOKEN_ENV, args.token),
                               ("--control-token", CONTROL_TOKEN_ENV, args.control_token)):
        if value is not None and not value.strip():
            # "--token $TOKEN" with TOKEN unset: an open server where a closed one was meant.
            raise ValueError(f"{option} (or ${env}) is empty: give a secret, or leave it out for a server without "
                             "one")
    return ServerConfig(
        host=args.host, port=args.port, token=args.token or None, control_token=args.control_token or None,
        allow_origins=tuple(args.allow_origins), jpeg_quality=args.jpeg_quality, source=args.source, limits=limits,
        trusted_proxies=tuple(args.trusted_proxies),
    )


def main(args) -> int:
    """`turbostream serve`: listen at once (/healthz says 503), load and warm the engine, serve until SIGINT/SIGTERM."""
    integration_args(args)  # a playlist's first prompt is the broadcast's starting prompt: before engine_config
    try:
        return _main(args)
    finally:
        args.controls.stop()  # the OSC port was bound by integration_args (stopping twice is harmless)


def _main(args) -> int:
    factories = engine_factories(args)  # option mistakes are reported now, before minutes of model loading
    jpeg = jpeg_codec(args)
    capture_factory = None
    try:
        config = server_config(args)
        if config.source is not None:
            if not getattr(args, "verbose", False):
                quiet_opencv()  # a camera not there yet is retried, and said, by the source thread: no OpenCV lines
            # Parsing the source now turns a missing file or a bad URL into one message and exit status 2; opening
            # it (which can take seconds for a network source) happens on the source thread, which makes a new
            # capture each time a lost live source is opened again.
            default_capture(config.source)
            loop = getattr(args, "loop", False)
            capture_factory = functools.partial(default_capture, loop=True) if loop else default_capture
    except ValueError as exc:
        raise UserError(str(exc)) from None
    server = TurboServer(config=config, engine_factories=factories, capture_factory=capture_factory, jpeg=jpeg)
    if not is_loopback_host(config.host) and config.token is None:
        log.warning("listening on %s without --token: anyone who can reach this port can use the GPU (and any web "
                    "page that someone on the network opens, through DNS rebinding)", config.host or "every interface")
    try:
        from ..serve.integrations import Integrations

        extras = Integrations(server, args.controls, tuple(args.publish), size=args.size,
                              fps=args.publish_fps, audio=getattr(args, "publish_audio", None))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        return asyncio.run(_serve_until_signal(server, extras))
    finally:
        extras.stop()  # already done on a normal shutdown; here for a failed start


def jpeg_codec(args):
    """The codec workers' JPEG codec: None (the CPU's), or with --jpeg gpu|hybrid nvJPEG on the first CUDA device of
    --device, tried now (a trial round trip), before the model loads; UserError if it cannot work here."""
    kind = getattr(args, "jpeg", "cpu")
    if kind == "cpu":
        return None
    from ..models import resolve_device

    try:
        devices = [str(resolve_device(d)) if d == "auto" else d for d in parse_devices(args.device)]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    cuda = [d for d in devices if d.startswith("cuda")]
    if not cuda:
        raise UserError(f"--jpeg {kind} needs a CUDA device among --device (got {', '.join(devices)}); use --jpeg "
                        "cpu")
    from ..codec_cuda import CudaJpeg, HybridJpeg

    try:
        codec = CudaJpeg(cuda[0])
    except ValueError as exc:
        raise UserError(str(exc).replace("--jpeg gpu", f"--jpeg {kind}")) from None
    if kind == "hybrid":
        log.info("JPEG decode on %s (nvJPEG) while it is free, else on the CPU; encode on the CPU", codec.device)
        return HybridJpeg(codec)
    log.info("JPEG decode and encode on %s (nvJPEG)", codec.device)
    return codec


def integration_args(args) -> None:
    """Check --publish, --osc-port, --osc-feedback and --prompts before the model loads; args.controls holds the
    bound controls."""
    if (args.publish or args.osc_port is not None or args.osc_feedback or args.prompts) and args.source is None:
        raise UserError("--publish, --osc-port, --osc-feedback and --prompts act on the broadcast of a server-side "
                        "source: add --source SRC")
    if getattr(args, "loop", False) and (args.source is None or parse_source(args.source).live):
        raise UserError("--loop plays a --source video file or folder of images again at its end: give one "
                        "(cameras and URLs go on by themselves)")
    if not 1.0 <= args.publish_fps <= 240.0:
        raise UserError(f"--publish-fps must be between 1 and 240, got {args.publish_fps:g}")
    from ..io.sources import redact
    from ..io.stream import check_stream_output, is_stream_url

    for k, url in enumerate(args.publish):
        if url in args.publish[:k]:  # two FFmpeg publishers to one place: for udp://, one corrupt stream
            raise UserError(f"--publish {redact(url)!r} is given twice")
        if not is_stream_url(url):
            raise UserError(f"--publish {redact(url)!r}: use an rtmp://, srt://, rtsp:// or udp:// URL")
        check_stream_output(url, "--publish")  # SinkError (a UserError) for an output that cannot work
    args.publish_audio = None
    if args.publish:
        from ..io.audio import find_source_audio
        from ..io.sinks import parse_output

        args.publish_audio = find_source_audio(parse_source(args.source), [parse_output(u) for u in args.publish],
                                               enabled=getattr(args, "audio", True),
                                               loop=getattr(args, "loop", False))
        if args.publish_audio is not None:
            log.info("the sound of %s (%s) goes to the published streams beside its pictures", args.source,
                     args.publish_audio.description)
    args.controls = controls_from_args(args)


async def _serve_until_signal(server: TurboServer, extras=None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Ctrl-C, SIGTERM and SIGHUP (unless ignored) all close connections with 1001; the process exits 0.
    undo = [on_signal(loop, sig, stop.set) for sig in (signal.SIGINT, *stop_signals())]
    try:
        return await _serve_until(server, extras, stop)
    finally:
        for restore in undo:
            restore()


async def _serve_until(server: TurboServer, extras, stop: asyncio.Event) -> int:
    """Serve until stop is set or the engine fails; then close the connections, the controls and the publishers."""
    loop = asyncio.get_running_loop()
    try:
        await server.start()
    except OSError as exc:
        server.devices.stop(0)
        raise UserError(f"cannot listen on {server.config.host}:{server.config.port}: {exc.strerror or exc}") from None
    viewer = f" (viewer page: {server.url}view)" if server.config.source is not None else ""  # else nothing to view
    log.info("serving on %s%s; loading the engine...", server.url, viewer)
    if extras is not None:
        extras.start(loop)
    failed = asyncio.create_task(_wait_failed(server))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({failed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    failed.cancel()
    stopped.cancel()
    log.info("shutting down: closing connections")
    await server.stop()
    if extras is not None:  # controls, then the publishers' last frames (ffmpeg finishes its stream)
        await loop.run_in_executor(None, extras.stop)
    if server.failed:
        raise UserError(f"the engine failed to start: {server.error}")
    return 0


async def _wait_failed(server: TurboServer) -> None:
    while not server.failed:
        await asyncio.sleep(0.1)


def engine_factories(args) -> dict:
    """One engine factory per --device entry (cuda:0,cuda:1 / all / cpu,cpu), named for metrics and logs; every
    device's options are checked now, before minutes of model loading."""
    try:
        devices = parse_devices(args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    per_device = [argparse.Namespace(**{**vars(args), "device": device}) for device in devices]
    names = []
    for device_args in per_device:
        cfg = engine_config(device_args)  # UserError for a device this machine does not have
        if cfg.device == "auto":
            from ..models import resolve_device

            names.append(str(resolve_device("auto")))
        else:
            names.append(cfg.device)
    return {name: functools.partial(build_engine, device_args)
            for name, device_args in zip(device_labels(names), per_device)}
