"""`turbostream generate`: single pictures, text-to-image or image-to-image (the model card's jobs; not a hot path)."""

from __future__ import annotations

import argparse
import logging
import stat
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from ..config import MAX_SEED, EngineConfig, StreamParams
from ..errors import UserError, path_stat
from ..io.sinks import check_output_file, ensure_writable_folder, same_file, write_image
from ..io.sources import read_image
from .options import add_engine_options, build_engine, in_option_terms

log = logging.getLogger("turbostream.generate")

IMAGE_STRENGTH = 0.5  # --strength's default with --image


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="one picture: text-to-image, or image-to-image with --image")
    add_engine_options(p, stream_options=False)
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--image", metavar="IN", help="input image (image-to-image); without it, text-to-image")
    p.add_argument("--output", "-o", required=True, metavar="OUT.png", help="output file (with --count: OUT-N.png)")
    p.add_argument("--steps", type=int, default=None, help="steps (default: 1 text-to-image, 2 image-to-image)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"image-to-image strength, with --image (default: {IMAGE_STRENGTH})")
    p.add_argument("--seed", type=int, default=0, help="seed of the first picture (default: %(default)s)")
    p.add_argument("--count", type=int, default=1, help="pictures, seeds seed, seed+1, ... (default: %(default)s)")
    p.set_defaults(func=main)



IMAGE_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _read_image(path_text: str) -> np.ndarray:
    """An input image file -> uint8 RGB; UserError for a missing or unreadable file."""
    path = Path(path_text).expanduser()
    found = path_stat(path, f"--image {path_text}")
    if found is None:
        raise UserError(f"no such image file: {path_text}")
    if not stat.S_ISREG(found.st_mode):
        raise UserError(f"--image {path_text} is not a file")
    image, why = read_image(path)
    if image is None:
        raise UserError(f"could not read {path_text}: {why} (png, jpg, webp, bmp...)")
    if min(image.shape[:2]) < 8:
        raise UserError(f"{path_text} is {image.shape[1]}x{image.shape[0]}; images need at least 8 pixels a side")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def output_paths(output: str, count: int) -> list[Path]:
    """OUT.png for one picture; OUT-0.png ... OUT-(count-1).png for several."""
    path = Path(output).expanduser()
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(count)]


def graph_options_given(args: argparse.Namespace) -> list[str]:
    """The engine options that only shape CUDA graphs or torch.compile, given on this command line.

    `generate` runs each picture eagerly (Engine.generate): nothing is captured or compiled, so these would do
    nothing. The options that change the modules themselves (--attention, --prompt-kv, --fused-norm...) do apply.
    """
    defaults = EngineConfig.__dataclass_fields__
    return [flag for flag, on in (
        ("--compile", args.compile),
        ("--compile-aot", args.compile_aot),
        ("--compile-dynamic", args.compile_dynamic),
        ("--compile-mode", args.compile_mode != defaults["compile_mode"].default),
        ("--aot-format", args.aot_format != defaults["aot_format"].default),
        ("--compile-cache/--no-compile-cache", args.compile_cache != ""),
        ("--buckets", args.buckets != defaults["buckets"].default),
        ("--frame-graph", args.frame_graph),
    ) if on]


def main(args: argparse.Namespace, engine=None) -> int:
    """`turbostream generate`: text-to-image (no --image) or image-to-image; --count pictures, seeds seed, seed+1..."""
    if given := graph_options_given(args):
        raise UserError(f"generate draws each picture eagerly, without CUDA graphs or torch.compile: "
                        f"{', '.join(given)} would do nothing here; leave {'it' if len(given) == 1 else 'them'} out")
    out = Path(args.output).expanduser()
    if out.suffix.lower() not in IMAGE_OUTPUT_SUFFIXES:
        raise UserError(f"output {args.output!r} must end in one of {', '.join(IMAGE_OUTPUT_SUFFIXES)}")
    if args.count < 1:
        raise UserError(f"--count must be at least 1, got {args.count}")
    if args.seed < 0 or args.seed + args.count - 1 > MAX_SEED:
        raise UserError(f"seeds must lie between 0 and {MAX_SEED}: --seed {args.seed} with --count {args.count}")
    if args.strength is not None and not args.image:
        raise UserError("--strength is for image-to-image: text-to-image (no --image) runs the whole schedule from "
                        "noise, strength 1 by definition")
    image = _read_image(args.image) if args.image else None
    steps = args.steps if args.steps is not None else (1 if image is None else 2)
    # Text-to-image runs the whole schedule from pure noise: strength 1 by definition.
    strength = 1.0 if image is None else IMAGE_STRENGTH if args.strength is None else args.strength
    try:
        StreamParams(args.prompt, strength, steps, args.seed).validate()
    except ValueError as exc:
        raise UserError(in_option_terms(str(exc))) from None
    ensure_writable_folder(out.parent if str(out.parent) else Path("."), args.output)  # SinkError: a UserError
    source = Path(args.image).expanduser() if args.image else None
    for path in output_paths(args.output, args.count):
        if source is not None and same_file(path, source):
            raise UserError(f"output {str(path)!r} is the input image; write somewhere else")
        check_output_file(path, str(path))
    if engine is None:
        engine = build_engine(args)
    if engine.random_weights:
        log.warning("model %r has random weights: the pictures are noise", engine.model_name)
    kind = "image-to-image" if image is not None else "text-to-image"
    for k, path in enumerate(output_paths(args.output, args.count)):
        seed = args.seed + k
        t0 = time.perf_counter()
        picture = engine.generate(args.prompt, steps=steps, seed=seed, image=image, strength=strength)
        seconds = time.perf_counter() - t0
        try:
            write_image(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        except OSError as exc:  # found while running (a full disk), not before: status 1, and what was kept
            print(f"turbostream: error: could not write {path}: {exc.strerror or exc} ({k} of {args.count} "
                  "pictures written)", file=sys.stderr)
            return 1
        log.info("wrote %s (%s, %dx%d, seed %d, %d step%s, %.2f s)",
                 path, kind, picture.shape[1], picture.shape[0], seed, steps, "" if steps == 1 else "s", seconds)
    return 0
