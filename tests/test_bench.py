"""`turbostream bench` on the CPU: the JSON contract, parity, and GPU-only entries left null."""

from __future__ import annotations

import json

from turbostream.cli import main


def test_bench_on_the_cpu_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--iters", "2",
                 "--burn-in", "1", "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    for key in ("device", "model", "size", "diffusers_ms", "engine_eager_ms", "engine_graph_ms", "compiled_graph_ms",
                "parity_max_abs_diff", "peak_mem_gib", "warmup_s", "gflops_per_frame"):
        assert key in res
    assert res["model"] == "tiny-random" and res["size"] == "64x64" and res["random_weights"] is True
    assert res["diffusers_ms"] > 0 and res["engine_eager_ms"] > 0 and res["gflops_per_frame"] > 0
    # The engine is diffusers' math: on the CPU in fp32, the same uint8 picture with either VAE.
    assert res["parity_max_abs_diff"] == 0 and res["parity_taesd_max_abs_diff"] == 0
    assert res["engine_graph_ms"] is None and res["compiled_graph_ms"] is None and res["peak_mem_gib"] is None
    assert set(res["targets"].values()) == {None}
    assert "random weights" in capsys.readouterr().out
