"""The `turbostream` command: serve, run, generate, bench, warmup.

Each subcommand's options and entry live in the module it names (cli/serve.py, ...); its work lives in the package
(serve/, pipeline.py, bench.py). torch, diffusers and the engine are imported only when a subcommand builds an engine
(importing diffusers costs seconds; `turbostream --help` and errors in the options come without them). Nothing in the
package imports cli/.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from .. import __version__
from ..errors import UserError
from . import bench, generate, run, serve, warmup

SUBCOMMANDS = (serve, run, generate, bench, warmup)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbostream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (also after the subcommand)")
    parser.add_argument("--version", action="version", version=f"turbostream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, run one subcommand, return its exit status: 0 done, 1 failed while running, 2 user error, 130 Ctrl-C."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the words typed, for a record of the command
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"turbostream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("turbostream: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script: main(), then exit at once, without waiting for threads that cannot be interrupted.

    A model still loading or a warmup still running on its own thread when the command ends (Ctrl-C, SIGTERM), or
    a codec worker inside a long decode, cannot be stopped from outside. Letting the interpreter finalize under a
    thread inside torch aborts the process ("terminate called without an active exception", exit 134), and its exit
    handlers join the codec pool's threads (seconds to minutes). Every subcommand has closed what is worth keeping
    (output files are finalized, sockets closed with 1001) before main() returns, so the process leaves now.
    """
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):  # None when started with >&- or 2>&-
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os._exit(status)


def setup_logging(verbose: bool) -> None:
    """rich on a terminal; plain timestamped lines (never wrapped) when stderr is a file or a pipe."""
    if sys.stderr is None:  # started with 2>&-: nowhere to write, and nothing must fail for it
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[logging.NullHandler()],
                            force=True)
        return
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "diffusers", "transformers", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
