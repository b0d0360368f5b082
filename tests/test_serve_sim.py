"""scripts/serve_sim.py: the server against a simulated device (a timeline), driven by the load test. The timeline's
bookkeeping is checked exactly; the run itself end to end on loopback (its numbers depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import serve_sim  # noqa: E402

from turbostream.config import StreamParams  # noqa: E402


def test_the_simulated_device_books_calls_back_to_back_and_returns_the_frames(engine):
    """A call starts when the one before ends (or at its submit) and lasts FIXED + PER_FRAME x frames; collect()
    waits for its end and returns the fitted input frames; device_stats reads the timeline."""
    device = serve_sim.SimulatedDevice(engine, fixed_ms=20.0, per_frame_ms=10.0, host_ms=0.0)
    frames = [np.full((32, 48, 3), k, np.uint8) for k in range(3)]
    first = device.submit(frames[:2], [StreamParams()] * 2)
    second = device.submit(frames[2:], [StreamParams()])
    (s1, a1, e1, n1), (s2, a2, e2, n2) = device.calls
    assert (n1, n2) == (2, 1)
    assert e1 - a1 == pytest.approx(0.040) and e2 - a2 == pytest.approx(0.030)
    assert a2 == e1  # queued behind the first: starts when it ends
    assert not device.done(second)
    outs = device.collect(first) + device.collect(second)
    assert device.done(second)
    # Each ticket carries the timeline as the engine's do (CUDA events): device time, idle time before it.
    assert (first.device_s, first.gap_s) == (pytest.approx(0.040), None)
    assert (second.device_s, second.gap_s) == (pytest.approx(0.030), 0.0)
    assert [o.shape for o in outs] == [(64, 64, 3)] * 3 and [int(o[0, 0, 0]) for o in outs] == [0, 1, 2]
    with pytest.raises(ValueError):
        device.submit(frames[:1], [StreamParams(steps=0)])  # the engine's checks run in submit, as on CUDA
    stats = serve_sim.device_stats(device.calls, 0.0, e2 + 1, capacity_fps=100.0)
    assert stats["calls"] == 2 and stats["frames"] == 3 and stats["idle_ms_mean"] == 0.0
    assert stats["utilization"] == pytest.approx(1.0, abs=1e-3) and stats["batch_sizes"] == {"1": 1, "2": 1}


def test_with_the_engines_own_host_work_submit_and_collect_are_the_engines(make_engine, frame_rng):
    """host_ms None: the real engine stages and hands out the frames (its frame math a no-op), the call is booked on
    the timeline, and what comes back is the engine's output buffer for each frame."""
    engine = make_engine()
    device = serve_sim.SimulatedDevice(engine, fixed_ms=1.0, per_frame_ms=1.0, host_ms=None)
    frames = [frame_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    ticket = device.submit(frames, [StreamParams()] * 2, streams=["a", "b"])
    assert engine.in_flight == 1 and engine.stats.calls == 1 and len(device.calls) == 1
    outs = device.collect(ticket)
    assert engine.in_flight == 0 and [o.shape for o in outs] == [(64, 64, 3)] * 2
    assert engine.stream_states == 2  # the engine's per-stream bookkeeping ran


def test_serve_sim_runs_the_server_and_reports_the_device(tmp_path):
    out = tmp_path / "sim.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "serve_sim.py"), "--size", "64", "--clients", "2", "--duration", "3",
         "--warmup", "0.5", "--device-ms", "2,3", "--submit-ahead", "both", "--json", str(out)],
        capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["settings"]["capacity_fps"] == pytest.approx(8 / (2 + 3 * 8) * 1e3, abs=0.1)
    assert [(s["clients"], s["submit_ahead"]) for s in res["steps"]] == [(2, False), (2, True)]
    for step in res["steps"]:
        dev = step["device"]
        assert step["errors"] == 0 and step["fps"] > 0 and dev["calls"] >= 2
        assert 0 < dev["utilization"] <= 1.0 and sum(dev["batch_sizes"].values()) == dev["calls"]
        assert dev["batch_mean"] <= 2  # two clients, one frame in flight each
        # The device's window is the load test's measured one: after its probe connection (about 0.5 s of frames
        # from the first call on) and the step's own warmup (0.5 s), not the warmup counted from the probe's first
        # call (exactly 0.5 s after it).
        assert step["window_after_first_call_s"] > 0.5 + 0.25, step["window_after_first_call_s"]
        # The server's /metrics carry the same timeline (ticket -> batcher -> metrics -> load test): each call of
        # b frames took 2 + 3 b ms on the device, and with two clients b is 1 or 2, so the server's mean call lies
        # between 5 and 8 ms. (Not 2 + 3 x the simulated device's mean batch: the two are measured over different
        # windows, and how often the two clients share a call drifts within a step; 5.31 against 5.87 once.)
        server = step["server_device"]
        assert 2 + 3 * 1 - 0.5 <= server["call_ms_mean"] <= 2 + 3 * 2 + 0.5, server
        assert 0 < server["busy_pct"] <= 105 and server["gap_ms_mean"] >= 0
    assert "% of capacity" in proc.stdout


def test_bad_arguments_are_refused(tmp_path):
    for args in (["--device-ms", "2"], ["--clients", "0"], ["--device-ms", "2,0"], ["--host-ms", "fast"]):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve_sim.py"), *args], capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 2 and "error" in proc.stderr, args


def test_latency_breakdown_cuts_one_clients_frames_into_stages_that_add_up(tmp_path):
    """scripts/latency_breakdown.py (a process of its own: it wraps the server's methods): every stage is seen once
    per frame, none is negative, the simulated call shows as the device stage, and the stages add up to the
    server's receive -> sent."""
    out = tmp_path / "lat.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "latency_breakdown.py"), "--sim", "20,10", "--size", "64",
         "--duration", "3", "--warmup", "1", "--switch-interval-ms", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "marks seen unequally" not in proc.stderr
    res = json.loads(out.read_text())
    stages = res["stages"]
    assert list(stages) == ["receive -> decode start", "decode (+ fit)", "decode end -> in slot",
                            "in slot -> engine submit", "engine submit", "submit end -> collected",
                            "collected -> encode start", "encode", "encode end -> sent"]
    assert all(s["p50_ms"] >= 0 for s in stages.values()) and res["frames"] >= 20
    assert 30 <= stages["submit end -> collected"]["p50_ms"] < 60  # the 20 + 10 ms call, waited for and handed out
    # Medians do not add up: the stages' medians summed run up to 8 % under the total's median on a loaded machine
    # (0.92 seen; 0.997 unloaded), so within a fifth.
    assert res["stages_p50_sum_ms"] == pytest.approx(res["server_p50_ms"], rel=0.2)
    # The client's round trip holds the server's receive -> sent, but over a window of frames of its own (it runs a
    # second longer): the medians of the two sets may differ by a little either way (33.86 vs 34.01 ms once, under
    # load), not by a tenth.
    assert res["client_p50_ms"] >= 0.9 * res["server_p50_ms"]
    # The garbage collector's pauses in the window (the server froze its warm heap: no full collection walks it).
    assert res["heap_frozen"] is True and len(res["gc"]["collections"]) == 3
    assert res["switch_interval_ms"] == 2.0  # the run's thread switch interval, as asked
    assert 0 <= res["gc"]["max_pause_ms"] <= res["gc"]["total_pause_ms"]
