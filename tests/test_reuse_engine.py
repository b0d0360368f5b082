"""Temporal feature reuse inside the engine (tiny-random on the CPU): which batches run in full or partially, that
full frames stay exact, and that an engine started without reuse refuses it clearly."""

from __future__ import annotations

import numpy as np
import pytest

from turbostream.config import StreamParams


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture
def frames():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return [np.roll(base, 3 * k, axis=1) for k in range(8)]  # a panning clip


def test_a_stream_reusing_every_third_frame(make_engine, frames):
    """reuse 3: full, partial, partial, full, ...; a full frame is exactly the plain engine's, a partial frame on the
    very frame its deep features came from is exactly the full one, and on a moved frame it is near but not equal."""
    engine, plain = make_engine(feature_reuse=True), make_engine()
    p = StreamParams("a fox", seed=4, reuse=3)
    full = [plain.run([f], [p.updated(reuse=0)])[0] for f in frames[:4]]
    modes = []
    outs = []
    for k, frame in enumerate([frames[0], frames[0], frames[1], frames[3]]):
        before = (engine.stats.reuse_keep_batches, engine.stats.reuse_partial_batches)
        outs.append(engine.run([frame], [p], streams=["s"])[0])
        after = (engine.stats.reuse_keep_batches, engine.stats.reuse_partial_batches)
        modes.append("keep" if after[0] > before[0] else "reuse" if after[1] > before[1] else "plain")
    assert modes == ["keep", "reuse", "reuse", "keep"]
    assert np.array_equal(outs[0], full[0]) and np.array_equal(outs[3], full[3])  # full frames: exact
    assert np.array_equal(outs[1], full[0])  # same frame, its own deep features: exact
    moved = _diff(outs[2], full[1])
    assert 0 < moved <= 64, moved  # an approximation: it moves the output, boundedly


def test_a_later_cut_keeps_full_frames_exact_and_changes_only_partial_ones(make_engine, frames):
    """--reuse-layers 1: the engine's partial frames recompute only the UNet's last up layer. Full frames and a partial
    frame on its own frame stay exact; on a moved frame it differs from the whole-block cut's partial frame."""
    whole, cut = make_engine(feature_reuse=True), make_engine(feature_reuse=True, reuse_layers=1)
    assert whole.reuse.layers == 2 and cut.reuse.layers == 1  # tiny-random's outer up block: 2 layers
    assert cut.reuse.deep_shape(1, 8, 8) == (1, 32, 8, 8)
    p = StreamParams("a fox", seed=4, reuse=3)
    outs = {}
    for name, engine in (("whole", whole), ("cut", cut)):
        outs[name] = [engine.run([f], [p], streams=["s"])[0] for f in (frames[0], frames[0], frames[1], frames[3])]
        assert engine.stats.reuse_keep_batches == 2 and engine.stats.reuse_partial_batches == 2
    for k in (0, 1, 3):  # full, partial on its own frame, full: the same exact frames whatever the cut
        assert np.array_equal(outs["cut"][k], outs["whole"][k])
    assert not np.array_equal(outs["cut"][2], outs["whole"][2])  # a moved frame: each cut approximates its own way
    with pytest.raises(ValueError, match=r"reuse_layers \(--reuse-layers\): layers must be an integer from 1 to 2"):
        make_engine(feature_reuse=True, reuse_layers=3)


def test_reuse_off_leaves_every_frame_bit_identical(make_engine, frames):
    """On an engine with reuse enabled, streams with reuse 0 or 1 run the plain step: same frames as without it."""
    engine, plain = make_engine(feature_reuse=True), make_engine()
    params = [StreamParams("a", seed=1), StreamParams("b", seed=2, reuse=1)]
    for frame in frames[:3]:
        got = engine.run([frame, frame], params, streams=["x", "y"])
        want = plain.run([frame, frame], params, streams=["x", "y"])
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert engine.stats.reuse_keep_batches == engine.stats.reuse_partial_batches == 0


def test_a_batch_mixing_reuse_and_plain_streams_runs_in_full(make_engine, frames):
    engine, plain = make_engine(feature_reuse=True), make_engine()
    params = [StreamParams("a", seed=1, reuse=4), StreamParams("b", seed=2)]
    for frame in frames[:3]:
        got = engine.run([frame, frame], params, streams=["r", "p"])
        want = plain.run([frame, frame], [q.updated(reuse=0) for q in params])
        assert all(np.array_equal(g, w) for g, w in zip(got, want))  # the full step keeps outputs exact
    assert engine.stats.reuse_keep_batches == 3 and engine.stats.reuse_partial_batches == 0


def test_a_parameter_change_or_more_steps_forces_a_full_frame(make_engine, frames):
    engine = make_engine(feature_reuse=True)
    p = StreamParams("a", seed=1, reuse=8)
    engine.run([frames[0]], [p], streams=["s"])  # keep
    engine.run([frames[1]], [p], streams=["s"])  # reuse
    assert (engine.stats.reuse_keep_batches, engine.stats.reuse_partial_batches) == (1, 1)
    engine.run([frames[2]], [p.updated(prompt="b")], streams=["s"])  # the prompt changed: full
    engine.run([frames[3]], [p.updated(prompt="b", seed=9)], streams=["s"])  # the seed changed: full
    assert (engine.stats.reuse_keep_batches, engine.stats.reuse_partial_batches) == (3, 1)
    two = p.updated(prompt="b", seed=9, steps=4)  # 2 UNet evaluations a frame: features for each
    engine.run([frames[4]], [two], streams=["s"])  # the steps changed: full
    engine.run([frames[5]], [two], streams=["s"])
    assert (engine.stats.reuse_keep_batches, engine.stats.reuse_partial_batches) == (4, 2)
    assert len(engine._streams.get("s").deep) == 2
    engine.run([frames[5]], [p.updated(prompt="b", seed=9)], streams=["s"])  # back to one evaluation: full
    assert engine.stats.reuse_keep_batches == 5 and len(engine._streams.get("s").deep) == 1
    engine.run([frames[6]], [p.updated(prompt="b", seed=9, reuse=0)], streams=["s"])  # reuse off: features freed
    assert engine._streams.get("s").deep is None
    engine.release_stream("s")
    assert engine.stream_states == 0


def test_a_transition_runs_full_frames_and_ends_exactly_at_the_new_look(make_engine, frames):
    """A prompt and seed change with a 1 s transition on a reuse-4 stream: its conditioning moves every frame, so deep
    features kept from one frame of it are stale for the next. Every frame of the transition runs in full (each
    equal to the same transition without reuse), and so does the first after it, which is exactly the new look."""
    engine, plain = make_engine(feature_reuse=True), make_engine()
    now = [0.0]
    engine.clock = plain.clock = lambda: now[0]
    a = StreamParams("a fox", seed=1, transition_s=1.0, reuse=4)
    b = a.updated(prompt="an owl", seed=7)
    new_look = plain.run([frames[0]], [b.updated(reuse=0)])[0]
    engine.run([frames[0]], [a], streams=["s"])
    plain.run([frames[0]], [a.updated(reuse=0)], streams=["s"])
    for t in (10.0, 10.3, 10.6, 10.9, 11.0):
        now[0] = t
        partial = engine.stats.reuse_partial_batches
        got = engine.run([frames[0]], [b], streams=["s"])[0]
        assert engine.stats.reuse_partial_batches == partial, f"a partial frame at t={t}"
        assert np.array_equal(got, plain.run([frames[0]], [b.updated(reuse=0)], streams=["s"])[0]), t
    assert np.array_equal(got, new_look)  # the transition is over: the new prompt's output, exactly
    now[0] = 11.1
    engine.run([frames[0]], [b], streams=["s"])  # features of the new look only: reused again
    assert engine.stats.reuse_partial_batches == 1


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "segments"])
def test_each_unet_step_reuses_its_own_deep_features(make_engine, frames, graphs, monkeypatch):
    """With 2 UNet evaluations a frame (4 steps at 0.5), a stream keeps deep features per step: a partial frame on
    the very frame they came from equals the full frame exactly (step 1 reading step 0's features would not), and on
    a moved frame it is near but not equal. graphs=True runs the call as the CUDA path does (head, step k times,
    tail, with the deep copies between the steps) on the CPU, by replaying the segments eagerly."""
    engine, plain = make_engine(feature_reuse=True), make_engine()
    p = StreamParams("a fox", seed=4, steps=4, strength=0.5, reuse=3)
    assert p.unet_evals == 2
    full = [plain.run([f], [p.updated(reuse=0)])[0] for f in frames[:2]]
    if graphs:
        class Segments:  # what a captured graph does on replay: its segment, from static buffers to static buffers
            def __init__(self, b, kind):
                self.b, self.kind = b, kind

            def replay(self):
                engine._segment(self.b, self.kind)

        engine._graphs = {b: {kind: Segments(b, kind) for kind in ("head", *engine._step_modes, "tail")}
                          for b in engine.config.buckets}
        monkeypatch.setattr(type(engine), "use_graphs", property(lambda self: True))  # plain has run already
    outs = [engine.run([f], [p], streams=["s"])[0] for f in (frames[0], frames[0], frames[1])]
    assert (engine.stats.reuse_keep_batches, engine.stats.reuse_partial_batches) == (1, 2)
    assert engine.stats.graph_replays == (3 if graphs else 0)
    assert np.array_equal(outs[0], full[0])  # full: exact
    assert np.array_equal(outs[1], full[0])  # partial on its own frame, each step on its own features: exact
    moved = _diff(outs[2], full[1])
    assert 0 < moved <= 64, moved


def test_a_full_frame_that_fails_leaves_no_features_to_reuse(make_engine, frames, monkeypatch):
    """A full frame stores its deep features before its VAE decode; if the call fails after that, the stream's old
    features are overwritten, so they must not count as valid for the parameters they were computed with."""
    engine = make_engine(feature_reuse=True)
    p = StreamParams("a", seed=1, reuse=4)
    engine.run([frames[0]], [p], streams=["s"])  # full: features of prompt "a"
    decode = engine.math.decoder_call

    def broken(z):
        raise RuntimeError("decoder failed")

    monkeypatch.setattr(engine.math, "decoder_call", broken)
    with pytest.raises(RuntimeError, match="decoder failed"):
        engine.run([frames[1]], [p.updated(prompt="b")], streams=["s"])  # full (new prompt), fails after the UNet
    monkeypatch.setattr(engine.math, "decoder_call", decode)
    engine.run([frames[2]], [p], streams=["s"])  # prompt "a" again: its features were overwritten, so in full
    assert (engine.stats.reuse_keep_batches, engine.stats.reuse_partial_batches) == (2, 0)


def test_an_engine_without_reuse_refuses_it_clearly(make_engine):
    from turbostream.serve import protocol

    engine = make_engine()
    assert not engine.config.reuse_enabled and engine.reuse is None
    with pytest.raises(ValueError, match="feature reuse is off on this engine"):
        engine.run([np.zeros((64, 64, 3), np.uint8)], [StreamParams(reuse=2)])
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.apply_config(StreamParams(), {"reuse": 3}, 4, reuse=False)
    assert err.value.code == "bad_config" and "--reuse" in str(err.value)
    assert protocol.apply_config(StreamParams(), {"reuse": 1}, 4, reuse=False).reuse == 1
    assert make_engine(default_params=StreamParams(reuse=2)).config.reuse_enabled  # --reuse N turns it on


def test_compile_wraps_the_full_and_partial_forwards_and_warms_every_step_mode(make_engine, frames, monkeypatch):
    """With --compile, the keep and reuse steps run through compiled wrappers of FeatureReuse.full and .partial (not
    the uncompiled blocks), and warmup's compile pass runs every step mode, so none compiles on the hot path.

    torch.compile is CUDA-only in the engine; here a recording stand-in takes its place (compiling for real is the
    GPU rows' job: scripts/engine_rows.py compile_reuse), so what is tested is which functions the engine routes
    through the compiled wrappers and when they first run."""
    import torch

    calls: dict[str, int] = {}

    def fake_compile(fn, **kwargs):
        name = getattr(fn, "__name__", type(fn).__name__)
        calls.setdefault(name, 0)

        def wrapper(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)

        return wrapper

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    engine, plain = make_engine(feature_reuse=True, compile=True, compile_cache=None), make_engine()
    engine._compile()  # what warmup() does first on CUDA
    assert {"full", "partial", "UNet2DConditionModel"} <= set(calls)
    warmed = dict(calls)
    assert warmed["full"] >= len(engine.config.buckets) and warmed["partial"] >= len(engine.config.buckets)
    p = StreamParams("a fox", seed=4, reuse=2)
    outs = [engine.run([f], [p], streams=["s"])[0] for f in (frames[0], frames[0])]
    assert calls["full"] == warmed["full"] + 1 and calls["partial"] == warmed["partial"] + 1
    assert engine.stats.reuse_partial_batches == 1
    want = plain.run([frames[0]], [p.updated(reuse=0)])[0]
    assert np.array_equal(outs[0], want) and np.array_equal(outs[1], want)


def test_whole_frame_graph_dispatch_moves_deep_features_around_one_launch(make_engine):
    """_replay's choice among a bucket's graphs (CUDA graphs stand-ins here; tests/test_engine_gpu.py replays real
    ones): with one evaluation a frame, a keep or reuse call launches its whole-frame graph once, with the deep
    features moved in before it and out after it; with two, the segments run and the moves go around each step."""
    from turbostream.engine.engine import DeepMoves

    engine = make_engine(feature_reuse=True)
    log: list[str] = []

    class Graph:
        def __init__(self, name: str) -> None:
            self.name = name

        def replay(self) -> None:
            log.append(self.name)

    names = ["head", "plain", "keep", "reuse", "tail", "frame1", "frame1-keep", "frame1-reuse"]
    engine._graphs[1] = {name: Graph(name) for name in names}
    moves = DeepMoves(before=lambda k: log.append(f"in{k}"), after=lambda k: log.append(f"out{k}"))
    for mode, n, want in (("plain", 1, ["frame1"]), ("keep", 1, ["in0", "frame1-keep", "out0"]),
                          ("reuse", 1, ["in0", "frame1-reuse", "out0"]),
                          ("reuse", 2, ["head", "in0", "reuse", "out0", "in1", "reuse", "out1", "tail"]),
                          ("plain", 2, ["head", "plain", "plain", "tail"])):
        log.clear()
        engine._replay(1, n, mode, None if mode == "plain" else moves)
        assert log == want, (mode, n)
    del engine._graphs[1]["frame1-reuse"]  # an engine without frame_graph: the segments, as before
    log.clear()
    engine._replay(1, 1, "reuse", moves)
    assert log == ["head", "in0", "reuse", "out0", "tail"]
