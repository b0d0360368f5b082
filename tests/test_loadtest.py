"""scripts/loadtest.py on the CPU: a short sweep against a real server, and its bounds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from turbostream.config import Limits, ServerConfig, preset
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


class PacedSource:
    """A stand-in for the server's capture (sources.CaptureThread's shape): 50 frames a second, forever."""

    def __init__(self, spec: str) -> None:
        self.index, self.ended, self.error = 0, False, None

    def start(self) -> None:
        pass

    def latest(self, timeout: float):
        time.sleep(0.02)
        self.index += 1
        y, x = np.mgrid[0:48, 0:64]
        return self.index, np.stack([x * 4, y * 5, np.full_like(x, self.index % 255)], -1).astype(np.uint8)

    def close(self) -> None:
        pass


def _broadcasting_server(tiny_components, max_viewers: int) -> TurboServer:
    engine = Engine(preset("test"), tiny_components)
    config = ServerConfig(port=0, source="stand-in", limits=Limits(max_viewers=max_viewers))
    return TurboServer(engine, config, capture_factory=PacedSource)


def _watch(tiny_components, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The load test with `args` against a broadcasting server (at most 3 viewers); its result and JSON report."""
    with ServerThread(_broadcasting_server(tiny_components, max_viewers=3)) as server:
        result = subprocess.run([sys.executable, str(SCRIPT), "--url", f"ws://127.0.0.1:{server.port}/ws", *args,
                                 "--warmup", "0.5", "--json", str(out)], capture_output=True, text=True, timeout=120)
    return result, json.loads(out.read_text()) if out.exists() else {}


def test_loadtest_viewers_watch_the_broadcast_beside_clients(tiny_components, tmp_path):
    """--viewers: a step of one client alone, then one with three viewers of the broadcast; each viewer's frames/s
    and the gaps between its frames, the verdict's viewer checks, and a table for the README."""
    out = tmp_path / "load.json"
    result, report = _watch(tiny_components, out, "--clients", "1", "--viewers", "0,3", "--duration", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [(s["clients"], s["viewers"]) for s in report["steps"]] == [(1, 0), (1, 3)]
    assert report["steps"][0]["viewer_total"]["count"] == 0 and report["steps"][0]["per_viewer"] == []
    step = report["steps"][1]
    assert step["total"]["frames"] > 0 and step["total"]["errors"] == 0  # the client streams beside them
    viewers = step["viewer_total"]
    assert viewers["count"] == 3 and viewers["errors"] == 0 and viewers["silent"] == 0
    # The source delivers 50 frames a second; each viewer gets what the engine makes of them, one encode for all.
    assert 0 < viewers["fps_min"] <= viewers["fps_max"] <= 60
    for v in step["per_viewer"]:
        assert v["frames"] > 1 and v["bytes"] > 0 and v["gap_ms"]["p50"] >= 10 and v["states"][-1] == "live"
    checks = {c["check"]: c for c in report["verdict"]["checks"]}
    assert checks["1 clients, 3 viewers: viewer errors"]["pass"] and report["verdict"]["pass"]
    assert "3 viewers: frames/s" in result.stdout
    table = subprocess.run([sys.executable, str(SCRIPT), "--markdown", str(out)], capture_output=True, text=True,
                           timeout=60)
    assert table.returncode == 0 and "| 1 | 0 |" in table.stdout and "| 1 | 3 |" in table.stdout, table.stdout
    assert "frames/s per viewer" in table.stdout


def test_loadtest_shows_the_viewer_limit_holding(tiny_components, tmp_path):
    """Four viewers against --max-viewers 3: one is refused with server_full, the verdict fails on it (exit status
    1), and the three let in watch the broadcast all the same."""
    result, report = _watch(tiny_components, tmp_path / "load.json", "--clients", "0", "--viewers", "4",
                            "--duration", "1.5")
    assert result.returncode == 1, result.stdout + result.stderr
    step = report["steps"][0]
    refused = [v for v in step["per_viewer"] if v["error_count"]]
    assert len(refused) == 1 and refused[0]["errors"][0].startswith("server_full"), step["per_viewer"]
    assert refused[0]["frames"] == 0
    assert sum(1 for v in step["per_viewer"] if v["frames"] > 0) == 3
    failed = {c["check"] for c in report["verdict"]["checks"] if not c["pass"]}
    assert failed == {"0 clients, 4 viewers: viewer errors", "0 clients, 4 viewers: viewers that got no frame in "
                      "the window"}


def test_loadtest_churn_opens_a_new_connection_every_few_tenths_of_a_second(tiny_components, tmp_path):
    """--churn 0.3: the client and both viewers close their connection every 0.3 s and open another at once, all
    answered, none lost, and the server's descriptors back where they were once they leave."""
    result, report = _watch(tiny_components, tmp_path / "load.json", "--clients", "1", "--viewers", "2",
                            "--duration", "1.5", "--churn", "0.3")
    assert result.returncode == 0, result.stdout + result.stderr
    step = report["steps"][0]
    client = step["per_client"][0]
    # 2 s of step (warmup included) in connections of 0.3 s: about 6 each; a slow machine opens fewer.
    # Each connection but the last was churned (the last too when its 0.3 s ran out just before the step's end).
    assert client["connection_count"] >= 3, client
    assert client["connection_count"] - 1 <= client["churned"] <= client["connection_count"], client
    assert client["error_count"] == 0 and client["lost"] == 0 and client["unanswered"] == 0
    assert all(c["end"] in ("churned", "step ended") for c in client["connections"])
    for viewer in step["per_viewer"]:
        assert viewer["connections"] >= 3 and viewer["error_count"] == 0 and viewer["frames"] > 0, viewer
    assert step["total"]["connections"] == client["connection_count"] + sum(v["connections"]
                                                                           for v in step["per_viewer"])
    assert report["settings"]["churn_s"] == 0.3 and report["verdict"]["pass"], report["verdict"]
    assert "connections opened and closed" in result.stdout


@pytest.mark.parametrize("args", [["--clients", "100"], ["--duration", "5000"], ["--inflight", "0"],
                                  ["--clients", "x"], ["--clients", "0"], ["--viewers", "300"],
                                  ["--clients", "1,2", "--viewers", "1,2"], ["--churn", "0.05"]])
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
