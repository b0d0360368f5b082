"""Packaging: the dependency floors pyproject.toml declares are the releases .ci/run installs in its minimum-versions
run, and the wheel a user installs holds every module and data file of the repository."""

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


def test_the_wheel_holds_every_module_web_file_and_model_config(tmp_path):
    """A user's `pip install .` (not editable) gets what the repository has: a subpackage missing from pyproject's
    list, or a data file outside package-data, would import here and fail there. Built without warnings."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # Built from a copy: pip builds in the source tree (build/, *.egg-info) and the checkout stays as it was.
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("src", "web"):
        shutil.copytree(ROOT / part, tree / part, ignore=skip)
    for part in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / part, tree / part)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(tree)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "Warning" not in built.stdout + built.stderr, (built.stdout + built.stderr)[-3000:]
    (wheel,) = tmp_path.glob("turbostream-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    src = ROOT / "src"
    wanted = {p.relative_to(src).as_posix() for p in (src / "turbostream").rglob("*")
              if p.is_file() and p.suffix in (".py", ".json") and "__pycache__" not in p.parts}
    wanted |= {"turbostream/web/" + p.name for p in (ROOT / "web").iterdir()
               if p.suffix in (".py", ".html", ".js", ".css", ".svg")}
    assert any(name.startswith("turbostream/model_configs/tiny-random/") for name in wanted)  # the walk saw them
    assert wanted - shipped == set()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in shipped)  # pyproject's Apache-2.0, its text
