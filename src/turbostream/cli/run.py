"""`turbostream run`: the headless capture loop, from the command line (the loop itself: pipeline.py).

Inputs and outputs are checked, and the source opened, before the model loads (that can take minutes). Ctrl-C stops
the stages, and the writers finalize their files before the command exits (status 130); SIGTERM (kill, timeout,
docker stop, systemctl stop) takes the same path and exits with status 143; SIGHUP (a closed terminal) with 129.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager

from ..config import RunConfig, stream_limits
from ..control import Controls, LoraTarget, RunTarget
from ..control.prompt_line import PromptLine
from ..errors import UserError
from ..io.audio import find_source_audio
from ..io.sinks import WindowSink, check_outputs, open_sink, parse_output
from ..io.sources import CaptureThread, parse_source, quiet_opencv
from ..io.stream import StreamSink
from ..pipeline import Pipeline, Progress, RunSummary
from ..similarity import FitAndCheck
from .controls import add_control_options, controls_from_args
from .options import add_engine_options, build_engine, engine_config, stream_params
from .signals import stop_signals

log = logging.getLogger("turbostream.run")

INTERRUPT_STATUS = 130  # Ctrl-C: 128 + SIGINT, as shells report it


def add_parser(sub) -> None:
    d = RunConfig()
    p = sub.add_parser("run", help="headless capture loop: camera, file, URL or folder -> window, file or folder")
    add_engine_options(p, lora_live=True)
    g = p.add_argument_group("run")
    g.add_argument("--input", "-i", required=True, metavar="SRC",
                   help="camera index (0), video file, stream URL (rtsp://, rtmp://, http(s)://, udp://, srt://) or "
                        "folder of images")
    g.add_argument("--output", "-o", dest="outputs", action="append", required=True, metavar="DST",
                   help="'window', a video file (.mp4/.mov/.mkv/.avi), a folder of images, a stream URL (rtmp://, "
                        "srt://, rtsp://, udp://) or 'virtualcam'; repeat for several")
    g.add_argument("--max-frames", type=int, default=d.max_frames, metavar="N", help="stop after N frames")
    g.add_argument("--realtime", action="store_true",
                   help="treat a file like a live source: keep only the newest frame, drop the rest")
    g.add_argument("--fullscreen", action="store_true",
                   help="open the window output full screen (an installation started at boot; f still toggles)")
    g.add_argument("--loop", action="store_true",
                   help="play a video file or folder again from its start at its end, for ever (installations: a "
                        "window, a stream, a virtual camera); a video file or folder output needs --max-frames; "
                        "the sound is left out")
    g.add_argument("--no-audio", dest="audio", action="store_false",
                   help="leave the source's sound out of video file and stream outputs (by default a video file "
                        "read into either keeps its sound, through ffmpeg)")
    add_control_options(p, "the run's stream")
    p.set_defaults(func=main)


def main(args: argparse.Namespace, engine=None) -> int:
    """`turbostream run`; engine: a ready Engine (or stand-in) instead of loading one from args (tests)."""
    cfg = RunConfig()
    if not getattr(args, "verbose", False):
        quiet_opencv()
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {args.max_frames}")
    # Everything that can be checked without the model first: loading it can take minutes. (SourceError and
    # SinkError are UserErrors: main() prints them as one message, exit 2.) The options before the outputs: a refused
    # --strength left the output folders it had created behind.
    if engine is None:
        engine_config(args)  # the engine's options and the stream's
    else:
        try:
            stream_params(args)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    source = parse_source(args.input)
    outputs = [parse_output(text) for text in args.outputs]
    check_outputs(outputs, source)
    if getattr(args, "fullscreen", False) and not any(o.kind == "window" for o in outputs):
        raise UserError("--fullscreen is for the window output: add -o window")
    loop = getattr(args, "loop", False)
    if loop and source.live:
        raise UserError("--loop plays a video file or folder of images again at its end: a camera or a URL goes on "
                        "by itself")
    if loop and args.max_frames is None and any(o.kind in ("video", "folder") for o in outputs):
        raise UserError("--loop never ends by itself: with a video file or folder output add --max-frames N, or it "
                        "grows until the disk is full")
    audio = find_source_audio(source, outputs, enabled=getattr(args, "audio", True), loop=loop)
    # A playlist's first prompt becomes args.prompt; the OSC port is bound.
    controls = controls_from_args(args, prompt_line=_stdin_is_terminal() and _in_the_foreground())
    with _sigterm_as_ctrl_c() as term:
        try:
            status = _run(args, engine, cfg, source, outputs, controls, term, audio)
        except KeyboardInterrupt:
            if not term.received:
                raise
            # Before the run began (the model loading, say): nothing written yet to finalize.
            print(f"turbostream: terminated ({term.name})", file=sys.stderr)
            return 128 + term.received
        finally:
            controls.stop()
    # A run that a stop signal ended, or that ended by itself after one: the signal's status, as documented.
    return 128 + term.received if term.received and status in (0, INTERRUPT_STATUS) else status


class _Sigterm:
    received = 0  # the signal number of a SIGTERM or SIGHUP received (0: none)
    pipeline = None  # the run's Pipeline once it exists: told to stop too (Pipeline.interrupt)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "Ctrl-C"


@contextmanager
def _sigterm_as_ctrl_c():
    """While the run runs, SIGTERM does what Ctrl-C does (its default would end the process on the spot, leaving an
    .mp4 without its index, which does not play): the run stops, the outputs are finalized. A SIGTERM while they
    are finalized counts as another Ctrl-C: the second warns, the third quits without them. SIGHUP (the terminal or
    the ssh session that started the run went away) does the same, unless it is ignored (nohup). Exit status 128 +
    the signal's number: 143 for SIGTERM, 129 for SIGHUP."""
    term = _Sigterm()
    if threading.current_thread() is not threading.main_thread():
        yield term  # signal handlers belong to the main thread (tests that run a command on another)
        return

    def handler(signum, frame):
        term.received = signum
        if term.pipeline is not None:
            # The KeyboardInterrupt below can be lost (raised inside a finalizer, Python only prints it); this cannot.
            term.pipeline.interrupt()
        on_sigint = signal.getsignal(signal.SIGINT)
        if callable(on_sigint):  # Python's default (raises KeyboardInterrupt), or the pipeline's while it finalizes
            on_sigint(signal.SIGINT, frame)
        else:  # SIGINT ignored (started in the background by a script, nohup): SIGTERM still stops the run
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in stop_signals()}
    try:
        yield term
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before if before is not None else signal.SIG_DFL)


def _run(args, engine, cfg: RunConfig, source, outputs, controls: Controls, term: _Sigterm, audio=None) -> int:
    try:
        params = stream_params(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if engine is None:
        ecfg = engine_config(args)
        width, height, max_batch = ecfg.width, ecfg.height, ecfg.max_batch
    else:
        width, height, max_batch = engine.width, engine.height, engine.max_batch
    # A stream or a virtual camera is live by nature: a file sent to one plays at its own rate.
    realtime = source.live or bool(args.realtime) or any(o.kind in ("stream", "virtualcam") for o in outputs)
    batch = 1 if realtime else max_batch
    if controls.playlist is not None and not realtime:
        # Its durations are wall-clock time; a file read in order goes as fast as the engine does, not at its rate.
        log.warning("--prompts: each look lasts its duration in wall-clock time, and this file is read as fast as "
                    "the engine goes: the looks will not fall on the video's time (add --realtime to play the file "
                    "at its own rate)")
    transform = FitAndCheck(width, height, lambda: params)  # the pipeline's live parameters once it exists
    capture = CaptureThread(
        source, realtime=realtime, queue_size=max(cfg.queue_frames, 2 * batch), loop=getattr(args, "loop", False),
        reconnect=cfg.reconnect_attempts if source.live else 0, open_timeout_s=cfg.open_timeout_s,
        transform=transform,  # fitting and the similarity check run on the capture thread, not the GPU's
    )
    capture.start()
    sinks: list = []
    window = None
    try:
        _log_source(capture, audio)
        if any(o.kind == "window" for o in outputs):
            window = WindowSink(f"turbostream: {source.describe()}", fullscreen=getattr(args, "fullscreen", False))
        fps = capture.fps or cfg.fallback_fps
        if capture.fps is None and any(o.kind in ("video", "stream", "virtualcam") for o in outputs):
            log.info("the source reports no frame rate; video output is written at %g fps", fps)
        # A video file keeps its own timeline (its frames' times), read in order or paced as if live: a file whose
        # rate varies stays in step with its sound, and a paced file's frames dropped as stale leave the frame
        # before them held over their time. Other live runs keep real time: by frame index where the capture paces
        # a folder, else (cameras, live streams) by when each frame was read, since their real rate is often not
        # the one they announce.
        if source.kind == "file" and not source.picture:
            fill_gaps = "pts"
        elif realtime:
            fill_gaps = "index" if capture.pace else "time"
        else:
            fill_gaps = None
        for o in outputs:  # a virtual camera opens here: a missing backend is reported before the model loads
            if o.kind != "window":
                sinks.append(open_sink(o, fps, (width, height), fill_gaps=fill_gaps, audio=audio))
        if engine is None:
            engine = build_engine(args)
        if engine.random_weights:
            log.warning("model %r has random weights: the output is noise, not a stylization", engine.model_name)
        total = None
        if not realtime:
            total = None if capture.loop else capture.frame_count  # a loop's end is --max-frames, or none
            if args.max_frames is not None:
                total = min(total, args.max_frames) if total else args.max_frames
        pipeline = Pipeline(
            engine, capture, sinks, params, window=window, max_frames=args.max_frames, batch=batch,
            progress=Progress(live=realtime, total=total), queue_frames=cfg.queue_frames,
        )
        term.pipeline = pipeline
        if term.received:
            # A stop signal came while the model loaded, and its KeyboardInterrupt was lost (raised inside a
            # finalizer, which Python only prints): stop now, as it asked.
            raise KeyboardInterrupt
        transform.params_of = lambda: pipeline.params
        target = RunTarget(pipeline, stream_limits(engine))
        engine_cfg = getattr(engine, "config", None)
        lora = LoraTarget(getattr(engine_cfg, "loras", ()), pipeline.set_lora_scales,
                          live=getattr(engine_cfg, "lora_live", False))
        controls.start_osc(target, lora=lora)
        controls.start_feedback(lambda: pipeline.params, lambda: lora)
        if _stdin_is_terminal() and _in_the_foreground():
            PromptLine(pipeline, target=target, lora=lora).start()
        # The playlist's clock starts once the engine is warm (a warm-up of seconds would eat its first look);
        # run() closes the sinks (writes what is queued, finalizes files).
        try:
            summary = pipeline.run(on_ready=lambda: controls.start_playlist(target, lora=lora))
        except Exception as exc:
            if isinstance(exc, UserError):
                raise
            # The engine failed mid-run (a CUDA error, out of memory): the outputs were finalized with what it
            # had computed; the summary says what was kept, as for any other stop.
            log.debug("the engine failed", exc_info=True)
            summary = pipeline.summary
            summary.stopped = "error"
            summary.error = f"the engine failed: {type(exc).__name__}: {exc} (-v logs where)"
    except BaseException:
        for sink in sinks:  # opened before the run began (a virtual camera, say)
            with contextlib.suppress(Exception):
                sink.close()
        raise
    finally:
        capture.close()
    _log_summary(summary, realtime, [*sinks, *([window] if window else [])], term.name)
    if summary.stopped == "interrupt":
        return INTERRUPT_STATUS
    if summary.stopped == "error":
        print(f"turbostream: error: {summary.error}", file=sys.stderr)
        return 1
    # A stream output retries and never stops the run; one that no frame ever reached failed all the same (a script
    # pushing a file to a server that was down all along must not read success).
    unreached = [s for s in sinks if isinstance(s, StreamSink) and s.frames_sent == 0 and s.failures]
    if unreached:
        names = ", ".join(s.shown for s in unreached)
        print(f"turbostream: error: no frame reached {names} ({unreached[0].last_error})", file=sys.stderr)
        return 1
    return 0


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _in_the_foreground() -> bool:
    """Whether this process owns its terminal: a read from it in the background (`turbostream run ... &`) would stop
    the whole process (SIGTTIN) until `fg`. Windows has no job control (nor os.tcgetpgrp): there it always does."""
    if not hasattr(os, "tcgetpgrp"):
        return True
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (AttributeError, OSError, ValueError):
        return False


def _log_source(capture: CaptureThread, audio=None) -> None:
    w, h = capture.size or (0, 0)
    facts = [f"{w}x{h}"]
    if capture.fps:
        facts.append(f"{capture.fps:g} fps")
    if capture.frame_count:  # a folder's images, unreadable ones included (they are skipped when reached)
        noun = "images" if capture.spec.kind == "folder" else "picture" if capture.spec.picture else "frames"
        facts.append(f"{capture.frame_count} {noun}")
    facts.append("live: newest frame only" if capture.realtime else "every frame, in order")
    if audio is not None:
        facts.append(f"sound: {audio.description}, kept in the video files and streams")
    log.info("input %s (%s)", capture.spec.describe(), ", ".join(facts))


def _log_summary(s: RunSummary, realtime: bool, sinks: list, interrupt: str = "Ctrl-C") -> None:
    how = {
        "end": "done", "max-frames": "reached --max-frames", "quit": "stopped", "interrupt": f"stopped by {interrupt}",
        "error": "stopped by an error",
    }[s.stopped]
    line = f"{how}: {s.frames} frames in {s.seconds:.1f} s ({s.fps:.1f} fps)"
    if realtime:
        lat = sorted(s.latencies)
        if lat:
            line += f", latency {1000 * lat[len(lat) // 2]:.0f} ms median, {1000 * lat[-1]:.0f} ms max"
        line += f", {s.dropped} stale frames dropped"
    if s.skipped:
        line += f", {s.skipped} similar frames answered with the last output"
    if s.device_busy is not None:
        line += f"; the device was busy {100 * min(s.device_busy, 1.0):.0f} % of the time"
    log.info("%s", line)
    for sink in sinks:
        log.info("  %s", sink.describe())
