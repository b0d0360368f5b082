"""--compile-aot's loader check (engine/aot_check.py): a child process finds out whether AOTInductor packages load and
run here, so a package that crashes its process (as every CUDA package did on the H200 test machine) cannot take a
server down; the engine says why and compiles without packages instead.

One test builds a real toy package in a child (about 20 s on two CPU cores); the others give the child a command that
crashes, fails or hangs the way a broken loader would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys

import numpy as np
import pytest
import torch

from turbostream.config import EngineConfig, StreamParams
from turbostream.engine import aot_check
from turbostream.engine.compile_cache import _with_torch

CPU = torch.device("cpu")


def _child_that(monkeypatch, code: str) -> None:
    """The check's child runs `code` instead of building a toy package."""
    monkeypatch.setattr(aot_check, "child_command", lambda device, dtype: [sys.executable, "-c", code])


CRASH = ("import os, signal\nprint('STEP exporting a test network', flush=True)\n"
         "print('STEP loading the test package', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)")


def test_a_package_that_loads_and_runs_is_checked_once_and_the_verdict_kept(tmp_path, monkeypatch):
    verdict = aot_check.check(CPU, torch.float32, tmp_path)
    assert verdict.works and not verdict.cached, verdict.detail
    assert verdict.detail.startswith("a test package loads and runs")
    (kept,) = tmp_path.glob("aotinductor-check-*.json")
    assert json.loads(kept.read_text())["key"] == _with_torch(aot_check.loader_key(CPU))[0]

    def no_child(*args):
        raise AssertionError("a kept verdict must not start a child")

    monkeypatch.setattr(aot_check, "_run_child", no_child)
    again = aot_check.check(CPU, torch.float32, tmp_path)
    assert again.works and again.cached and again.detail == verdict.detail
    # Another torch (or compiler, or GPU) is another key: the kept verdict does not answer for it.
    monkeypatch.setattr(aot_check, "loader_key", lambda device: {"torch": "another"})
    with pytest.raises(AssertionError, match="must not start a child"):
        aot_check.check(CPU, torch.float32, tmp_path)


def test_a_loader_that_crashes_its_process_is_named_with_its_signal_and_step(tmp_path, monkeypatch):
    _child_that(monkeypatch, CRASH)
    verdict = aot_check.check(CPU, torch.float16, tmp_path)
    assert not verdict.works
    assert verdict.detail == ("a test package crashed the process that loaded it (SIGSEGV while loading the test "
                              "package)")
    assert verdict.kept  # the engine's warning says so only when it is
    assert json.loads(next(tmp_path.glob("aotinductor-check-*.json")).read_text())["works"] is False
    assert aot_check.check(CPU, torch.float16, tmp_path).cached  # a crash is kept: the next start does not crash


def test_a_failure_says_where_and_a_check_that_cannot_start_or_is_cut_short_is_not_kept(tmp_path, monkeypatch):
    _child_that(monkeypatch, "print('STEP building a test package', flush=True)\nraise SystemExit('no C++ compiler')")
    verdict = aot_check.check(CPU, torch.float32, None)
    assert not verdict.works
    assert verdict.detail == "a test package failed while building a test package (exit 1: no C++ compiler)"
    _child_that(monkeypatch, "import turbostream_not_installed")  # dies before its first step: nothing learnt
    verdict = aot_check.check(CPU, torch.float32, tmp_path)
    assert not verdict.works and verdict.detail.startswith("the check could not start (exit 1: ModuleNotFoundError")
    assert not list(tmp_path.iterdir())
    _child_that(monkeypatch, "import time\nprint('STEP building a test package', flush=True)\ntime.sleep(60)")
    verdict = aot_check.check(CPU, torch.float32, tmp_path, timeout=2)
    assert not verdict.works and "did not finish in 2 s (while building a test package)" in verdict.detail
    assert not verdict.kept
    assert not list(tmp_path.iterdir())  # a busy machine's time-out says nothing lasting about torch


def test_what_says_nothing_lasting_about_torch_is_not_kept(tmp_path, monkeypatch, capsys):
    """Killed from outside (the OOM killer's SIGKILL) or out of GPU memory: not a verdict on torch, not kept."""
    _child_that(monkeypatch, "import os, signal\nprint('STEP building a test package', flush=True)\n"
                             "os.kill(os.getpid(), signal.SIGKILL)")
    verdict = aot_check.check(CPU, torch.float32, tmp_path)
    assert not verdict.works and verdict.detail == "the check was stopped by SIGKILL while building a test package"
    assert not list(tmp_path.iterdir())

    def out_of_memory(device, dtype):
        aot_check._step("running the test package")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(aot_check, "_child", out_of_memory)
    assert aot_check.main(["--device", "cpu", "--dtype", "float32"]) == 1
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("RESULT ")
    result = json.loads(line[len("RESULT "):])
    assert result == {"works": False, "lasting": False, "detail": "a test package failed while running the test "
                      "package (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)"}
    _child_that(monkeypatch, f"print('RESULT ' + {json.dumps(json.dumps(result))})\nraise SystemExit(1)")
    verdict = aot_check.check(CPU, torch.float32, tmp_path)
    assert not verdict.works and "OutOfMemoryError" in verdict.detail
    assert not list(tmp_path.iterdir())


def test_an_engine_whose_packages_would_crash_says_why_and_runs_without_them(tmp_path, monkeypatch, caplog):
    """--compile-aot where packages crash their process: the warm-up names the crash and goes on without packages
    (eager frames on the CPU; on CUDA, the dynamo format: tests/test_engine_gpu.py), equal to an engine without
    --compile-aot; nothing is built."""
    from turbostream.engine import Engine

    _child_that(monkeypatch, CRASH)

    def config(**kw) -> EngineConfig:
        return EngineConfig(model="tiny-random", device="cpu", width=64, height=64, buckets=(1,),
                            compile_cache=str(tmp_path), **kw)

    plain = Engine(config())
    plain.warmup()
    engine = Engine(config(compile=True, compile_aot=True), plain.components)
    with caplog.at_level(logging.WARNING, logger="turbostream.engine"):
        engine.warmup()
    assert "SIGSEGV while loading the test package" in engine.stats.aot_unavailable
    assert (engine.stats.aot_packages_built, engine.stats.aot_packages_loaded) == (0, 0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("aot-")]  # no package folder, nothing built
    warning = next(r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage())
    assert warning.startswith("--compile-aot: AOTInductor packages cannot be used here") and \
        "Running eager frames instead" in warning
    frame = [np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    params = [StreamParams("a", seed=1)]
    np.testing.assert_array_equal(engine.run(frame, params)[0], plain.run(frame, params)[0])


def test_turbostream_warmup_says_when_packages_cannot_be_used(tmp_path, monkeypatch, capsys):
    from turbostream.cli import main

    _child_that(monkeypatch, CRASH)
    argv = ["warmup", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--buckets", "1",
            "--compile-aot", "--compile-cache", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "AOTInductor packages cannot be used here (a test package crashed the process that loaded it (SIGSEGV" \
        in out and out.rstrip().endswith("eager frames instead")


def test_on_windows_the_check_imports_and_names_a_crash_by_its_exit_status(tmp_path, monkeypatch):
    """Windows' signal module has no SIGBUS (importing the check raised AttributeError, a traceback at every
    --compile-aot start), and a crash there is an NTSTATUS exit status (0xC0000005: access violation), not a
    signal: it is a crash, kept like one."""
    import subprocess

    code = ("import signal\ndel signal.SIGBUS\nimport turbostream.engine.aot_check as check\n"
            "print(sorted(int(s) for s in check._CRASHES))")
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    import signal

    assert json.loads(listed.stdout) == sorted(int(s) for s in aot_check._CRASHES if s != signal.SIGBUS)

    def access_violation(command, **kwargs):
        return subprocess.CompletedProcess(command, 0xC0000005, "STEP loading the test package\n", "")

    monkeypatch.setattr(aot_check.subprocess, "run", access_violation)
    verdict = aot_check.check(CPU, torch.float16, tmp_path)
    assert not verdict.works
    assert verdict.detail == ("a test package crashed the process that loaded it (exception 0xc0000005 while loading "
                              "the test package)")
    assert json.loads(next(tmp_path.glob("aotinductor-check-*.json")).read_text())["works"] is False


def test_the_check_ends_with_the_process_that_started_it():
    """A server or run stopped by SIGTERM exits at once (os._exit): its check's child went on compiling for
    minutes as an orphan (while it printed nothing, no broken pipe ended it), its verdict thrown away. It now ends
    within about a second of its parent: here a child that would otherwise sleep for a minute."""
    import subprocess
    import time

    import psutil

    child_code = ("import time\nfrom turbostream.engine import aot_check\naot_check._exit_with_parent(0.1)\n"
                  "print('watching', flush=True)\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', "
                               f"{child_code!r}])"], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline() == "watching\n"  # the child got as far as watching its parent
        (child,) = psutil.Process(parent.pid).children()
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 8
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the check outlived its parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        with contextlib.suppress(psutil.Error, UnboundLocalError):
            child.kill()
