"""scripts/loadtest.py on the CPU: a short sweep against a real server, and its bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from turbostream.config import ServerConfig, preset
from turbostream.engine import Engine
from turbostream.serve import ServerThread, TurboServer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "loadtest.py"
sys.path.insert(0, str(SCRIPT.parent))


def _check_report(report: dict, counts: list[int]) -> None:
    assert [s["clients"] for s in report["steps"]] == counts
    assert report["errors"] == 0
    assert report["server"]["model"] == "tiny-random" and report["settings"]["frame_size"] == [64, 64]
    assert report["server"]["rss_bytes_start"] > 0 and report["server"]["rss_bytes_end"] > 0
    for step in report["steps"]:
        total = step["total"]
        assert len(step["per_client"]) == step["clients"]
        assert total["frames"] > 0 and total["fps"] > 0
        lat = total["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        for client in step["per_client"]:  # every client was answered (warmup included: CPU timing is noisy)
            assert client["replies"] > 0 and client["error_count"] == 0
        server = step["server"]
        assert server["engine_calls"] > 0 and server["batch_size_mean"] >= 1
        # The device's timeline over the measured window (a CPU engine: its compute). Busy time is counted when a call
        # ends, so a 1 s window may pass 100 % by a call's share.
        device = step["device"]
        assert 0 < device["busy_pct"] <= 110 and device["call_ms_mean"] > 0 and device["gap_ms_mean"] >= 0
        assert server["rss_bytes_end"] > 0


def test_loadtest_sweep_against_a_running_server(tiny_components, tmp_path):
    out = tmp_path / "load.json"
    engine = Engine(preset("test"), tiny_components)
    with ServerThread(TurboServer(engine, ServerConfig(port=0))) as server:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--url", f"ws://127.0.0.1:{server.port}/ws", "--clients", "1,2",
             "--duration", "1", "--warmup", "0.3", "--json", str(out)],
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "p50 ms" in result.stdout  # the table
    report = json.loads(out.read_text())
    _check_report(report, [1, 2])
    assert report["server"]["command"] is None
    table = subprocess.run([sys.executable, str(SCRIPT), "--markdown", str(out)], capture_output=True, text=True,
                           timeout=60)
    assert table.returncode == 0 and "| 1 |" in table.stdout and "| 2 |" in table.stdout
    # A run cut off (a device's time limit) leaves a .partial report of the steps it finished: it makes a table too.
    full = json.loads(out.read_text())
    partial = tmp_path / "load.json.partial"
    partial.write_text(json.dumps({"tool": "scripts/loadtest.py", "partial": True, "url": full["url"],
                                   "ready": {"model": "tiny-random", "width": 64, "height": 64},
                                   "steps": full["steps"][:1]}))
    table = subprocess.run([sys.executable, str(SCRIPT), "--markdown", str(partial)], capture_output=True, text=True,
                           timeout=60)
    assert table.returncode == 0 and "| 1 |" in table.stdout and "cut off after 1 step" in table.stdout, table.stderr


def test_frames_answered_without_an_engine_call_are_counted_apart(tiny_components, tmp_path):
    """With `similarity` on, the server answers repeats with its last output in a fraction of a frame's time: they
    were counted as frames (68.6 frames/s at p50 10 ms against 30.2 at 31.5 ms for the engine's own)."""
    from turbostream.config import StreamParams

    out = tmp_path / "load.json"
    engine = Engine(preset("test", default_params=StreamParams(similarity=0.5)), tiny_components)
    with ServerThread(TurboServer(engine, ServerConfig(port=0))) as server:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--url", f"ws://127.0.0.1:{server.port}/ws", "--clients", "1",
             "--duration", "2", "--warmup", "0.3", "--json", str(out)],
            capture_output=True, text=True, timeout=120,
        )
        skipped_by_server = server.metrics.frames_skipped._value.get()
    assert result.returncode == 0, result.stdout + result.stderr
    total = json.loads(out.read_text())["steps"][0]["total"]
    assert total["skipped"] > 0 and total["frames"] > 0, total
    assert total["skipped"] <= skipped_by_server  # the window's share of what the server skipped
    client = json.loads(out.read_text())["steps"][0]["per_client"][0]
    assert client["frames"] + client["skipped"] <= client["replies"] and client["frames"] == total["frames"]


@pytest.mark.slow
def test_loadtest_spawns_and_stops_its_own_server(tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--spawn-server", "--clients", "2", "--duration", "1", "--warmup", "0.3",
         "--inflight", "2", "--rate", "50", "--json", str(out), "--server-log", str(tmp_path / "server.log"),
         "--", "--model", "tiny-random", "--size", "64", "--device", "cpu"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "server.log").read_text()
    report = json.loads(out.read_text())
    _check_report(report, [2])
    assert report["server"]["exit_status"] == 0  # SIGTERM, clean shutdown
    assert "--model" in report["server"]["command"]
    # --rate caps each client: 50 frames/s at most (generous margin for timer jitter).
    assert all(c["fps"] <= 60 for c in report["steps"][0]["per_client"])


@pytest.mark.parametrize("args", [["--clients", "100"], ["--duration", "5000"], ["--inflight", "0"],
                                  ["--clients", "x"]])
def test_loadtest_refuses_unbounded_runs(args):
    result = subprocess.run([sys.executable, str(SCRIPT), "--url", "ws://127.0.0.1:9/ws", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "error" in result.stderr


def test_device_numbers_from_two_scrapes():
    """Utilization, time per call, idle time per call and the share queued in time, from the counters' deltas over a
    window, averaged over devices; None for each figure a server did not export."""
    from loadtest_report import device_numbers  # scripts/, on the path above

    def scrape(busy, calls, gaps, gap_sum, in_time):
        out = {}
        for dev in ("cuda:0", "cuda:1"):
            out[f'turbostream_device_busy_seconds_total{{device="{dev}"}}'] = busy
            out[f'turbostream_device_engine_seconds_count{{device="{dev}"}}'] = calls
            out[f'turbostream_device_gap_seconds_count{{device="{dev}"}}'] = gaps
            out[f'turbostream_device_gap_seconds_sum{{device="{dev}"}}'] = gap_sum
            out[f'turbostream_device_gap_seconds_bucket{{device="{dev}",le="0.00025"}}'] = in_time
            out[f'turbostream_device_gap_seconds_bucket{{device="{dev}",le="0.0005"}}'] = gaps  # not the in-time one
        return out

    start, end = scrape(10.0, 100, 99, 1.0, 50), scrape(18.0, 300, 299, 1.4, 200)
    assert device_numbers(start, end, 10.0) == {"busy_pct": 80.0, "call_ms_mean": 40.0, "gap_ms_mean": 2.0,
                                                "queued_in_time_share": 0.75}
    assert device_numbers({}, {}, 10.0) == dict.fromkeys(("busy_pct", "call_ms_mean", "gap_ms_mean",
                                                          "queued_in_time_share"))


def test_server_engine_figures_span_the_device_window():
    """Engine calls, their mean time and batch, and the codecs' means come from the scrapes at the measured window's
    ends (the device figures' window), not from the whole step with its warmup; the whole step without them."""
    from loadtest_report import server_numbers  # scripts/, on the path above

    def scrape(calls, gpu_s, frames, decodes, decode_s):
        return {'turbostream_stage_seconds_count{stage="gpu"}': calls, 'turbostream_stage_seconds_sum{stage="gpu"}':
                gpu_s, "turbostream_batch_size_sum": frames, 'turbostream_stage_seconds_count{stage="decode"}':
                decodes, 'turbostream_stage_seconds_sum{stage="decode"}': decode_s}

    # Warmup: 10 calls of one frame at 100 ms; window: 20 calls of 8 frames at 40 ms; settling: 1 call of 1 frame.
    before, warm = scrape(0, 0.0, 0, 0, 0.0), scrape(10, 1.0, 10, 10, 0.05)
    window_end, after = scrape(30, 1.8, 170, 170, 0.21), scrape(31, 1.85, 171, 171, 0.211)
    windowed = server_numbers(before, after, warm, window_end)
    assert (windowed["timing_over"], windowed["engine_calls"], windowed["engine_call_ms_mean"],
            windowed["batch_size_mean"], windowed["decode_ms_mean"]) == ("window", 20, 40.0, 8.0, 1.0)
    whole = server_numbers(before, after, warm)
    assert (whole["timing_over"], whole["engine_calls"], whole["batch_size_mean"]) == ("step", 31, round(171 / 31, 3))
