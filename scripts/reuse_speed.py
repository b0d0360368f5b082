#!/usr/bin/env python
"""Measure temporal feature reuse (engine/reuse.py): its speed, and how far its output moves from full recomputation.

A moving test clip (a synthetic picture that pans and rotates, generated here) goes through the SD-Turbo img2img frame
math of the engine (engine/frame.py's FrameMath itself: uint8 -> encode -> noise -> UNet + Euler step per step ->
decode -> uint8), with the UNet call routed through FeatureReuse:

- "off": every frame runs FeatureReuse.full (the reference: it equals the plain UNet bit for bit);
- "reuse N" for each N of --reuse: frames 0, N, 2N, ... run full and keep the deep features (one buffer per UNet
  step: each step has its own timestep), the N - 1 frames between run FeatureReuse.partial on them;
- with --layers L1,L2,...: each setting for each cut (FeatureReuse's `layers`: how many layers of the innermost
  recomputed up block a partial frame recomputes), side by side in the same passes ("reuse N, layers L").

Reported per setting: ms per full frame and per partial frame (medians over the timed frames), the average ms per
frame over the clip (median over --repeats passes) and the speed-up over "off"; and the distance of the outputs
from "off" in uint8 levels (mean, p99 and max over every pixel of every frame, and over the partial frames alone).
Frame times are whole frames (encode, UNet, decode, uint8 in and out) after --burn-in untimed frames of each kind;
on CUDA every frame is synchronized, and with graphs (the default there, as in the engine) a full and a partial
frame are each one captured CUDA graph replay.

    python scripts/reuse_speed.py --model tiny-random --device cpu --size 64
    python scripts/reuse_speed.py --model random --device cpu --size 256 --json benchmarks/reuse-cpu-random-256.json
    python scripts/reuse_speed.py --model random --device cuda --size 512 --dtype float16 --json reuse-gpu.json
    python scripts/reuse_speed.py --model random --device cuda --size 512 --dtype float16 --layers all,2,1

Random weights (random, tiny-random) show the mechanism and its cost, not visual quality: a distance here says how
much the output moves, not whether a viewer would mind.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from turbostream.config import StreamParams, parse_size  # noqa: E402
from turbostream.engine import aot  # noqa: E402


def picture(width: int, height: int, angle: float, shift: float) -> np.ndarray:
    """A test picture (gradients, stripes, a checker, a disc) rotated by `angle` radians and panned by `shift` px."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width / 2, height / 2
    c, s = math.cos(angle), math.sin(angle)
    # Rotate about the centre, then pan: u, v are the picture's own coordinates, in units of the frame's width.
    u = ((x - cx) * c + (y - cy) * s - shift) / width
    v = (-(x - cx) * s + (y - cy) * c) / width
    img = np.stack([128 + 100 * np.sin(u * 9.0), 128 + 100 * np.cos(v * 7.0), 128 + 80 * np.sin((u + v) * 23.0)], -1)
    checker = ((np.floor(u * 8) + np.floor(v * 8)) % 2 == 0) & (np.abs(v) < 0.25)
    img[checker] *= 0.55
    disc = (u - 0.15) ** 2 + (v + 0.1) ** 2 < 0.03
    img[disc] = (230, 60, 70)
    return img.clip(0, 255).astype(np.uint8)


def moving_clip(n: int, width: int, height: int, pan: float, rotate_deg: float) -> np.ndarray:
    """(n, H, W, 3) uint8: the picture panning `pan` px and turning `rotate_deg` degrees a frame."""
    return np.stack([picture(width, height, math.radians(rotate_deg * k), pan * k) for k in range(n)])


class ReuseCall:
    """Stands in for FrameMath.unet_call: routes each UNet evaluation of a frame to FeatureReuse.full or .partial.

    `mode` is set per frame; the k-th call of a frame is UNet step k and uses deep-features buffer k (the steps of a
    frame run at different timesteps, so each has deep features of its own).
    """

    def __init__(self, reuse, deep: list[torch.Tensor]) -> None:
        self.reuse, self.deep = reuse, deep
        self.mode, self.k = "full", 0

    def start(self, mode: str) -> None:
        self.mode, self.k = mode, 0

    def __call__(self, x, t, encoder_hidden_states, return_dict=False):
        deep = self.deep[self.k]
        self.k += 1
        if self.mode == "full":
            return (self.reuse.full(x, t, encoder_hidden_states, deep),)
        return (self.reuse.partial(x, t, encoder_hidden_states, deep),)


class Runner:
    """One frame, full or partial: eagerly, or as the replay of a CUDA graph captured once per mode."""

    def __init__(self, math_, call: ReuseCall, emb, noise, timesteps, sigmas, example: torch.Tensor,
                 graphs: bool) -> None:
        self.math, self.call, self.graphs = math_, call, graphs
        self.args = (emb, noise, timesteps, sigmas)
        self.frames = example.clone()  # the static input a graph reads
        self.latents = torch.zeros_like(noise)  # the frame's final latents (x0), float32
        self.out: dict[str, torch.Tensor] = {}
        self.graph: dict[str, torch.cuda.CUDAGraph] = {}
        if graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the default stream before capture (PITFALLS: CUDA graphs)
                for mode in ("full", "partial", "full", "partial", "full", "partial"):
                    self._eager(mode)
            torch.cuda.current_stream().wait_stream(side)
            for mode in ("full", "partial"):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.out[mode] = self._eager(mode)
                self.graph[mode] = graph

    def _eager(self, mode: str) -> torch.Tensor:
        self.math.unet_call = self.call  # several runners may share one FrameMath (one per cut)
        self.call.start(mode)
        return self.math(self.frames, *self.args, latents_out=self.latents)

    @torch.inference_mode()
    def __call__(self, frame: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (1, H, W, 3) on the device -> (uint8 (1, H, W, 3), float32 x0 latents (1, 4, h, w)), the caller's
        own tensors (copied out of the graph's buffers, which the next replay overwrites)."""
        self.frames.copy_(frame)
        if self.graphs:
            self.graph[mode].replay()
            return self.out[mode].clone(), self.latents.clone()
        return self._eager(mode), self.latents.clone()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def play(runner: Runner, clip: torch.Tensor, n: int, device: torch.device):
    """Run the clip with a full frame every n frames (n <= 1: every frame): (uint8 outputs, x0 latents on the CPU,
    seconds per frame)."""
    outs, latents, times = [], [], []
    for i in range(clip.shape[0]):
        mode = "full" if n <= 1 or i % n == 0 else "partial"
        sync(device)
        t0 = time.perf_counter()
        out, x0 = runner(clip[i: i + 1], mode)
        sync(device)
        times.append(time.perf_counter() - t0)
        outs.append(out[0].cpu().numpy())
        latents.append(x0[0].cpu())
    return outs, latents, times


def distances(outs: list[np.ndarray], ref: list[np.ndarray], which: list[int]) -> dict[str, float]:
    """Mean, p99 and max of |out - ref| in uint8 levels over every pixel and channel of the frames `which`."""
    if not which:
        return {"mean": 0.0, "p99": 0.0, "max": 0.0, "frames": 0}
    d = np.concatenate([np.abs(outs[i].astype(np.int16) - ref[i]).ravel() for i in which])
    return {"mean": float(d.mean()), "p99": float(np.percentile(d, 99)), "max": float(d.max()), "frames": len(which)}


def latent_distance(latents: list[torch.Tensor], ref: list[torch.Tensor], which: list[int]) -> float | None:
    """Mean over the frames `which` of ||x0 - x0_ref|| / ||x0_ref||: how far the denoised latents move, relative to
    their size. Random VAEs decode nearly flat pictures, so this shows the mechanism where uint8 levels cannot."""
    if not which:
        return None
    return statistics.fmean(float((latents[i] - ref[i]).norm() / ref[i].norm().clamp_min(1e-12)) for i in which)


def device_name(device: torch.device) -> str:
    name = aot.device_name(device)  # the GPU's name, or "cpu: " and the CPU's model
    return name if device.type == "cuda" else f"{name}, {torch.get_num_threads()} torch threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random", help="random, tiny-random, a hub id or a folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on the CPU), float16, float32")
    ap.add_argument("--size", default="64", help="N or WxH, multiples of 64 (default: %(default)s)")
    ap.add_argument("--vae", default="tiny", choices=("tiny", "full"))
    ap.add_argument("--frames", type=int, default=32, help="frames in the clip (default: %(default)s)")
    ap.add_argument("--reuse", default="2,3,4", help="settings N measured, comma-separated (default: %(default)s)")
    ap.add_argument("--depth", type=int, default=1, help="outer block pairs recomputed by partial (default: 1)")
    ap.add_argument("--layers", default="all",
                    help="comma-separated cuts to compare: how many layers of the innermost recomputed up block a "
                         "partial frame recomputes, or all (the whole block) (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prompt", default="a watercolor painting of a city street")
    ap.add_argument("--pan", type=float, default=1.0, help="pixels a frame (default: %(default)s)")
    ap.add_argument("--rotate", type=float, default=0.5, help="degrees a frame (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed passes of the clip per setting (default: 5 on CUDA, 3 on the CPU)")
    ap.add_argument("--burn-in", type=int, default=2, help="untimed frames of each kind first (default: 2)")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="CUDA: run eagerly, no CUDA graphs")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch threads (default: the engine's, every core but one)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    from turbostream.engine.caches import encode_prompt, seed_noise
    from turbostream.engine.cuda import prepare_cpu, prepare_cuda
    from turbostream.engine.frame import FrameMath
    from turbostream.engine.reuse import FeatureReuse
    from turbostream.engine.schedule import ScheduleTable
    from turbostream.models import default_dtype, load_components, resolve_device

    width, height = parse_size(args.size)
    settings = sorted({int(n) for n in args.reuse.split(",")})
    if not settings or settings[0] < 2:
        ap.error("--reuse takes settings N >= 2 (a full frame every N frames)")
    if args.frames < 2 * max(settings):
        ap.error(f"--frames must be at least twice the largest setting ({2 * max(settings)})")
    try:
        cuts = list(dict.fromkeys(None if v.strip() == "all" else int(v) for v in args.layers.split(",")))
    except ValueError:
        ap.error(f"--layers takes whole numbers or all, comma-separated; got {args.layers!r}")
    params = StreamParams(args.prompt, args.strength, args.steps, args.seed).validate()
    device = resolve_device(args.device)
    dtype = default_dtype(device, args.dtype)
    graphs = args.graphs and device.type == "cuda"
    repeats = args.repeats or (5 if device.type == "cuda" else 3)

    t_load = time.perf_counter()
    comps = load_components(args.model, device=device, dtype=dtype, vae=args.vae)
    load_s = time.perf_counter() - t_load
    # The engine's own preparation, so the numbers are the engine's kernels (channels_last, fused QKV on CUDA).
    if device.type == "cuda":
        prepare_cuda(comps)
    else:
        prepare_cpu()
        if args.threads:
            torch.set_num_threads(args.threads)
    try:
        reuses = {cut: FeatureReuse(comps.unet, depth=args.depth, layers=cut) for cut in cuts}
    except ValueError as exc:
        ap.error(str(exc))
    math_ = FrameMath(comps.unet, comps.vae, comps.vae_kind, dtype)

    schedule = ScheduleTable(comps.scheduler.config).get(params.steps, params.unet_evals)
    n_evals = schedule.unet_evals
    timesteps = torch.tensor(schedule.timesteps, dtype=torch.float32, device=device).view(n_evals, 1)
    sigmas = torch.tensor(schedule.sigmas, dtype=torch.float32, device=device).view(n_evals + 1, 1)
    emb = encode_prompt(comps, params.prompt, device, dtype)[None]
    latent_h, latent_w = height // 8, width // 8
    noise = seed_noise(params.seed, (comps.unet.config.in_channels, latent_h, latent_w), device)[None]
    clip_np = moving_clip(args.frames, width, height, args.pan, args.rotate)
    clip = torch.from_numpy(clip_np).to(device)
    runners: dict[int | None, Runner] = {}
    with torch.inference_mode():
        for cut, reuse in reuses.items():
            deep = [reuse.empty_deep(1, latent_h, latent_w, device) for _ in range(n_evals)]
            runners[cut] = Runner(math_, ReuseCall(reuse, deep), emb, noise, timesteps, sigmas, clip[:1], graphs)
        # The reference path is the UNet's own forward: check that "off" (every cut's full frame) is exactly it
        # before measuring anything.
        math_.unet_call = comps.unet
        plain = math_(clip[:1].clone(), emb, noise, timesteps, sigmas)
        full_is_plain = all(bool(torch.equal(r(clip[:1], "full")[0], plain)) for r in runners.values())
        # Burn-in: both kinds of frame, untimed (first-call allocations, autotuning, lazy initialisation).
        for _ in range(args.burn_in):
            for runner in runners.values():
                runner(clip[:1], "full")
                runner(clip[1:2], "partial")

    # Passes are interleaved (off, reuse 2, reuse 3, ..., off, reuse 2, ...) so that a machine that speeds up or slows
    # down during the run (clocks, neighbours on shared cores) shifts every setting alike. A setting is (name, cut,
    # N); "off" runs full frames only, the same for every cut.
    def setting_name(cut: int | None, n: int) -> str:
        return f"reuse {n}" if len(cuts) == 1 else f"reuse {n}, layers {'all' if cut is None else cut}"

    plan = [("off", cuts[0], 1)] + [(setting_name(cut, n), cut, n) for cut in cuts for n in settings]
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    timed = {name: {"full": [], "partial": [], "avg": [], "all": [], "kind": []} for name, _, _ in plan}
    got: dict[str, tuple[list[np.ndarray], list[torch.Tensor]]] = {}
    deterministic = True
    for _ in range(repeats):
        for name, cut, n in plan:
            outs, latents, times = play(runners[cut], clip, n, device)
            timed[name]["avg"].append(statistics.fmean(times))
            for i, t in enumerate(times):
                kind = "full" if n == 1 or i % n == 0 else "partial"
                timed[name][kind].append(t)
                timed[name]["all"].append(t)
                timed[name]["kind"].append(kind[0])
            if name in got and not all(np.array_equal(a, b) for a, b in zip(outs, got[name][0])):
                # Every pass of a setting computes the same frames; if not, the distances mix in run-to-run noise.
                deterministic = False
                print(f"WARNING: {name}: two passes of the same frames gave different outputs", file=sys.stderr)
            got[name] = (outs, latents)

    rows = []
    ref_outs, ref_latents = got["off"]
    off_avg = 1e3 * statistics.median(timed["off"]["avg"])
    for name, cut, n in plan:
        outs, latents = got[name]
        partial_frames = [i for i in range(args.frames) if n > 1 and i % n]
        full_frames = [i for i in range(args.frames) if n == 1 or i % n == 0]
        t = timed[name]
        row = {
            "setting": name, "reuse": 0 if n == 1 else n,
            "layers": None if n == 1 else reuses[cut].layers,  # the cut's layers (a number, "all" resolved)
            "ms_full_frame": 1e3 * statistics.median(t["full"]),
            "ms_partial_frame": 1e3 * statistics.median(t["partial"]) if t["partial"] else None,
            "ms_avg_frame": 1e3 * statistics.median(t["avg"]),
            "distance_all_frames": distances(outs, ref_outs, list(range(args.frames))),
            "distance_partial_frames": distances(outs, ref_outs, partial_frames),
            "latent_rel_l2_partial_frames": latent_distance(latents, ref_latents, partial_frames),
            # Full frames depend on nothing before them: they must equal the reference exactly.
            "full_frames_identical": all(np.array_equal(outs[i], ref_outs[i]) for i in full_frames),
            # Every timed frame, in play order (pass after pass), full frames marked: to see drift or a pattern.
            "frame_ms": [round(1e3 * x, 3) for x in t["all"]],
            "frame_kind": "".join(t["kind"]),  # f: full, p: partial
        }
        row["speedup_vs_off"] = off_avg / row["ms_avg_frame"]
        rows.append(row)
        print(f"{name}: full {row['ms_full_frame']:.2f} ms, partial {row['ms_partial_frame'] or 0:.2f} ms, "
              f"avg {row['ms_avg_frame']:.2f} ms; distance mean {row['distance_all_frames']['mean']:.3f}",
              file=sys.stderr)

    result = {
        "script": "scripts/reuse_speed.py",
        "command": " ".join([Path(sys.argv[0]).name if argv is None else "reuse_speed.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device),
        "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
        "model": args.model, "random_weights": bool(comps.random_weights),
        "note": ("random weights: the distances show the mechanism (how far reuse moves the output), not visual "
                 "quality" if comps.random_weights else "real weights"),
        "size": f"{width}x{height}", "latent": f"{latent_w}x{latent_h}",
        "dtype": str(dtype).replace("torch.", ""), "vae": args.vae,
        "cuda_graphs": graphs, "depth": args.depth,
        "deep_shape": list(reuses[cuts[0]].deep_shape(1, latent_h, latent_w)),
        "deep_shapes": {str(r.layers): list(r.deep_shape(1, latent_h, latent_w)) for r in reuses.values()},
        "steps": params.steps, "strength": params.strength, "unet_evals": n_evals,
        "frames": args.frames, "pan_px_per_frame": args.pan, "rotate_deg_per_frame": args.rotate,
        "repeats": repeats, "burn_in": args.burn_in, "load_s": load_s,
        # The machine's load average (1, 5, 15 min) around the timed passes: CPU numbers from shared cores vary.
        "loadavg_start": load_start, "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "off_equals_plain_unet": full_is_plain, "passes_identical": deterministic,
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    # Both checks are recorded in the JSON (the tests assert them on the CPU); on a GPU a mismatch is worth a loud
    # warning, not the loss of the timings.
    if not full_is_plain:
        print("WARNING: the 'off' path differs from the plain UNet forward", file=sys.stderr)
    if not all(r["full_frames_identical"] for r in rows):
        print("WARNING: full frames of a reuse setting differ from the same frames with reuse off", file=sys.stderr)
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"{r['model']} on {r['device_name']} at {r['size']} ({r['dtype']}, graphs {'on' if r['cuda_graphs'] else 'off'}"
        f"), {r['frames']} frames panning {r['pan_px_per_frame']:g} px and turning {r['rotate_deg_per_frame']:g} deg a "
        f"frame, depth {r['depth']}, {r['unet_evals']} UNet evaluation(s) a frame",
        "",
        "| setting | ms full frame | ms partial frame | ms avg frame | speed-up | distance mean / p99 / max (levels) "
        "| partial frames: mean / p99 / max | x0 latents, partial frames: rel. L2 |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for row in r["rows"]:
        a, p = row["distance_all_frames"], row["distance_partial_frames"]
        partial_ms = f"{row['ms_partial_frame']:.2f}" if row["ms_partial_frame"] is not None else "-"
        rel = row["latent_rel_l2_partial_frames"]
        lines.append(
            f"| {row['setting']} | {row['ms_full_frame']:.2f} | {partial_ms} | {row['ms_avg_frame']:.2f} "
            f"| {row['speedup_vs_off']:.2f}x | {a['mean']:.2f} / {a['p99']:g} / {a['max']:g} "
            f"| {p['mean']:.2f} / {p['p99']:g} / {p['max']:g} "
            f"| {'-' if rel is None else format(rel, '.4f')} |")
    if r["random_weights"]:
        lines += ["", "Random weights: the distances show how far reuse moves the output, not visual quality."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
