"""scripts/engine_rows.py (issue 12's side-by-side rows) end to end on the CPU, as the GPU session will run it."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "engine_rows.py"


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny-random", "--device", "cpu", "--size", "64",
                           "--iters", "2", "--burn-in", "1", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_cpu_dry_run_measures_the_cpu_rows_and_skips_the_cuda_ones(tmp_path):
    proc, res = _run(tmp_path, "--profile", "--profile-row", "baseline,prompt_kv", "--row", "broken:attention=xformers",
                     "--row", "plain_math:attention=math,skip_unit_rescale=false",
                     "--row", "mm_math:attention=math,inductor.conv_1x1_as_mm=true,inductor.epilogue_fusion=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = res["rows"]
    assert list(rows) == ["baseline", "attn_flash", "attn_efficient", "attn_cudnn", "attn_math", "unit_rescale",
                          "frame_graph", "fused_norm", "fused_epilogue", "graphs_lean", "prompt_kv", "lean_prompt_kv",
                          "fused_time_proj", "lean_conditioning", "fp8", "compile_default", "compile_frame_graph",
                          "fp8_compile", "compile_prompt_kv", "compile_conditioning", "compile_dynamic", "compile_aot",
                          "compile_aot_dynamo", "compile_max_autotune", "compile_tuned", "compile_max_autotune_tuned",
                          "temporal_reuse", "compile_reuse", "temporal_reuse_l1", "lean_reuse_l1", "compile_reuse_l1",
                          "compile_aot_reuse_l1", "broken", "plain_math", "mm_math"]
    assert res["reference"]["frames"] == 4 and res["reference"]["P_vs_R"]["max"] <= 2
    for name in ("baseline", "attn_flash", "attn_math", "unit_rescale", "prompt_kv", "fused_time_proj", "plain_math"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["graphs"] is False  # the CPU runs eagerly; the same rows capture graphs on CUDA
        for b in ("1", "8"):
            t = row["timing"][b]
            assert t["iters"] == 2 and 0 < t["median_ms"] <= t["p95_ms"]
            assert t["fps"] == pytest.approx(1e3 * int(b) / t["median_ms"], rel=1e-2)
        assert row["parity"]["vs_R"]["frames"] == 4 and row["parity_pass"] is row["parity"]["verdict"]["pass"]
        # tiny-random in fp16 on the CPU stays within a level or two of fp32 with every CPU backend.
        assert row["parity_pass"] is True, row["parity"]
    # The default leaves out the /1.0 divisions (our processor, lean resnets); unit_rescale is diffusers' own.
    assert rows["baseline"]["applied"]["processors"] == {
        "TurboAttnProcessor(backend=None, skip_unit_rescale=True)": 8}
    assert rows["baseline"]["applied"]["lean_resnets"] > 0
    assert rows["unit_rescale"]["applied"]["processors"] == {"AttnProcessor2_0": 8}
    # prompt_kv: tiny-random's 4 cross-attention layers read their keys and values from the conditioning.
    assert rows["prompt_kv"]["applied"]["processors"] == {
        "TurboAttnProcessor(backend=None, skip_unit_rescale=True)": 4,
        "TurboAttnProcessor(backend=None, skip_unit_rescale=True, prompt_kv)": 4}
    assert rows["prompt_kv"]["config"]["prompt_kv"] is True and rows["baseline"]["config"]["prompt_kv"] is False
    assert rows["fused_time_proj"]["config"]["fused_time_proj"] is True
    assert rows["fused_time_proj"]["applied"]["stacked_time_projections"] > 0
    assert rows["baseline"]["applied"]["stacked_time_projections"] == 0
    assert rows["unit_rescale"]["applied"]["lean_resnets"] == 0
    assert rows["attn_math"]["applied"]["processors"] == {
        "TurboAttnProcessor(backend=SDPBackend.MATH, skip_unit_rescale=True)": 8}
    assert rows["plain_math"]["config"]["attention"] == "math"
    # A row's inductor settings are what inductor reads while that row warms up (torch's defaults are the opposite);
    # rows without settings of their own record none.
    assert rows["mm_math"]["status"] == "ok" and rows["mm_math"]["config"]["attention"] == "math"
    assert rows["mm_math"]["inductor"] == {"conv_1x1_as_mm": True, "epilogue_fusion": False}
    assert "inductor" not in rows["plain_math"] and "inductor" not in rows["baseline"]
    assert rows["plain_math"]["applied"]["processors"] == {
        "TurboAttnProcessor(backend=SDPBackend.MATH, skip_unit_rescale=False)": 8}
    assert rows["plain_math"]["applied"]["lean_resnets"] == 0
    for name in ("attn_efficient", "attn_cudnn", "fused_norm", "fused_epilogue", "graphs_lean", "lean_prompt_kv",
                 "lean_conditioning", "fp8", "compile_default", "compile_frame_graph", "fp8_compile",
                 "compile_prompt_kv", "compile_conditioning", "compile_dynamic",
                 "compile_aot",
                 "compile_aot_dynamo", "compile_max_autotune", "compile_tuned", "compile_max_autotune_tuned",
                 "compile_reuse", "lean_reuse_l1", "compile_reuse_l1", "compile_aot_reuse_l1"):
        assert rows[name]["skipped"] == "CUDA only"
    for name, layers in (("temporal_reuse", None), ("temporal_reuse_l1", 1)):
        reuse = rows[name]
        assert reuse["status"] == "ok" and reuse["config"]["feature_reuse"] is True and reuse["parity_pass"] is True
        assert reuse["config"]["reuse_layers"] == layers
        for b in ("1", "8"):  # reuse 4: one full call in four, the others partial
            r = reuse["reuse"][b]
            assert r["calls"] == {"keep": 2, "reuse": 6}
            assert 0 < r["reuse_median_ms"] and 0 < r["keep_median_ms"]
            assert r["avg_ms_per_call"]["2"] == pytest.approx((r["keep_median_ms"] + r["reuse_median_ms"]) / 2,
                                                              abs=2e-3)
            assert r["partial_vs_full_max"] == 0  # eager: a partial frame on its own frame is the full frame
    # The two reuse rows the CPU runs: the target names the one with the lower average.
    avg4, best = min((rows[n]["reuse"]["1"]["avg_ms_per_call"]["4"], n)
                     for n in ("temporal_reuse", "temporal_reuse_l1"))
    assert res["targets"]["b1_reuse4_avg_le_4ms"] == {"met": avg4 <= 4.0, "ms": avg4, "row": best}
    assert list(rows["temporal_reuse"]["reuse"]["1"]["avg_ms_per_call"]) == [str(n) for n in range(2, 9)]
    # tiny-random on the CPU is far from 4 ms a frame at any setting: no reuse setting brings it there.
    assert res["targets"]["b1_reuse_avg_le_4ms_from"] is None
    # A row that fails is recorded with its error, and the rows after it still run (lean_math above).
    assert rows["broken"]["status"] == "error" and "attention must be one of" in rows["broken"]["error"]
    assert res["errors"] == [f"broken: {rows['broken']['error']}"]
    assert res["targets"]["b1_le_5ms"]["row"] in rows and res["targets"]["compiled_b8_ge_300fps"] is None
    profile = rows["baseline"]["profile"]
    assert profile["path"] == "eager (CPU)" and len(profile["top30"]) == 30
    with gzip.open(profile["trace"], "rt") as f:
        assert "traceEvents" in json.load(f)
    assert "aten::" in Path(profile["table"]).read_text()
    # Where the frame's time goes, by kind; the CPU's operators are nested, so their calls count each level.
    kinds = profile["by_kind"]
    assert {"gemm", "conv", "attention", "norm"} <= set(kinds) and profile["calls_per_frame"] > 0
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0, abs=1e-3)
    assert "kind" in Path(profile["table"]).read_text()
    # A second profiled row: prompt_kv's frame runs fewer GEMM operators (the keys' and values' projections).
    assert rows["prompt_kv"]["profile"]["by_kind"]["gemm"]["calls_per_frame"] < kinds["gemm"]["calls_per_frame"]
    assert "profile" not in rows["attn_math"]
    assert "baseline" in proc.stdout and "targets:" in proc.stdout


def test_budget_skips_rows_that_no_longer_fit_and_says_how_to_run_them(tmp_path):
    proc, res = _run(tmp_path, "--rows", "baseline,attn_math", "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("baseline", "attn_math"):
        assert "time budget" in res["rows"][name]["skipped"] and f"--rows {name}" in res["rows"][name]["skipped"]
    assert res["targets"] == {"b1_le_5ms": None, "b8_ge_350fps": None, "compiled_b8_ge_300fps": None,
                              "b1_reuse4_avg_le_4ms": None, "b1_reuse_avg_le_4ms_from": None}


def test_reuse_targets_name_the_least_setting_within_4ms(monkeypatch):
    """targets(): among rows whose parity passes, the least reuse N whose batch-1 average is at most 4 ms."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("engine_rows", SCRIPT)
    rows_mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "engine_rows", rows_mod)  # its dataclasses look their module up there
    spec.loader.exec_module(rows_mod)

    def row(avg: dict, parity=True) -> dict:
        return {"status": "ok", "parity_pass": parity, "timing": {"1": {"median_ms": 7.0}, "8": {"median_ms": 30.0}},
                "reuse": {"1": {"avg_ms_per_call": avg}}}

    got = rows_mod.targets({"a": row({"2": 5.0, "3": 4.4, "4": 4.1, "5": 3.9}),
                            "b": row({"2": 4.6, "3": 4.0, "4": 3.7}),
                            "c": row({"2": 3.0}, parity=False)})  # fails parity: never counts
    assert got["b1_reuse_avg_le_4ms_from"] == {"reuse": 3, "ms": 4.0, "row": "b"}
    assert got["b1_reuse4_avg_le_4ms"] == {"met": True, "ms": 3.7, "row": "b"}


def test_kernel_kinds_of_typical_names(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("engine_rows", SCRIPT)
    rows_mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "engine_rows", rows_mod)  # its dataclasses look their module up there
    spec.loader.exec_module(rows_mod)
    kinds = {
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "conv",
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "gemm",
        "ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_tn": "gemm",
        "triton_tem_fused_addmm_4": "gemm",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>": "attention",
        "fmha_cutlassF_f16_aligned_64x64_rf_sm80": "attention",
        "triton_red_fused_native_group_norm_silu_2": "norm",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>": "norm",
        "triton_poi_fused_add_convolution_gelu_mul_7": "fused (triton)",  # a conv's epilogue, not the conv
        "triton_poi_fused__to_copy_add_mul_1": "fused (triton)",
        "triton_tem_fused_convolution_3": "conv",
        "block_stats": "norm", "normalize": "norm", "bias_act": "elementwise",  # --fused-norm's, --fused-epilogue's
        "void at::native::(anonymous namespace)::ComputeFusedParamsCUDAKernel<c10::Half, float>": "norm",
        "Memcpy DtoD (Device -> Device)": "copy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>": "elementwise",
        "aten::addmm": "gemm", "aten::mkldnn_convolution": "conv", "aten::native_group_norm": "norm",
        "something_new": "other",
    }
    assert {name: rows_mod.kernel_kind(name) for name in kinds} == kinds


def test_bad_rows_are_refused(tmp_path):
    for args, message in ((["--rows", "baseline,warp"], "unknown rows ['warp']"),
                          (["--profile-row", "baseline,warp"], "unknown rows ['warp']"),
                          (["--row", "x:speed=11"], "is not FIELD=VALUE"), (["--row", "baseline:fp8=true"], "NAME"),
                          (["--row", "x:compile=true,inductor.warp_speed=1"], "has no setting 'warp_speed'")):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(tmp_path / "r.json")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "r.json").exists()


def test_compile_mode_and_dynamic_reach_torch_compile(monkeypatch, tiny_components):
    """Engine._compile passes EngineConfig.compile_mode to every torch.compile call (None: torch's default mode), and
    dynamic=False (a static graph per bucket) unless compile_dynamic asks for torch's automatic dynamic shapes."""
    import torch

    from turbostream.config import preset
    from turbostream.engine import Engine

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    for mode, want in (("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"), ("default", None)):
        seen.clear()
        engine = Engine(preset("test", compile_mode=mode, compile_cache=None), tiny_components)
        engine._compile()  # what warmup() does on CUDA
        assert [kw.get("mode", "missing") for kw in seen] == [want] * 3  # the UNet, TAESD's encoder and decoder
        assert [kw.get("dynamic", "missing") for kw in seen] == [False] * 3  # one static graph per bucket
    seen.clear()
    engine = Engine(preset("test", compile_dynamic=True, compile_cache=None), tiny_components)
    engine._compile()
    assert [kw.get("dynamic", "missing") for kw in seen] == [None] * 3  # compile_dynamic: torch's automatic choice


def test_compile_says_which_batch_size_it_is_compiling(monkeypatch, tiny_components, caplog):
    """A first `--compile` start spends minutes in Engine._compile: it logs each batch size as it starts and ends it,
    in bucket order, not only the total at the end."""
    import logging

    import torch

    from turbostream.config import preset
    from turbostream.engine import Engine

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    engine = Engine(preset("test", buckets=(1, 2, 4), compile_cache=None), tiny_components)
    with caplog.at_level(logging.INFO, logger="turbostream.engine"):
        engine._compile()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch.compile: batch size")]
    assert [line.split(" in ")[0] for line in lines] == [
        "torch.compile: batch size 1 (1 of 3)...", "torch.compile: batch size 1 ready",
        "torch.compile: batch size 2 (2 of 3)...", "torch.compile: batch size 2 ready",
        "torch.compile: batch size 4 (3 of 3)...", "torch.compile: batch size 4 ready"]
    assert any(r.getMessage().startswith("torch.compile: ") and "for buckets (1, 2, 4)" in r.getMessage()
               for r in caplog.records)
