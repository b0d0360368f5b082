"""`turbostream bench` on the CPU: the JSON contract, parity, and GPU-only entries left null."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from turbostream.cli import main

HAS_STREAMDIFFUSION = importlib.util.find_spec("streamdiffusion") is not None


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
    printed = capsys.readouterr().out
    assert "random weights" in printed
    row_a = next(line for line in printed.splitlines() if "diffusers (a)" in line)
    assert [cell.strip() for cell in row_a.split("│")[1:-1]][6] == "1.0"  # the baseline itself
    # StreamDiffusion's rows are CUDA only (its __call__ creates CUDA events): on the CPU the JSON says why not.
    rival = res["streamdiffusion"]
    assert rival["version"] == ("0.1.1" if HAS_STREAMDIFFUSION else None)  # the installed one, as .ci/run pins it
    assert "same_work" not in rival and "demo" not in rival
    assert ("CUDA only" if HAS_STREAMDIFFUSION else "pip install --no-deps streamdiffusion==0.1.1") in rival["skipped"]


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="one core: one thread for every row anyway")
def test_every_row_is_timed_under_the_same_process_settings(tmp_path, monkeypatch):
    """The diffusers rows ran before any engine existed, on torch's default thread pool (2 threads on 2 cores); the
    engine's build then set one core aside, and its rows ran on 1: "x diffusers" came out 4 to 9 times too high.
    The JSON says what every row ran under, the command and the engine options timed."""
    from turbostream import bench

    threads, timed = [], bench._timed

    def recording(fn, *args, **kwargs):
        threads.append(torch.get_num_threads())
        return timed(fn, *args, **kwargs)

    monkeypatch.setattr(bench, "_timed", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(__import__("os").cpu_count())  # torch's default, as in a fresh process
    try:
        out = tmp_path / "bench.json"
        assert main(["bench", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--iters", "1",
                     "--burn-in", "0", "--skip-streamdiffusion", "--prompt-kv", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    res = json.loads(out.read_text())
    assert len(threads) >= 3 and set(threads) == {res["process_settings"]["torch_threads"]}, threads
    assert res["engine_config"]["prompt_kv"] is True and res["engine_config"]["model"] == "tiny-random"
    assert res["command"].startswith("turbostream bench --model tiny-random") and "--prompt-kv" in res["command"]


def test_bench_leaves_streamdiffusion_out_when_asked(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    monkeypatch.setenv("HOME", str(tmp_path))  # --json=~/bench.json: the shell does not expand ~ after =
    assert main(["bench", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--iters", "1", "--burn-in",
                 "0", "--skip-diffusers", "--skip-streamdiffusion", "--json=~/bench.json"]) == 0
    res = json.loads(out.read_text())
    assert "streamdiffusion" not in res and res["diffusers_ms"] is None and res["engine_eager_ms"] > 0
    assert res["vs_streamdiffusion"] is None
    # Without the diffusers rows there is no "x diffusers" figure to print (not a 1.0 that reads as "as fast").
    eager = next(line for line in capsys.readouterr().out.splitlines() if "engine eager" in line)
    cells = [cell.strip() for cell in eager.split("│")[1:-1]]
    assert cells[0] == "engine eager" and cells[5] == f"{res['engine_eager']['fps']:.1f}" and cells[6] == "", cells


def test_flops_per_frame_leave_the_text_encoder_out(engine):
    """A frame's FLOPs are the VAE's and the UNet's: a prompt seen for the first time must not add its text encoder
    run (45 GFLOP at SD-Turbo's size, 4 % of a frame) to the count."""
    from turbostream.bench import _flops_per_frame
    from turbostream.config import StreamParams

    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    params = StreamParams("a prompt this engine has not seen")
    first = _flops_per_frame(engine, frame, params)
    assert first > 0 and first == _flops_per_frame(engine, frame, params)


def test_bench_compile_on_the_cpu_is_refused_not_ignored(capsys):
    """Its compiled phase runs inside the CUDA graphs phase: on the CPU nothing was compiled or timed, silently."""
    assert main(["bench", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--compile"]) == 2
    assert "bench --compile times compiled CUDA graphs: it needs a CUDA device" in capsys.readouterr().err


def test_targets_are_judged_only_for_the_full_model_at_512_with_parity():
    """tiny-random at 64 px met every target; so did a run whose frames failed parity."""
    from turbostream.bench import _targets

    fast = {"model": "random", "size": "512x512", "diffusers_ms": 100.0, "engine_graph_ms": {"1": 9.0, "4": 15.0},
            "compiled_graph_ms": {"1": 6.0, "4": 14.0, "8": 25.0}, "parity_pass": True}
    assert set(_targets(fast).values()) == {True}
    for other in ({"model": "tiny-random"}, {"size": "64x64"}, {"parity_pass": False}):
        assert set(_targets({**fast, **other}).values()) == {None}, other
    assert set(_targets({**fast, "parity_pass": None}).values()) == {True}  # --skip-diffusers: no parity run


def test_flops_per_frame_count_attention_on_the_cpu(engine):
    """FlopCounterMode counts 0 for PyTorch's CPU attention kernel (12 % of a 512x512 frame went uncounted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from turbostream.bench import _flops_per_frame
    from turbostream.config import StreamParams

    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    params = StreamParams("a prompt")
    counted = _flops_per_frame(engine, frame, params)
    plain = FlopCounterMode(display=False)
    with plain:
        engine.trace(frame, params)
    assert counted > plain.get_total_flops() * 1.01, (counted, plain.get_total_flops())


@pytest.mark.skipif(not HAS_STREAMDIFFUSION, reason="streamdiffusion not installed (.ci/run installs it)")
@pytest.mark.parametrize("key, expected", [("same_work", [499]), ("demo", [299, 99])])
def test_streamdiffusion_runs_on_the_bench_components(tiny_components, key, expected):
    """The rival is built on the bench's own UNet, text encoder and TAESD: its timesteps are the ones each row claims,
    and the steps its __call__ takes (without the CUDA events that keep __call__ itself off the CPU) make a frame."""
    import PIL.Image

    from turbostream import rivals

    setting = next(s for s in rivals.SETTINGS if s.key == key)
    stream = rivals.build(tiny_components, tiny_components.vae, setting, 64, 64, "a watercolor")
    assert rivals.timesteps(stream) == expected
    assert stream.unet is tiny_components.unet and stream.vae is tiny_components.vae
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        x = stream.image_processor.preprocess(image, 64, 64)
        for _ in range(len(expected)):  # a stream batch of n gives its first real frame after n calls
            out = stream.decode_image(stream.predict_x0_batch(stream.encode_image(x)))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    picture = stream.image_processor.postprocess(out, output_type="pil")[0]
    assert picture.size == (64, 64) and np.asarray(picture).std() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_STREAMDIFFUSION, reason="streamdiffusion not installed (.ci/run installs it)")
def test_streamdiffusion_rows_on_cuda():
    """On CUDA the bench times StreamDiffusion's own __call__ for both settings, PIL in and out."""
    from turbostream.bench import BenchOptions, _streamdiffusion
    from turbostream.models import load_components

    comps = load_components("tiny-random", device="cuda", vae="tiny")
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rows = _streamdiffusion(comps, comps.vae, frame, torch.device("cuda"), 100.0, BenchOptions(iters=3, burn_in=2),
                            torch.cuda.synchronize)
    assert "skipped" not in rows, rows
    assert rows["same_work"]["timesteps"] == [499] and rows["demo"]["timesteps"] == [299, 99]
    for key in ("same_work", "demo"):
        row = rows[key]
        assert row["median_ms"] > 0 and row["iters"] == 3 and row["batch"] == 1
        assert row["speedup_vs_diffusers"] == round(100.0 / row["median_ms"], 2)


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


def test_ratios_to_streamdiffusion_come_from_the_same_run():
    from turbostream.bench import _vs_streamdiffusion, _vs_streamdiffusion_line

    def row(ms, batch):
        return {"median_ms": ms, "batch": batch, "fps": round(1e3 * batch / ms, 1)}

    assert _vs_streamdiffusion({"streamdiffusion": {"skipped": "CUDA only"}}) is None
    res = {"streamdiffusion": {"same_work": row(30.0, 1)}, "engine_eager": row(45.0, 1),
           "engine_graph": {"1": row(10.0, 1), "8": row(40.0, 8)}, "compiled_graph": None}
    vs = _vs_streamdiffusion(res)
    assert vs == {"streamdiffusion_ms": 30.0, "streamdiffusion_fps": 33.3,
                  "eager_b1_speedup": 0.67, "eager_best_fps_ratio": 0.67, "eager_best_batch": 1,
                  "graph_b1_speedup": 3.0, "graph_best_fps_ratio": 6.01, "graph_best_batch": 8}
    assert _vs_streamdiffusion_line(vs) == (
        "against StreamDiffusion doing the same work (30.00 ms a frame, this run): eager batch 1 x0.67, best frames/s "
        "x0.67 (batch 1); graph batch 1 x3.0, best frames/s x6.01 (batch 8)")


def test_a_failing_streamdiffusion_costs_the_bench_nothing_else(tmp_path, monkeypatch):
    """StreamDiffusion is another project's code: if it fails (an API it relies on changed, out of memory), its row
    records the error and the bench goes on to the engine's rows."""
    from turbostream import rivals

    def broken(*args, **kwargs):
        raise AttributeError("'StableDiffusionPipeline' object has no attribute 'encode_prompt'")

    monkeypatch.setattr(rivals, "unavailable", lambda device: None)
    monkeypatch.setattr(rivals, "build", broken)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--iters", "1", "--burn-in",
                 "0", "--skip-diffusers", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("same_work", "demo"):
        assert res["streamdiffusion"][key]["error"].startswith("AttributeError: 'StableDiffusionPipeline'")
    assert res["vs_streamdiffusion"] is None and res["engine_eager_ms"] > 0


def test_streamdiffusion_that_cannot_be_imported_is_a_reason_not_a_crash(monkeypatch):
    import builtins

    from turbostream import rivals

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "streamdiffusion":
            raise failure
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(__import__("sys").modules, "streamdiffusion", raising=False)
    for failure, expected in ((ModuleNotFoundError("No module named 'streamdiffusion'", name="streamdiffusion"),
                               "streamdiffusion is not installed; to time it: pip install --no-deps"),
                              (ImportError("cannot import name 'retrieve_latents'"),
                               "cannot be imported (ImportError: cannot import name 'retrieve_latents')"),
                              (AttributeError("module 'diffusers' has no attribute 'LCMScheduler'"),
                               "cannot be imported (AttributeError: module 'diffusers'")):
        assert expected in rivals.unavailable(torch.device("cuda"))
