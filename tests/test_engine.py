"""The engine against diffusers' own pipelines on tiny random models (CPU, fp32)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from turbostream.config import StreamParams, parse_size


def _reference(components, engine, frames, params):
    """diffusers' img2img (reference.py) on the same model, images, prompt embeddings, steps, strength and seeds.

    On components of its own, freshly loaded (the same weights): those the engine was given carry its attention
    processors and lean resnets, and a reference run on them compared the engine with itself."""
    from turbostream.reference import ReferencePipeline, reference_components

    fresh = reference_components("tiny-random", dtype=components.unet.dtype, vae=components.vae_kind)
    emb = torch.stack([engine.prompt_embeddings(p.prompt) for p in params])
    return ReferencePipeline(fresh).run(frames, params, emb)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("steps,strength,evals", [(2, 0.5, 1), (4, 0.5, 2), (1, 1.0, 1), (3, 1.0, 3)])
def test_engine_matches_diffusers_img2img(make_engine, tiny_components, frame_rng, steps, strength, evals):
    engine = make_engine()
    frames = [frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    params = [StreamParams("a red fox", strength, steps, seed) for seed in (3, 11)]
    assert params[0].unet_evals == evals
    ours = engine.run(frames, params)
    ref = _reference(tiny_components, engine, frames, params)
    for o, r in zip(ours, ref):
        assert o.shape == (64, 64, 3) and o.dtype == np.uint8
        assert _max_diff(o, r) <= 2
        assert o.std() > 20  # a real picture, not a constant: the comparison means something


def test_engine_matches_diffusers_with_full_vae(make_engine, tiny_full_vae_components, frame_rng):
    """The full AutoencoderKL path: the engine encodes to the posterior's mean (a stable picture every frame), and
    so does the reference (it hands diffusers the mean's latents)."""
    engine = make_engine(components=tiny_full_vae_components, vae="full")
    frames = [frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    params = [StreamParams("a lighthouse", 0.5, 2, 5)]
    ours = engine.run(frames, params)[0]
    assert ours.std() > 20 and _max_diff(ours, _reference(tiny_full_vae_components, engine, frames, params)[0]) <= 2


def test_float16_path_matches_diffusers_in_float16(make_engine, frame_rng):
    """The engine's fp16 path (fp32 latents and Euler steps, fp16 networks) against diffusers' fp16 pipeline."""
    from turbostream.models import load_components

    comps = load_components("tiny-random", device="cpu", dtype=torch.float16)
    engine = make_engine(components=comps, dtype="float16")
    frames = [frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    params = [StreamParams("a red fox", 0.5, 2, 3)]
    out = engine.run(frames, params)[0]
    assert out.std() > 20 and _max_diff(out, _reference(comps, engine, frames, params)[0]) <= 2
    with pytest.raises(ValueError, match="components are torch.float16 but the engine runs torch.float32"):
        make_engine(components=comps)


def test_mixed_batch_equals_each_frame_alone(make_engine, frame_rng):
    engine = make_engine()
    frames = [frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    params = [
        StreamParams("a cat", 0.5, 2, 1),
        StreamParams("a dog", 0.7, 2, 2),  # same single evaluation as 0.5 (int(2 * 0.7) = 1)
        StreamParams("a watercolor", 0.5, 4, 3),  # two evaluations: a separate group
        StreamParams("a cat", 0.5, 2, 4),
    ]
    together = engine.run(frames, params)
    for frame, p, out in zip(frames, params, together):
        alone = engine.run([frame], [p])[0]
        assert _max_diff(out, alone) <= 1
    # Different prompts and seeds really give different pictures.
    assert np.abs(together[0].astype(int) - together[3]).mean() > 5
    assert np.abs(together[0].astype(int) - engine.run([frames[0]], [params[1]])[0]).mean() > 1


def test_batches_larger_than_the_largest_bucket_are_split(make_engine, frame_rng):
    engine = make_engine(buckets=(1, 2))
    frames = [frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    params = [StreamParams("x", seed=i) for i in range(5)]
    outs = engine.run(frames, params)
    assert len(outs) == 5
    assert _max_diff(outs[4], engine.run([frames[4]], [params[4]])[0]) <= 1


def test_any_input_size_is_center_cropped_and_resized(make_engine, frame_rng):
    engine = make_engine()
    wide = frame_rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    out = engine.run([wide], [StreamParams()])[0]
    assert out.shape == (64, 64, 3)
    # The same picture as feeding the center square ourselves, resized the same way.
    from turbostream.codec import fit_frame

    center = np.ascontiguousarray(wide[:, 35:125])
    assert _max_diff(out, engine.run([fit_frame(center, 64, 64)], [StreamParams()])[0]) <= 1


def test_non_square_size(make_engine, frame_rng):
    engine = make_engine(width=128, height=64)
    out = engine.run([frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)], [StreamParams()])[0]
    assert out.shape == (64, 128, 3)


@pytest.mark.parametrize("spacing, steps", [("trailing", 1), ("trailing", 4), ("leading", 4), ("linspace", 4)])
def test_generate_matches_diffusers_text_to_image(make_engine, tiny_components, spacing, steps):
    """SD-Turbo's trailing spacing, and the spacings of SD 1.x/2.x-base models: leading starts text-to-image from
    noise scaled by sqrt(sigma^2 + 1), not sigma (the scheduler's init_noise_sigma)."""
    import dataclasses

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler.from_config(tiny_components.scheduler.config, timestep_spacing=spacing)
    components = dataclasses.replace(tiny_components, scheduler=scheduler)
    engine = make_engine(components)
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    ours = engine.generate("a castle", steps=steps, seed=9)
    ref = pipe(prompt_embeds=engine.prompt_embeddings("a castle")[None], num_inference_steps=steps,
               guidance_scale=0.0, height=64, width=64, generator=torch.Generator("cpu").manual_seed(9),
               output_type="np").images
    assert ours.shape == (64, 64, 3)
    assert _max_diff(ours, (ref[0] * 255).round().astype(np.uint8)) <= 2  # diffusers' numpy_to_pil rounding


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_a_unet_that_does_not_predict_noise_is_refused(make_engine, tiny_components, prediction):
    """The frame math is Euler on predicted noise: another prediction type would give wrong frames, so it is refused
    before the engine changes anything."""
    import dataclasses

    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(tiny_components.scheduler.config, prediction_type=prediction)
    with pytest.raises(ValueError, match=f"predicts '{prediction}'.*'epsilon'"):
        make_engine(dataclasses.replace(tiny_components, scheduler=scheduler))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(steps=2, strength=0.4), "steps x strength must be at least 1"),
        (dict(steps=0), "steps must be between 1 and"),
        (dict(steps=11), "steps must be between 1 and 10"),
        (dict(steps=2.0), "steps must be an integer"),
        (dict(strength=0.0), "strength must be in (0, 1]"),
        (dict(strength=1.5), "strength must be in (0, 1]"),
        (dict(strength=float("nan")), "strength must be in (0, 1]"),
        (dict(strength="high"), "strength must be a number"),
        (dict(seed=-1), "seed must be between 0 and"),
        (dict(seed=True), "seed must be an integer"),
        (dict(prompt=None), "prompt must be a string"),
        (dict(prompt="x" * 1001), "the limit is 1000"),
        (dict(prompt="ok \ud800"), "unpaired surrogate at character 3"),
    ],
)
def test_bad_parameters_give_clear_errors(make_engine, changes, message):
    engine = make_engine()
    bad = StreamParams(**{**StreamParams().__dict__, **changes})
    with pytest.raises(ValueError) as err:
        engine.run([np.zeros((64, 64, 3), np.uint8)], [bad])
    assert message in str(err.value)
    with pytest.raises(ValueError, match="unknown stream parameter"):
        StreamParams().updated(guidance=7)


def test_bad_frames_and_calls_give_clear_errors(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="uint8 RGB array"):
        engine.run([np.zeros((64, 64), np.uint8)], [StreamParams()])
    with pytest.raises(ValueError, match="uint8 RGB array"):
        engine.run([np.zeros((64, 64, 3), np.float32)], [StreamParams()])
    with pytest.raises(ValueError, match="too small"):
        engine.run([np.zeros((4, 64, 3), np.uint8)], [StreamParams()])
    with pytest.raises(ValueError, match="2 frames but 1 parameter sets"):
        engine.run([np.zeros((64, 64, 3), np.uint8)] * 2, [StreamParams()])
    assert engine.run([], []) == []


@pytest.mark.parametrize("text", ["0", "100", "64x65", "2048", "axb", "1x2x3"])
def test_bad_sizes_are_rejected(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
    assert parse_size("768x512") == (768, 512) and parse_size("512") == (512, 512)


def test_prompt_cache_is_bounded_and_text_encoder_runs_once_per_prompt(make_engine):
    engine = make_engine(prompt_cache_size=3)
    frame = np.zeros((64, 64, 3), np.uint8)
    for _ in range(3):
        engine.run([frame], [StreamParams("same prompt")])
    assert engine.stats.text_encoder_runs == 1
    for i in range(20):
        engine.prompt_embeddings(f"prompt {i}")
    assert engine.prompt_cache_len == 3
    assert engine.stats.text_encoder_runs == 21
    assert engine.stats.prompt_cache_evictions == 18


def test_engine_refuses_a_second_thread(make_engine):
    engine = make_engine()
    engine.warmup()
    errors = []

    def other():
        try:
            engine.run([np.zeros((64, 64, 3), np.uint8)], [StreamParams()])
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors and "one inference thread" in errors[0]


def test_random_models_tokenizer_works_offline():
    from turbostream.models import byte_level_clip_tokenizer

    tok = byte_level_clip_tokenizer()
    ids = tok("Hello, world! ünïcode", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and max(ids) < 514
    assert tok("a cat").input_ids != tok("a dog").input_ids


def test_pipelined_calls_hand_out_their_own_frames(make_engine, frame_rng):
    """submit/collect: a call's frames are not overwritten by the call submitted after it (two host slots), they equal
    run()'s, a third call in flight is refused, and a failed submit leaves its slot free."""
    engine = make_engine()
    frames = [frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    calls = [([frames[0], frames[1]], [StreamParams("a fox", 0.5, 2, 1), StreamParams("an owl", 1.0, 2, 2)]),
             ([frames[2]], [StreamParams("a cat", 0.5, 4, 3)]),
             ([frames[1], frames[0]], [StreamParams("a lake", 0.7, 3, 4)] * 2)]
    want = [engine.run(f, p) for f, p in calls]
    assert not any(np.array_equal(want[0][0], w[0]) for w in want[1:])  # the check below can tell them apart
    first = engine.submit(*calls[0])
    second = engine.submit(*calls[1])
    assert engine.in_flight == 2
    with pytest.raises(RuntimeError, match="in flight"):
        engine.submit(*calls[2])
    with pytest.raises(RuntimeError, match="in flight"):
        engine.trace(frames[0], StreamParams())
    got_first = engine.collect(first)
    third = engine.submit(*calls[2])  # reuses the first call's slot, now collected
    assert all(np.array_equal(g, w) for g, w in zip(got_first, want[0]))
    assert all(np.array_equal(g, w) for g, w in zip(engine.collect(second), want[1]))
    assert all(np.array_equal(g, w) for g, w in zip(engine.collect(third), want[2]))
    with pytest.raises(RuntimeError, match="collected already"):
        engine.collect(third)
    with pytest.raises(ValueError):
        engine.submit([frames[0]], [StreamParams(steps=99)])
    assert engine.in_flight == 0
    # A submit that fails inside its work (out of memory encoding a new prompt) while another call is in flight:
    # the batcher retries its frames one by one at once, and they must get the free slot, not the busy one.
    running = engine.submit(*calls[0])
    real_embeddings = engine.prompt_embeddings

    def out_of_memory(prompt):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    engine.prompt_embeddings = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        engine.submit([frames[2]], [StreamParams("a brand new prompt")])
    engine.prompt_embeddings = real_embeddings
    assert engine.in_flight == 1
    assert all(np.array_equal(g, w) for g, w in zip(engine.run(*calls[1]), want[1]))  # was "in flight already"
    assert all(np.array_equal(g, w) for g, w in zip(engine.collect(running), want[0]))


def test_calls_carry_the_devices_timeline(make_engine, frame_rng):
    """collect() gives each call its device time (on the CPU: the compute inside submit) and the device's idle time
    before it: none for an engine's first call, the pause between two calls for the next."""
    engine = make_engine()
    frames, params = [frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)], [StreamParams("a fox")]
    t0 = time.perf_counter()
    first = engine.submit(frames, params)
    t1 = time.perf_counter()
    assert first.device_s is None  # known once collected
    engine.collect(first)
    assert 0 < first.device_s <= t1 - t0 and first.gap_s is None
    time.sleep(0.1)
    second = engine.submit(frames, params)
    engine.collect(second)
    assert 0 < second.device_s and 0.1 <= second.gap_s < 0.1 + (time.perf_counter() - t1)


def test_the_timeline_of_cuda_events_in_seconds():
    """The CUDA branch of the timeline, with stand-in events (milliseconds apart on one stream): device seconds from
    the call's start to its end, idle seconds from the previous call's end (never below 0), the end event waited for
    first (it follows the slot's event collect() waited for)."""
    from turbostream.engine.engine import _timeline

    class Event:
        def __init__(self, t_ms: float) -> None:
            self.t_ms, self.waited = t_ms, False

        def synchronize(self) -> None:
            self.waited = True

        def elapsed_time(self, later: "Event") -> float:
            return later.t_ms - self.t_ms

    previous, started, ended = Event(10.0), Event(12.5), Event(40.5)
    assert _timeline(started, ended, previous) == (pytest.approx(0.028), pytest.approx(0.0025)) and ended.waited
    assert _timeline(started, ended, None) == (pytest.approx(0.028), None)
    assert _timeline(Event(10.0), Event(11.0), Event(10.001))[1] == 0.0  # queued: clock skew never makes it negative


def test_a_call_split_into_batches_keeps_each_batch(make_engine, frame_rng):
    """A call larger than one batch (two step counts, and more frames than the largest bucket) runs its batches
    through one host slot: each batch's frames are handed out before the next overwrites the slot."""
    engine = make_engine()
    frames = [frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    params = [StreamParams(f"p{i}", 0.5, 2 if i % 3 else 4, i) for i in range(6)]
    together = engine.collect(engine.submit(frames, params))
    alone = [engine.run([f], [p])[0] for f, p in zip(frames, params)]
    assert all(_max_diff(t, a) <= 1 for t, a in zip(together, alone))  # batch size moves float sums by a level
    assert all(np.abs(together[i].astype(int) - together[i + 1]).mean() > 5 for i in range(5))  # all distinct


def test_unchanged_rows_are_not_copied_again(make_engine, frame_rng):
    """A stream that keeps its row, prompt and seed leaves its embeddings and noise rows as they are; a new prompt, a
    new seed or another stream in the row copies again, and the frames stay those of a fresh engine."""
    engine, fresh = make_engine(), make_engine()
    frames = [frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    a, b = StreamParams("a fox", seed=1), StreamParams("an owl", seed=2)
    engine.run(frames, [a, b])
    assert engine.stats.rows_reused == 0
    engine.run(frames, [a, b])
    assert engine.stats.rows_reused == 4  # embeddings and noise of both rows
    out = engine.run(frames, [b, a.updated(seed=5)])  # rows swapped, and a new seed: all four copied
    assert engine.stats.rows_reused == 4
    want = fresh.run(frames, [b, a.updated(seed=5)])
    assert all(np.array_equal(o, w) for o, w in zip(out, want))
    engine.run(frames, [b, a.updated(prompt="a cat", seed=5)])  # row 0 unchanged, row 1: new prompt, same noise
    assert engine.stats.rows_reused == 4 + 3


def test_the_reference_refuses_components_an_engine_prepared(make_engine, tiny_components):
    """The engine puts its own attention processors and resnets into the modules it is given: a reference on them
    checked the engine against itself (a causal-attention bug passed every "matches diffusers" test)."""
    from turbostream.reference import ReferencePipeline

    make_engine()  # prepares the shared tiny components
    with pytest.raises(ValueError, match="prepared by an Engine"):
        ReferencePipeline(tiny_components)
