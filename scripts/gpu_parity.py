#!/usr/bin/env python3
"""GPU parity (issue 10): E16 (engine, graphs, as served) and P16 (diffusers) vs R (diffusers fp32, TF32 off).

Every model is built on fresh components. Per VAE (TAESD, full): R, P16 and E16 (batch 1, and frames in chunks of 3
padded to bucket 4) on frames x seeds; statistics and the pass rule; the stage diagnosis E16 vs an fp32 engine; then
E16 variants with one CUDA-only setting switched each. P16 draws its noise in float32 like R and the engine
(reference.py); P16_own_noise, diffusers' own draw in float16, is reported beside it and judges nothing. JSON goes
to --out after every step; exit 1 on a failed verdict or an error outside the variants. On the CPU (a test run):
--device cpu --model tiny-random --size 64.

    python scripts/gpu_parity.py [--model random] [--size 512] [--device cuda] [--out $OUT/parity.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback

import numpy as np
import PIL.Image
import torch

from turbostream.config import EngineConfig, StreamParams
from turbostream.engine import Engine
from turbostream.models import DTYPES
from turbostream.parity import compare_traces, parity_stats, parity_verdict
from turbostream.reference import NonFiniteError, ReferencePipeline, exact_fp32, reference_components, tf32_off

PROMPTS = ("a lighthouse at dusk", "a red fox in the snow", "an oil painting of a harbour")
VARIANTS = ("eager", "sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "cudnn_benchmark_off",
            "channels_last_off", "qkv_unfused", "tf32_off")


def frames_and_params(n: int, seeds: list[int], size: int, steps: int, strength: float):
    """n smooth random uint8 (size, size, 3) frames, each with every seed: len(seeds) * n samples."""
    rng = np.random.default_rng(2026)
    frames = []
    for _ in range(n):
        coarse = PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), 3)
        frames.append(np.clip(np.asarray(coarse, np.int16) + rng.integers(-16, 17, (size, size, 3)), 0, 255)
                      .astype(np.uint8))
    samples = [(f, StreamParams(PROMPTS[i % 3], strength, steps, s)) for s in seeds for i, f in enumerate(frames)]
    return [s[0] for s in samples], [s[1] for s in samples]


def pick_dtype(name: str, device: str) -> tuple[torch.dtype, str]:
    """The asked dtype if a conv and a matmul run in it on `device`, else bfloat16, else float32 (said in the note)."""
    for cand in dict.fromkeys((name, "bfloat16", "float32")):
        try:
            x = torch.ones(1, 4, 8, 8, dtype=DTYPES[cand], device=device)
            torch.nn.functional.conv2d(x, torch.ones(4, 4, 3, 3, dtype=x.dtype, device=device)).sum().item()
            torch.ones(4, 4, dtype=x.dtype, device=device).matmul(torch.ones(4, 4, dtype=x.dtype, device=device))
            return DTYPES[cand], (f"{cand} as asked" if cand == name else f"{name} unsupported on {device}: {cand}")
        except RuntimeError:
            continue
    raise RuntimeError("no usable dtype")


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def variant(name: str, engine: Engine) -> contextlib.AbstractContextManager:
    """Switch one CUDA-only setting on a freshly built engine; the returned context wraps its warmup and runs."""
    if name.startswith("sdpa_"):
        # The engine's own --attention option built it (Run.engine): the backend is pinned for the UNet's attention
        # only, as a user would pin it. The full VAE's one attention (head size 512) stays on PyTorch's choice: flash
        # and cuDNN have no kernel for it, so pinning them for the whole frame fails with "No available kernel".
        return contextlib.nullcontext()
    if name == "cudnn_benchmark_off":
        torch.backends.cudnn.benchmark = False  # the engine turned it on; the next engine turns it on again
    elif name == "channels_last_off":
        for module in (engine.unet, engine.vae):
            module.to(memory_format=torch.contiguous_format)
        encode = engine.math.encode  # the frame path's permute yields channels_last strides: undo that too
        engine.math.encode = lambda x: encode(x.contiguous())
    elif name == "qkv_unfused":
        if getattr(engine.unet, "original_attn_processors", None) is None:
            raise Skip("the engine did not fuse QKV here")
        engine.unet.unfuse_qkv_projections()
    elif name == "tf32_off":
        return tf32_off()
    return contextlib.nullcontext()


def brief(res: dict) -> str:
    """One line of a step's result for the log: the verdict and |E16-R|, or the diagnosis, or the whole (short) dict."""
    if "all" in res:
        return f"pass={res['pass']} |E-R| all {res['all']['vs_R']} failed {res['all']['verdict']['failed']}"
    if "stages" in res or "nonfinite_counts_ours_fp32" in res:
        if "stages" not in res:
            return f"{res['error']} | non-finite (E16, E32) {res['nonfinite_counts_ours_fp32']}"
        stages = " ".join(f"{k}={v:.1e}" for k, v in res["stages"].items())
        return f"first_over={res['first_over']} {stages} | E32 vs R {res['engine_fp32_vs_R']}"
    return json.dumps(res)[:200]


class Skip(Exception):
    """A variant that means nothing on this device (recorded as skipped, not as an error)."""


class Run:
    def __init__(self, args) -> None:
        self.args, self.t0 = args, time.perf_counter()
        self.dtype, note = pick_dtype(args.dtype, args.device)
        self.frames, self.params = frames_and_params(args.frames, args.seeds, args.size, args.steps, args.strength)
        cuda = torch.cuda.is_available() and args.device.startswith("cuda")
        self.res = {"args": vars(args), "dtype": str(self.dtype).replace("torch.", ""), "dtype_note": note,
                    "device_name": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                    "samples": len(self.frames), "rule": "each of mean/p99/max of |E16-R| <= max(2 x |P16-R|, 2)",
                    "vae": {}, "summary": {}, "errors": []}
        # Whether this torch's CPU sampler gives float16 the float32 sample of a seed (rounded) or another sample:
        # P16 draws its noise in float32 like the engine (reference.py); P16_own_noise shows diffusers' own draw.
        h, w = args.size // 8, args.size // 8
        draws = [torch.randn((1, 4, h, w), generator=torch.Generator().manual_seed(7), dtype=dt).float()
                 for dt in (torch.float32, self.dtype)]
        self.res["cpu_randn_low_vs_float32_max"] = float((draws[0] - draws[1]).abs().max())
        self.ref: dict[str, list[np.ndarray]] = {}
        self.p16: dict[str, dict] = {}

    def save(self) -> None:
        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.res, f, indent=1)
        os.replace(tmp, self.args.out)

    def step(self, vae: str, name: str, fn, *args) -> None:
        """Run one step, store its result (or its error) under res.vae[vae][name], print one line, save the JSON."""
        out = self.res["vae"].setdefault(vae, {})
        if time.perf_counter() - self.t0 > self.args.budget_s:
            out[name] = {"skipped": f"time budget of {self.args.budget_s} s spent"}
        else:
            t = time.perf_counter()
            try:
                out[name] = fn(*args)
            except Skip as exc:
                out[name] = {"skipped": str(exc)}
            except Exception as exc:  # noqa: BLE001 - recorded, loudly, and the other steps still run
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
                self.res["errors"].append(f"{vae}/{name}: {type(exc).__name__}: {exc}")
                traceback.print_exc(limit=-4)
            out[name]["seconds"] = round(time.perf_counter() - t, 1)
            free()
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {vae:4} {name:30} {brief(out[name])}", flush=True)
        self.save()

    def comps(self, vae: str, dtype: torch.dtype):
        a = self.args
        return reference_components(a.model, device=a.device, dtype=dtype, vae=vae)

    def engine(self, vae: str, dtype: torch.dtype, graphs: bool = True, attention: str = "auto") -> Engine:
        a = self.args
        cfg = EngineConfig(model=a.model, device=a.device, dtype=str(dtype).replace("torch.", ""), width=a.size,
                           height=a.size, vae=vae, buckets=(1, 4), cuda_graphs=graphs, attention=attention)
        return Engine(cfg, self.comps(vae, dtype))

    def run_engine(self, engine: Engine, vae: str, ctx=None, graphs: bool | None = None) -> dict:
        """Batch 1 per sample, then chunks of 3 in bucket 4: stats of each against R and the verdict of each."""
        for prompt in {engine.config.default_params.prompt, *(p.prompt for p in self.params)}:
            engine.prompt_embeddings(prompt)  # the text encoder runs outside ctx: variants concern the frame path
        with ctx or contextlib.nullcontext():
            engine.warmup()
            singles = [engine.run([f], [p], graphs=graphs)[0] for f, p in zip(self.frames, self.params)]
            padded = []
            for i in range(0, len(self.frames), 3):
                padded += engine.run(self.frames[i : i + 3], self.params[i : i + 3], graphs=graphs)
        ref, res = self.ref[vae], {"graph_replays": engine.stats.graph_replays}
        for key, outs in (("batch1", singles), ("bucket4_of_3", padded), ("all", singles + padded)):
            stats = parity_stats(outs, ref + ref if key == "all" else ref)
            # Without P16 (its run failed) there is no rule to apply: recorded as a failure, the stats still kept.
            no_p16 = {"pass": False, "failed": ["no P16 to compare with"]}
            res[key] = {"vs_R": stats, "verdict": parity_verdict(stats, self.p16[vae]) if vae in self.p16 else no_p16}
        res["pass"] = all(res[k]["verdict"]["pass"] for k in ("batch1", "bucket4_of_3", "all"))
        return res

    def variant_run(self, vae: str, name: str | None) -> dict:
        """E16 as served (name None) or with one setting switched (VARIANTS), on fresh components."""
        if name in ("sdpa_efficient", "sdpa_cudnn") and not self.args.device.startswith("cuda"):
            raise Skip("CUDA only")
        attention = name[5:] if name and name.startswith("sdpa_") else "auto"
        engine = self.engine(vae, self.dtype, attention=attention)
        ctx = variant(name, engine) if name else None
        return self.run_engine(engine, vae, ctx, graphs=False if name == "eager" else None)

    def reference(self, vae: str) -> dict:
        self.ref[vae] = ReferencePipeline(self.comps(vae, torch.float32)).run(self.frames, self.params)
        return {"dtype": "float32", "tf32": False, "sdpa": "math", "mean_level": float(np.mean(self.ref[vae]))}

    def pipeline16(self, vae: str, noise_dtype: torch.dtype | None = torch.float32) -> dict:
        """P16 (noise drawn in float32, as R and the engine draw it); with noise_dtype None diffusers' own draw in
        the pipeline's dtype, for information only: on some torch versions another sample, so no yardstick."""
        outs = ReferencePipeline(self.comps(vae, self.dtype), noise_dtype=noise_dtype).run(self.frames, self.params)
        stats = parity_stats(outs, self.ref[vae])
        if noise_dtype is not None:
            self.p16[vae] = stats
        return {"vs_R": stats, "noise_drawn_in": str(noise_dtype or self.dtype).replace("torch.", "")}

    def diagnosis(self, vae: str) -> dict:
        """Stage by stage, E16 vs an fp32 engine (exact fp32) on sample 0; and that fp32 engine's output vs R."""
        e16 = self.engine(vae, self.dtype, graphs=False)
        ours = e16.trace(self.frames[0], self.params[0])
        del e16
        free()
        e32 = self.engine(vae, torch.float32, graphs=False)
        with exact_fp32():
            base = e32.trace(self.frames[0], self.params[0])
            e32_out = e32.run(self.frames, self.params)
        res = {"engine_fp32_vs_R": parity_stats(e32_out, self.ref[vae])}
        try:
            return {**compare_traces(ours, base, self.args.threshold), **res}
        except NonFiniteError as exc:  # keep which stages hold NaN/inf, and say it loudly
            self.res["errors"].append(f"{vae}/diagnosis: {exc}")
            bad = {k: [int((~torch.isfinite(t.float())).sum()) for t in (ours[k], base[k])] for k in ours}
            return {"error": str(exc), "nonfinite_counts_ours_fp32": bad, **res}

    def main(self) -> int:
        vaes = self.args.vaes
        for vae in vaes:
            self.step(vae, "R", self.reference, vae)
            self.step(vae, "P16", self.pipeline16, vae)
            self.step(vae, "P16_own_noise", self.pipeline16, vae, None)
            self.step(vae, "E16", self.variant_run, vae, None)
            e16 = self.res["vae"][vae]["E16"]
            if "all" in e16:
                self.res["summary"][vae] = {
                    **{f"parity_engine_{k}": e16["all"]["vs_R"][k] for k in ("max", "p99", "mean")},
                    **{f"parity_pipeline_fp16_{k}": self.p16.get(vae, {}).get(k) for k in ("max", "p99", "mean")},
                    "parity_pass": e16["pass"]}
        for vae in vaes:
            self.step(vae, "diagnosis", self.diagnosis, vae)
        for vae in (v for v in vaes if v in self.ref):
            for name in self.args.variants:
                self.step(vae, f"variant_{name}", self.variant_run, vae, name)
        print(json.dumps(self.res["summary"], indent=1))
        ok = all(s["parity_pass"] for s in self.res["summary"].values()) and len(self.res["summary"]) == len(vaes)
        main_errors = [e for e in self.res["errors"] if "/variant_" not in e]
        print("errors:", len(self.res["errors"]), "| verdict:", "PASS" if ok else "FAIL", "|", self.args.out)
        return 0 if ok and not main_errors else 1


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=tuple(DTYPES))
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[7, 1234])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--vaes", type=lambda s: s.split(","), default=["tiny", "full"])
    ap.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=list(VARIANTS))
    # fp16's own rounding gives 1-2e-3 at every stage (tiny-random, CPU): 1e-3 would always name the first stage.
    ap.add_argument("--threshold", type=float, default=1e-2, help="relative error that marks a stage as parted")
    ap.add_argument("--budget-s", type=float, default=420, help="start no new step after this many seconds")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "parity.json"))
    args = ap.parse_args(argv)
    if unknown := set(args.variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" at every fp16 cast
    sys.exit(Run(parse()).main())
