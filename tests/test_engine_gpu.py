"""CUDA-only checks of the graph path (skipped without a GPU; scripts/gpu_check.sh runs them on the device machine)."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from turbostream.config import StreamParams, preset

pytestmark = pytest.mark.gpu


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def cuda_tiny():
    from turbostream.models import load_components

    return load_components("tiny-random", device="cuda", vae="tiny")


@pytest.fixture(scope="module")
def cuda_random_512():
    """The full SD-Turbo architecture (random weights) in fp16 with TAESD: what the benchmark times."""
    from turbostream.engine import Engine

    engine = Engine(preset("bench", device="cuda", buckets=(1, 2, 4)))
    engine.warmup()
    return engine


def _frames(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_graph_replay_equals_eager(cuda_tiny):
    from turbostream.engine import Engine

    engine = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 2, 4)), cuda_tiny)
    engine.warmup()
    frames = _frames(3, 128, 128)
    params = [StreamParams("a", seed=1), StreamParams("b", seed=2), StreamParams("c", seed=3)]
    graph = engine.run(frames, params)
    eager = engine.run(frames, params, graphs=False)
    assert engine.stats.graph_replays >= 1
    for g, e in zip(graph, eager):
        assert g.std() > 10 and _diff(g, e) <= 2


def test_engines_warming_up_at_once_on_their_own_threads_capture_what_one_alone_does(cuda_tiny):
    """serve --device cuda:0,cuda:1 (or all) warms each engine on its own thread at once: each captures on its own
    stream on its own GPU, and one's capture does not break the other's allocations. Two engines on one GPU here."""
    import threading

    from turbostream.engine import Engine

    cfg = preset("test", device="cuda", width=128, height=128, buckets=(1, 2))
    frames, params = _frames(2, 128, 128), [StreamParams("a", seed=1), StreamParams("b", seed=2)]
    alone = Engine(cfg, cuda_tiny)
    alone.warmup()
    want = alone.run(frames, params)
    engines = [Engine(cfg, cuda_tiny) for _ in range(2)]
    assert engines[0]._capture_stream is not engines[1]._capture_stream
    results, errors = {}, []

    def warm_and_run(k):
        try:
            engines[k].warmup()
            results[k] = engines[k].run(frames, params)
        except Exception as exc:  # noqa: BLE001 - reported below with the engine's index
            errors.append((k, repr(exc)))

    threads = [threading.Thread(target=warm_and_run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for k in range(2):
        assert engines[k].stats.graph_replays >= 1
        assert all(np.array_equal(a, b) for a, b in zip(results[k], want)), k


def test_mixed_batch_equals_single_on_graphs(cuda_tiny):
    from turbostream.engine import Engine

    engine = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 2, 4)), cuda_tiny)
    engine.warmup()
    frames = _frames(4, 128, 128, seed=5)
    params = [StreamParams("cat", 0.5, 2, 1), StreamParams("dog", 0.5, 2, 2), StreamParams("fox", 0.5, 4, 3),
              StreamParams("owl", 0.5, 2, 4)]
    captured = engine.stats.graphs_captured
    together = engine.run(frames, params)  # bucket 4 padded from 3 frames (1 evaluation), bucket 1 (2 evaluations)
    assert engine.stats.graphs_captured == captured  # a new number of UNet evaluations replays the same graphs
    for frame, p, out in zip(frames, params, together):
        assert _diff(out, engine.run([frame], [p])[0]) <= 2
    assert np.abs(together[0].astype(int) - together[3]).mean() > 5


def test_cuda_graph_matches_diffusers_in_fp32():
    """The math on CUDA, graphs included: the same as diffusers' pipeline in fp32 (H200, 2026-11-26: max 1 level).
    fp16, what users run, is held to the project's parity rule in test_parity.py."""
    from turbostream.engine import Engine
    from turbostream.models import load_components
    from turbostream.reference import ReferencePipeline, reference_components

    engine = Engine(preset("test", device="cuda", dtype="float32", width=128, height=128, buckets=(1,)),
                    load_components("tiny-random", device="cuda", dtype=torch.float32))
    engine.warmup()
    frame, p = _frames(1, 128, 128, seed=9)[0], StreamParams("a lighthouse", 0.5, 2, 77)
    ours = engine.run([frame], [p])[0]
    emb = engine.prompt_embeddings(p.prompt)[None]
    ref = ReferencePipeline(reference_components("tiny-random", device="cuda")).run([frame], [p], emb)[0]
    assert _diff(ours, ref) <= 2


def test_full_size_random_model_outputs_are_finite(cuda_random_512):
    engine = cuda_random_512
    for k, frame in enumerate(_frames(3, 512, 512)):
        stages = engine.trace(frame, StreamParams("x", seed=k))
        assert stages["output"].shape == (512, 512, 3)
        assert all(torch.isfinite(t).all().item() for name, t in stages.items() if name != "output"), k


def test_full_size_graph_equals_eager_and_pads_buckets(cuda_random_512):
    engine = cuda_random_512
    frames = _frames(3, 480, 640, seed=2)  # any size in: cropped and resized to 512x512
    params = [StreamParams("p", seed=s) for s in range(3)]
    graph = engine.run(frames, params)  # 3 frames run in the bucket-4 graph
    eager = engine.run(frames, params, graphs=False)
    assert all(g.shape == (512, 512, 3) for g in graph)
    assert max(_diff(g, e) for g, e in zip(graph, eager)) <= 2


def test_warmup_captured_every_bucket_and_timed_it(cuda_random_512):
    stats = cuda_random_512.stats
    assert {"b1", "b2", "b4"} <= set(stats.capture_s)
    assert stats.graphs_captured == 9 and stats.warmup_s > 0  # head, step and tail of each bucket


def test_engine_without_graphs_config(cuda_tiny):
    from turbostream.engine import Engine

    cfg = dataclasses.replace(preset("test", device="cuda"), cuda_graphs=False)
    engine = Engine(cfg, cuda_tiny)
    engine.warmup()
    engine.run(_frames(2, 64, 64), [StreamParams()] * 2)
    assert engine.stats.graph_replays == 0 and not engine._graphs


def test_live_controls_on_graphs_without_recapture(cuda_tiny):
    """Feedback, transitions and blends are data for the captured graphs: streams with different controls share one
    replay, changing a control captures nothing, and both streams' graph frames match their eager frames."""
    from turbostream.engine import Engine

    def make():
        e = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 2, 4)), cuda_tiny)
        e.warmup()
        return e

    graph, eager = make(), make()
    now = [0.0]
    graph.clock = eager.clock = lambda: now[0]  # one clock: both see the transition at the same point
    captured = graph.stats.graphs_captured
    frames = _frames(6, 128, 128, seed=3)
    plain = StreamParams("a", seed=1)
    fed = StreamParams([["a", 1], ["b", 1]], seed=2, feedback=0.5, transition_s=0.5)
    for k, frame in enumerate(frames):
        p_fed = fed if k < 3 else fed.updated(seed=9)  # a seed change: a transition starts
        g = graph.run([frame, frame], [plain, p_fed], streams=["plain", "fed"])
        e = eager.run([frame, frame], [plain, p_fed], streams=["plain", "fed"], graphs=False)
        assert _diff(g[0], e[0]) <= 2 and _diff(g[1], e[1]) <= 2
        now[0] += 0.1
    assert graph.stats.graphs_captured == captured and graph.stats.graph_replays == len(frames)
    assert graph.stream_states == 2
    graph.release_stream("fed")
    assert graph.stream_states == 1


def test_new_step_count_captures_nothing_and_pipelined_calls_keep_their_outputs(cuda_tiny):
    """The no-stall rule on the GPU: after warmup no number of UNet evaluations captures a graph (each step replays
    the one step graph), and two calls in flight hand out their own frames, equal to run()'s, in order."""
    from turbostream.engine import Engine

    engine = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 2, 4)), cuda_tiny)
    engine.warmup()
    captured = engine.stats.graphs_captured
    frames = _frames(4, 128, 128, seed=8)
    # UNet evaluations (steps x strength) 1+4, 2+3, 3+2, 4+1: two groups in every call, each count in two calls.
    batches = [[StreamParams("a", 0.5, 2 * s, 1), StreamParams("b", 1.0, 5 - s, 2)] for s in (1, 2, 3, 4)]
    want = [engine.run(frames[:2], ps, graphs=False) for ps in batches]
    assert engine.stats.graphs_captured == captured
    first = engine.submit(frames[:2], batches[0])
    for k in range(1, len(batches)):
        second = engine.submit(frames[:2], batches[k])  # enqueued while the first may still run
        got = engine.collect(first)
        assert all(_diff(g, w) <= 2 for g, w in zip(got, want[k - 1])), k
        first = second
    got = engine.collect(first)
    assert all(_diff(g, w) <= 2 for g, w in zip(got, want[-1]))
    assert engine.stats.graphs_captured == captured


def test_engine_calls_run_on_the_engines_own_stream(cuda_tiny):
    """Nothing of an engine call goes to the legacy default stream, so work other threads queue there (torchvision's
    nvJPEG encoder copies its bitstream there: serve --jpeg gpu) neither waits for an engine call nor delays one."""
    from turbostream.engine import Engine

    engine = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 2)), cuda_tiny)
    engine.warmup()
    frames, params = _frames(2, 128, 128), [StreamParams("a", seed=1), StreamParams("b", seed=2)]
    wanted = engine.run(frames, params)
    assert engine.stream is not None and engine.stream != torch.cuda.default_stream()
    with torch.cuda.stream(engine.stream):
        torch.cuda._sleep(2_000_000_000)  # holds the engine's stream about a second: the call queues behind it
    ticket = engine.submit(frames, params)
    default_idle, pending = torch.cuda.default_stream().query(), not engine.done(ticket)
    got = engine.collect(ticket)
    assert pending and default_idle
    assert all(np.array_equal(g, w) for g, w in zip(got, wanted))


def test_calls_carry_the_devices_timeline_from_cuda_events(cuda_tiny):
    """On CUDA a call's device time and the idle time before it come from events on the stream: a call queued while
    the one before it runs waits for nothing (gap under 1 ms); a call submitted after a pause shows the pause."""
    import time

    from turbostream.engine import Engine

    engine = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 2)), cuda_tiny)
    engine.warmup()
    frames, params = _frames(2, 128, 128, seed=9), [StreamParams("a", 0.5, 4, 1)] * 2
    torch.cuda._sleep(100_000_000)  # ~50 ms of the device spinning: both calls are enqueued before the first starts
    first = engine.submit(frames, params)
    queued = engine.submit(frames, params)  # enqueued behind the first
    engine.collect(first), engine.collect(queued)
    assert first.device_s > 0 and queued.device_s > 0 and first.gap_s is None  # no call before the first
    assert queued.gap_s < 1e-3, queued.gap_s
    time.sleep(0.05)
    late = engine.submit(frames, params)
    engine.collect(late)
    assert 0.045 <= late.gap_s < 1.0, late.gap_s


def test_a_whole_frame_graph_replays_the_segments_kernels_bit_for_bit(cuda_tiny):
    """frame_graph: a plain call of the default evaluation count is one launch and equals the segment graphs exactly;
    other step counts still replay the segments (nothing captured after warmup)."""
    from turbostream.engine import Engine

    base = preset("test", device="cuda", width=128, height=128, buckets=(1, 4))
    segments, whole = Engine(base, cuda_tiny), Engine(dataclasses.replace(base, frame_graph=True), cuda_tiny)
    segments.warmup(), whole.warmup()
    assert whole.stats.graphs_captured == segments.stats.graphs_captured + 2  # one more per bucket
    captured = whole.stats.graphs_captured

    class Counted:  # counts the launches of a whole-frame graph
        def __init__(self, graph) -> None:
            self.graph, self.replays = graph, 0

        def replay(self) -> None:
            self.replays += 1
            self.graph.replay()

    default = base.default_params
    key = f"frame{default.unet_evals}"
    counted = {b: Counted(graphs[key]) for b, graphs in whole._graphs.items()}
    for b, graphs in whole._graphs.items():
        graphs[key] = counted[b]
    frames = _frames(3, 128, 128, seed=11)
    for params, launches in (([default] * 3, 1), ([dataclasses.replace(default, steps=4, strength=0.75)] * 3, 0)):
        for n, b in ((1, 1), (3, 4)):
            before = counted[b].replays
            a, c = segments.run(frames[:n], params[:n]), whole.run(frames[:n], params[:n])
            assert all(np.array_equal(x, y) for x, y in zip(a, c)), (params[0], n)
            assert counted[b].replays - before == launches, (params[0], n)
    assert whole.stats.graphs_captured == captured


def test_engine_options_run_in_graphs_within_rounding_of_auto():
    """Each attention backend, no /1.0, the fused GroupNorms and prompt_kv under CUDA graph capture: a rounding
    difference at most; a backend this GPU lacks is a clear error at build time. fp8 runs (or names torchao when it
    is missing)."""
    from turbostream.engine import Engine
    from turbostream.models import load_components

    comps = load_components("tiny-random", device="cuda", vae="tiny")  # its own: options change modules
    frames = _frames(3, 128, 128, seed=5)
    params = [StreamParams("a", seed=1), StreamParams("b", seed=2), StreamParams("c", seed=3)]

    def run(**options):
        engine = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 4), **options), comps)
        engine.warmup()
        out = engine.run(frames, params)
        assert engine.stats.graph_replays >= 1  # the graph path, not eager
        return out

    auto = run()
    for options in ({"attention": "flash"}, {"attention": "efficient"}, {"attention": "math"},
                    {"skip_unit_rescale": True}, {"fused_norm": True}, {"fused_epilogue": True}, {"prompt_kv": True},
                    {"fused_time_proj": True, "fused_norm": True},
                    {"fused_norm": True, "fused_epilogue": True, "skip_unit_rescale": True, "frame_graph": True}):
        assert max(_diff(a, b) for a, b in zip(run(**options), auto)) <= 2, options
    try:
        cudnn = run(attention="cudnn")
    except ValueError as exc:
        assert "attention backend 'cudnn' cannot run here" in str(exc)
    else:
        assert max(_diff(a, b) for a, b in zip(cudnn, auto)) <= 2
    fp8_comps = load_components("tiny-random", device="cuda", vae="tiny")
    try:
        engine = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 4), fp8=True),
                              fp8_comps)
    except ValueError as exc:  # torchao absent, or a GPU before 8.9
        assert "pip install torchao" in str(exc) or "compute capability" in str(exc)
    else:
        engine.warmup()
        assert all(o.std() > 0 for o in engine.run(frames, params))


def test_feature_reuse_graphs_match_eager(cuda_tiny):
    """With reuse enabled each bucket also captures the keep and reuse steps (5 graphs); a stream's full and partial
    frames on graphs match the same frames run eagerly."""
    from turbostream.engine import Engine

    def make():
        e = Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 2), feature_reuse=True),
                   cuda_tiny)
        e.warmup()
        return e

    graph, eager = make(), make()
    assert graph.stats.graphs_captured == 10
    p = StreamParams("a fox", seed=3, reuse=3)
    for k, frame in enumerate(_frames(5, 128, 128, seed=6)):
        g = graph.run([frame], [p], streams=["s"])[0]
        e = eager.run([frame], [p], streams=["s"], graphs=False)[0]
        assert _diff(g, e) <= 2, k
    assert graph.stats.reuse_partial_batches == eager.stats.reuse_partial_batches == 3
    two = p.updated(steps=4)  # two UNet evaluations a frame: deep features per step, copied between the replays
    for k, frame in enumerate(_frames(3, 128, 128, seed=7)):
        g = graph.run([frame], [two], streams=["s"])[0]
        e = eager.run([frame], [two], streams=["s"], graphs=False)[0]
        assert _diff(g, e) <= 2, k
    assert graph.stats.reuse_partial_batches == eager.stats.reuse_partial_batches == 5
    assert graph.stats.graphs_captured == 10


def test_whole_frame_graphs_of_feature_reuse_replay_the_segments_bit_for_bit(cuda_tiny):
    """frame_graph with reuse: one evaluation a frame, so its full (keep) and partial (reuse) frames are one launch
    each, the streams' deep features moved in before it and out after it; the frames equal the segment graphs' bit
    for bit, with --reuse-layers too. Two evaluations a frame replay the segments."""
    from turbostream.engine import Engine

    for layers in (None, 1):
        base = preset("test", device="cuda", width=128, height=128, buckets=(1, 2), feature_reuse=True,
                      reuse_layers=layers)
        segments, whole = Engine(base, cuda_tiny), Engine(dataclasses.replace(base, frame_graph=True), cuda_tiny)
        segments.warmup(), whole.warmup()
        assert whole.stats.graphs_captured == segments.stats.graphs_captured + 6  # plain, keep, reuse per bucket
        launches = {}

        class Counted:
            def __init__(self, key, graph) -> None:
                self.key, self.graph = key, graph

            def replay(self) -> None:
                launches[self.key] = launches.get(self.key, 0) + 1
                self.graph.replay()

        for graphs in whole._graphs.values():
            for key in [k for k in graphs if k.startswith("frame")]:
                graphs[key] = Counted(key, graphs[key])
        p = StreamParams("a fox", seed=3, reuse=3)
        frames = _frames(6, 128, 128, seed=8)
        for params in ([p], [p, p.updated(seed=4)]):
            keys = ["s", "t"][: len(params)]
            for frame in frames:
                a = segments.run([frame] * len(params), params, streams=keys)
                c = whole.run([frame] * len(params), params, streams=keys)
                assert all(np.array_equal(x, y) for x, y in zip(a, c)), (layers, len(params))
        assert launches == {"frame1-keep": 4, "frame1-reuse": 8}, launches
        assert whole.stats.reuse_partial_batches == segments.stats.reuse_partial_batches == 8
        two = p.updated(steps=4)  # two evaluations: the segments, deep features copied between the steps
        for frame in frames[:3]:
            a = segments.run([frame], [two], streams=["s"])[0]
            assert np.array_equal(a, whole.run([frame], [two], streams=["s"])[0])
        assert launches == {"frame1-keep": 4, "frame1-reuse": 8}, launches


def test_run_pipelined_on_cuda_writes_what_the_serial_loop_writes(tmp_path, cuda_tiny):
    """`turbostream run`'s GPU loop on CUDA (pipelined: two calls in flight) against the same loop forced serial, on a
    small video with feedback on (each frame depends on the one before): the same frames, bit for bit, in order.

    cuDNN autotuning is off here. Its choices are cached per thread (PyTorch's cuDNN v8 benchmark cache is
    thread_local), each Pipeline warms its engine up on a GPU thread of its own, and timing picks a convolution
    algorithm afresh there: on an H200 the two runs then parted by up to 3 levels through the feedback chain in two
    runs of three. Heuristic choices are the same for the same shapes, so a frame that differs means the pipelining
    changed an input (a latent read before it was written), not a rounding."""
    from test_run_pipelined import make_video, run_video

    from turbostream.engine import Engine

    n = 12
    src = make_video(tmp_path / "in.avi", n=n, flat=False)
    params = StreamParams("a fox", 0.5, 2, 3, feedback=0.5)

    class Serial:
        pipelined = False

        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

    def make():
        return Engine(preset("test", device="cuda", width=128, height=128, buckets=(1, 2)), cuda_tiny)

    pipelined_engine = make()
    assert pipelined_engine.pipelined
    serial_engine = Serial(make())
    autotune = torch.backends.cudnn.benchmark  # the engines turned it on (prepare_cuda)
    torch.backends.cudnn.benchmark = False
    try:
        piped, serial = run_video(pipelined_engine, src, n, params), run_video(serial_engine, src, n, params)
    finally:
        torch.backends.cudnn.benchmark = autotune
    assert piped.indices == serial.indices == list(range(n))
    assert [_diff(a, b) for (_, a), (_, b) in zip(piped.written, serial.written)] == [0] * n


def test_compile_aot_where_packages_cannot_run_builds_dynamo_artifacts_instead(tmp_path, cuda_tiny, monkeypatch):
    """--compile-aot on a CUDA machine whose AOTInductor packages crash at load (the H200 image of 2026-11-27; here
    the check's child is made to crash): the engine says why and runs torch.compile's ahead-of-time artifacts, which
    a second start loads, within rounding of the plain graphs."""
    from turbostream.engine import Engine, aot_check

    crash = ("import os, signal\nprint('STEP loading the test package', flush=True)\n"
             "os.kill(os.getpid(), signal.SIGSEGV)")
    monkeypatch.setattr(aot_check, "child_command", lambda device, dtype: [sys.executable, "-c", crash])
    base = preset("test", device="cuda", width=128, height=128, buckets=(1,), compile_cache=str(tmp_path))
    plain = Engine(base, cuda_tiny)
    plain.warmup()
    frames, params = _frames(1, 128, 128, seed=6), [StreamParams("a", seed=1)]
    expected = plain.run(frames, params)
    ahead = dataclasses.replace(base, compile=True, compile_aot=True)
    for built, loaded in ((3, 0), (0, 3)):
        engine = Engine(ahead, cuda_tiny)
        stats = engine.warmup()
        assert "SIGSEGV while loading the test package" in stats.aot_unavailable
        assert (stats.aot_format, stats.aot_packages_built, stats.aot_packages_loaded) == ("dynamo", built, loaded)
        assert _diff(engine.run(frames, params)[0], expected[0]) <= 2


@pytest.mark.parametrize("fmt", ["aotinductor", "dynamo"])
def test_compile_aot_packages_replay_in_graphs_and_load_at_the_second_start(tmp_path, cuda_tiny, fmt):
    """--compile-aot on CUDA, both formats: the packages (single-threaded AOTInductor runs, so the capture meets no
    event query) or torch.compile's artifacts run inside the captured graphs, within rounding of the plain graphs,
    and a second engine loads what the first built instead of exporting or compiling again."""
    from turbostream.engine import Engine
    from turbostream.engine.aot import AotCall

    base = preset("test", device="cuda", width=128, height=128, buckets=(1, 2), compile_cache=str(tmp_path))
    plain = Engine(base, cuda_tiny)
    plain.warmup()
    frames = _frames(3, 128, 128, seed=5)
    params = [StreamParams("a", seed=1), StreamParams("b", seed=2), StreamParams("c", seed=3)]
    expected = plain.run(frames, params)

    ahead = dataclasses.replace(base, compile=True, compile_aot=True, aot_format=fmt)
    first = Engine(ahead, cuda_tiny)
    first.warmup()
    # On the H200 image of 2026-11-27 every AOTInductor package crashed its process at load; the engine's check now
    # finds that in a child and builds the dynamo format instead: this test then fails here, naming why.
    assert first.stats.aot_unavailable is None, f"packages cannot run here: {first.stats.aot_unavailable}"
    assert first.stats.aot_format == fmt
    assert (first.stats.aot_packages_built, first.stats.aot_packages_loaded) == (6, 0)
    assert first.use_graphs and isinstance(first.math.unet_call, AotCall)
    replays = first.stats.graph_replays
    got = first.run(frames, params)  # a batch of 2 and one of 1: both buckets' graphs
    assert first.stats.graph_replays > replays
    for g, e in zip(got, expected):
        assert g.std() > 10 and _diff(g, e) <= 2
    steps4 = [dataclasses.replace(p, steps=4, strength=0.75) for p in params]  # the step graph replayed 3 times
    for g, e in zip(first.run(frames, steps4), plain.run(frames, steps4)):
        assert _diff(g, e) <= 3  # three evaluations' roundings add up; a package misplayed is off by far more

    second = Engine(ahead, cuda_tiny)
    second.warmup()
    assert (second.stats.aot_packages_built, second.stats.aot_packages_loaded) == (0, 6)
    assert second.stats.compile_cache_hit
    for g, s in zip(got, second.run(frames, params)):
        assert _diff(g, s) <= 1
