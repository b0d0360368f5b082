"""`turbostream bench`: the diffusers pipeline and this engine, side by side, in one process, on the same inputs.

Measured, each after a burn-in: (a) diffusers' AutoPipelineForImage2Image as the SD-Turbo model card uses it (full VAE,
PIL in and out, 2 steps, strength 0.5, guidance 0; prompt embeddings precomputed), and the same pipeline with TAESD,
so the VAE's share of the speedup is visible; (a2) StreamDiffusion on the same components with TAESD, where it is
installed (rivals.py; CUDA only); (b) the engine eager; (c) the engine's CUDA graphs at every bucket, and back-to-back
calls at the largest bucket serial against pipelined (submit/collect); (d) with --compile, compiled then captured.
Per call: median and p95; frames/s; speedup over (a). Also peak GPU memory, warmup and compile seconds, FLOPs per frame
(torch's FlopCounterMode on one eager frame) and achieved TFLOP/s, and parity (parity.py): the engine and diffusers in
the bench's dtype against diffusers in fp32 on fresh components, in uint8 levels, with the project's pass rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .config import AOT_FORMAT_NAMES, BENCH_COMPILE_BUCKETS, EngineConfig, StreamParams
from .engine import Engine, encode_prompt
from .engine.cuda import process_settings
from .models import Components, default_dtype, diffusers_pipeline, load_components, load_vae, resolve_device

log = logging.getLogger("turbostream.bench")
PROMPT = "a watercolor painting of a city street"
SEED = 42


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """How long to measure and what to leave out (the CLI's bench options)."""

    iters: int = 30  # timed calls per measurement
    burn_in: int = 5  # untimed calls before each measurement
    compile_buckets: tuple[int, ...] = BENCH_COMPILE_BUCKETS  # batch sizes compiled and captured with --compile
    skip_diffusers: bool = False  # leave out the diffusers pipeline baseline (and parity)
    skip_streamdiffusion: bool = False  # leave out StreamDiffusion's rows (rivals.py)
    json: str | None = None  # where to write the results
    command: str | None = None  # the command line that asked for this run, recorded in the JSON


def _timed(fn: Callable[[], object], iters: int, burn_in: int, sync: Callable[[], None]) -> dict:
    """Burn in, then time `iters` calls with a host clock (each call ends with its own sync): ms statistics."""
    for _ in range(burn_in):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p95_ms": round(times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))], 3),
        "min_ms": round(times[0], 3),
        "iters": iters,
    }


def _pipeline(comps: Components, vae):
    """diffusers' image-to-image pipeline, resolved the way the model card does (AutoPipelineForImage2Image)."""
    from diffusers import AutoPipelineForImage2Image

    pipe = AutoPipelineForImage2Image.from_pipe(diffusers_pipeline(comps, vae))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _parity(cfg: EngineConfig, comps: Components, frames: list[np.ndarray], params: StreamParams) -> dict:
    """The project's parity check (parity.py) for the engine on comps, as served (graphs on CUDA, a padded bucket).

    E = the engine in the bench's dtype; R = diffusers' pipeline in fp32 on fresh components (TF32 off);
    P = diffusers' pipeline in the bench's dtype on fresh components. Three frames with different seeds run as one
    batch (bucket 4, padded) and the first one alone (bucket 1). Returns |E-R|, |P-R| (mean, p99, max in uint8
    levels) and the verdict.
    """
    from .parity import parity_stats, parity_verdict
    from .reference import ReferencePipeline, reference_components

    batch = [dataclasses.replace(params, seed=params.seed + k) for k in range(3)]
    engine = Engine(dataclasses.replace(cfg, vae=comps.vae_kind, compile=False, buckets=(1, 4)), comps)
    engine.warmup()
    ours = engine.run(frames[:3], batch) + engine.run(frames[:1], batch[:1])
    emb = torch.stack([engine.prompt_embeddings(p.prompt) for p in batch]).float().cpu()
    del engine
    refs = {}
    for key, dtype in (("R", torch.float32), ("P", comps.unet.dtype)):
        fresh = reference_components(cfg.model, device=comps.unet.device, dtype=dtype, vae=comps.vae_kind,
                                     taesd=cfg.taesd)
        out = ReferencePipeline(fresh).run(frames[:3], batch, emb)
        refs[key] = out + out[:1]
        del fresh
    e_vs_r, p_vs_r = parity_stats(ours, refs["R"]), parity_stats(refs["P"], refs["R"])
    return {"engine": e_vs_r, "pipeline": p_vs_r, "verdict": parity_verdict(e_vs_r, p_vs_r)}


def _flops_per_frame(engine, frame: np.ndarray, params: StreamParams) -> float:
    """FLOPs of one eager frame (VAE encode, UNet, VAE decode) counted by torch's FlopCounterMode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    engine.trace(frame, params)  # the prompt's embeddings are cached now: the text encoder is not a frame's work
    counter = FlopCounterMode(display=False)
    # FlopCounterMode has formulas for the GPU's attention kernels but none for the CPU's default one, which then
    # counts 0 (12 % of a 512x512 frame): on the CPU the frame is counted with the math backend, whose matmuls count.
    backend = sdpa_kernel(SDPBackend.MATH) if engine.device.type == "cpu" else contextlib.nullcontext()
    with backend, counter:
        engine.trace(frame, params)
    return float(counter.get_total_flops())


def _row(stats: dict, batch: int, baseline_ms: float | None, gflops: float | None) -> dict:
    per_frame = stats["median_ms"] / batch
    row = dict(stats, batch=batch, per_frame_ms=round(per_frame, 3), fps=round(1e3 / per_frame, 1))
    if baseline_ms:
        row["speedup_vs_diffusers"] = round(baseline_ms / per_frame, 2)
    if gflops:
        row["tflops"] = round(gflops / per_frame, 1)  # GFLOP per ms = TFLOP/s
    return row


def run_bench(base_cfg: EngineConfig, opts: BenchOptions) -> int:
    """Measure everything the module docstring lists, print the table, write opts.json; returns 0."""
    device = resolve_device(base_cfg.device)
    dtype = default_dtype(device, base_cfg.dtype)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    params = dataclasses.replace(base_cfg.default_params, prompt=PROMPT, seed=SEED)
    w, h = base_cfg.width, base_cfg.height
    rng = np.random.default_rng(0)
    # Enough frames for the largest batch timed: the graph buckets, and the compiled ones, which may go past them.
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for _ in range(max(*base_cfg.buckets, *opts.compile_buckets, 3))]

    # Every row runs under the engine's process settings (the CPU's thread pool, cuDNN autotuning, TF32): the
    # engine sets them when it is built, after the baselines' rows, which ran under torch's defaults (on a 2-core
    # CPU twice the engine's threads, which made "x diffusers" 4 to 9 times what it was with both the same).
    settings = process_settings(device.type)
    t0 = time.perf_counter()
    comps = load_components(base_cfg.model, device=device, dtype=dtype, vae="full", taesd=base_cfg.taesd)
    tiny_vae = load_vae(base_cfg.model, "tiny", device=device, dtype=dtype, taesd=base_cfg.taesd)
    load_s = time.perf_counter() - t0
    tiny_comps = dataclasses.replace(comps, vae=tiny_vae, vae_kind="tiny")
    engine_comps = tiny_comps if base_cfg.vae == "tiny" else comps
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res: dict = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "device_type": device.type,
        "model": base_cfg.model,
        "random_weights": comps.random_weights,
        "size": f"{w}x{h}",
        "dtype": str(dtype).replace("torch.", ""),
        "engine_vae": base_cfg.vae,
        "steps": params.steps,
        "strength": params.strength,
        "unet_evals": params.unet_evals,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": opts.command,
        "engine_config": json.loads(json.dumps(dataclasses.asdict(base_cfg), default=str)),  # the options timed
        "process_settings": settings,  # what every row ran under
        "load_s": round(load_s, 1),
        "iters": opts.iters,
        "burn_in": opts.burn_in,
        "diffusers_ms": None, "diffusers_taesd_ms": None,
        "engine_graph_ms": None, "engine_graph": None, "compiled_graph_ms": None, "compiled_graph": None,
        "warmup_s": None, "compile_s": None, "compiled_warmup_s": None, "peak_mem_gib": None,
        # The GPU-correctness check (parity.py): |engine - R| and |diffusers in this dtype - R|, uint8 levels.
        "parity_engine_max": None, "parity_engine_p99": None, "parity_engine_mean": None,
        "parity_pipeline_fp16_max": None, "parity_pipeline_fp16_p99": None, "parity_pipeline_fp16_mean": None,
        "parity_pass": None, "parity": None,
    }

    def save() -> None:
        """Write what is measured so far: a run cut short (a time limit, a crash in a later phase) keeps it."""
        res["targets"] = _targets(res)
        res["vs_streamdiffusion"] = _vs_streamdiffusion(res)
        if opts.json:
            Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.json).write_text(json.dumps(res, indent=2) + "\n")

    # (a) diffusers first, on the untouched modules: building an engine on CUDA fuses QKV projections and sets
    # channels_last in place, which the model card's pipeline does not do.
    if not opts.skip_diffusers:
        import PIL.Image

        image = PIL.Image.fromarray(frames[0])
        emb = encode_prompt(comps, PROMPT, device, dtype)[None]
        for key, vae in (("diffusers", comps.vae), ("diffusers_taesd", tiny_vae)):
            log.info("(a) %s: AutoPipelineForImage2Image, PIL in and out", key)
            pipe = _pipeline(comps, vae)
            call = lambda: pipe(prompt_embeds=emb, image=image, num_inference_steps=2, strength=0.5,  # noqa: E731
                                guidance_scale=0.0).images[0]
            stats = _timed(call, max(5, opts.iters // 2), max(2, opts.burn_in // 2), sync)
            res[f"{key}_ms"], res[f"{key}_stats"] = stats["median_ms"], _row(stats, 1, res["diffusers_ms"], None)
            log.info("    median %.2f ms, p95 %.2f ms", stats["median_ms"], stats["p95_ms"])
    diffusers_ms = res["diffusers_ms"]
    save()

    # (a2) StreamDiffusion, also before any engine touches the modules.
    if not opts.skip_streamdiffusion:
        res["streamdiffusion"] = _streamdiffusion(comps, tiny_vae, frames[0], device, diffusers_ms, opts, sync)
        save()

    # (b) the engine, eager (the CPU's only path).
    log.info("(b) engine eager")
    eager = Engine(dataclasses.replace(base_cfg, cuda_graphs=False, compile=False, buckets=(1,)), engine_comps)
    eager.warmup()
    gflops = _flops_per_frame(eager, frames[0], params) / 1e9
    res["gflops_per_frame"] = round(gflops, 1)
    stats = _timed(partial(eager.run, frames[:1], [params]), opts.iters, opts.burn_in, sync)
    res["engine_eager_ms"], res["engine_eager"] = stats["median_ms"], _row(stats, 1, diffusers_ms, gflops)
    log.info("    median %.2f ms", stats["median_ms"])
    del eager
    save()

    # Parity on the path users run (graphs on CUDA, eager on the CPU), for both VAEs, against fresh references.
    if not opts.skip_diffusers:
        res["parity"] = {}
        for c in (comps, tiny_comps):
            log.info("parity, %s VAE: the engine and diffusers in %s against diffusers in fp32", c.vae_kind,
                     res["dtype"])
            res["parity"][c.vae_kind] = _parity(base_cfg, c, frames, params)
        mine = res["parity"][base_cfg.vae]
        for stat in ("max", "p99", "mean"):
            res[f"parity_engine_{stat}"] = mine["engine"][stat]
            res[f"parity_pipeline_fp16_{stat}"] = mine["pipeline"][stat]
        res["parity_pass"] = all(v["verdict"]["pass"] for v in res["parity"].values())
        for kind, v in res["parity"].items():
            log.info("    %s VAE: |engine-R| %s, |diffusers-R| %s: %s", kind, v["engine"], v["pipeline"],
                     "pass" if v["verdict"]["pass"] else f"FAIL ({', '.join(v['verdict']['failed'])})")
        save()

    def time_buckets(engine, buckets: tuple[int, ...], key: str) -> None:
        """Time engine.run at each batch size into res[key] (rows) and res[key + "_ms"] (median ms per call)."""
        res[key], res[key + "_ms"] = {}, {}
        for b in buckets:
            stats = _timed(partial(engine.run, frames[:b], [params] * b), opts.iters, opts.burn_in, sync)
            res[key][str(b)], res[key + "_ms"][str(b)] = _row(stats, b, diffusers_ms, gflops), stats["median_ms"]
            log.info("    batch %d: median %.2f ms per call, %.2f per frame", b, stats["median_ms"],
                     stats["median_ms"] / b)

    if cuda:
        # The peak from here on is the engine's (the components and its buffers), not the fp32 parity references'.
        torch.cuda.reset_peak_memory_stats()
        # (c) CUDA graphs at every bucket.
        log.info("(c) engine CUDA graphs, buckets %s", base_cfg.buckets)
        graph = Engine(dataclasses.replace(base_cfg, cuda_graphs=True, compile=False), engine_comps)
        res["warmup_s"] = round(graph.warmup().warmup_s, 2)
        time_buckets(graph, base_cfg.buckets, "engine_graph")
        res["engine_graph_pipelined"] = _pipelined(graph, frames, params, base_cfg.buckets[-1], opts)
        del graph
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        save()
        # (d) compiled, then captured; each compiled bucket costs a compile, hence the shorter default list.
        if base_cfg.compile:
            res["compiled_with"] = (f"{AOT_FORMAT_NAMES[base_cfg.aot_format]} (--compile-aot {base_cfg.aot_format})"
                                    if base_cfg.compile_aot else "torch.compile")
            log.info("(d) %s + CUDA graphs, buckets %s (compiling: minutes)", res["compiled_with"],
                     opts.compile_buckets)
            try:
                compiled = Engine(dataclasses.replace(base_cfg, compile=True, buckets=opts.compile_buckets),
                                  engine_comps)
                wstats = compiled.warmup()
                if wstats.aot_unavailable:  # the engine fell back: the rows are another path's, and say which
                    res["compiled_with"] = (f"{AOT_FORMAT_NAMES[wstats.aot_format]} (--compile-aot fell back: "
                                            "AOTInductor packages cannot run here)" if wstats.aot_format else
                                            "torch.compile (--compile-aot fell back: packages cannot run here)")
                    res["aot_unavailable"] = wstats.aot_unavailable
                res["compile_s"], res["compiled_warmup_s"] = round(wstats.compile_s, 1), round(wstats.warmup_s, 1)
                time_buckets(compiled, opts.compile_buckets, "compiled_graph")
                del compiled
            except Exception as exc:
                # Minutes of compiling: keep what was measured (the buckets timed so far) and why it stopped.
                res["compiled_error"] = f"{type(exc).__name__}: {exc}"
                save()
                raise
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    save()
    _print_table(res)
    if opts.json:
        log.info("wrote %s", opts.json)
    return 0


def _streamdiffusion(comps: Components, tiny_vae, frame: np.ndarray, device: torch.device, diffusers_ms: float | None,
                     opts: BenchOptions, sync: Callable[[], None]) -> dict:
    """StreamDiffusion's rows (rivals.py), PIL in and out with TAESD, each setting timed like (a); or why not."""
    from . import rivals

    out: dict = {"version": rivals.installed_version(), "acceleration": "none", "vae": "tiny"}
    reason = rivals.unavailable(device)
    if reason:
        log.info("(a2) StreamDiffusion: skipped: %s", reason)
        return dict(out, skipped=reason)
    import PIL.Image

    image = PIL.Image.fromarray(frame)
    h, w = frame.shape[:2]
    for setting in rivals.SETTINGS:
        log.info("(a2) StreamDiffusion %s, %s", setting.key, setting.what)
        stream = None
        try:
            stream = rivals.build(comps, tiny_vae, setting, w, h, PROMPT)
            stats = _timed(partial(rivals.call, stream, image), opts.iters, opts.burn_in, sync)
        except Exception as exc:  # noqa: BLE001 - another project's code: its failure must not cost the engine's rows
            out[setting.key] = {"error": f"{type(exc).__name__}: {exc}", "what": setting.what}
            log.warning("    StreamDiffusion %s failed: %s: %s", setting.key, type(exc).__name__, exc)
        else:
            out[setting.key] = dict(_row(stats, 1, diffusers_ms, None), what=setting.what,
                                    t_index_list=list(setting.t_index_list), timesteps=rivals.timesteps(stream))
            log.info("    median %.2f ms, p95 %.2f ms", stats["median_ms"], stats["p95_ms"])
        finally:
            del stream
    return out


def _pipelined(engine: Engine, frames: list[np.ndarray], params: StreamParams, b: int, opts: BenchOptions) -> dict:
    """Frames/s of back-to-back calls at batch b, serial (run: stage, replay, wait, copy out) against pipelined
    (submit call k+1, then collect call k: its copy out overlaps the next call on the GPU), in one run."""
    batch, ps = frames[:b], [params] * b
    calls = max(opts.iters, 10)

    def serial() -> None:
        for _ in range(calls):
            engine.run(batch, ps)

    def pipelined() -> None:
        ticket = engine.submit(batch, ps)
        for _ in range(calls - 1):
            following = engine.submit(batch, ps)
            engine.collect(ticket)
            ticket = following
        engine.collect(ticket)

    out = {"batch": b, "calls": calls}
    for name, fn in (("serial", serial), ("pipelined", pipelined)):
        fn()  # burn in
        t0 = time.perf_counter()
        fn()
        out[f"{name}_fps"] = round(calls * b / (time.perf_counter() - t0), 1)
    out["speedup"] = round(out["pipelined_fps"] / out["serial_fps"], 3)
    log.info("    batch %d back to back: serial %.1f frames/s, pipelined %.1f (x%.3f)", b, out["serial_fps"],
             out["pipelined_fps"], out["speedup"])
    return out


def _targets(res: dict) -> dict:
    """The performance targets of the project (the full architecture at 512x512, against (a) in the same run); None
    where not measured, for another model or size (tiny-random at 64 px met them all), or where parity failed (a
    fast wrong frame meets no target)."""
    if res.get("model") == "tiny-random" or res.get("size") != "512x512" or res.get("parity_pass") is False:
        res = {}
    a = res.get("diffusers_ms")
    g = (res.get("engine_graph_ms") or {}).get("1")
    c = (res.get("compiled_graph_ms") or {}).get("1")
    b4 = min(filter(None, [(res.get("engine_graph_ms") or {}).get("4"), (res.get("compiled_graph_ms") or {}).get("4")]),
             default=None)
    c8 = (res.get("compiled_graph_ms") or {}).get("8")
    return {
        "graph_b1_le_10ms": None if g is None else g <= 10.0,
        "graph_b1_ge_7x": None if g is None or a is None else a / g >= 7.0,
        "compiled_b1_le_6_5ms": None if c is None else c <= 6.5,
        "compiled_b1_ge_10x": None if c is None or a is None else a / c >= 10.0,
        "batch4_le_4ms_per_frame": None if b4 is None else b4 / 4 <= 4.0,
        "compiled_b8_ge_300fps": None if c8 is None else 8e3 / c8 >= 300.0,
    }


def _vs_streamdiffusion(res: dict) -> dict | None:
    """The engine's paths against StreamDiffusion doing the same work (its `same_work` row), from this run: batch 1
    time (its median over the path's) and best frames/s (the path's best batch over its one frame a call); None
    when it was not timed."""
    rival = (res.get("streamdiffusion") or {}).get("same_work")
    if not rival or "median_ms" not in rival:  # not timed, or it failed
        return None
    paths = {"eager": {"1": res["engine_eager"]} if res.get("engine_eager") else None,
             "graph": res.get("engine_graph"), "compiled": res.get("compiled_graph")}
    out = {"streamdiffusion_ms": rival["median_ms"], "streamdiffusion_fps": rival["fps"]}
    for name, rows in paths.items():
        if not rows:
            continue
        if "1" in rows:
            out[f"{name}_b1_speedup"] = round(rival["median_ms"] / rows["1"]["median_ms"], 2)
        best = max(rows.values(), key=lambda row: row["fps"])
        out[f"{name}_best_fps_ratio"] = round(best["fps"] / rival["fps"], 2)
        out[f"{name}_best_batch"] = best["batch"]
    return out


def _vs_streamdiffusion_line(vs: dict) -> str:
    """One printed line of _vs_streamdiffusion's ratios."""
    parts = [f"{name} batch 1 x{vs[f'{name}_b1_speedup']}, best frames/s x{vs[f'{name}_best_fps_ratio']} "
             f"(batch {vs[f'{name}_best_batch']})"
             for name in ("eager", "graph", "compiled") if f"{name}_b1_speedup" in vs]
    return (f"against StreamDiffusion doing the same work ({vs['streamdiffusion_ms']:.2f} ms a frame, this run): "
            + "; ".join(parts))


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"turbostream bench: {res['model']} on {res['device']}, {res['size']}, {res['dtype']}"
    if res["random_weights"]:
        title += " (random weights: timings are real, pictures are noise)"
    table = Table(title=title)
    for col in ("path", "batch", "median ms/call", "p95 ms", "ms/frame", "frames/s", "x diffusers", "TFLOP/s"):
        table.add_column(col, justify="right" if col != "path" else "left")

    def add(name: str, row: dict | None, batch: int = 1) -> None:
        if not row:
            return
        table.add_row(name, str(batch), f"{row['median_ms']:.2f}", f"{row['p95_ms']:.2f}",
                      f"{row.get('per_frame_ms', row['median_ms'] / batch):.2f}",
                      f"{row.get('fps', 1e3 * batch / row['median_ms']):.1f}",
                      str(row.get("speedup_vs_diffusers", "")),  # none without the diffusers rows
                      str(row.get("tflops", "")))

    add("diffusers (a), full VAE", dict(res["diffusers_stats"], speedup_vs_diffusers=1.0)
        if res.get("diffusers_stats") else None)
    add("diffusers + TAESD", res.get("diffusers_taesd_stats"))
    rival = res.get("streamdiffusion") or {}
    for key, label in (("same_work", "one step t=499"), ("demo", "demo t=299+99")):
        if "median_ms" in rival.get(key, {}):
            add(f"StreamDiffusion {rival['version']}, {label}", rival[key])
    add("engine eager", res.get("engine_eager"))
    for b, row in (res.get("engine_graph") or {}).items():
        add("engine graph", row, int(b))
    for b, row in (res.get("compiled_graph") or {}).items():
        aot = res.get("compiled_with", "").startswith("AOT")
        add("compile-aot + graph" if aot else "compiled + graph", row, int(b))
    console = Console(width=130)
    console.print(table)
    if res.get("engine_graph_pipelined"):
        p = res["engine_graph_pipelined"]
        console.print(f"batch {p['batch']} back to back: serial {p['serial_fps']} frames/s, "
                      f"pipelined {p['pipelined_fps']} (x{p['speedup']})")
    extras = {k: res.get(k) for k in ("gflops_per_frame", "parity_engine_max", "parity_engine_p99", "parity_pass",
                                      "peak_mem_gib", "warmup_s", "compile_s")}
    console.print(" ".join(f"{k}={v}" for k, v in extras.items() if v is not None))
    console.print("targets: " + ", ".join(f"{k}={v}" for k, v in res["targets"].items()))
    if res.get("vs_streamdiffusion"):
        console.print(_vs_streamdiffusion_line(res["vs_streamdiffusion"]))
