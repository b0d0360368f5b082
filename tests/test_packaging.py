"""The dependency floors pyproject.toml declares are the releases .ci/run installs in its minimum-versions run."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _floors() -> dict[str, str]:
    """{package: the version of its `>=` bound} for the runtime dependencies, torch aside (CI has one build)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for text in project["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        lower = [spec.version for spec in req.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{text!r}: every dependency needs one >= floor for the minimum-versions run"
        floors[name] = lower[0]
    return floors


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "minimum.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line!r}: the minimum constraints pin exact releases"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_minimum_constraints_pin_every_declared_floor():
    floors, pins = _floors(), _pins()
    assert set(pins) == set(floors), f"constraints/minimum.txt names {sorted(set(pins) ^ set(floors))} " \
                                     "that pyproject.toml does not, or the other way round"
    for name, floor in floors.items():
        # A floor of 1.0 may be pinned as 1.0.0: equal as versions, not as text.
        assert Requirement(f"x=={pins[name]}").specifier.contains(floor), \
            f"{name}: pyproject.toml's floor is {floor}, constraints/minimum.txt installs {pins[name]}"
