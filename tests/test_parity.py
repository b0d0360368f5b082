"""The parity reference, statistics, pass rule and stage diagnosis (CPU, tiny-random), and the pass rule on CUDA."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from turbostream.config import StreamParams, preset
from turbostream.parity import compare_traces, parity_stats, parity_verdict
from turbostream.reference import NonFiniteError, ReferencePipeline, reference_components, tf32_off


@pytest.fixture(scope="module")
def fresh():
    """Fresh tiny-random reference components per VAE kind (fp32, CPU), never handed to an Engine."""
    return {vae: reference_components("tiny-random", vae=vae) for vae in ("tiny", "full")}


def _frames(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("vae", ["tiny", "full"])
def test_reference_matches_the_engine_in_fp32(make_engine, tiny_components, tiny_full_vae_components, fresh, vae):
    engine = make_engine(components=tiny_components if vae == "tiny" else tiny_full_vae_components, vae=vae)
    frames = _frames(2)
    params = [StreamParams("a red fox", 0.5, 2, 3), StreamParams("a lighthouse", 0.5, 2, 11)]
    ref = ReferencePipeline(fresh[vae]).run(frames, params)  # diffusers encodes the prompts itself
    ours = engine.run(frames, params)
    assert parity_stats(ours, ref)["max"] <= 2
    assert all(r.dtype == np.uint8 and r.shape == (64, 64, 3) and r.std() > 20 for r in ref)
    assert np.abs(ref[0].astype(int) - ref[1]).mean() > 5  # the seeds and prompts really differ


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_reference_matches_the_engine_for_other_timestep_spacings(make_engine, tiny_components, fresh, spacing):
    """SD 1.x/2.x-base models space their timesteps otherwise than SD-Turbo (trailing): the engine's schedules come
    from the model's scheduler config, so its frames still follow diffusers' img2img."""
    from diffusers import EulerDiscreteScheduler

    def spaced(components):
        return dataclasses.replace(components, scheduler=EulerDiscreteScheduler.from_config(
            components.scheduler.config, timestep_spacing=spacing))

    engine = make_engine(components=spaced(tiny_components))
    frames = _frames(3, seed=5)
    params = [StreamParams("a red fox", 0.5, 2, 3), StreamParams("a red fox", 0.5, 4, 3),
              StreamParams("a lighthouse", 0.3, 10, 11)]
    ref = ReferencePipeline(spaced(fresh["tiny"])).run(frames, params)
    assert parity_stats(engine.run(frames, params), ref)["max"] <= 2


def test_the_reference_draws_its_noise_in_float32_in_every_dtype(monkeypatch, fresh):
    """Where PyTorch's CPU sampler gives float16 another sample than float32 for one seed (older versions; emulated
    here), a float16 reference still starts from the float32 draw, as the engine does: its frames stay within a
    level of the float32 reference, while diffusers' own draw in float16 (noise_dtype=None) lands elsewhere."""
    real = torch.randn

    def randn(*args, dtype=None, **kw):
        if dtype in (torch.float16, torch.bfloat16):  # another sample of the same generator, not a rounding
            return real(*args, dtype=torch.float32, **kw).flip(-1).to(dtype)
        return real(*args, dtype=dtype, **kw)

    frames, params = _frames(2), [StreamParams("a fox", 0.5, 2, 3), StreamParams("an owl", 0.5, 2, 4)]
    r = ReferencePipeline(fresh["tiny"]).run(frames, params)
    half = reference_components("tiny-random", vae="tiny", dtype=torch.float16)
    monkeypatch.setattr(torch, "randn", randn)
    same_noise = parity_stats(ReferencePipeline(half).run(frames, params), r)
    own_noise = parity_stats(ReferencePipeline(half, noise_dtype=None).run(frames, params), r)
    assert same_noise["max"] <= 1, same_noise
    assert own_noise["max"] >= 20 and own_noise["mean"] > 20 * max(same_noise["mean"], 0.01), own_noise


def test_reference_refuses_components_an_engine_prepared():
    comps = reference_components("tiny-random")
    comps.unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="prepared by an Engine"):
        ReferencePipeline(comps)
    comps = reference_components("tiny-random")
    comps.unet.to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="prepared by an Engine"):
        ReferencePipeline(comps)


def test_reference_fails_loudly_on_nan():
    comps = reference_components("tiny-random")
    comps.vae.decoder.layers[-1].bias.data[0] = float("nan")
    with pytest.raises(NonFiniteError, match="reference decoded image"):
        ReferencePipeline(comps).run(_frames(1), [StreamParams()])


def test_tf32_off_restores_the_settings_even_on_error():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with pytest.raises(RuntimeError), tf32_off():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            raise RuntimeError
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_stats_on_hand_made_frames():
    ref = np.zeros((2, 10, 10, 3), np.uint8)
    ours = ref.copy()
    ours[0, 0, 0, 0] = 255  # uint8 in: no wrap-around (0 - 255 is 255 levels, not 1)
    ours[1, :, :, 1] = 1  # a third of all values off by 1
    stats = parity_stats(list(ours), list(ref))
    assert stats["max"] == 255 and stats["p99"] == 1
    assert stats["mean"] == pytest.approx((255 + 100) / 600, abs=1e-4) and stats["frames"] == 2
    assert parity_stats(ref, ours)["max"] == 255
    with pytest.raises(ValueError, match="shapes differ"):
        parity_stats(ours[:1], ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_stats_refuse_non_finite_frames(bad):
    ours = np.zeros((1, 4, 4, 3), np.float32)
    ours[0, 1, 2, 0] = bad
    with pytest.raises(NonFiniteError, match="ours: .* of 48"):
        parity_stats(ours, np.zeros((1, 4, 4, 3), np.uint8))


def test_verdict_is_the_issues_rule():
    p16 = {"mean": 0.4, "p99": 3.0, "max": 20.0}
    ok = parity_verdict({"mean": 2.0, "p99": 6.0, "max": 40.0}, p16)  # mean under the 2-level floor, rest at 2x
    assert ok == {"pass": True, "limits": {"mean": 2.0, "p99": 6.0, "max": 40.0}, "failed": []}
    bad = parity_verdict({"mean": 2.1, "p99": 6.0, "max": 41.0}, p16)
    assert not bad["pass"] and bad["failed"] == ["mean", "max"]
    assert parity_verdict({"mean": 0, "p99": 0, "max": 2}, {"mean": 0, "p99": 0, "max": 0})["pass"]
    with pytest.raises(NonFiniteError):
        parity_verdict({"mean": float("nan"), "p99": 0, "max": 0}, p16)


def test_trace_comparison_finds_the_first_stage_that_parts(make_engine, tiny_components, frame_rng):
    from turbostream.models import load_components

    frame, params = frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), StreamParams("a cat", 0.5, 4, 5)
    base = make_engine().trace(frame, params)
    assert list(base) == ["latent", "noisy", "eps_0", "x_0", "eps_1", "x_1", "image", "output"]
    same = compare_traces(make_engine().trace(frame, params), base)
    assert same["first_over"] is None and max(same["stages"].values()) == 0
    # The same VAE, another UNet: latent and noisy agree, the first UNet output parts.
    other = dataclasses.replace(load_components("tiny-random", seed=1), vae=tiny_components.vae)
    diff = compare_traces(make_engine(components=other).trace(frame, params), base)
    assert diff["first_over"] == "eps_0" and diff["stages"]["noisy"] == 0 and diff["stages"]["eps_0"] > 0.1
    broken = dict(base, x_0=base["x_0"].clone().fill_(float("nan")))
    with pytest.raises(NonFiniteError, match="stage 'x_0' \\(ours\\)"):
        compare_traces(broken, base)


@pytest.mark.gpu
@pytest.mark.parametrize("vae", ["tiny", "full"])
def test_cuda_fp16_engine_passes_the_parity_rule(vae):
    """The issue's rule on CUDA: E16 (graphs; batch 1 and 3 frames in bucket 4) vs R (fp32, TF32 off) vs P16."""
    from turbostream.engine import Engine

    size, frames = 128, _frames(3, 128, seed=9)
    params = [StreamParams(p, 0.5, 2, s) for p, s in (("a lighthouse", 77), ("a fox", 5), ("a cat", 123))]
    ref = ReferencePipeline(reference_components("tiny-random", device="cuda", vae=vae)).run(frames, params)
    p16 = ReferencePipeline(reference_components("tiny-random", device="cuda", dtype=torch.float16, vae=vae))
    p16_out = p16.run(frames, params)
    engine = Engine(preset("test", device="cuda", dtype="float16", width=size, height=size, vae=vae, buckets=(1, 4)))
    engine.warmup()
    singles = [engine.run([f], [p])[0] for f, p in zip(frames, params)]
    padded = engine.run(frames, params)
    assert engine.stats.graph_replays == 4
    p16_stats = parity_stats(p16_out, ref)
    for ours in (singles, padded):
        verdict = parity_verdict(parity_stats(ours, ref), p16_stats)
        assert verdict["pass"], (parity_stats(ours, ref), p16_stats, verdict)


@pytest.mark.slow
def test_gpu_parity_script_runs_on_the_cpu(tmp_path):
    """scripts/gpu_parity.py end to end on the CPU (a cut-down run): JSON with the bench's parity keys, exit 0."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "gpu_parity.py"
    spec = importlib.util.spec_from_file_location("gpu_parity", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "parity.json"
    args = script.parse(["--device", "cpu", "--model", "tiny-random", "--size", "64", "--frames", "1", "--seeds",
                         "3", "--vaes", "tiny", "--variants", "eager,sdpa_efficient", "--out", str(out)])
    assert script.Run(args).main() == 0
    res = json.loads(out.read_text())
    assert set(res["summary"]["tiny"]) == {"parity_pass", *(f"parity_{w}_{k}" for w in ("engine", "pipeline_fp16")
                                                           for k in ("max", "p99", "mean"))}
    steps = res["vae"]["tiny"]
    assert steps["E16"]["pass"] and steps["variant_eager"]["pass"] and "stages" in steps["diagnosis"]
    assert steps["variant_sdpa_efficient"]["skipped"] == "CUDA only" and not res["errors"]
    assert script.Run(script.parse([*map(str, ["--device", "cpu", "--model", "tiny-random", "--size", 64,
                                               "--budget-s", 0, "--out", out])])).main() == 1  # nothing ran: FAIL


def test_controls_at_their_defaults_leave_the_output_bit_identical(make_engine):
    """The parity rule for the live-video controls: with similarity, transition_s and feedback at 0 and a plain
    prompt, each frame is bit for bit what the frame math gives with no controls' inputs at all (the path the
    diffusers comparisons above hold to), whatever a feedback stream left in the shared buffers, in the same batch
    or before, with or without stream keys."""
    engine = make_engine()
    frames = _frames(3, seed=4)
    params = [StreamParams("a red fox", 0.5, 2, 3), StreamParams("a lighthouse", 0.7, 2, 11),
              StreamParams("a cat", 0.5, 4, 5)]

    def plain(rows: list[int]) -> list[np.ndarray]:
        """FrameMath as it was before the controls: no prev, no feedback, no latents out; one batch of `rows`."""
        ps = [params[i] for i in rows]
        n = ps[0].unet_evals
        scheds = [engine.schedules.get(p.steps, n) for p in ps]
        with torch.inference_mode():
            out = engine.math(
                torch.from_numpy(np.stack([frames[i] for i in rows])),
                torch.stack([engine.prompt_embeddings(p.prompt) for p in ps]),
                torch.stack([engine.noise(p.seed) for p in ps]),
                torch.tensor([s.timesteps for s in scheds]).T.contiguous(),
                torch.tensor([s.sigmas for s in scheds]).T.contiguous(),
            )
        return list(out.numpy())

    want = dict(zip([0, 1], plain([0, 1]))) | {2: plain([2])[0]}
    # Feedback streams run first and leave their latents and weights behind; then poison the previous-latent rows.
    fed = [p.updated(feedback=0.9, transition_s=1.0) for p in params]
    for _ in range(2):
        engine.run(frames, fed, streams=["f0", "f1", "f2"])
    engine._prev.fill_(float("nan"))
    for keys in (None, ["a", "b", "c"]):
        outs = engine.run(frames, params, streams=keys)
        assert all(np.array_equal(outs[i], want[i]) for i in range(3))
    # A default stream batched with a feedback stream (whose row is NaN-free and blends): still bit-identical.
    engine._prev.zero_()
    mixed = engine.run(frames[:2], [params[0], fed[1]], streams=["a", "f1"])
    alone_batch = plain([0, 1])
    assert np.array_equal(mixed[0], alone_batch[0]) and not np.array_equal(mixed[1], alone_batch[1])
