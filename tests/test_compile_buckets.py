"""scripts/compile_buckets.py --trace-only: dynamo's tracing of the engine's modules per bucket, nothing compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_trace_only_traces_every_bucket_and_reports_dynamo_s_time(tmp_path):
    out = tmp_path / "trace.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_buckets.py"), "--model", "tiny-random",
                           "--size", "64", "--buckets", "1,2", "--modes", "static", "--trace-only",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["trace_only"] is True and "dynamic" not in r
    static = r["static"]
    # UNet, TAESD encoder and decoder, once per bucket: six graphs, each only traced (dynamo's eager back end).
    assert static["graphs"] == 6
    assert 0 < static["dynamo_s"] <= static["compile_s"]
    assert not any("inductor" in phase or "aot" in phase.lower() for phase in static["phases_s"]), static["phases_s"]
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_buckets.py"), "--trace-only", "--warm"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "leave out --warm" in bad.stderr
