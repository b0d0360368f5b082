"""The live-video controls in the engine and in the producers' similarity filter (CPU, tiny-random, no sockets)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from turbostream.config import StreamParams, parse_prompt
from turbostream.engine.streams import lerp, slerp


def _scene(rng, noise: float = 0.0, shift: int = 0) -> np.ndarray:
    """A smooth 64x64 picture (gradients and a block), shifted right by `shift`, with Gaussian 'sensor' noise."""
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    x = x - shift
    img = np.stack([x * 3 % 256, y * 4, 128 + 60 * np.sin(x / 6)], -1)
    img[20:40, 10:30] = (200, 40, 90)
    if noise:
        img = img + rng.normal(0, noise, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _flicker(outs: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(outs, outs[1:])]))


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------------------------------------ feedback


def test_feedback_lowers_still_scene_flicker(make_engine):
    engine = make_engine()
    rng = np.random.default_rng(0)
    clip = [_scene(rng, noise=6) for _ in range(20)]
    plain = [engine.run([f], [StreamParams("a cat")], streams=["a"])[0] for f in clip]
    fed = [engine.run([f], [StreamParams("a cat", feedback=0.5)], streams=["b"])[0] for f in clip]
    assert np.array_equal(fed[0], plain[0])  # the first frame has no previous output to blend
    # Random weights' outputs are far from their inputs (x0 about 10x the input latent's scale), so the first
    # frames drift to the loop's fixed point; from then on the loop damps the sensor noise.
    assert _flicker(fed[12:]) < 0.5 * _flicker(plain[12:]), (_flicker(fed[12:]), _flicker(plain[12:]))
    assert engine.stream_states == 2
    engine.release_stream("b")
    assert engine.stream_states == 1


def test_feedback_state_is_per_stream_and_freed_when_off(make_engine):
    engine = make_engine()
    rng = np.random.default_rng(1)
    a, b = _scene(rng, 4), _scene(rng, 4, shift=9)
    fb = StreamParams("x", feedback=0.6)
    engine.run([a, b], [fb, fb], streams=[1, 2])
    # Stream 1's next frame blends its own previous latent, not stream 2's: the same as running it alone after.
    together = engine.run([a, b], [fb, fb], streams=[1, 2])
    other = make_engine()
    other.run([a], [fb], streams=[1])
    alone = other.run([a], [fb], streams=[1])[0]
    assert np.abs(together[0].astype(int) - alone).max() <= 1  # batch 2 vs 1: CPU kernels may round differently
    assert engine._streams.get(1).latent is not None
    engine.run([a], [StreamParams("x")], streams=[1])
    assert engine._streams.get(1).latent is None  # feedback off frees the latent


def test_stream_states_are_bounded_least_recently_used_first(make_engine):
    """A caller that never releases its streams (a long `run` restarted with new keys, a client of the engine API)
    keeps at most max_stream_states of them: the one used longest ago goes, with its feedback latent."""
    engine = make_engine(max_stream_states=3)
    frame = _scene(np.random.default_rng(3), 4)
    fb = StreamParams("x", feedback=0.5)
    for key in ("a", "b", "c"):
        engine.run([frame], [fb], streams=[key])
    engine.run([frame], [fb], streams=["a"])  # "a" is now the most recently used; "b" the least
    engine.run([frame], [fb], streams=["d"])
    assert engine.stream_states == 3
    assert "b" not in engine._streams and all(k in engine._streams for k in ("a", "c", "d"))
    for i in range(20):
        engine.run([frame], [fb], streams=[f"new{i}"])
    assert engine.stream_states == 3


def test_frames_of_one_stream_in_one_call_run_in_order(make_engine):
    """A file run hands several frames of its one stream to one call: with feedback each sees the one before."""
    engine = make_engine()
    rng = np.random.default_rng(2)
    clip = [_scene(rng, 5) for _ in range(3)]
    fb = StreamParams("y", feedback=0.5)
    together = engine.run(clip, [fb] * 3, streams=[0, 0, 0])
    other = make_engine()
    one_by_one = [other.run([f], [fb], streams=[0])[0] for f in clip]
    assert all(np.array_equal(x, y) for x, y in zip(together, one_by_one))
    assert engine.stats.frames == 3



@pytest.mark.parametrize("ordered", [dict(feedback=0.8), dict(reuse=2), dict(transition_s=60.0)])
def test_a_stream_changing_its_number_of_steps_within_a_call_runs_in_order(make_engine, ordered):
    """Frames are batched by their number of UNet evaluations; one stream's frames needing 1, 2 and 1 of them ran
    as frames 0, 2, 1: feedback read frame 0's latent for frame 2 (179 levels off), reuse made it a partial frame,
    and a transition was left moving to frame 1's prompt, not the last frame's."""
    rng = np.random.default_rng(4)
    clip = [_scene(rng, 5) for _ in range(3)]
    prompts = ("a", "b", "c") if "transition_s" in ordered else ("a", "a", "a")
    params = [StreamParams(prompt, strength, 2, **ordered) for prompt, strength in zip(prompts, (0.5, 1.0, 0.5))]
    assert [p.unet_evals for p in params] == [1, 2, 1]
    engine, other = make_engine(feature_reuse=True), make_engine(feature_reuse=True)
    engine.clock = other.clock = lambda: 0.0  # transitions: one call's frames share its clock; so do these
    together = engine.run(clip, params, streams=["s"] * 3)
    one_by_one = [other.run([f], [p], streams=["s"])[0] for f, p in zip(clip, params)]
    assert [int(np.abs(x.astype(int) - y).max()) for x, y in zip(together, one_by_one)] == [0, 0, 0]
    assert engine._streams.get("s").target == (prompts[-1], 0)



def _batch_sizes(engine) -> list[int]:
    """Record the size of every batch the engine stages from now on (its _enqueue)."""
    sizes: list[int] = []
    enqueue = engine._enqueue

    def spy(frames, *args, **kwargs):
        sizes.append(len(frames))
        return enqueue(frames, *args, **kwargs)

    engine._enqueue = spy
    return sizes


def test_frames_of_one_stream_share_a_batch_unless_they_read_the_one_before(make_engine):
    """`turbostream run` hands a file's frames to one call as one stream: at the defaults they run as one batch (the
    same frames as one by one), with feedback, feature reuse or changed parameters one after another."""
    engine = make_engine(feature_reuse=True)
    sizes = _batch_sizes(engine)
    rng = np.random.default_rng(3)
    clip = [_scene(rng, 5) for _ in range(4)]
    plain = StreamParams("y")
    together = engine.run(clip, [plain] * 4, streams=[0] * 4)
    assert sizes == [4]
    other = make_engine(feature_reuse=True)
    one_by_one = [other.run([f], [plain], streams=[0])[0] for f in clip]
    assert all(np.abs(x.astype(int) - y).max() <= 1 for x, y in zip(together, one_by_one))  # batch 4 vs 1: rounding
    for ordered in (StreamParams("y", feedback=0.5), StreamParams("y", reuse=2)):
        sizes.clear()
        engine.run(clip, [ordered] * 4, streams=[0] * 4)
        assert sizes == [1, 1, 1, 1], ordered
    sizes.clear()
    engine.run(clip, [plain, plain, StreamParams("z"), StreamParams("z")], streams=[0] * 4)
    assert sizes == [2, 2]  # a change of prompt within the call: the stream's transition state moves in order
    sizes.clear()
    engine.run(clip, [plain] * 4, streams=[0, 1, 0, 1])
    assert sizes == [4]

# ------------------------------------------------------------------------------------------------ transitions


def test_slerp_keeps_the_noise_variance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 32, generator=g)
    mid = slerp(a, b, 0.5)
    assert abs(float(mid.std()) - 1.0) < 0.05 and abs(float(lerp(a, b, 0.5).std()) - 0.71) < 0.05
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)  # parallel: no division by zero


def test_transition_moves_gradually_and_ends_at_the_new_prompt(make_engine):
    engine = make_engine()
    engine.clock = clock = Clock()
    frame = _scene(np.random.default_rng(3))
    old, new = StreamParams("a red fox", seed=1), StreamParams("a neon city", seed=7, transition_s=1.0)
    target = make_engine().run([frame], [new.updated(transition_s=0)])[0]
    start = engine.run([frame], [old], streams=["s"])[0]
    jump = _diff(start, target)
    outs = [start]
    for k in range(11):
        outs.append(engine.run([frame], [new], streams=["s"])[0])
        clock.t += 0.1
    steps = [_diff(x, y) for x, y in zip(outs, outs[1:])]
    assert np.array_equal(outs[1], start)  # the change starts from what was shown
    assert max(steps) < 0.6 * jump, (steps, jump)
    assert np.array_equal(outs[-1], target)  # and ends exactly at the new prompt and seed
    assert _diff(outs[5], start) > 0.2 * jump and _diff(outs[5], target) > 0.2 * jump


def test_a_change_mid_transition_starts_from_what_is_shown(make_engine):
    engine = make_engine()
    engine.clock = clock = Clock()
    frame = _scene(np.random.default_rng(4))
    a, b, c = (StreamParams(p, seed=s, transition_s=1.0) for p, s in (("one", 1), ("two", 2), ("three", 3)))
    engine.run([frame], [a], streams=[0])
    engine.run([frame], [b], streams=[0])
    clock.t += 0.5
    halfway = engine.run([frame], [b], streams=[0])[0]
    after = engine.run([frame], [c], streams=[0])[0]  # a new change at the same moment: no jump
    assert np.array_equal(halfway, after)
    clock.t += 1.0
    assert np.array_equal(engine.run([frame], [c], streams=[0])[0], make_engine().run([frame], [c])[0])


def test_transition_of_two_streams_in_one_batch(make_engine):
    engine = make_engine()
    engine.clock = clock = Clock()
    frame = _scene(np.random.default_rng(5))
    p1, p2 = StreamParams("one", seed=1), StreamParams("two", seed=2)
    engine.run([frame, frame], [p1, p1], streams=["slow", "jump"])
    slow, jump = p2.updated(transition_s=2.0), p2
    clock.t += 0.5
    outs = engine.run([frame, frame], [slow, jump], streams=["slow", "jump"])
    clock.t += 0.5
    outs = engine.run([frame, frame], [slow, jump], streams=["slow", "jump"])
    # The jumping stream's row is exactly what a batch of two gives a plain stream with p2 in that row: the other
    # row's transition does not touch it. (Compared within one batch size: on some CPUs a batch of 1 and a batch of 2
    # round a pixel differently, the GEMMs blocking by batch.)
    target = make_engine().run([frame, frame], [p1, p2])[1]
    assert np.array_equal(outs[1], target)
    assert _diff(outs[0], target) > 1


# ------------------------------------------------------------------------------------------------ prompt blends


def test_prompt_blends(make_engine):
    engine = make_engine()
    frame = _scene(np.random.default_rng(6))
    def run(prompt):
        return engine.run([frame], [StreamParams(prompt)])[0]

    assert np.array_equal(run([["a watercolor", 2.0]]), run("a watercolor"))
    assert np.array_equal(run([["a watercolor", 1], ["a pencil sketch", 0]]), run("a watercolor"))
    emb = engine.prompt_embeddings((("a watercolor", 0.7), ("a pencil sketch", 0.3)))
    want = 0.7 * engine.prompt_embeddings("a watercolor") + 0.3 * engine.prompt_embeddings("a pencil sketch")
    assert torch.allclose(emb, want, atol=1e-5)
    a, b, mix = run("a watercolor"), run("a pencil sketch"), run([["a watercolor", 1], ["a pencil sketch", 1]])
    assert _diff(mix, a) < _diff(a, b) and _diff(mix, b) < _diff(a, b)
    runs = engine.stats.text_encoder_runs
    run([["a pencil sketch", 3], ["a watercolor", 1]])
    assert engine.stats.text_encoder_runs == runs  # each text is encoded once, whatever blend it is in


@pytest.mark.parametrize("bad, message", [
    (dict(prompt=[]), "an empty list"),
    (dict(prompt=[["a", 1]] * 5), "at most 4 prompts"),
    (dict(prompt=[["a", -1]]), "weight must be a number >= 0"),
    (dict(prompt=[["a", 0], ["b", 0]]), "add up to a finite number above 0"),
    (dict(prompt=[["a", 1e308], ["b", 1e308]]), "add up to a finite number above 0"),
    (dict(prompt=[["a"]]), "must be a [text, weight] pair"),
    (dict(prompt=[["x" * 1001, 1]]), "the limit is 1000"),
    (dict(prompt=[["a", "1"]]), "weight must be a number"),
    (dict(prompt=[["a", True]]), "weight must be a number"),
    (dict(similarity=1.0), "similarity must be 0 (off) or a threshold below 1"),
    (dict(similarity=-0.1), "similarity must be"),
    (dict(similarity="high"), "similarity must be a number"),
    (dict(transition_s=-1), "transition_s must be seconds"),
    (dict(transition_s=float("inf")), "transition_s must be seconds"),
    (dict(feedback=0.99), "feedback must be 0 (off) to 0.95"),
    (dict(feedback=float("nan")), "feedback must be"),
    (dict(feedback=10**400), "feedback must be"),
    (dict(strength=10**400), "strength must be in (0, 1]"),  # JSON integers are unbounded; floats are not
])
def test_bad_control_values_are_refused(bad, message):
    with pytest.raises(ValueError) as err:
        StreamParams().updated(**bad)
    assert message in str(err.value)


def test_command_line_prompt_blend():
    assert parse_prompt("a cat") == "a cat"
    assert parse_prompt('[["a cat", 0.7], ["a dog", 0.3]]') == (("a cat", 0.7), ("a dog", 0.3))
    with pytest.raises(ValueError, match="JSON blend"):
        parse_prompt("[not json")


# ------------------------------------------------------------------------------------------------ similarity skip


def test_similarity_filter_is_stochastic_bounded_and_runs_after_changes():
    from turbostream.config import MAX_CONSECUTIVE_SKIPS
    from turbostream.similarity import SimilarityFilter

    rng = np.random.default_rng(7)
    still = _scene(rng)
    f = SimilarityFilter(seed=0)
    p = StreamParams(similarity=0.9)
    assert f.check(still, StreamParams()) is None and f.reference is None  # off: nothing kept
    assert f.check(still, p) is None and f.reference is still  # the first frame runs and becomes the reference
    marks = [f.check(still.copy(), p) is not None for _ in range(2 * MAX_CONSECUTIVE_SKIPS + 3)]
    want = [True] * MAX_CONSECUTIVE_SKIPS + [False]
    assert marks == want + want + [True]  # identical: always skipped, but at most MAX in a row
    assert f.check(still.copy(), p) is f.reference  # a skip hands back the reference object itself
    assert f.check(still.copy(), p.updated(seed=3)) is None  # changed parameters: run
    # Stochastic: a slightly noisy scene near the threshold is skipped some of the time, not always or never.
    f = SimilarityFilter(seed=1)
    noisy = [_scene(rng, noise=10) for _ in range(200)]
    f.check(noisy[0], StreamParams(similarity=0.99))
    skips = sum(f.check(x, StreamParams(similarity=0.99)) is not None for x in noisy[1:])
    assert 20 < skips < 180, skips
    # A transition after a prompt change runs every frame until it is over.
    clock = Clock()
    f = SimilarityFilter(seed=0, clock=clock)
    p = StreamParams(similarity=0.9, transition_s=1.0)
    f.check(still, p)
    f.check(still, p.updated(prompt="new"))
    clock.t += 0.5
    assert f.check(still, p.updated(prompt="new")) is None
    clock.t += 0.6
    assert f.check(still, p.updated(prompt="new")) is not None


class _Engine:
    """A stand-in with per-stream state: records calls and released streams; output = frame + 1."""

    max_batch = 4

    def __init__(self) -> None:
        self.calls, self.released = [], []

    def warmup(self) -> None:
        pass

    def run(self, frames, params, streams=None):
        self.calls.append(list(streams))
        return [f + 1 for f in frames]

    def release_stream(self, key) -> None:
        self.released.append(key)


def test_batcher_answers_skips_from_the_last_output_and_releases_closed_streams():
    import threading

    from turbostream.batcher import Batcher

    engine = _Engine()
    batcher = Batcher(engine, on_skip=lambda n: skipped.append(n)).start()
    skipped, results, done = [], [], threading.Event()

    def on_result(result):
        results.append(result)
        done.set()

    def submit(frame, meta, skip=False):
        done.clear()
        stream.submit(frame, meta, skip=skip)
        assert done.wait(5)

    try:
        assert batcher.ready.wait(5)
        stream = batcher.open_stream(on_result, StreamParams(similarity=0.9))
        ref = np.zeros((8, 8, 3), np.uint8)
        submit(ref, 1)
        submit(ref, 2, skip=True)  # the reference ran: answered from its output, no engine call
        other = np.full((8, 8, 3), 5, np.uint8)
        submit(other, 3, skip=True)  # a reference that never ran (dropped): it runs now
        assert [r.skipped for r in results] == [False, True, False]
        assert results[1].frame is results[0].frame and results[1].batch_size == 0
        assert int(results[2].frame[0, 0, 0]) == 6 and len(engine.calls) == 2 and skipped == [1]
        assert engine.calls[0] == [stream.key]  # the engine gets each frame's stream key
        stream.close()
        batcher.open_stream(on_result, StreamParams()).submit(other, 4)  # the next batch frees the closed stream
        deadline = time.monotonic() + 5
        while not engine.released and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.released == [stream.key]
    finally:
        batcher.stop()


# ------------------------------------------------------------------------------------------------ turbostream run


class _Pipelined:
    """The real engine with pipelining forced on (on the CPU its submit computes the call; collect hands it out)."""

    pipelined = True

    def __init__(self, engine) -> None:
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.mark.parametrize("pipelined", [False, True])
def test_run_with_controls_skips_repeats_and_keeps_every_frame(tmp_path, make_engine, caplog, pipelined):
    """A folder of one still picture (and a different one at the end) through `turbostream run --similarity
    --feedback --transition` with a prompt blend: every frame written, repeats answered with the last output
    (pipelined: also a repeat of a frame whose call is still in flight)."""
    import argparse
    import logging

    import cv2

    from turbostream.cli import run as cli_run

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(8)
    still, other = _scene(rng), _scene(rng, shift=20)[::-1]
    for k in range(14):
        cv2.imwrite(str(src / f"f{k:02d}.png"), other if k == 13 else still)
    parser = argparse.ArgumentParser()
    cli_run.add_parser(parser.add_subparsers())
    args = parser.parse_args(["run", "-i", str(src), "-o", f"{out}/", "--similarity", "0.9", "--feedback", "0.5",
                              "--transition", "1", "--prompt", '[["a watercolor", 0.7], ["a pencil sketch", 0.3]]',
                              "--model", "tiny-random", "--device", "cpu", "--size", "64"])
    engine = make_engine()
    with caplog.at_level(logging.INFO, "turbostream.run"):
        assert cli_run.main(args, engine=_Pipelined(engine) if pipelined else engine) == 0
    written = sorted(out.glob("*.png"))
    assert len(written) == 14
    # Frame 0 runs, 1-10 are repeats, 11 runs (at most 10 skips in a row), 12 is a repeat, 13 is another picture.
    assert "11 similar frames answered with the last output" in caplog.text
    assert engine.stats.frames == 3 and engine.stream_states == 1
    pics = [cv2.imread(str(p)) for p in written]
    same = [np.array_equal(a, b) for a, b in zip(pics, pics[1:])]
    assert same == [True] * 10 + [False, True, False]  # frame 11 differs from 10: feedback moved it on


def test_prompt_line_changes_the_controls():
    from turbostream.io.sources import CaptureThread
    from turbostream.control.prompt_line import PromptLine
    from turbostream.pipeline import Pipeline

    pipeline = Pipeline(type("E", (), {"max_batch": 1})(), CaptureThread("0"), [], StreamParams(prompt="a"))
    line = PromptLine(pipeline)
    assert "similarity 0.95" in line.apply("/similarity 0.95")
    line.apply("/transition 2")
    line.apply("/feedback 0.4")
    line.apply('/prompt [["a cat", 1], ["a dog", 3]]')
    assert pipeline.params == StreamParams((("a cat", 1), ("a dog", 3)), similarity=0.95, transition_s=2.0,
                                           feedback=0.4)
    with pytest.raises(ValueError, match="feedback must be"):
        line.apply("/feedback 2")
    with pytest.raises(ValueError, match="needs a number"):
        line.apply("/transition soon")


def test_serve_options_set_every_stream_s_starting_controls():
    import argparse

    from turbostream.cli import serve as cli_serve
    from turbostream.cli.options import engine_config
    from turbostream.errors import UserError

    def parse(*argv):
        parser = argparse.ArgumentParser()
        cli_serve.add_parser(parser.add_subparsers())
        return parser.parse_args(["serve", "--model", "tiny-random", "--device", "cpu", *argv])

    default = engine_config(parse()).default_params
    assert (default.similarity, default.transition_s, default.feedback) == (0, 0, 0)  # off unless asked
    p = engine_config(parse("--similarity", "0.97", "--transition", "1.5", "--feedback", "0.3",
                            "--prompt", '[["a", 1], ["b", 1]]')).default_params
    assert p == StreamParams((("a", 1), ("b", 1)), similarity=0.97, transition_s=1.5, feedback=0.3)
    for bad, message in ((["--feedback", "1"], "feedback must be"), (["--similarity", "1"], "similarity must be"),
                         (["--prompt", "[oops"], "JSON blend")):
        with pytest.raises(UserError, match=message):
            engine_config(parse(*bad))


def test_osc_sets_the_live_controls():
    from turbostream.control.osc import OscServer

    params = [StreamParams()]

    def apply(fields):
        params.append(params[-1].updated(**fields))
        return params[-1]

    osc = OscServer(port=0)
    try:
        osc.apply, osc.playlist, osc.on_result = apply, None, None
        assert osc.handle_message("/turbostream/similarity", [0.97]) == "applied"
        assert osc.handle_message("/turbostream/transition", [2]) == "applied"
        assert osc.handle_message("/turbostream/feedback", [0.4]) == "applied"
        assert osc.handle_message("/turbostream/feedback", [1.5]) == "rejected"
        assert osc.handle_message("/turbostream/transition", ["soon"]) == "bad_arguments"
        assert params[-1] == StreamParams(similarity=0.97, transition_s=2.0, feedback=0.4)
    finally:
        osc.stop()


def test_blend_caches_stay_bounded_while_a_mix_slider_moves(make_engine):
    """A mix slider (or an OSC fader) makes a new blend for every position: the blended embeddings (and with
    prompt_kv their keys and values, megabytes of GPU memory each) are kept for the last BLEND_CACHE_SIZE only,
    while each prompt text is encoded once."""
    from turbostream.engine.engine import BLEND_CACHE_SIZE

    engine = make_engine(prompt_kv=True)
    for k in range(1, 3 * BLEND_CACHE_SIZE):
        w = k / (3 * BLEND_CACHE_SIZE)
        engine.conditioning((("a watercolor", 1 - w), ("a pencil sketch", w)))
    assert len(engine._blends) == BLEND_CACHE_SIZE and len(engine._kv_blends) == BLEND_CACHE_SIZE
    assert engine.stats.text_encoder_runs == 2
