"""scripts/op_count.py: what --prompt-kv and --fused-time-proj remove from one UNet evaluation, counted exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("op_count", ROOT / "scripts" / "op_count.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_option_removes_what_it_says(tmp_path):
    out = tmp_path / "ops.json"
    assert _script().main(["--model", "tiny-random", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    base, kv, time_proj, both = (rows[n] for n in ("default", "prompt_kv", "fused_time_proj",
                                                   "prompt_kv+fused_time_proj"))
    layers = kv["applied"]["prompt_kv_layers"]
    resnets = time_proj["applied"]["stacked_time_projections"]
    assert (layers, resnets) == (4, 8)  # tiny-random's cross-attention layers and resnets
    # prompt_kv: one fused to_kv GEMM per cross-attention layer leaves the evaluation (done once per prompt instead).
    assert kv["fewer_gemms"] == kv["fewer_ops"] == layers
    assert kv["by_op"]["mm"] == base["by_op"]["mm"] - layers
    assert kv["per_prompt_ops"] == layers + 1  # each layer's to_kv, then one cat
    # fused_time_proj: the resnets' SiLUs and Linears (one each) become one SiLU and one Linear.
    assert time_proj["by_op"]["silu"] == base["by_op"]["silu"] - (resnets - 1)
    assert time_proj["by_op"]["addmm"] == base["by_op"]["addmm"] - (resnets - 1)
    assert time_proj["fewer_ops"] == 2 * (resnets - 1) and time_proj["fewer_gemms"] == resnets - 1
    assert both["fewer_ops"] == kv["fewer_ops"] + time_proj["fewer_ops"]
