#!/usr/bin/env python3
"""--fused-norm's kernels against eager PyTorch at every GroupNorm shape of SD-Turbo's UNet and full VAE, side by side.

For each (channels, side) the UNet (latents) and the full VAE (encoder and decoder) normalize at 512x512 and each
batch size, times two ways of doing a resnet's norm2 (conv bias [+ the UNet's time embedding] + GroupNorm + SiLU) and
a plain norm (GroupNorm + SiLU):
  eager:  PyTorch's ops as diffusers calls them (F.group_norm on channels_last, F.silu, the two adds)
  fused:  engine/group_norm.py's two Triton kernels
Each is replayed from a CUDA graph of `--calls` calls (no launch overhead, as in the engine), timed with CUDA events,
median of `--repeats`. Also reports the largest difference between the two (fp16 rounding). JSON with --json.

    python scripts/group_norm_speed.py --json norm.json          # on a CUDA machine
    python scripts/group_norm_speed.py --device cpu --quick      # Triton's interpreter: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from turbostream.engine.group_norm import fusable, group_norm
from turbostream.engine.triton_support import triton_problem

# (channels, latent side at 512x512, how many of the UNet's 61 GroupNorms see that shape): counted with forward hooks
# on the `random` model's UNet (model_configs/random/unet.json) run on the meta device.
SD_TURBO_NORMS = ((320, 64, 13), (640, 64, 2), (960, 64, 1), (320, 32, 1), (640, 32, 11), (960, 32, 1),
                  (1280, 32, 1), (1920, 32, 1), (640, 16, 1), (1280, 16, 11), (1920, 16, 1), (2560, 16, 2),
                  (1280, 8, 12), (2560, 8, 3))
# The same for the full VAE (AutoencoderKL, model_configs/random/vae.json), encoder and decoder, without the two
# attention norms (they see token tensors and are not fused).
SD_VAE_NORMS = ((128, 512, 10), (256, 512, 1), (128, 256, 1), (256, 256, 8), (512, 256, 1), (256, 128, 1),
                (512, 128, 9), (512, 64, 19))


def eager(x, w, b, temb, bias, resnet: bool):
    if resnet:  # diffusers: conv output (bias added by the conv) + time embedding (UNet), then norm2 and its SiLU
        x = x + bias[None, :, None, None]
        if temb is not None:
            x = x + temb[:, :, None, None]
    return F.silu(F.group_norm(x, 32, w, b, 1e-5))


def fused(x, w, b, temb, bias, resnet: bool):
    return group_norm(x, 32, w, b, 1e-5, silu=True, shift=temb if resnet else None,
                      channel_shift=bias if resnet else None)


def time_ms(fn, calls: int, repeats: int, cuda: bool) -> float:
    """Milliseconds per call: a CUDA graph of `calls` calls replayed `repeats` times (CUDA), or a plain loop."""
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()  # Triton compiles, cuDNN/allocator warm up, before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def time_shape(part, batch, channels, side, count, g, device, dtype, calls, repeats, cuda) -> list[dict]:
    """Eager and fused rows of one (part, batch, channels, side): the resnet norm2 form and the plain form."""
    x = torch.randn(batch, channels, side, side, generator=g).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w, b, bias = (torch.randn(channels, generator=g).to(device, dtype) for _ in range(3))
    temb = torch.randn(batch, channels, generator=g).to(device, dtype) if part == "unet" else None
    assert fusable(x, 32, w), (batch, channels, side)
    rows = []
    for resnet in (True, False):
        what = ("bias + temb + norm + silu" if temb is not None else "bias + norm + silu") if resnet else "norm + silu"
        row = {"part": part, "batch": batch, "channels": channels, "side": side, "count": count, "what": what}
        row["eager_ms"] = time_ms(lambda: eager(x, w, b, temb, bias, resnet), calls, repeats, cuda)
        row["fused_ms"] = time_ms(lambda: fused(x, w, b, temb, bias, resnet), calls, repeats, cuda)
        row["speedup"] = round(row["eager_ms"] / row["fused_ms"], 3)
        diff = (eager(x, w, b, temb, bias, resnet).float() - fused(x, w, b, temb, bias, resnet).float())
        row["max_abs_diff"] = float(diff.abs().max())
        rows.append(row)
        print(f"{part} batch {batch} {channels:4d} x {side:3d}^2 {what:26s} eager {row['eager_ms']:.4f} ms "
              f"fused {row['fused_ms']:.4f} ms  x{row['speedup']:.2f}  max diff {row['max_abs_diff']:.4g}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8", help="batch sizes (default: %(default)s)")
    ap.add_argument("--calls", type=int, default=20, help="calls per CUDA graph (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=20, help="timed replays per row (default: %(default)s)")
    ap.add_argument("--parts", default="unet,vae", help="unet, vae or both (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="two small shapes, one call each (a dry run)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if problem := triton_problem(device):  # else group_norm() would time PyTorch's own ops against themselves
        ap.error(f"the fused kernels cannot run on {device}: {problem} (on a CPU: TRITON_INTERPRET=1)")
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    tables = {"unet": SD_TURBO_NORMS, "vae": SD_VAE_NORMS}
    parts = [p for p in args.parts.split(",") if p]
    if not parts or any(p not in tables for p in parts):
        ap.error(f"--parts: unet, vae or unet,vae; got {args.parts!r}")
    if args.quick:
        tables = {"unet": ((64, 8, 1), (128, 4, 1)), "vae": ((64, 16, 1),)}
    calls, repeats = (1, 1) if args.quick else (args.calls, args.repeats)
    g = torch.Generator().manual_seed(0)
    rows = []
    for part in parts:
        for batch in (int(b) for b in args.batches.split(",")):
            for channels, side, count in tables[part]:
                rows += time_shape(part, batch, channels, side, count, g, device, dtype, calls, repeats, cuda)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
              "dtype": str(dtype).replace("torch.", ""), "calls_per_graph": calls, "repeats": repeats, "rows": rows}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
