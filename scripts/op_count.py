"""Count the operations one UNet evaluation dispatches, per engine option: what each option removes, on any machine.

On CUDA nearly every dispatched compute op is one kernel launch (a CUDA graph replays them all), and at batch 1 the
frame is launch- and latency-bound, so the count is a first measure of an option that removes small work
(--prompt-kv, --fused-time-proj). It counts ATen ops below autograd with a TorchDispatchMode, leaving out views and
allocations (no kernel); GEMMs (mm, addmm, bmm, baddbmm) are counted apart too. The UNet is set up as a CUDA engine
sets it up (channels_last, QKV fused, then apply_options with the row's options), so the counts are the CUDA path's
op for op, even on the CPU (the CPU's kernels behind each op differ: attention, for one, is the CPU's flash kernel).
Times come from scripts/engine_rows.py on a GPU, not from here.

    python scripts/op_count.py --model random --json benchmarks/op-count-cpu-random-<date>.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ROWS = {
    "default": {},
    "prompt_kv": {"prompt_kv": True},
    "fused_time_proj": {"fused_time_proj": True},
    "prompt_kv+fused_time_proj": {"prompt_kv": True, "fused_time_proj": True},
}
GEMMS = {"mm", "addmm", "bmm", "baddbmm"}
NO_KERNEL = {"empty", "empty_strided", "empty_like", "lift_fresh", "alias", "detach", "_unsafe_view"}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it by name, views and allocations left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(unet, conditioning: torch.Tensor, batch: int, latent: int) -> collections.Counter:
    x = torch.randn(batch, unet.config.in_channels, latent, latent).contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 499.0)
    with torch.no_grad(), OpCounter() as counter:
        unet(x, t, encoder_hidden_states=conditioning.expand(batch, -1, -1), return_dict=False)
    return counter.ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random", help="random (SD-Turbo's architecture) or tiny-random")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=16, help="latent size (the count does not depend on it)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    from turbostream.config import EngineConfig
    from turbostream.engine.cuda import apply_options
    from turbostream.engine.prompt_kv import PromptKV
    from turbostream.models import load_components

    comps = load_components(args.model, device="cpu", dtype=torch.float32, vae="tiny")
    # As prepare_cuda sets the UNet up: channels_last activations (a layout decides which copies happen) and fused
    # QKV projections.
    comps.unet.to(memory_format=torch.channels_last)
    comps.unet.fuse_qkv_projections()
    emb = torch.randn(1, comps.max_tokens, comps.text_dim)
    rows = {}
    for name, options in ROWS.items():
        config = EngineConfig(model=args.model, device="cpu", **options)
        applied = apply_options(comps, config)
        conditioning = emb
        projection = None
        if config.prompt_kv:
            kv = PromptKV(comps.unet, comps.text_dim)
            with OpCounter() as counter:
                conditioning = kv.project(emb)
            projection = sum(counter.ops.values())  # once per new prompt, outside the frame
        ops = count(comps.unet, conditioning, args.batch, args.latent)
        rows[name] = {"options": options, "ops": sum(ops.values()), "gemms": sum(ops[g] for g in GEMMS),
                      "per_prompt_ops": projection, "by_op": dict(ops.most_common()),
                      "applied": {k: applied[k] for k in ("prompt_kv_layers", "stacked_time_projections")}}
        print(f"{name:28s} {rows[name]['ops']:5d} ops, {rows[name]['gemms']:4d} GEMMs per UNet evaluation"
              + (f" ({projection} ops per new prompt)" if projection is not None else ""), flush=True)
    base = rows["default"]
    for row in rows.values():
        row["fewer_ops"], row["fewer_gemms"] = base["ops"] - row["ops"], base["gemms"] - row["gemms"]
    result = {"command": " ".join(["python", "scripts/op_count.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "model": args.model,
              "batch": args.batch, "latent": args.latent, "what": "ATen ops dispatched by one UNet evaluation "
              "(views and allocations left out), channels_last and QKV fused as on CUDA", "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
