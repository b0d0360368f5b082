#!/usr/bin/env python3
"""Which AOTInductor settings load and run on this machine's GPU: each variant in a process of its own (a crash in
one is a result, not the end of the probe), on a toy network and on the engine (tiny-random, --compile-aot).

Why: on the H200 test machine (torch 2.11.0+cu130, g++ 13.3, 2026-11-27) every package crashed the process that
loaded it, the engine's and a toy built with torch's default settings alike, in the building process or a fresh one
(`benchmarks/aot-probe-h200-2026-11-27.json`: the first eight variants below). cuda-gdb put the crash in the package's
own std::regex, a libstdc++ call landing in unrelated code. The later variants try what could explain or fix that:
g++'s libstdc++ preloaded, the package linked -Bsymbolic or with its inline functions hidden, no precompiled header,
and one that logs inductor's compiler command lines and describes the package's shared library (is libstdc++ linked
into it?). Each child records which libstdc++ files its process has mapped. The JSON says for each variant how far it
got (built, loaded, weights handed over, ran, its largest difference from eager), its exit status (-11: SIGSEGV) and
its log's tail. Each variant gets kernel caches of its own.

    python scripts/aot_probe.py --json probe.json                 # every variant, on cuda (about two minutes)
    python scripts/aot_probe.py --device cpu --variants toy-current   # a dry run of the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

CURRENT = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}
# name -> (network, inductor configs, run_single_threaded, load in a fresh process[, extra environment])
VARIANTS = {
    "toy-current": ("toy", CURRENT, True, False),
    "toy-weights-in-package": ("toy", {"always_keep_tensor_constants": True}, True, False),
    "toy-threaded": ("toy", CURRENT, False, False),
    "toy-no-keep-constants": ("toy", {"aot_inductor.package_constants_in_so": False}, True, False),
    "toy-current-fresh-process": ("toy", CURRENT, True, True),
    "engine-current": ("engine", CURRENT, True, False),
    "engine-weights-in-package": ("engine", {"always_keep_tensor_constants": True}, True, False),
    "engine-threaded": ("engine", CURRENT, False, False),
    # The H200 crash (2026-11-27) was in the package's std::regex, a locale facet call landing in the wrong code: a
    # C++ runtime the package was not built against. This loads g++'s own libstdc++ before anything else.
    "toy-gxx-libstdcxx-preloaded": ("toy", CURRENT, True, False, {"LD_PRELOAD": "gxx-libstdc++"}),
    # The compiler as inductor runs it: every command line logged (are libstdc++ or libgcc linked statically?), and
    # the package's shared library described after the build (what it needs, whether it holds libstdc++'s own code).
    "toy-compiler-logged": ("toy", CURRENT, True, False, {"CXX": "cxx:"}),
    # Suspect: the package's calls into the C++ templates it instantiated (std::regex) bind to other copies in the
    # process (libtorch's exports them, built by another GCC). -Bsymbolic binds them to the package's own copies;
    # -fvisibility-inlines-hidden keeps those copies out of the dynamic symbol table altogether.
    "toy-linked-bsymbolic": ("toy", CURRENT, True, False, {"CXX": "cxx:-Wl,-Bsymbolic"}),
    "toy-inlines-hidden": ("toy", CURRENT, True, False, {"CXX": "cxx:-fvisibility-inlines-hidden"}),
    "toy-no-precompiled-headers": ("toy", {**CURRENT, "aot_inductor.precompile_headers": False}, True, False),
    "engine-check": ("check", CURRENT, True, False),
}


def mark(step: str, **extra) -> None:
    """One progress line the parent reads back (the last one says how far a crashed child got)."""
    print("PROBE " + json.dumps({"step": step, **extra}), flush=True)


def _mapped(name: str) -> list[str]:
    """The files named like `name` this process has mapped (which C++ runtime torch brought in, and from where)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    return sorted({line.split()[-1] for line in lines if name in line.split()[-1]})


def child(variant: str, device: str, folder: Path) -> None:
    import torch
    import torch._inductor

    network, configs, single, fresh = VARIANTS[variant][:4]
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    mark("start", torch=torch.__version__, libstdcxx=_mapped("libstdc++"))
    if network == "check":  # the engine's own guard (engine/aot_check.py): its verdict, from a child of its own
        from turbostream.engine import aot_check

        verdict = aot_check.check(torch.device(device), dtype, None)
        mark("ran" if verdict.works else "check says no", works=verdict.works, detail=verdict.detail)
        return
    if network == "toy":
        from turbostream.engine.aot_check import toy_network

        net, inputs = toy_network(device, dtype)
        path = folder / "toy.pt2"
        with torch.no_grad():
            expected = net(*inputs)
            if not path.exists():
                program = torch.export.export(net, inputs, strict=False)
                torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
                mark("built", **_describe_package(path))
            if fresh and os.environ.get("PROBE_PHASE") != "load":
                return
            package = torch._inductor.aoti_load_package(str(path), run_single_threaded=single)
            mark("loaded")
            if configs.get("aot_inductor.package_constants_in_so", True) is False or not fresh:
                weights = {**dict(net.named_buffers()), **net.state_dict()}
                package.load_constants({k: weights[k] for k in package.get_constant_fqns()}, check_full_update=True,
                                       user_managed=True)
                mark("weights handed over")
            got = package(*inputs)
            got = got[0] if isinstance(got, (list, tuple)) else got
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            mark("ran", max_abs_diff=float((got.float() - expected.float()).abs().max()))
        return
    # The engine's own path: tiny-random, graphs, the packages of bucket 1 built and loaded by engine/aot.py.
    import numpy as np

    from turbostream.config import StreamParams, preset
    from turbostream.engine import Engine, aot, aot_check
    from turbostream.models import load_components

    aot.PACKAGE_CONFIGS = configs
    # These variants test the loading itself, in this process: the engine's own check (a child, engine-check) is
    # skipped, or a crashing loader would make the engine compile without packages and the variant test nothing.
    aot_check.check = lambda *args, **kwargs: aot_check.LoaderVerdict(True, "skipped by scripts/aot_probe.py")
    if not single:
        real = torch._inductor.aoti_load_package
        torch._inductor.aoti_load_package = lambda p, **kw: real(p, **{**kw, "run_single_threaded": False})
    comps = load_components("tiny-random", device=device, vae="tiny")
    base = preset("test", device=device, width=128, height=128, buckets=(1,), compile_cache=str(folder))
    frame = [np.random.default_rng(5).integers(0, 256, (128, 128, 3), dtype=np.uint8)]
    params = [StreamParams("a", seed=1)]
    plain = Engine(base, comps)
    plain.warmup()
    expected = plain.run(frame, params)[0]
    mark("plain engine ran")
    import dataclasses

    engine = Engine(dataclasses.replace(base, compile=True, compile_aot=True), comps)
    engine.warmup()
    mark("packages built and loaded", built=engine.stats.aot_packages_built, loaded=engine.stats.aot_packages_loaded)
    got = engine.run(frame, params)[0]
    mark("ran", max_abs_diff=int(np.abs(got.astype(np.int16) - expected.astype(np.int16)).max()))


def _describe_package(path: Path) -> dict:
    """What the package's shared library needs and whether it holds libstdc++'s own code (static linking)."""
    import zipfile

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(".so")]
        if not names:
            return {"so": None}
        so = archive.extract(names[0], tmp)
        facts: dict = {"so": names[0].rsplit("/", 1)[-1], "so_bytes": os.path.getsize(so)}
        for key, cmd in (("needed", ["readelf", "-d", so]), ("symbols", ["nm", "-D", "-C", "--defined-only", so]),
                         ("all_symbols", ["nm", "-C", "--defined-only", so])):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
            except (OSError, subprocess.SubprocessError) as exc:
                facts[key] = f"{type(exc).__name__}: {exc}"
                continue
            if key == "needed":
                facts["needed"] = [line.split("[")[-1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
            elif key == "all_symbols":  # the static table too: local code (libstdc++ linked in) shows only here
                facts["all_defined_symbols"] = len(out.splitlines())
                facts["all_codecvt"] = sum("codecvt" in line for line in out.splitlines())
            else:
                lines = out.splitlines()
                facts["defined_symbols"] = len(lines)
                facts["defines_codecvt"] = sum("codecvt" in line for line in lines)
                facts["defines_regex"] = sum("regex" in line for line in lines)
                facts["defines_locale"] = sum("std::locale" in line for line in lines)
    return facts


def _compiler_wrapper(folder: str, flags: str) -> str:
    """A compiler command for inductor (CXX) that logs each command line and runs g++ with `flags` added: linker
    flags (-Wl,...) to the commands that link a shared library only (a precompiled header's command must not link).

    It is named g++ (in a folder of its own): inductor tells the compiler by its name (cpp_builder._is_gcc), and a
    wrapper named otherwise got neither g++'s flags nor its precompiled-header name (.gch; g++ ignores a .pch)."""
    log = Path(folder) / "cxx-commands.log"
    (Path(folder) / "bin").mkdir(exist_ok=True)
    script = Path(folder) / "bin" / "g++"
    real = subprocess.run(["sh", "-c", "command -v g++"], capture_output=True, text=True).stdout.strip() or "g++"
    link = " ".join(f for f in flags.split() if f.startswith("-Wl,"))
    compile_ = " ".join(f for f in flags.split() if not f.startswith("-Wl,"))
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\ncase " $* " in *" -shared "*) exec "{real}" "$@" {link} '
                      f'{compile_} ;; esac\nexec "{real}" "$@" {compile_}\n')
    script.chmod(0o755)
    return str(script)


def _gxx_libstdcxx() -> str:
    """The libstdc++ that g++ (inductor's compiler) links packages against."""
    try:
        out = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, timeout=30)
        return os.path.realpath(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return ""


def run_variant(variant: str, device: str, timeout: float) -> dict:
    t0 = time.monotonic()
    result: dict = {"variant": variant, "configs": VARIANTS[variant][1], "run_single_threaded": VARIANTS[variant][2]}
    with tempfile.TemporaryDirectory(prefix=f"aot-probe-{variant}-") as tmp:
        phases = ["build", "load"] if VARIANTS[variant][3] else ["all"]
        steps, tails = [], []
        for phase in phases:
            # Kernel caches of its own: a variant that changes how packages are compiled must not find another's.
            env = {**os.environ, "PROBE_PHASE": phase, "PYTHONFAULTHANDLER": "1",
                   "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"),
                   "TRITON_CACHE_DIR": str(Path(tmp) / "triton")}
            for name, value in (VARIANTS[variant][4] if len(VARIANTS[variant]) > 4 else {}).items():
                env[name] = (_gxx_libstdcxx() if value == "gxx-libstdc++" else
                             _compiler_wrapper(tmp, value[4:]) if value.startswith("cxx:") else value)
            result.setdefault("environment", {k: env[k] for k in (VARIANTS[variant][4] if len(VARIANTS[variant]) > 4
                                                                   else {})})
            cmd = [sys.executable, __file__, "--child", variant, "--device", device, "--folder", tmp]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
                rc, out = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as exc:
                rc, out = "timeout", (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
                    else (exc.stdout or "")
            steps += [json.loads(line[6:]) for line in out.splitlines() if line.startswith("PROBE ")]
            tails.append(f"[{phase} exit {rc}]\n" + "\n".join(out.splitlines()[-25:]))
            result["exit_status"] = rc
            commands = Path(tmp) / "cxx-commands.log"
            if commands.exists():  # the compiler's command lines, each cut to 2,000 characters
                result["compiler_commands"] = [c[:2000] for c in commands.read_text().splitlines()]
            if rc != 0:
                break
    result.update(steps=steps, last_step=steps[-1]["step"] if steps else None, log_tail="\n".join(tails),
                  ok=result["exit_status"] == 0 and bool(steps) and steps[-1]["step"] == "ran",
                  seconds=round(time.monotonic() - t0, 1))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all)")
    ap.add_argument("--parallel", type=int, default=4, help="variants run at once (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per variant (default: %(default)s)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.device, Path(args.folder))
        return 0
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    from concurrent.futures import ThreadPoolExecutor

    results = {}
    with ThreadPoolExecutor(args.parallel) as pool:
        for res in pool.map(lambda n: run_variant(n, args.device, args.timeout), names):
            results[res["variant"]] = res
            print(f"{res['variant']}: {'ok' if res['ok'] else 'FAILED'} (exit {res['exit_status']}, last step "
                  f"{res['last_step']!r}, {res['seconds']} s) {res['steps'][-1] if res['steps'] else ''}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": args.device,
                                                       "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
