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
                "parity_engine_max", "parity_engine_p99", "parity_engine_mean", "parity_pipeline_fp16_max",
                "parity_pipeline_fp16_p99", "parity_pipeline_fp16_mean", "parity_pass", "peak_mem_gib", "warmup_s",
                "gflops_per_frame"):
        assert key in res
    assert res["model"] == "tiny-random" and res["size"] == "64x64" and res["random_weights"] is True
    assert res["diffusers_ms"] > 0 and res["engine_eager_ms"] > 0 and res["gflops_per_frame"] > 0
    # The engine is diffusers' math: on the CPU in fp32, the same uint8 picture as the fresh reference with either
    # VAE (4 frames: 3 seeds in a padded batch and one alone); so is diffusers itself in the bench's dtype (fp32).
    for kind in ("tiny", "full"):
        parity = res["parity"][kind]
        assert parity["engine"]["frames"] == 4 and parity["engine"]["max"] <= 1, parity
        assert parity["pipeline"]["max"] == 0 and parity["verdict"]["pass"], parity
    assert res["parity_pass"] is True and res["parity_engine_max"] == res["parity"]["tiny"]["engine"]["max"]
    assert res["engine_graph_ms"] is None and res["compiled_graph_ms"] is None and res["peak_mem_gib"] is None
    assert set(res["targets"].values()) == {None}
    assert "random weights" in capsys.readouterr().out


def test_serial_and_pipelined_rows_time_the_same_calls(engine):
    """The back-to-back row (CUDA only in the bench) runs on any engine: both ways time `calls` calls of the batch,
    leave nothing in flight, and report their ratio."""
    import numpy as np

    from turbostream.bench import BenchOptions, _pipelined
    from turbostream.config import StreamParams

    frames = [np.full((64, 64, 3), v, np.uint8) for v in (10, 200)]
    before = engine.stats.calls
    row = _pipelined(engine, frames, StreamParams(), 2, BenchOptions(iters=3))
    assert row["batch"] == 2 and row["calls"] == 10
    assert engine.stats.calls - before == 4 * row["calls"]  # burn-in and timed run, each way
    assert engine.in_flight == 0 and row["serial_fps"] > 0 and row["pipelined_fps"] > 0
    assert row["speedup"] == round(row["pipelined_fps"] / row["serial_fps"], 3)
