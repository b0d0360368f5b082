#!/usr/bin/env python3
"""Issue 12's candidate engine settings, side by side: one row each, same process, same inputs, same reference.

Each row builds an Engine with one setting changed (attention backend, torch.compile mode or dynamic batch size, fp8,
no /1.0 divisions; the full list is ROWS below), warms it up (warmup_s, compile_s), times batch 1 and batch 8 through
Engine.run (CUDA graphs on CUDA; median/p95 ms per call and frames/s, after a burn-in, synchronized), and holds its
output to the project's parity rule (parity.py): |E - R| against R, diffusers in fp32 on fresh components (TF32 off,
math attention), with P, diffusers in the engine's dtype, setting the limits; R and P are computed once and shared by
every row.

Every row runs inside try/except: an error is recorded in the row and the next row runs. The JSON is written before
and after every row (a row cut off by a time limit says "running"). --budget-s: no row starts after that many
seconds, nor one whose usual cost no longer fits. CUDA-only rows are recorded as skipped on the CPU, where the script
runs end to end for tests:

    python scripts/engine_rows.py --model random --device cuda --size 512 --json $OUT/engine_rows.json --profile
    python scripts/engine_rows.py --model tiny-random --device cpu --size 64 --json /tmp/rows.json   (a dry run)

--profile writes a torch.profiler Chrome trace and a top-30 table (by CUDA time; CPU time on the CPU) of the
batch-1 frame of some rows (--profile-row; default: compile_default and compile_conditioning on CUDA, baseline
elsewhere) next to the JSON, with the frame's time and kernel count by kind (GEMM, conv, attention, norm, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    options: dict  # EngineConfig fields this row changes
    what: str
    cuda_only: bool = False
    needs_s: float = 30.0  # about what the row costs on an H200 at 512x512 (compile rows: minutes); budget check
    fresh: bool = False  # changes modules for good (fp8): its own components, never the shared ones
    # torch._inductor.config settings in force while the row is built, compiled and timed (compile rows)
    inductor: dict = dataclasses.field(default_factory=dict)


MAX_AUTOTUNE = "max-autotune-no-cudagraphs"
# The inductor settings pytorch-labs' diffusion-fast and diffusers' torch.compile guide use for SD UNets: 1x1 convs
# lowered to matmuls (which inductor can tune and fuse), coordinate-descent tuning of the Triton kernels' launch
# settings, tried in every direction, and no epilogue fusion into matmul templates. Candidate rows only: no engine
# option sets them until a GPU shows a gain.
DIFFUSION_FAST = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                  "coordinate_descent_check_all_directions": True, "epilogue_fusion": False}
# Cheap rows first, so a short budget still measures most of them; the compile rows cost minutes each.
ROWS = (
    Row("baseline", {}, "CUDA graphs, PyTorch's attention choice, no /1.0 (today's default)"),
    Row("attn_flash", {"attention": "flash"}, "graphs + FlashAttention"),
    Row("attn_efficient", {"attention": "efficient"}, "graphs + memory-efficient attention", cuda_only=True),
    Row("attn_cudnn", {"attention": "cudnn"}, "graphs + cuDNN attention", cuda_only=True),
    Row("attn_math", {"attention": "math"}, "graphs + math attention"),
    Row("unit_rescale", {"skip_unit_rescale": False}, "graphs with diffusers' divisions by 1.0 (the default until "
        "2026-11-26; bit-identical)"),
    Row("frame_graph", {"frame_graph": True}, "one graph per frame of the default step count, not head + steps + "
        "tail (bit-identical)", cuda_only=True),
    Row("fused_norm", {"fused_norm": True}, "graphs + GroupNorm+SiLU in Triton kernels (rounding only)",
        cuda_only=True),
    Row("fused_epilogue", {"fused_epilogue": True}, "graphs + TAESD's conv bias, skip and ReLU in one Triton pass "
        "(rounding only)", cuda_only=True),
    Row("graphs_lean", {"fused_norm": True, "fused_epilogue": True, "skip_unit_rescale": True, "frame_graph": True},
        "graphs without wasted kernels: fused norms and epilogues, no /1.0, one graph per frame", cuda_only=True),
    Row("prompt_kv", {"prompt_kv": True}, "graphs + each prompt's cross-attention keys and values computed once, "
        "not in every UNet evaluation (rounding only)"),
    Row("lean_prompt_kv", {"fused_norm": True, "fused_epilogue": True, "skip_unit_rescale": True, "frame_graph": True,
                           "prompt_kv": True}, "graphs_lean + prompt_kv", cuda_only=True),
    Row("fused_time_proj", {"fused_time_proj": True}, "graphs + the resnets' time-embedding projections as one "
        "stacked GEMM (rounding only)"),
    Row("lean_conditioning", {"fused_norm": True, "fused_epilogue": True, "skip_unit_rescale": True,
                              "frame_graph": True, "prompt_kv": True, "fused_time_proj": True},
        "graphs_lean + prompt_kv + fused_time_proj", cuda_only=True),
    Row("fp8", {"fp8": True}, "graphs + float8 e4m3 transformer Linears (torchao)", cuda_only=True, fresh=True),
    Row("compile_default", {"compile": True}, "torch.compile (default mode) + graphs", cuda_only=True, needs_s=200),
    Row("compile_frame_graph", {"compile": True, "frame_graph": True},
        "torch.compile + one graph per frame instead of head + steps + tail", cuda_only=True, needs_s=200),
    Row("fp8_compile", {"fp8": True, "compile": True}, "fp8 + torch.compile + graphs", cuda_only=True,
        needs_s=200, fresh=True),
    Row("compile_prompt_kv", {"compile": True, "prompt_kv": True}, "torch.compile + graphs + prompt_kv",
        cuda_only=True, needs_s=200),
    Row("compile_conditioning", {"compile": True, "prompt_kv": True, "fused_time_proj": True},
        "torch.compile + graphs + prompt_kv + fused_time_proj", cuda_only=True, needs_s=200),
    Row("compile_dynamic", {"compile": True, "compile_dynamic": True}, "torch.compile with a symbolic batch size "
        "after batch 1 (two compiles for every bucket) + graphs", cuda_only=True, needs_s=150),
    Row("compile_aot", {"compile": True, "compile_aot": True}, "torch.export + AOTInductor packages (--compile-aot, "
        "what a warm start loads instead of compiling) + graphs", cuda_only=True, needs_s=200),
    Row("compile_aot_dynamo", {"compile": True, "compile_aot": True, "aot_format": "dynamo"},
        "torch.compile's ahead-of-time artifacts (--aot-format dynamo: what a warm start loads instead of tracing) "
        "+ graphs", cuda_only=True, needs_s=200),
    Row("compile_max_autotune", {"compile": True, "compile_mode": MAX_AUTOTUNE},
        "torch.compile max-autotune-no-cudagraphs + graphs", cuda_only=True, needs_s=420),
    Row("compile_tuned", {"compile": True}, "torch.compile (default mode) with diffusion-fast's inductor settings "
        "(1x1 convs as matmuls, coordinate-descent tuning, no epilogue fusion) + graphs", cuda_only=True,
        needs_s=300, inductor=DIFFUSION_FAST),
    Row("compile_max_autotune_tuned", {"compile": True, "compile_mode": MAX_AUTOTUNE},
        "torch.compile max-autotune-no-cudagraphs with diffusion-fast's inductor settings + graphs", cuda_only=True,
        needs_s=480, inductor=DIFFUSION_FAST),
    Row("temporal_reuse", {"feature_reuse": True}, "graphs + temporal feature reuse: full (keep) and partial frames",
        needs_s=45),
    Row("compile_reuse", {"compile": True, "feature_reuse": True},
        "torch.compile + graphs + temporal feature reuse (full and partial forwards compiled too)", cuda_only=True,
        needs_s=300),
    Row("temporal_reuse_l1", {"feature_reuse": True, "reuse_layers": 1},
        "graphs + temporal feature reuse whose partial frames recompute only the last up layer", needs_s=45),
    Row("lean_reuse_l1", {"fused_norm": True, "fused_epilogue": True, "skip_unit_rescale": True, "frame_graph": True,
                          "feature_reuse": True, "reuse_layers": 1},
        "graphs_lean + temporal feature reuse, partial frames recompute only the last up layer", cuda_only=True,
        needs_s=45),
    Row("compile_reuse_l1", {"compile": True, "feature_reuse": True, "reuse_layers": 1},
        "torch.compile + graphs + temporal feature reuse, partial frames recompute only the last up layer",
        cuda_only=True, needs_s=300),
    Row("compile_aot_reuse_l1", {"compile": True, "compile_aot": True, "feature_reuse": True, "reuse_layers": 1},
        "AOTInductor packages + graphs + temporal feature reuse, partial frames recompute only the last up layer",
        cuda_only=True, needs_s=300),
)
ROW_NAMES = tuple(r.name for r in ROWS)
# The EngineConfig fields a row may set (--row) and each row's JSON records.
OPTION_FIELDS = ("attention", "prompt_kv", "fused_time_proj", "compile", "compile_mode", "compile_dynamic",
                 "compile_aot", "aot_format", "fp8", "skip_unit_rescale", "cuda_graphs", "feature_reuse",
                 "reuse_layers", "frame_graph", "fused_norm", "fused_epilogue")
PROMPT = "a watercolor painting of a city street"
SEED = 42
BATCHES = (1, 8)
PARITY_FRAMES = 3  # three seeds as one padded batch (bucket 8), then the first alone (bucket 1), as bench does


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random", help="random (full SD-Turbo, random weights) or tiny-random")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--rows", type=lambda s: [r for r in s.split(",") if r], default=list(ROW_NAMES),
                    help=f"comma-separated rows, in order (default: all): {','.join(ROW_NAMES)}")
    ap.add_argument("--row", dest="extra", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                    help="one more row with these EngineConfig fields (repeatable), run after --rows, e.g. "
                         "compile_flash:compile=true,attention=flash")
    ap.add_argument("--iters", type=int, default=30, help="timed calls per batch size (default: %(default)s)")
    ap.add_argument("--burn-in", type=int, default=5, help="untimed calls before timing (default: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="start no row after this many seconds, nor one whose usual cost no longer fits")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "engine_rows.json"))
    ap.add_argument("--profile", action="store_true", help="trace rows' batch-1 frames (see --profile-row)")
    ap.add_argument("--profile-row", type=row_list, default=None, metavar="ROW[,ROW...]",
                    help="rows to profile (default: compile_default and compile_conditioning on CUDA, baseline "
                         "elsewhere)")
    ap.add_argument("--warm-caches", action="store_true",
                    help="keep torch's compile caches; by default each compile row compiles cold (fresh inductor "
                         "cache folder), so compile_s is what a first start costs")
    args = ap.parse_args(argv)
    if unknown := [r for r in args.rows if r not in ROW_NAMES]:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROW_NAMES)}")
    if args.iters < 1 or args.burn_in < 0:
        ap.error("--iters must be at least 1 and --burn-in at least 0")
    try:
        args.extra_rows = [extra_row(spec) for spec in args.extra]
    except ValueError as exc:
        ap.error(str(exc))
    return args


def _value(text: str):
    """A --row value: true/false (booleans), an int, a float, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def extra_row(spec: str) -> Row:
    """--row NAME:FIELD=VALUE,...: a Row of those EngineConfig fields, and inductor.SETTING=VALUE items:
    torch._inductor.config settings in force for the row (values as _value reads them)."""
    name, _, fields = spec.partition(":")
    if not name or not fields or name in ROW_NAMES:
        raise ValueError(f"--row {spec!r}: write NAME:FIELD=VALUE,... with a NAME that is not a built-in row")
    options, inductor = {}, {}
    for item in fields.split(","):
        key, eq, value = item.partition("=")
        if eq and key.startswith("inductor."):
            import torch._inductor.config as inductor_config

            setting = key.removeprefix("inductor.")
            if not hasattr(inductor_config, setting):
                raise ValueError(f"--row {spec!r}: torch._inductor.config has no setting {setting!r}")
            inductor[setting] = _value(value)
            continue
        if not eq or key not in OPTION_FIELDS:
            raise ValueError(f"--row {spec!r}: {item!r} is not FIELD=VALUE with FIELD one of "
                             f"{', '.join(OPTION_FIELDS)} or inductor.SETTING")
        options[key] = _value(value)
    cuda_only = bool(options.get("compile") or options.get("fp8")) or options.get("attention") in ("efficient", "cudnn")
    return Row(name, options, f"extra row {fields}", cuda_only=cuda_only,
               needs_s=420 if options.get("compile_mode") == MAX_AUTOTUNE else 200 if options.get("compile") else 30,
               fresh=bool(options.get("fp8")), inductor=inductor)


def smooth_frames(n: int, size: int):
    """n uint8 (size, size, 3) frames: coarse random colour fields with a little grain (camera-like, not noise)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(2026)
    frames = []
    for _ in range(n):
        coarse = PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), 3)
        grain = rng.integers(-12, 13, (size, size, 3))
        frames.append(np.clip(np.asarray(coarse, np.int16) + grain, 0, 255).astype(np.uint8))
    return frames


class Rows:
    def __init__(self, args) -> None:
        import numpy as np  # noqa: F401 - imported here with torch, after the cache folders are set
        import torch

        from turbostream.config import StreamParams
        from turbostream.models import DTYPES, resolve_device

        self.args, self.t0 = args, time.perf_counter()
        self.device = resolve_device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = DTYPES[args.dtype]
        self.params = StreamParams(PROMPT, seed=SEED)
        self.batch = [dataclasses.replace(self.params, seed=SEED + k) for k in range(PARITY_FRAMES)]
        self.frames = smooth_frames(max(BATCHES), args.size)
        self.profile_rows = args.profile_row or (("compile_default", "compile_conditioning") if self.cuda
                                                 else ("baseline",))
        self.out = Path(args.json)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.shared = None  # components every row that does not change them for good shares
        self.R: list | None = None
        self.P: dict | None = None
        self.res: dict = {
            "args": {k: v for k, v in vars(args).items() if k != "extra_rows"},
            "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
            "capability": list(torch.cuda.get_device_capability(self.device)) if self.cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": _version("diffusers"),
            "torchao": _version("torchao"), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model": args.model, "size": f"{args.size}x{args.size}", "dtype": args.dtype, "batches": list(BATCHES),
            "prompt": PROMPT, "seed": SEED, "caches": "warm (as found)" if args.warm_caches else
            "cold: a fresh inductor cache folder per compile row (Triton may reuse identical kernels in-process)",
            "parity_rule": "each of mean/p99/max of |E-R| <= max(2 x that of |P-R|, 2 levels)",
            "reference": None, "rows": {}, "errors": [], "targets": {}, "elapsed_s": 0.0,
        }

    # ------------------------------------------------------------------ bookkeeping

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.res["elapsed_s"] = round(self.elapsed(), 1)
        self.res["targets"] = targets(self.res["rows"])
        tmp = self.out.with_name(self.out.name + ".tmp")
        # default=str: a value JSON cannot hold (a dtype, an enum) is written as text, never a lost file.
        tmp.write_text(json.dumps(self.res, indent=1, default=str) + "\n")
        os.replace(tmp, self.out)

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def cuda_alive(self) -> str | None:
        """None if CUDA still works after an error; else why (a sticky error: no later row can run in this process)."""
        import torch

        if not self.cuda:
            return None
        try:
            torch.ones(1, device=self.device).add_(1).sum().item()
            return None
        except Exception as exc:  # noqa: BLE001 - any failure here means the context is gone
            return f"{type(exc).__name__}: {exc}"

    def load(self, dtype=None):
        from turbostream.models import load_components

        t = time.perf_counter()
        comps = load_components(self.args.model, device=self.device, dtype=dtype or self.dtype, vae="tiny")
        return comps, round(time.perf_counter() - t, 2)

    # ------------------------------------------------------------------ the shared reference

    def reference(self) -> None:
        """R (fp32, exact) and P (the rows' dtype) on fresh components, once, for every row's parity."""
        import torch

        from turbostream.engine import encode_prompt
        from turbostream.parity import parity_stats
        from turbostream.reference import ReferencePipeline

        t = time.perf_counter()
        self.shared, load_s = self.load()
        emb = torch.stack([encode_prompt(self.shared, p.prompt, self.device, self.dtype) for p in self.batch])
        emb = emb.float().cpu()  # the engine's embeddings, as bench's parity uses them: the frame path is compared
        frames = self.frames[:PARITY_FRAMES]
        refs = {}
        for key, dtype in (("R", torch.float32), ("P", self.dtype)):
            fresh, _ = self.load(dtype)
            out = ReferencePipeline(fresh).run(frames, self.batch, emb)
            refs[key] = out + out[:1]  # the rows run the three as one batch, then the first alone
            del fresh
            self.free()
        self.R = refs["R"]
        self.P = parity_stats(refs["P"], self.R)
        self.res["reference"] = {"R": "diffusers fp32, TF32 off, math attention, fresh components",
                                 "P_vs_R": self.P, "frames": len(self.R), "load_s": load_s,
                                 "seconds": round(time.perf_counter() - t, 1)}

    # ------------------------------------------------------------------ one row

    def run_row(self, row: Row, out: dict) -> None:
        """Build, warm up, time and check one row; its results go into `out` (the row's entry in the JSON), which
        is saved after each phase, so a crash or a kill later in the row keeps what it measured."""
        import torch

        from turbostream.bench import _timed
        from turbostream.config import EngineConfig
        from turbostream.engine import Engine
        from turbostream.parity import parity_stats, parity_verdict

        a = self.args
        cfg = EngineConfig(model=a.model, device=a.device, dtype=a.dtype, width=a.size, height=a.size, vae="tiny",
                           buckets=BATCHES, compile_cache=None, **row.options)
        out["config"] = {k: getattr(cfg, k) for k in OPTION_FIELDS} | {"buckets": list(cfg.buckets)}
        comps, out["load_s"] = self.load() if row.fresh else (self.shared, 0.0)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if cfg.compile:
            torch._dynamo.reset()  # compiled code of an earlier row must not serve this one
            if not a.warm_caches:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-{row.name}-")
        settings = contextlib.ExitStack()  # the row's inductor settings, until the row is done
        if row.inductor:
            import torch._inductor.config as inductor_config

            settings.enter_context(inductor_config.patch(row.inductor))
        engine = None
        try:
            engine = Engine(cfg, comps)
            out["applied"] = applied(engine.unet)
            stats = engine.warmup()  # compiles with cfg.torch_compile_mode (Engine._compile)
            if row.inductor:  # the settings in force while this row warmed up (and compiled, if it compiles)
                out["inductor"] = {k: getattr(inductor_config, k) for k in row.inductor}
            out.update(warmup_s=round(stats.warmup_s, 2), compile_s=round(stats.compile_s, 1) if cfg.compile else None,
                       graphs=engine.use_graphs, capture_s={k: round(v, 3) for k, v in stats.capture_s.items()},
                       kernel_variants=stats.kernel_variants, kernel_compile_s=round(stats.kernel_compile_s, 2))
            self.save()
            out["timing"] = {}
            for b in BATCHES:
                frames, params = self.frames[:b], [self.params] * b
                t = _timed(functools.partial(engine.run, frames, params), a.iters, a.burn_in, self.sync)
                t.update(batch=b, per_frame_ms=round(t["median_ms"] / b, 3), fps=round(1e3 * b / t["median_ms"], 1))
                out["timing"][str(b)] = t
                self.save()
                print(f"    batch {b}: median {t['median_ms']:.2f} ms (p95 {t['p95_ms']:.2f}), {t['fps']:.1f} frames/s",
                      flush=True)
            if cfg.feature_reuse:
                out["reuse"] = {str(b): self.time_reuse(engine, b) for b in BATCHES}
                self.save()
            if self.R is not None:
                ours = engine.run(self.frames[:PARITY_FRAMES], self.batch) + engine.run(self.frames[:1],
                                                                                          self.batch[:1])
                stats_r = parity_stats(ours, self.R)
                out["parity"] = {"vs_R": stats_r, "verdict": parity_verdict(stats_r, self.P)}
                out["parity_pass"] = out["parity"]["verdict"]["pass"]
            else:
                out["parity"], out["parity_pass"] = {"error": "no reference (its step failed)"}, None
            if self.cuda:
                out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
            if a.profile and row.name in self.profile_rows:
                out["profile"] = {"status": "running"}
                self.save()
                try:
                    out["profile"] = self.profile(engine, row.name)
                except Exception as exc:  # noqa: BLE001 - the row's numbers stand without its profile
                    out["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            engine = None  # its graphs and their memory pool go with it
            if cfg.compile:
                torch._dynamo.reset()
            comps = None
            self.free()
            settings.close()

    def time_reuse(self, engine, b: int) -> dict:
        """Per-call ms of full frames that keep deep features and of partial frames, b streams with reuse 4 (a full
        call, then three partial ones), classified by the engine's own counters; average ms per frame for reuse 2 to
        8 (every setting a stream may choose) from the two medians (a full frame every N).

        The frames do not move, so a partial frame reuses deep features of its very own frame and must give the full
        frame's output (exactly when eager, within rounding when compiled): `partial_vs_full_max` (uint8 levels)
        checks the partial path itself, whatever runs it (graphs, compiled wrappers)."""
        import statistics

        import numpy as np

        a, frames = self.args, self.frames[:b]
        params = [self.params.updated(reuse=4)] * b
        keys = [f"reuse-{b}-{i}" for i in range(b)]
        times: dict[str, list[float]] = {"keep": [], "reuse": []}
        cycles = max(2, -(-a.iters // 4))  # whole cycles of 4 after the burn-in: every window holds full calls
        full_out, worst = None, 0
        for i in range(a.burn_in + 4 * cycles):
            before = engine.stats.reuse_partial_batches
            t0 = time.perf_counter()
            outs = engine.run(frames, params, streams=keys)
            self.sync()
            dt = (time.perf_counter() - t0) * 1e3
            partial = engine.stats.reuse_partial_batches > before
            if not partial:
                full_out = outs
            elif full_out is not None:
                worst = max(worst, max(int(np.abs(o.astype(np.int16) - f.astype(np.int16)).max())
                                       for o, f in zip(outs, full_out)))
            if i >= a.burn_in:
                times["reuse" if partial else "keep"].append(dt)
        for key in keys:
            engine.release_stream(key)
        out = {f"{k}_median_ms": round(statistics.median(v), 3) if v else None for k, v in times.items()}
        out["calls"] = {k: len(v) for k, v in times.items()}
        out["partial_vs_full_max"] = worst
        full, part = out["keep_median_ms"], out["reuse_median_ms"]
        if full and part:
            from turbostream.config import MAX_REUSE

            out["avg_ms_per_call"] = {str(n): round((full + (n - 1) * part) / n, 3) for n in range(2, MAX_REUSE + 1)}
            out["partial_over_full"] = round(part / full, 3)
        print(f"    reuse, batch {b}: full {full} ms, partial {part} ms per call", flush=True)
        return out

    def profile(self, engine, name: str) -> dict:
        """Chrome trace and top-30 table of `name`'s batch-1 frame (graph replay on CUDA; eager if that shows no
        kernels, as with profilers that cannot see inside CUDA graphs)."""
        from torch.profiler import ProfilerActivity, profile

        reps = 5
        frame, params = self.frames[:1], [self.params]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        result: dict = {"row": name, "frames": reps}
        for graphs in ((True, False) if self.cuda else (None,)):
            for _ in range(3):
                engine.run(frame, params, graphs=graphs)
            self.sync()
            with profile(activities=activities) as prof:
                for _ in range(reps):
                    engine.run(frame, params, graphs=graphs)
                self.sync()
            kernels = top_events(prof, self.cuda, reps)
            if kernels["events"] or not self.cuda:
                break
        result["path"] = "eager" if graphs is False else ("graph replay" if self.cuda else "eager (CPU)")
        base = self.out.with_name(f"{self.out.stem}-profile-{name}-b1")
        trace = base.with_suffix(".trace.json.gz")  # Perfetto and chrome://tracing read it gzipped (10x smaller)
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
        table = base.with_suffix(".top30.txt")
        table.write_text(kernels["table"] + "\n")
        result.update(trace=str(trace), table=str(table), sort_by=kernels["sort_by"],
                      total_ms_per_frame=kernels["total_ms_per_frame"], calls_per_frame=kernels["calls_per_frame"],
                      by_kind=kernels["by_kind"], top30=kernels["events"])
        return result

    # ------------------------------------------------------------------ all rows

    def main(self) -> int:
        a = self.args
        print(f"engine rows: {a.model} {a.size}px {a.dtype} on {self.res['device']}; rows {','.join(a.rows)}",
              flush=True)
        self.save()
        try:
            self.reference()
        except Exception as exc:  # noqa: BLE001 - the rows still give timings; their parity says why it is missing
            self.res["reference"] = {"error": f"{type(exc).__name__}: {exc}"}
            self.res["errors"].append(f"reference: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=-4)
        print(f"[{self.elapsed():6.1f} s] reference: {self.res['reference']}", flush=True)
        self.save()
        lost = None
        for row in [r for name in a.rows for r in ROWS if r.name == name] + a.extra_rows:
            res = self.res["rows"]
            left = a.budget_s - self.elapsed()
            if row.cuda_only and not self.cuda:
                res[row.name] = {"what": row.what, "skipped": "CUDA only"}
            elif lost:
                res[row.name] = {"what": row.what, "skipped": f"CUDA failed in an earlier row ({lost}): run it in a "
                                                              f"new process (--rows {row.name})"}
            elif left < (row.needs_s if self.cuda else 0) or left <= 0:
                res[row.name] = {"what": row.what, "skipped": f"time budget: {max(left, 0):.0f} s of --budget-s "
                                 f"{a.budget_s:g} left, this row needs about {row.needs_s:.0f} s; run it alone with "
                                 f"--rows {row.name}"}
            else:
                print(f"[{self.elapsed():6.1f} s] {row.name}: {row.what}", flush=True)
                res[row.name] = {"what": row.what, "status": "running", "started_s": round(self.elapsed(), 1)}
                self.save()
                t = time.perf_counter()
                try:
                    self.run_row(row, res[row.name])
                    res[row.name]["status"] = "ok"
                except KeyboardInterrupt:  # gpu_check.sh's time limit (SIGINT): keep what is known, then stop
                    res[row.name].update(status="interrupted", error="interrupted (time limit)")
                    res[row.name]["seconds"] = round(time.perf_counter() - t, 1)
                    self.save()
                    print(f"interrupted in {row.name}; wrote {self.out}", flush=True)
                    return 130
                except Exception as exc:  # noqa: BLE001 - recorded in the row; the next row still runs
                    res[row.name].update(status="error", error=f"{type(exc).__name__}: {exc}",
                                         traceback=traceback.format_exc(limit=-6)[-3000:])
                    self.res["errors"].append(f"{row.name}: {type(exc).__name__}: {exc}")
                    traceback.print_exc(limit=-4)
                    lost = self.cuda_alive()
                res[row.name]["seconds"] = round(time.perf_counter() - t, 1)
            print(f"[{self.elapsed():6.1f} s] {row.name}: {brief(res[row.name])}", flush=True)
            self.save()
        print_summary(self.res)
        print(f"wrote {self.out}", flush=True)
        # A row's error is one of its results (a backend this GPU lacks, torchao missing); the run as a whole failed
        # only if the reference or the baseline did.
        base = self.res["rows"].get("baseline", {})
        return 1 if "error" in (self.res["reference"] or {}) or base.get("status") == "error" else 0


def applied(unet) -> dict:
    """What the UNet's modules show of the options (not what was asked): processors, lean blocks, fp8 Linears,
    fused GroupNorms, resnets reading the stacked time projections."""
    procs = {}
    for p in unet.attn_processors.values():
        procs[repr(p) if type(p).__name__ == "TurboAttnProcessor" else type(p).__name__] = procs.get(
            repr(p) if type(p).__name__ == "TurboAttnProcessor" else type(p).__name__, 0) + 1
    return {"processors": procs, "lean_resnets": sum(type(m).__name__ == "LeanResnetBlock2D" for m in unet.modules()),
            "fp8_linears": getattr(unet, "_turbostream_fp8", 0),
            "fused_norms": sum(type(m).__name__.startswith("FusedGroupNorm") for m in unet.modules()),
            "stacked_time_projections": sum(type(m).__name__ == "ProjectionSlice" for m in unet.modules())}


def row_list(text: str) -> tuple[str, ...]:
    """--profile-row's comma-separated built-in row names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in ROW_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown}: choose from {', '.join(ROW_NAMES)}")
    return names


# What a kernel (CUDA) or operator (CPU) name says it does, first match wins. cuDNN's convolutions are implicit
# GEMMs ("fprop", "nhwckrsc"), so they are told apart before the GEMMs. Inductor's Triton kernels name the ops they
# fused: a template (triton_tem_) is the GEMM or conv it names; the others (triton_poi_, _per_, _red_) are pointwise
# or reduction code, a norm where they name one, even when they fused a conv's epilogue and say "convolution".
KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "mha_")),
    ("conv", ("triton_tem_fused_convolution", "conv", "fprop", "nhwckrsc", "dgrad", "wgrad")),
    ("gemm", ("gemm", "cutlass", "triton_tem_", "cublas", "matmul", "addmm", "aten::mm", "aten::bmm", "xmma",
              "s16816", "s1688")),
    # block_stats (and "normalize", kernel_kind): --fused-norm's own kernels
    ("norm", ("norm", "moments", "welford", "compute_stats", "computefusedparams", "block_stats")),
    ("copy", ("memcpy", "memset", "copy", "clone", "contiguous")),
    ("elementwise", ("elementwise", "add", "mul", "silu", "gelu", "div", "upsample", "cat", "reduce", "fill",
                     "where", "clamp", "round", "lerp", "bias_act")),  # bias_act: ours, --fused-epilogue
)


def kernel_kind(name: str) -> str:
    """The kind of one profiler event by its name (KINDS), "other" if none fits."""
    low = name.lower()
    if low == "normalize":  # --fused-norm's second kernel (engine/group_norm_kernels.py)
        return "norm"
    if low.startswith("triton_") and not low.startswith("triton_tem_"):
        return "norm" if "norm" in low else "fused (triton)"
    for kind, marks in KINDS:
        if any(m in low for m in marks):
            return kind
    return "other"


def top_events(prof, cuda: bool, reps: int) -> dict:
    """The 30 costliest events: CUDA kernels by self CUDA time on CUDA, operators by self CPU time on the CPU; and
    all of them per frame by kind (kernel_kind) with their count, to see where a frame's time goes at a glance."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    if cuda:
        def cost(e):
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)
        chosen = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA and cost(e) > 0]
        sort_by = "self_device_time_total"
    else:
        def cost(e):
            return float(e.self_cpu_time_total or 0)
        chosen = [e for e in events if cost(e) > 0]
        sort_by = "self_cpu_time_total"
    chosen.sort(key=cost, reverse=True)
    total = sum(cost(e) for e in chosen)
    rows = [{"name": e.key[:200], "calls_per_frame": round(e.count / reps, 2),
             "us_per_frame": round(cost(e) / reps, 1), "share": round(cost(e) / total, 4) if total else None}
            for e in chosen[:30]]
    kinds: dict[str, list[float]] = {}
    for e in chosen:
        k = kinds.setdefault(kernel_kind(e.key), [0.0, 0.0])
        k[0], k[1] = k[0] + cost(e), k[1] + e.count
    by_kind = {kind: {"us_per_frame": round(us / reps, 1), "share": round(us / total, 4) if total else None,
                      "calls_per_frame": round(n / reps, 2)}
               for kind, (us, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])}
    calls = round(sum(e.count for e in chosen) / reps, 2)
    lines = [f"{'us/frame':>10} {'share':>7} {'calls/frame':>11}  name", "-" * 100]
    lines += [f"{r['us_per_frame']:10.1f} {100 * (r['share'] or 0):6.1f}% {r['calls_per_frame']:11.2f}  {r['name']}"
              for r in rows]
    lines.append(f"total {total / reps / 1e3:.3f} ms per frame over {len(chosen)} distinct "
                 f"{'kernels' if cuda else 'operators'} ({sort_by}), {calls:g} calls per frame")
    lines += ["", f"{'us/frame':>10} {'share':>7} {'calls/frame':>11}  kind", "-" * 50]
    lines += [f"{k['us_per_frame']:10.1f} {100 * (k['share'] or 0):6.1f}% {k['calls_per_frame']:11.2f}  {kind}"
              for kind, k in by_kind.items()]
    return {"events": rows, "table": "\n".join(lines), "sort_by": sort_by,
            "total_ms_per_frame": round(total / reps / 1e3, 3), "calls_per_frame": calls, "by_kind": by_kind}


def targets(rows: dict) -> dict:
    """Issue 12 and 11's targets against the rows measured so far (parity-passing rows only for the speed goals)."""
    def ms(name, b):
        return ((rows.get(name) or {}).get("timing") or {}).get(str(b), {}).get("median_ms")

    ok = [n for n, r in rows.items() if r.get("status") == "ok" and r.get("parity_pass") is not False]
    best1 = min(((ms(n, 1), n) for n in ok if ms(n, 1)), default=None)
    best8 = min(((ms(n, 8), n) for n in ok if ms(n, 8)), default=None)
    c8 = ms("compile_default", 8)
    def reuse_avgs(name: str) -> dict:  # a reuse row's batch-1 average ms per frame by N ({} for other rows)
        return ((rows[name].get("reuse") or {}).get("1") or {}).get("avg_ms_per_call") or {}

    # Feature reuse at batch 1: the average ms per frame with a full frame every 4 (the rows' reuse setting).
    best_reuse = min(((reuse_avgs(n)["4"], n) for n in ok if reuse_avgs(n)), default=None)
    # The least N (a full frame every N) that brings some row's batch-1 average to 4 ms: what reuse must give up.
    least = min(((int(k), avg, n) for n in ok for k, avg in reuse_avgs(n).items() if avg <= 4.0), default=None)
    return {
        "b1_le_5ms": None if best1 is None else {"met": best1[0] <= 5.0, "ms": best1[0], "row": best1[1]},
        "b8_ge_350fps": None if best8 is None else {"met": 8e3 / best8[0] >= 350.0,
                                                    "fps": round(8e3 / best8[0], 1), "row": best8[1]},
        "compiled_b8_ge_300fps": None if c8 is None else {"met": 8e3 / c8 >= 300.0, "fps": round(8e3 / c8, 1)},
        "b1_reuse4_avg_le_4ms": None if best_reuse is None else {"met": best_reuse[0] <= 4.0, "ms": best_reuse[0],
                                                                  "row": best_reuse[1]},
        "b1_reuse_avg_le_4ms_from": None if least is None else {"reuse": least[0], "ms": least[1], "row": least[2]},
    }


def brief(row: dict) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if row.get("status") == "error":
        return f"ERROR {row['error'][:300]}"
    t = row.get("timing", {})
    parts = [f"b{b} {v['median_ms']:.2f} ms ({v['fps']:.0f} f/s)" for b, v in t.items()]
    verdict = row.get("parity", {}).get("verdict")
    parity = "n/a" if not verdict else ("pass" if verdict["pass"] else f"FAIL {verdict['failed']}")
    compile_s = f", compile {row['compile_s']} s" if row.get("compile_s") is not None else ""
    return f"{', '.join(parts)}; warmup {row.get('warmup_s')} s{compile_s}; parity {parity} {row.get('parity', {}).get('vs_R')}"


def print_summary(res: dict) -> None:
    print(f"\n{'row':22} {'b1 ms':>8} {'b8 ms':>8} {'b8 f/s':>8} {'warmup s':>9} {'compile s':>9}  parity")
    for name, row in res["rows"].items():
        if row.get("status") != "ok":
            print(f"{name:22} {row.get('skipped') or row.get('error', '')[:90]}")
            continue
        t = row["timing"]
        verdict = (row.get("parity") or {}).get("verdict")
        print(f"{name:22} {t['1']['median_ms']:8.2f} {t['8']['median_ms']:8.2f} {t['8']['fps']:8.1f} "
              f"{row['warmup_s']:9.1f} {row['compile_s'] if row['compile_s'] is not None else '-':>9}  "
              f"{'n/a' if not verdict else 'pass' if verdict['pass'] else 'FAIL ' + ','.join(verdict['failed'])}")
    print("targets:", json.dumps(res["targets"]))


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - not installed
        return None


if __name__ == "__main__":
    args = parse()
    if not args.warm_caches:
        # Before torch is imported, so the compile workers it starts inherit them: no cache of an earlier run.
        scratch = tempfile.mkdtemp(prefix="engine-rows-caches-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(scratch, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(scratch, "triton")
        import atexit
        import shutil

        atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # compiled kernels of this run only
    import logging

    from diffusers.utils import logging as diffusers_logging

    handler = logging.StreamHandler()  # the engine's own log (compile and capture times) in the step's log
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger("turbostream").addHandler(handler)
    logging.getLogger("turbostream").setLevel(logging.INFO)

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" at every fp16 cast
    sys.exit(Rows(args).main())
