"""Ahead-of-time compiled networks (`--compile-aot`): the UNet and TAESD built once by torch.export and AOTInductor
into packages on disk, and loaded at every later start without tracing or compiling anything.

Why: `--compile` keeps inductor's output in the compile cache (compile_cache.py), but every start still runs dynamo
over the UNet's Python again to find its graph and check its guards: about 36 s for buckets 1, 2, 4, 8 on this
project's CPU before a single kernel is loaded (`scripts/compile_buckets.py --trace-only`). An AOTInductor package
(.pt2) is the compiled graph as a shared library; loading it is a file read and a dlopen.

What a package holds and what it does not:
- code only: its weights are the live module's, handed to it at load (user-managed constants, no copy), so a
  package follows the weights it is loaded with; `always_keep_tensor_constants` keeps inductor from inlining small
  weights (SD-Turbo's 4-element conv_out bias) into the code, where they would not follow;
- static shapes: one package per network and bucket, or (compile_dynamic) one for batch 1 and one with a symbolic
  batch size for every larger bucket, the two compiles `--compile-dynamic` makes with torch.compile too;
- the memory layout of each input as the eager path gives it (recorded in one eager frame per bucket); AotCall makes
  an input of another layout contiguous in that one first, since compiled code assumes the strides it was built for.

Every package is checked against the eager network on the recorded inputs when it is loaded: one that does not
match (stale, built from a changed model folder, corrupt) is rebuilt with a warning, never used. Packages are run
single-threaded (no event queries or syncs of AOTInductor's own between calls), so the CUDA graphs captured after
can hold their launches.

The second format, `--aot-format dynamo` (DynamoArtifacts): torch.compile's own ahead-of-time compile
(`torch.compile(fullgraph=True).aot_compile`, `torch.compiler.load_compiled_function`), one artifact per network and
bucket like the packages. It keeps what dynamo traced and inductor generated as a Python callable: a later start
loads it and runs no dynamo either, but no C++ shared library of AOTInductor's is loaded (on some machines that load
crashes the process: aot_check.py). Its kernels come back through the compile cache file (compile_cache.py), as
--compile's do. Unlike a package, an artifact keeps the CUDA device index inductor wrote into its code, so its folder
and file are keyed by the index too (compile_cache.device_key); a package is handed the index when it is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..parity import relative_error
from .compile_cache import sweep_stale_temporaries

log = logging.getLogger("turbostream.engine")

# Inductor settings of every package: weights left out of the package and handed over at load, none inlined.
PACKAGE_CONFIGS = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}
# --compile-mode -> inductor settings (the cudagraph modes are refused before this: config.check_compile_mode).
MODE_CONFIGS = {"default": {}, "max-autotune-no-cudagraphs": {"max_autotune": True}}


_BUILD_LOCK = threading.Lock()
# torch.export's own pytree code warns of a deprecated check of its own at every export (torch 2.13), into the
# server's log: nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


class StalePackageError(RuntimeError):
    """A package on disk that cannot serve these modules (unreadable, other weights' names, other results)."""


class UNetEps(torch.nn.Module):
    """The UNet as one tensor function for export: (latents, timesteps (b,), embeddings) -> eps."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=emb, return_dict=False)[0]


class _ReuseForward(torch.nn.Module):
    """One of a reuse.FeatureReuse's forwards as a module, its UNet a submodule (so its weights are this module's)."""

    def __init__(self, reuse) -> None:
        super().__init__()
        self.reuse, self.unet = reuse, reuse.unet


class ReuseFull(_ReuseForward):
    """Temporal feature reuse's full forward for export: (latents, t, emb) -> (eps, deep features)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, emb: torch.Tensor):
        return self.reuse.full_and_deep(sample, timestep, emb)


class ReusePartial(_ReuseForward):
    """Temporal feature reuse's partial forward for export: (latents, t, emb, deep features) -> eps."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, emb: torch.Tensor,
                deep: torch.Tensor) -> torch.Tensor:
        return self.reuse.partial(sample, timestep, emb, deep)


@dataclass
class Recorded:
    """A network's first call in an eager frame: its tensor inputs (as export takes them) and its outputs."""

    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


@contextlib.contextmanager
def record_calls(networks: dict[str, torch.nn.Module]) -> Iterator[dict[str, Recorded]]:
    """Within the block, each network's first call is recorded (clones) under its name; "unet" as UNetEps takes it."""
    recorded: dict[str, Recorded] = {}

    def hook(name: str):
        def record(module, args, kwargs, output) -> None:
            if name in recorded:
                return
            if name == "unet":
                inputs = (args[0], args[1], kwargs["encoder_hidden_states"])
                output = output[0]
            else:
                inputs = tuple(args)
            outputs = tuple(output) if isinstance(output, (tuple, list)) else (output,)
            recorded[name] = Recorded(tuple(x.detach().clone() for x in inputs),
                                      tuple(x.detach().clone() for x in outputs))
        return record

    handles = [module.register_forward_hook(hook(name), with_kwargs=True) for name, module in networks.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format an input is in (channels_last only for 4-D tensors that are not also plain contiguous)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _plain(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """A normal (not inference-mode) copy of x in `layout`, for torch.export."""
    with torch.inference_mode(False):
        return torch.empty_like(x, memory_format=layout).copy_(x)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's run to pages), or "" if it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def new_file_mode(folder: Path) -> int:
    """The mode a file created in `folder` gets (0o666 less the umask), found without setting the umask (which is the
    whole process's: engines warm up on other threads)."""
    probe = folder / f".mode-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(probe, "xb"):
            pass
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink(missing_ok=True)


def tolerance(dtype: torch.dtype) -> float:
    """How far a compiled network may be from the eager one: rounding differs (fused kernels), the math does not."""
    return 1e-3 if dtype == torch.float32 else 3e-2


class Runner:
    """One loaded package: the batch sizes it serves and its inputs' layouts."""

    def __init__(self, package, lo: int, hi: int, layouts: tuple[torch.memory_format, ...]) -> None:
        self.package, self.lo, self.hi, self.layouts = package, lo, hi, layouts

    def __call__(self, *inputs: torch.Tensor):
        """The package's output: one tensor, or a tuple where the network returns several."""
        # Compiled code indexes its inputs with the strides it was built for: an input in another layout (the
        # encoder's latents may come either way) is copied into that one first; in the usual case nothing is copied.
        inputs = tuple(x if x.is_contiguous(memory_format=f) else x.contiguous(memory_format=f)
                       for x, f in zip(inputs, self.layouts, strict=True))
        out = self.package(*inputs)
        if isinstance(out, (list, tuple)):
            return out[0] if len(out) == 1 else tuple(out)
        return out


class AotCall:
    """A network called the way FrameMath calls it, through the package that serves the batch size, or through
    `module` (the exported one, eagerly) for a batch size no package serves.

    kind says how FrameMath calls it: "plain" (tensors in, a tensor out: TAESD), "unet" (diffusers' signature, a
    1-tuple back), "full" (reuse's full forward: deep features written to deep_out) or "partial" (deep_in read).
    """

    def __init__(self, name: str, runners: list[Runner], module: Callable, kind: str = "plain") -> None:
        if kind not in ("plain", "unet", "full", "partial"):
            raise ValueError(f"unknown kind {kind!r}")
        self.name, self.runners, self.module, self.kind = name, runners, module, kind

    def runner(self, batch: int) -> Runner | None:
        return next((r for r in self.runners if r.lo <= batch <= r.hi), None)

    def __call__(self, *args, **kwargs):
        if self.kind == "unet":
            inputs = (args[0], args[1], kwargs["encoder_hidden_states"])
        elif self.kind == "partial":
            inputs = (*args, kwargs["deep_in"])
        else:  # plain, and full: deep_out is written below, not an input
            inputs = args
        run = self.runner(inputs[0].shape[0]) or self.module  # the CPU path runs batch sizes no package serves
        out = run(*inputs)
        if self.kind == "unet":
            return (out,)
        if self.kind == "full":
            eps, deep = out
            kwargs["deep_out"].copy_(deep)
            return eps
        return out


def device_name(device: torch.device) -> str:
    """What compiled code depends on besides torch: the GPU's name, or the CPU's model (its vector instructions)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return "cpu: " + (platform.processor() or platform.machine())


class AotPackages:
    """Build or load the packages of a set of networks, one folder per configuration.

    folder None: nothing kept (a temporary folder, removed once the packages are loaded). read_only: the folder's
    packages are loaded, and those that must be built (missing, stale) go to such a temporary folder instead, for
    this start only (a read-only volume that `turbostream warmup` filled).
    """

    label = "AOTInductor"  # what the log calls these artifacts
    suffix = ".pt2"
    format_configs = PACKAGE_CONFIGS  # inductor settings of this format, under the compile mode's

    def __init__(self, folder: Path | None, *, device: torch.device, dtype: torch.dtype, dynamic: bool,
                 mode: str = "default", read_only: bool = False) -> None:
        self.folder, self.device, self.dtype, self.dynamic = folder, device, dtype, dynamic
        self.read_only = read_only and folder is not None
        self.inductor_configs = {**self.format_configs, **MODE_CONFIGS[mode]}
        self.built = self.loaded = 0
        self.build_s = self.load_s = 0.0
        self.expected = 0  # packages this start will prepare (for the progress log; set by the caller)

    def plan(self, buckets: tuple[int, ...]) -> list[tuple[str, int, int, int]]:
        """(tag, lo, hi, example bucket) per package: one per bucket, or batch 1 and a symbolic batch above it."""
        if not self.dynamic or len(buckets) == 1:
            return [(f"b{b}", b, b, b) for b in buckets]
        plan = [("b1", 1, 1, 1)] if buckets[0] == 1 else []
        rest = [b for b in buckets if b > 1]
        # Export needs an example batch of 2 or more for a symbolic size (1 would be specialized).
        return [*plan, (f"b{rest[0]}-{rest[-1]}", 2 if buckets[0] == 1 else rest[0], rest[-1], rest[-1])]

    def prepare(self, name: str, module: torch.nn.Module, recorded: dict[int, Recorded],
                buckets: tuple[int, ...], kind: str = "plain") -> AotCall:
        """An AotCall of `module` (UNetEps, ReuseFull, ReusePartial or a TAESD half) with a package for every bucket:
        loaded, or built first. recorded: the module's inputs and outputs per bucket (record_calls)."""
        runners = []
        with contextlib.ExitStack() as stack:
            folder = build_in = self.folder  # where packages are loaded from, and built into
            if folder is None or self.read_only:
                build_in = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="turbostream-aot-")))
                folder = folder or build_in
            else:
                folder.mkdir(parents=True, exist_ok=True)
                sweep_stale_temporaries(folder)
            for tag, lo, hi, example in self.plan(buckets):
                file = f"{name}-{tag}{self.suffix}"
                runners.append(self._runner(folder / file, build_in / file, module, recorded[example], lo, hi,
                                            f"{name} batch {tag[1:]}"))
        return AotCall(name, runners, module, kind)

    def _runner(self, path: Path, build: Path, module: torch.nn.Module, rec: Recorded, lo: int, hi: int,
                what: str) -> Runner:
        # One package at a time in this process: torch.export and inductor keep global state (config patches, trace
        # contexts) that two threads building at once would share, as the engines of `serve --device cuda:0,cuda:1`
        # warm up at once. The one that waited then finds the package the other built and loads it.
        with _BUILD_LOCK:
            return self._load_or_build(path, build, module, rec, lo, hi, what)

    def _load_or_build(self, path: Path, build: Path, module: torch.nn.Module, rec: Recorded, lo: int, hi: int,
                       what: str) -> Runner:
        """The package at `path`, loaded and checked; or, if there is none that fits, built at `build` (the same
        path, or one in a temporary folder where `path`'s cannot be written) and loaded from there."""
        layouts = tuple(_layout(x) for x in rec.inputs)
        if path.is_file():
            t0 = time.perf_counter()
            try:
                runner = self._load(path, module, lo, hi, layouts)
                self._check(runner, rec, what)
            except StalePackageError as exc:
                log.warning("compile cache: ignoring %s (%s); building it again%s", path, exc,
                            "" if build == path else " for this start only (its folder cannot be written)")
            else:
                self.loaded += 1
                self.load_s += time.perf_counter() - t0
                log.info("%s: %s loaded from %s in %.2f s", self.label, what, path, time.perf_counter() - t0)
                return runner
        t0 = time.perf_counter()
        done = self.built + self.loaded
        log.info("%s: building %s (package %d of %s; minutes on a first start)...", self.label, what, done + 1,
                 self.expected or "?")
        self._build(build, module, rec, lo, hi, layouts)
        runner = self._load(build, module, lo, hi, layouts)
        try:
            self._check(runner, rec, what)
        except StalePackageError as exc:  # built from these very modules: a compiler problem, not a stale file
            build.unlink(missing_ok=True)
            raise RuntimeError(f"{self.label}'s {what} does not match the eager network ({exc}); start with "
                               "--compile instead of --compile-aot") from None
        self.built += 1
        self.build_s += time.perf_counter() - t0
        log.info("%s: %s built in %.1f s (%s)", self.label, what, time.perf_counter() - t0, build)
        return runner

    def _build(self, path: Path, module: torch.nn.Module, rec: Recorded, lo: int, hi: int,
               layouts: tuple[torch.memory_format, ...]) -> None:
        """torch.export the module on the recorded inputs and compile it into `path` (written whole or not at all)."""
        import torch._inductor
        from torch.export import Dim

        inputs = tuple(_plain(x, f) for x, f in zip(rec.inputs, layouts, strict=True))
        dynamic_shapes = None
        if lo != hi:
            batch = Dim("batch", min=lo, max=hi)
            dynamic_shapes = tuple({0: batch} for _ in inputs)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
        step = "torch.export"
        try:
            with torch.inference_mode(False), torch.no_grad():
                program = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
                step = "AOTInductor"
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                         inductor_configs=self.inductor_configs)
            os.replace(tmp, path)
        except Exception as exc:  # a model this torch cannot export or compile: say which, and the way on
            raise RuntimeError(f"{step} could not build {path.stem} ({type(exc).__name__}: "
                               f"{first_line(exc)[:300]}); start with --compile instead of --compile-aot") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _load(self, path: Path, module: torch.nn.Module, lo: int, hi: int,
              layouts: tuple[torch.memory_format, ...]) -> Runner:
        """Load a package and hand it the module's weights (shared, not copied); StalePackageError if it cannot."""
        import torch._inductor

        where = {"device_index": self.device.index} if self.device.type == "cuda" and self.device.index else {}
        try:
            package = torch._inductor.aoti_load_package(str(path), run_single_threaded=True, **where)
            names = set(package.get_constant_fqns())
        except Exception as exc:  # noqa: BLE001 - truncated, corrupt, another torch's format: rebuild
            raise StalePackageError(f"{type(exc).__name__}: {first_line(exc)}") from None
        weights = {**dict(module.named_buffers()), **module.state_dict()}
        missing = sorted(names - weights.keys())
        if missing:
            raise StalePackageError(f"built for other weights: {len(missing)} not in this model, e.g. {missing[0]}")
        try:
            package.load_constants({k: weights[k] for k in names}, check_full_update=True, user_managed=True)
        except Exception as exc:  # noqa: BLE001 - a shape or dtype that differs
            raise StalePackageError(f"its weights do not fit this model: {exc}") from None
        return Runner(package, lo, hi, layouts)

    def _check(self, runner: Runner, rec: Recorded, what: str) -> None:
        """The package's output on the recorded inputs against the eager network's; StalePackageError if apart."""
        try:
            with torch.inference_mode():
                out = runner(*rec.inputs)
        except Exception as exc:  # noqa: BLE001 - built for another network of this name (shapes differ)
            raise StalePackageError(f"{what} does not run on the network's inputs ({type(exc).__name__}: "
                                    f"{first_line(exc)[:200]})") from None
        outs = out if isinstance(out, tuple) else (out,)
        if [o.shape for o in outs] != [r.shape for r in rec.outputs]:
            raise StalePackageError(f"{what} gives shapes {[tuple(o.shape) for o in outs]}, the network "
                                    f"{[tuple(r.shape) for r in rec.outputs]}")
        for o, r in zip(outs, rec.outputs):
            error = relative_error(o, r)
            if not error <= tolerance(self.dtype):  # also catches NaN
                raise StalePackageError(f"{what} is {error:.3g} away from the network (relative; at most "
                                        f"{tolerance(self.dtype):g} allowed)")


class DynamoArtifacts(AotPackages):
    """`--aot-format dynamo`: each network and bucket as torch.compile's ahead-of-time artifact instead of an
    AOTInductor package (same plan, files, check against the eager network and rebuild of what is stale).

    The artifact is the module's forward traced whole by dynamo and compiled by inductor; it reads the weights from
    the live module at every call (the module is handed back at load as external data), so like a package it
    follows the weights it is loaded with. It is called without dynamo's guards: AotCall picks the artifact by batch
    size and Runner gives each input the layout it was built for, which is all the guards would check here.
    """

    label = "torch.compile AOT"
    suffix = ".dynamo"
    format_configs: dict = {}  # PACKAGE_CONFIGS are AOTInductor's (weights left out of its shared library)

    def _build(self, path: Path, module: torch.nn.Module, rec: Recorded, lo: int, hi: int,
               layouts: tuple[torch.memory_format, ...]) -> None:
        """Trace and compile module.forward on the recorded inputs, and write the artifact to `path` (whole or not
        at all)."""
        import torch._dynamo

        # The guards are not kept (see the class): dynamo's default keeps some that cannot be written to a file.
        options = {**self.inductor_configs, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{self.suffix}")
        try:
            # Traced as the engine calls it: in inference mode, on inputs in the recorded layouts.
            with torch._dynamo.config.patch(enable_aot_compile=True), torch.inference_mode():
                inputs = tuple(torch.empty_like(x, memory_format=f).copy_(x)
                               for x, f in zip(rec.inputs, layouts, strict=True))
                if lo != hi:
                    for x in inputs:
                        torch._dynamo.mark_dynamic(x, 0, min=lo, max=hi)
                compiled = torch.compile(module.forward, fullgraph=True, dynamic=None if lo != hi else False,
                                         options=options).aot_compile((inputs, {}))
                compiled.save_compiled_function(str(tmp), external_data={"module": module})
            # torch writes it through a temporary file of mode 0600: give it the umask's, as every other file of the
            # cache has, so a server running as another user than `turbostream warmup` (root in a Dockerfile) can
            # read it.
            os.chmod(tmp, new_file_mode(tmp.parent))
            os.replace(tmp, path)
        except Exception as exc:  # a model dynamo cannot trace whole, or torch without this API
            raise RuntimeError(f"torch.compile's ahead-of-time compile could not build {path.stem} "
                               f"({type(exc).__name__}: {first_line(exc)[:300]}); start with --compile instead "
                               "of --compile-aot") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _load(self, path: Path, module: torch.nn.Module, lo: int, hi: int,
              layouts: tuple[torch.memory_format, ...]) -> Runner:
        """Load an artifact onto the module; StalePackageError if it cannot be (unreadable, another torch's)."""
        import sys

        import torch._dynamo

        # The module that defined forward: the globals the traced code may read.
        scope = vars(sys.modules[type(module).forward.__module__])
        try:
            with torch._dynamo.config.patch(enable_aot_compile=True), path.open("rb") as f:
                compiled = torch.compiler.load_compiled_function(f, f_globals=scope, external_data={"module": module})
            compiled.disable_guard_check()
        except Exception as exc:  # noqa: BLE001 - truncated, corrupt, another torch's or machine's: rebuild
            raise StalePackageError(f"{type(exc).__name__}: {first_line(exc)}") from None
        return Runner(functools.partial(compiled, module), lo, hi, layouts)
