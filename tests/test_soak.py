"""The soak in short: scripts/loadtest.py --soak against a spawned server, and the verdict's arithmetic.

The committed 10-minute run (benchmarks/soak-cpu-*.json) uses the same script and criteria; here 8 clients stream
for a few seconds and the same checks must pass, with margins a busy 2-core CI machine cannot trip.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "loadtest.py"
MIB = 2**20


def _loadtest():
    spec = importlib.util.spec_from_file_location("loadtest", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("loadtest", module)  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_soak_of_eight_clients_passes_the_soak_criteria(tmp_path):
    out = tmp_path / "soak.json"
    log = tmp_path / "server.log"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--soak", "--spawn-server", "--clients", "8", "--duration", "6",
         "--warmup", "2", "--sample-every", "1", "--json", str(out), "--server-log", str(log),
         "--", "--model", "tiny-random", "--size", "64", "--device", "cpu"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr + log.read_text()
    report = json.loads(out.read_text())
    assert report["verdict"]["pass"], json.dumps(report["verdict"], indent=1)
    assert "soak verdict: PASS" in result.stdout
    step = report["steps"][0]
    srv = step["server"]
    assert step["total"]["errors"] == 0 and report["server"]["exit_status"] == 0
    assert all(c["replies"] > 0 for c in step["per_client"])
    # Growth after the warmup: the 10-minute run allows 50 MiB; a few seconds must stay far below it.
    assert srv["rss_bytes_end"] - srv["rss_bytes_warm"] < 25 * MIB
    # Eight sockets while the clients stream, none left once they are gone.
    assert srv["open_fds_warm"] >= srv["open_fds_start"] + 8
    assert srv["open_fds_end"] <= srv["open_fds_start"] + 2
    assert srv["threads_end"] <= srv["threads_warm"] + 2 and srv["threads_warm"] < 64
    # The samples show the run: clients connected in the middle, gone at the end, every value present.
    samples = step["samples"]
    assert len(samples) >= 5 and all(s["rss_bytes"] and s["open_fds"] and s["threads"] for s in samples)
    assert max(s["clients"] for s in samples) == 8 and samples[-1]["clients"] == 0
    assert samples[-1]["send_buffer_bytes"] == 0


def _step(**server) -> dict:
    base = {"rss_bytes_warm": 400 * MIB, "rss_bytes_end": 410 * MIB, "open_fds_start": 9, "open_fds_end": 9,
            "threads_warm": 8, "threads_end": 8}
    return {"clients": 4, "total": {"errors": 0}, "per_client": [{"replies": 3}] * 4, "server": {**base, **server}}


def test_soak_verdict_fails_on_each_criterion():
    lt = _loadtest()
    args = argparse.Namespace(max_rss_growth_mib=50.0, max_gpu_growth_mib=50.0)

    def failed(steps, exit_status=0):
        v = lt.verdict(steps, args, exit_status, spawned=True)
        return [c["check"] for c in v["checks"] if not c["pass"]]

    assert failed([_step()]) == []
    assert failed([_step(rss_bytes_end=451 * MIB)]) == ["4 clients: RSS growth after the warmup"]
    assert failed([_step(open_fds_end=12)]) == [
        "4 clients: open file descriptors after the clients left, over the count before"]
    assert failed([_step(threads_end=11)]) == ["4 clients: threads at the end over the count after the warmup"]
    assert failed([_step(gpu_reserved_bytes_warm=MIB, gpu_reserved_bytes_end=80 * MIB)]) == [
        "4 clients: CUDA memory (reserved) growth after the warmup"]
    assert failed([_step()], exit_status=1) == ["server exit status after SIGTERM"]
    # A metric the server did not export is a failure, not a pass.
    assert failed([_step(rss_bytes_warm=None)]) == ["4 clients: RSS growth after the warmup"]
    silent = _step()
    silent["per_client"] = [{"replies": 3}, {"replies": 0}]
    silent["total"] = {"errors": 2}
    assert failed([silent]) == ["4 clients: errors", "4 clients: clients never answered"]
