"""Options shared by `serve` and `run` for external control: --osc-port, --osc-host, --osc-feedback, --prompts,
--prompt-duration.

Everything is checked, and the OSC port bound, before the model loads (which can take minutes).
"""

from __future__ import annotations

import argparse
import dataclasses

from ..config import MAX_STEPS
from ..control import Controls, LoraTarget, OscFeedback, OscServer, Playlist, load_playlist
from ..control.osc_feedback import MAX_TARGETS
from ..control.playlist import DEFAULT_DURATION_S, check_looks
from ..errors import UserError
from .options import stream_params


def add_control_options(parser: argparse.ArgumentParser, what: str) -> None:
    """what: the stream these controls change, for the help text ("the broadcast", "the run's stream")."""
    g = parser.add_argument_group("control")
    g.add_argument("--osc-port", type=int, default=None, metavar="N",
                   help=f"listen for OSC messages on this UDP port (/turbostream/prompt, ...) that change {what}")
    g.add_argument("--osc-host", default="127.0.0.1", metavar="ADDR",
                   help="address the OSC port binds (default: %(default)s; 0.0.0.0 for other machines)")
    g.add_argument("--osc-feedback", action="append", default=[], metavar="HOST:PORT",
                   help=f"send the settings of {what} (/turbostream/prompt, /turbostream/strength, ...) to a desk at "
                        f"this address whenever they change, whoever changed them, so its faders show them; repeat "
                        f"for up to {MAX_TARGETS} desks")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help=f"a playlist: one prompt a line (as --prompt: a JSON blend when it starts with '['), "
                        f"optional '| 30s' duration and '| strength=0.6 seed=7 lora=0.8' settings, # comments; "
                        f"cycles {what}")
    g.add_argument("--prompt-duration", type=float, default=DEFAULT_DURATION_S, metavar="S",
                   help="seconds a playlist prompt stays when its line gives no duration (default: %(default)g)")


def controls_from_args(args: argparse.Namespace, prompt_line: bool | None = None) -> Controls:
    """The command's Controls: the playlist read and checked, the OSC port bound (not yet serving); UserError if not.
    prompt_line: whether `run` reads a prompt line from its terminal (which changes LoRA scales too); None: `serve`.

    With a playlist, args.prompt becomes its first prompt as written: the stream starts with it, read as every
    later line is (config.parse_prompt: a JSON blend when it starts with '['); its settings replace those options
    (--strength, ...), and its LoRA scales those of --lora, so the engine loads with them. Every look is then tried
    in turn against the start (check_looks).
    """
    playlist = osc = None
    if getattr(args, "lora_live", False) and args.osc_port is None and not prompt_line \
            and not getattr(args, "control_token", None):
        raise UserError("--lora-live lets OSC change the LoRAs' scales (/turbostream/lora): add --osc-port N" + (
            " (or --control-token: the /view page's LoRA sliders)" if prompt_line is None
            else " (or run it in a terminal: its prompt line takes /lora)"))
    if args.prompts is not None:
        try:
            playlist = Playlist(load_playlist(args.prompts, args.prompt_duration))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        _start_with_first_look(args, playlist)
    if args.osc_port is not None:
        if not 0 <= args.osc_port <= 65535:
            raise UserError(f"--osc-port must be between 0 and 65535, got {args.osc_port}")
        try:
            osc = OscServer(args.osc_host, args.osc_port)
        except OSError as exc:
            raise UserError(str(exc)) from None
    feedback = None
    if args.osc_feedback:
        try:
            feedback = OscFeedback(args.osc_feedback)
        except ValueError as exc:
            if osc is not None:
                osc.stop()  # the port bound above
            raise UserError(str(exc)) from None
    return Controls(osc, playlist, feedback)


def _start_with_first_look(args: argparse.Namespace, playlist: Playlist) -> None:
    first = playlist.current
    args.prompt = first.prompt
    for field, value in first.settings:
        setattr(args, field, value)  # the options' dests are the fields' names (stream_params reads them)
    specs = list(getattr(args, "lora", []))
    lora = LoraTarget(specs, lambda scales: None, live=getattr(args, "lora_live", False))  # to check, not to apply
    try:
        try:
            start = stream_params(args)
        except ValueError as exc:  # the first look's settings with the other options
            raise ValueError(f"line {first.line}: {exc}") from None
        check_looks(playlist.looks, start, (MAX_STEPS, start.reuse >= 2), lora)
    except ValueError as exc:
        raise UserError(f"{args.prompts}, {exc}") from None
    for which, scale in first.loras:  # checked above: the engine loads with the first look's scales
        index, scale = lora.check(which, scale)
        specs[index] = dataclasses.replace(specs[index], scale=scale)
    if first.loras:
        args.lora = specs
