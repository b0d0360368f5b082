"""Whether AOTInductor packages load and run here, found out in a child process before `--compile-aot` uses any.

Why a child: on the H200 test machine (torch 2.11.0+cu130, g++ 13.3) every CUDA package, even a four-layer toy built
with torch's default settings, crashed the process that loaded it: a segmentation fault inside the package's own C++
start-up (the std::regex of its device-string parser), before any of our code ran
(`benchmarks/aot-probe-h200-2026-11-27.json`, `scripts/aot_probe.py`). A crash cannot be caught in the process it
happens in: a server started with `--compile-aot` would die at every start. So the engine first has a child build a
toy package with the packages' settings, load it, hand it its weights, run it and (on CUDA) replay it in a CUDA graph
as the engine does; only if all of that works are the real packages loaded in-process. Otherwise the engine says
why and builds torch.compile's ahead-of-time artifacts instead (`--aot-format dynamo`, which loads no shared
library; eager frames on the CPU).

The verdict is kept in the compile cache folder (aotinductor-check-<key>.json), keyed by what decides it: torch, Python,
the device, the C++ compiler inductor uses and the package settings. A later start reads the file. What says nothing
lasting is not kept: a check cut short by its time limit, a child killed from outside or that could not start, a GPU
out of memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..parity import relative_error
from .aot import PACKAGE_CONFIGS, AotPackages, Recorded, StalePackageError, _layout, device_name, first_line, tolerance
from .compile_cache import _with_torch

CHECK_TIMEOUT_S = 900.0  # the toy took 80-90 s on the H200 machine with eight built at once; ~20 s on a 2-core CPU
# Signals a broken loader dies of; SIGKILL, SIGTERM or SIGINT come from outside (the OOM killer, a stop) and say
# nothing lasting about torch.
# (Windows has no SIGBUS, and its crashes are exit statuses instead: NTSTATUS error codes, 0xC0000000 and up.)
_CRASHES = {sig for name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGABRT", "SIGFPE")
            if (sig := getattr(signal, name, None)) is not None}
_NTSTATUS_ERROR = 0xC0000000
PARENT_ENV = "TURBOSTREAM_AOT_CHECK_PARENT"  # the child's parent process id, set by _run_child
_LOCK = threading.Lock()  # engines of several GPUs warming up at once: one check at a time, the rest read its file


@dataclass(frozen=True)
class LoaderVerdict:
    works: bool
    detail: str  # what happened: "loads, runs and replays in a CUDA graph" or where and how it failed
    cached: bool = False  # read from the compile cache folder, no child run
    seconds: float = 0.0
    kept: bool = False  # in the compile cache folder (read from it, or written there), for the next start


def toy_network(device: torch.device | str, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """What the UNet is made of, small: channels_last convs, a GroupNorm, a Linear, a 4-element bias; and inputs."""

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 32, 3, padding=1)
            self.norm = torch.nn.GroupNorm(8, 32)
            self.proj = torch.nn.Linear(32, 32)
            self.out = torch.nn.Conv2d(32, 4, 3, padding=1)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            h = torch.nn.functional.silu(self.norm(self.conv(x)))
            h = h + self.proj(h.mean((2, 3)) + t[:, None]).reshape(x.shape[0], 32, 1, 1)
            return self.out(h)

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = Toy()
    net = net.to(device, dtype).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 4, 32, 32, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    t = torch.full((2,), 0.5, device=device, dtype=dtype)
    return net, (x, t)


def loader_key(device: torch.device) -> dict:
    """What decides whether packages load (torch's version is added by _with_torch): Python, the device, inductor's C++
    compiler, the package settings."""
    return {"python": sys.version.split()[0], "device": device_name(device),
            "compiler": _compiler(), "configs": PACKAGE_CONFIGS}


def _compiler() -> str:
    """The C++ compiler inductor builds packages with, as its --version names it (or why there is none)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        cxx = get_cpp_compiler()
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return f"{cxx}: {out.stdout.strip().splitlines()[0] if out.stdout.strip() else '?'}"
    except Exception as exc:  # noqa: BLE001 - no compiler: the child fails to build, and says so
        return f"none ({type(exc).__name__}: {exc})"


def check(device: torch.device, dtype: torch.dtype, folder: Path | None, *,
          timeout: float = CHECK_TIMEOUT_S) -> LoaderVerdict:
    """The verdict for this environment: from `folder` (the compile cache's) when it holds one, else a child's run."""
    key, digest = _with_torch(loader_key(device))  # the compile cache's digest (torch's version is in the key)
    path = folder / f"aotinductor-check-{digest}.json" if folder is not None else None
    with _LOCK:
        if path is not None:
            try:
                kept = json.loads(path.read_text())
                if kept.get("key") == key:
                    return LoaderVerdict(bool(kept["works"]), str(kept["detail"]), cached=True, kept=True)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # none yet, or unreadable: check again
        verdict, keep = _run_child(device, dtype, timeout)
        if path is not None and keep:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"key": key, "works": verdict.works, "detail": verdict.detail,
                                           "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
                os.replace(tmp, path)
                verdict = dataclasses.replace(verdict, kept=True)
            except OSError:
                pass  # an unwritable cache folder: the next start checks again
        return verdict


def child_command(device: torch.device, dtype: torch.dtype) -> list[str]:
    return [sys.executable, "-m", "turbostream.engine.aot_check", "--device", str(device),
            "--dtype", str(dtype).removeprefix("torch.")]


def _run_child(device: torch.device, dtype: torch.dtype, timeout: float) -> tuple[LoaderVerdict, bool]:
    """(verdict, whether to keep it): a time-out is not kept, it may say more about a busy machine than about torch."""
    t0 = time.perf_counter()
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the turbostream package, for the child
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
           "PYTHONFAULTHANDLER": "1", PARENT_ENV: str(os.getpid())}
    try:
        proc = subprocess.run(child_command(device, dtype), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return LoaderVerdict(False, f"the check did not finish in {timeout:.0f} s (while {_last_step(out)})",
                             seconds=time.perf_counter() - t0), False
    seconds = time.perf_counter() - t0
    result = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode in (0, 1) and result:  # 1: the child ran to its verdict, which is no
        verdict = json.loads(result[-1])
        return (LoaderVerdict(bool(verdict["works"]), str(verdict["detail"]), seconds=seconds),
                verdict.get("lasting", True))
    step = _last_step(proc.stdout)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        if -proc.returncode not in _CRASHES:  # killed from outside (out of memory, a stop): nothing lasting
            return LoaderVerdict(False, f"the check was stopped by {name} while {step}", seconds=seconds), False
        detail = f"a test package crashed the process that loaded it ({name} while {step})"
    elif proc.returncode >= _NTSTATUS_ERROR:  # Windows: an access violation or the like, as the exit status
        detail = f"a test package crashed the process that loaded it (exception {proc.returncode:#x} while {step})"
    else:
        last = next((line.strip() for line in reversed(proc.stderr.splitlines()) if line.strip()), "")
        detail = f"a test package failed while {step} (exit {proc.returncode}: {last[:300]})"
        if step == "starting":  # the child died before its first step (an import): nothing learnt about packages
            return LoaderVerdict(False, f"the check could not start (exit {proc.returncode}: {last[:300]})",
                                 seconds=seconds), False
    return LoaderVerdict(False, detail, seconds=seconds), True


def _last_step(stdout: str) -> str:
    steps = [line[len("STEP "):] for line in stdout.splitlines() if line.startswith("STEP ")]
    return steps[-1] if steps else "starting"


_CURRENT = ["starting"]  # the child's step, for its own error message


def _step(what: str) -> None:
    _CURRENT[0] = what
    print(f"STEP {what}", flush=True)  # the parent reads the last one back when this process dies


def _child(device: torch.device, dtype: torch.dtype) -> dict:
    """Build, load (weights handed over), check and (CUDA) graph-replay a toy package through the engine's own code
    (AotPackages: the same export, settings, loading and check as every real package); what worked, or what did not.
    """
    net, inputs = toy_network(device, dtype)
    with torch.no_grad():
        rec = Recorded(inputs, (net(*inputs),))
    layouts, batch = tuple(_layout(x) for x in inputs), inputs[0].shape[0]
    with tempfile.TemporaryDirectory(prefix="turbostream-aot-check-") as tmp:
        packages = AotPackages(Path(tmp), device=device, dtype=dtype, dynamic=False)
        path = Path(tmp) / "toy.pt2"
        _step("building a test package")
        packages._build(path, net, rec, batch, batch, layouts)
        _step("loading the test package")  # and handing it its weights
        runner = packages._load(path, net, batch, batch, layouts)
        _step("running the test package")
        try:
            packages._check(runner, rec, "a test package")
        except StalePackageError as exc:
            return {"works": False, "detail": str(exc)}  # "a test package is ... away from the network ..."
        if device.type != "cuda":
            return {"works": True, "detail": "a test package loads and runs"}
        _step("capturing the test package in a CUDA graph")
        static = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                runner(*static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = runner(*static)
        _step("replaying the CUDA graph")
        graph.replay()
        torch.cuda.synchronize(device)
        error = relative_error(out, rec.outputs[0])
        if not error <= tolerance(dtype):
            return {"works": False,
                    "detail": f"a test package replayed in a CUDA graph computed something else ({error:.2g})"}
        return {"works": True, "detail": f"a test package loads, runs and replays in a CUDA graph (relative error "
                                         f"{error:.1e})"}


def _exit_with_parent(every_s: float = 1.0) -> None:
    """End this check once the process that started it is gone: a server or run stopped by SIGTERM exits at once,
    and its check (minutes of compiling) went on building as an orphan, its verdict thrown away."""
    parent = int(os.environ.get(PARENT_ENV) or os.getppid())  # as started: the parent may be gone already

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:  # adopted by init (or a subreaper): the parent has exited
                os._exit(3)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check, in this process, that AOTInductor packages load and run "
                                 "(exit status 0 if they do, 1 if not; a crash is the answer too).")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = ap.parse_args(argv)
    _exit_with_parent()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    try:
        result = _child(device, getattr(torch, args.dtype))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as the verdict, with the step it failed in
        result = {"works": False, "detail": f"a test package failed while {_CURRENT[0]} ({type(exc).__name__}: "
                                            f"{first_line(exc)[:300]})",
                  # a full GPU (another process on it) is a passing state of the machine, not of torch: not kept
                  "lasting": not isinstance(exc, torch.OutOfMemoryError)}
    print(f"RESULT {json.dumps(result)}", flush=True)
    return 0 if result["works"] else 1


if __name__ == "__main__":
    sys.exit(main())
