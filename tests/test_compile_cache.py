"""The compile cache on the CPU: what one process compiled, another with empty torch caches reuses; a corrupt file is
ignored with a warning. Each step runs in its own process with its own empty inductor cache folder, so a hit can only
come from the saved artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

STEP = r"""
import json, logging, sys, torch
from torch._dynamo.utils import counters
from turbostream.engine.compile_cache import CompileCache
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
cache = CompileCache(sys.argv[1], {"model": "tiny-linear", "size": [16, 16]})
hit = cache.load()
torch.manual_seed(0)
module = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU())
out = torch.compile(module, dynamic=False)(torch.ones(4, 16))
saved = cache.save() if not hit else False
print(json.dumps({"hit": hit, "saved": saved, "fx_hits": counters["inductor"]["fxgraph_cache_hit"],
                  "sum": round(float(out.sum()), 4)}))
"""


def step(folder, inductor_dir) -> tuple[dict, str]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", STEP, str(folder)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
def test_a_second_process_reuses_what_the_first_compiled(tmp_path):
    folder = tmp_path / "compile"
    first, log1 = step(folder, tmp_path / "inductor-1")
    assert first["hit"] is False and first["saved"] is True and "no entry for this configuration" in log1
    [entry] = list(folder.glob("compile-*.bin"))
    second, log2 = step(folder, tmp_path / "inductor-2")  # empty inductor cache: a hit comes from the file alone
    assert second["hit"] is True and second["fx_hits"] >= 1 and "compile cache: hit" in log2
    assert second["sum"] == first["sum"]
    # A corrupt entry is ignored with a warning; the compile still works (and the entry is written anew).
    entry.write_bytes(b"\x00not torch's format\xff" * 10)
    third, log3 = step(folder, tmp_path / "inductor-3")
    assert third["hit"] is False and "WARNING compile cache: ignoring" in log3 and third["sum"] == first["sum"]
    assert third["saved"] is True


def test_the_key_names_everything_the_artifacts_depend_on(tmp_path):
    from turbostream.engine.compile_cache import CompileCache, default_folder

    a = CompileCache(tmp_path, {"gpu": "H100", "size": [512, 512], "buckets": [1, 2, 4, 8]})
    assert a.path == CompileCache(tmp_path, {"buckets": [1, 2, 4, 8], "size": [512, 512], "gpu": "H100"}).path
    assert a.path != CompileCache(tmp_path, {"gpu": "H200", "size": [512, 512], "buckets": [1, 2, 4, 8]}).path
    assert a.path != CompileCache(tmp_path, {"gpu": "H100", "size": [768, 512], "buckets": [1, 2, 4, 8]}).path
    assert a.key["torch"] and a.path.parent == tmp_path
    assert not a.load()  # nothing saved yet: a miss, not an error
    assert default_folder().parts[-2:] == ("turbostream", "compile")


def test_the_cli_turns_the_cache_off_or_points_it_elsewhere():
    from turbostream import cli
    from turbostream.cli.options import engine_config

    parse = cli.build_parser().parse_args
    assert engine_config(parse(["bench", "--device", "cpu"])).compile_cache == ""
    assert engine_config(parse(["bench", "--device", "cpu", "--no-compile-cache"])).compile_cache is None
    assert engine_config(parse(["bench", "--device", "cpu", "--compile-cache", "/tmp/x"])).compile_cache == "/tmp/x"
