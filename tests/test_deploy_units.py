"""The systemd units in deploy/: each ExecStart is a command line turbostream's own parser takes, with the options
the unit's comments promise (a unit that names an option that does not exist fails at boot, where nobody looks)."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from turbostream.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_there_are_units():
    assert {p.name for p in UNITS} >= {"turbostream-serve.service", "turbostream-installation.service"}


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_each_units_command_line_parses(path):
    service = unit(path)["Service"]
    argv = shlex.split(service["ExecStart"].replace("%h", "/home/someone"))
    assert argv[0].endswith("/bin/turbostream")
    args = build_parser().parse_args(argv[1:])  # SystemExit (a failed test) for an option that does not exist
    assert args.command in ("serve", "run")
    if args.command == "run":
        # Stopped by systemd (SIGTERM), run finalizes its outputs and exits 143: the unit must call that clean.
        assert "143" in service["SuccessExitStatus"].split()
        assert args.fullscreen and any(o == "window" for o in args.outputs)
    else:
        assert "--token" not in argv and "EnvironmentFile" in service  # the token from a file, not the command line
        assert args.host == "0.0.0.0"
    assert unit(path)["Install"]["WantedBy"]
