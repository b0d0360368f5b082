#!/usr/bin/env python3
"""How long `--lora` adds to a start: a kohya-ss LoRA of every attention and feed-forward Linear of the model's UNet
and text encoder (random matrices at --rank, written as a .safetensors file), read and merged, timed --repeats times.

With --live, what `--lora-live` costs too: the load that keeps the layers' weights from before the LoRA (and how much
memory that keeps), and a change of scale (lora.LiveLoras.set_scales: every adapted layer recomputed; the engine's
refresh of its fused projections comes on top), timed --repeats times.

    python scripts/lora_merge_speed.py --model random --rank 32 --live \
        --json benchmarks/lora-live-cpu-random-2026-11-29.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from turbostream.lora import merge_loras
from turbostream.models import load_components

UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def kohya_lora(components, rank: int) -> dict:
    """A kohya-ss LoRA (lora_down/lora_up/alpha, float16 as trainers save them) of every Linear named above."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for prefix, root, ends in (("lora_unet", components.unet, UNET_LAYERS),
                               ("lora_te_text_model", components.text_encoder, TEXT_LAYERS)):
        for name, module in root.named_modules():
            if name.endswith(ends) and isinstance(module, torch.nn.Linear):
                key = f"{prefix}_{name.removeprefix('text_model.').replace('.', '_')}"
                out_features, in_features = module.weight.shape
                state[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=g).half() * 0.01
                state[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=g).half() * 0.01
                state[f"{key}.alpha"] = torch.tensor(rank / 2)
    return state


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _live(components, path: str, args) -> dict:
    """A --lora-live load (layers kept as they were, then merged) and scale changes, timed."""
    t0 = time.perf_counter()
    _, live = merge_loras(components.unet, components.text_encoder, [path], live=True)
    _sync(args.device)
    load_s = time.perf_counter() - t0
    changes = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        live.set_scales([0.5 if i % 2 == 0 else 1.0])
        _sync(args.device)
        changes.append(time.perf_counter() - t0)
    return {"load_s": round(load_s, 3), "kept_mib": round(live.kept_bytes / 2**20, 1), "layers": len(live.layers),
            "change_s": [round(t, 3) for t in changes], "change_median_s": round(statistics.median(changes), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--live", action="store_true", help="also time a --lora-live load and changes of scale")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    components = load_components(args.model, device=args.device, vae="tiny")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "lora.safetensors")
        save_file(kohya_lora(components, args.rank), path)
        size_mib = os.path.getsize(path) / 2**20
        times, summary = [], None
        for _ in range(args.repeats):  # merged again each time: the weights drift, the work is the same
            t0 = time.perf_counter()
            (summary,), _ = merge_loras(components.unet, components.text_encoder, [path])
            _sync(args.device)
            times.append(time.perf_counter() - t0)
        live = _live(components, path, args) if args.live else None
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "model": args.model, "device": args.device, "rank": args.rank, "file_mib": round(size_mib, 1),
        "unet_layers": summary["unet_layers"], "text_encoder_layers": summary["text_encoder_layers"],
        "seconds": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }
    if live is not None:
        result["live"] = live
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
