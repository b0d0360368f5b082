"""The compile cache on the CPU: what one process compiled, another with empty torch caches reuses; a corrupt file is
ignored with a warning; a file that held only part of a start's compile is written anew. Each step runs in its own
process with its own empty inductor cache folder, so a hit can only come from the saved artifacts. The other tests
stand in for torch's save_cache_artifacts/load_cache_artifacts, so they compile nothing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from turbostream.engine import compile_cache
from turbostream.engine.compile_cache import CompileCache

STEP = r"""
import json, logging, sys, torch
from torch._dynamo.utils import counters
from turbostream.engine.compile_cache import CompileCache
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
cache = CompileCache(sys.argv[1], {"model": "tiny-linear", "size": [16, 16]})
cache.load()
torch.manual_seed(0)
module = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU())
out = torch.compile(module, dynamic=False)(torch.ones(4, 16))
if "b" in sys.argv[2]:  # another graph: what a new diffusers, or another GPU, compiles that the file does not hold
    out = out + torch.compile(lambda x: torch.cos(x) * 3, dynamic=False)(out)
state = cache.refresh()
print(json.dumps({"state": state, "fx_hits": counters["inductor"]["fxgraph_cache_hit"],
                  "sum": round(float(out.sum()), 4)}))
"""


def step(folder, inductor_dir, graphs: str = "a") -> tuple[dict, str]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", STEP, str(folder), graphs], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def written(path) -> tuple[int, int]:
    """What tells one write of a file from the next (a write is a new file renamed over it)."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


@pytest.mark.slow
def test_a_second_process_reuses_what_the_first_compiled(tmp_path):
    folder = tmp_path / "compile"
    first, log1 = step(folder, tmp_path / "inductor-1")
    assert first["state"] == "miss" and "no entry for this configuration" in log1
    [entry] = list(folder.glob("compile-*.bin"))
    # A start that compiles a graph the file does not hold (another diffusers, say) is a partial hit, not a hit,
    # and writes the file anew, so that the next start, which compiles the same, is a hit and writes nothing.
    before = written(entry)
    second, log2 = step(folder, tmp_path / "inductor-2", "ab")  # empty inductor cache: hits come from the file alone
    assert second["state"].startswith("partial hit, ") and second["fx_hits"] == 1
    assert "compile cache: saved" in log2 and written(entry) != before
    before = written(entry)
    third, log3 = step(folder, tmp_path / "inductor-3", "ab")
    assert third["state"] == "hit" and third["fx_hits"] == 2 and "compile cache: saved" not in log3
    assert written(entry) == before
    assert second["sum"] == third["sum"]
    # A corrupt entry is ignored with a warning; the compile still works (and the entry is written anew).
    entry.write_bytes(b"\x00not torch's format\xff" * 10)
    fourth, log4 = step(folder, tmp_path / "inductor-4")
    assert fourth["state"] == "miss" and "WARNING compile cache: ignoring" in log4 and fourth["sum"] == first["sum"]
    assert "compile cache: saved" in log4 and b"not torch's format" not in entry.read_bytes()


# ---------------------------------------------------------------- torch's artifact functions stood in for


@pytest.fixture
def artifacts(monkeypatch):
    """torch's artifacts of this process, stood in for: `recorded` is what a compile recorded (type -> keys),
    `files` what load_cache_artifacts takes (bytes -> type -> keys)."""
    state = SimpleNamespace(recorded={}, files={})

    def save():
        if not state.recorded:
            return None
        data = json.dumps(state.recorded, sort_keys=True).encode()
        state.files[data] = state.recorded
        return data, SimpleNamespace(artifacts=dict(state.recorded))

    def load(data: bytes):
        if data not in state.files:
            raise ValueError("not torch's format")
        return SimpleNamespace(artifacts=dict(state.files[data]))

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", save)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", load)
    return state


def test_a_hit_writes_nothing_and_a_partial_hit_writes_the_file_anew(tmp_path, artifacts, caplog):
    first = CompileCache(tmp_path, {"model": "m"})
    assert not first.load()
    artifacts.recorded = {"inductor": ["a"]}  # the compile after load()
    assert first.refresh() == "miss" and first.path.is_file()
    artifacts.recorded = {}  # a new process
    hit = CompileCache(tmp_path, {"model": "m"})
    assert hit.load()
    before = written(hit.path)
    artifacts.recorded = {"inductor": ["a"]}  # the compile took graph a from the caches the file filled
    assert hit.refresh() == "hit" and written(hit.path) == before and hit.compiled == 0

    artifacts.recorded = {}
    partial = CompileCache(tmp_path, {"model": "m"})
    assert partial.load()
    artifacts.recorded = {"inductor": ["a", "b"], "aot_autograd": ["c"]}  # graph b was compiled
    with caplog.at_level(logging.INFO, logger="turbostream.engine"):
        assert partial.refresh() == "partial hit, 2 artifacts compiled"
    assert "compile cache: saved" in caplog.text and written(partial.path) != before
    artifacts.recorded = {}
    again = CompileCache(tmp_path, {"model": "m"})
    assert again.load() and again.held == {("inductor", "a"), ("inductor", "b"), ("aot_autograd", "c")}


def test_what_another_engine_of_the_process_compiled_before_does_not_make_a_partial_hit(tmp_path, artifacts):
    artifacts.recorded = {"inductor": ["a"]}
    CompileCache(tmp_path, {"gpu": 0}).refresh()
    other = CompileCache(tmp_path, {"gpu": 1})  # serve --device cuda:0,cuda:1: the second engine, a file of its own
    assert not other.load()
    assert other.refresh() == "miss" and not other.path.exists()  # compiled nothing new itself
    artifacts.recorded = {"inductor": ["a", "z"]}
    assert other.refresh() == "miss" and other.path.is_file() and other.compiled == 1


def test_a_corrupt_file_is_written_anew_or_removed_when_nothing_replaces_it(tmp_path, artifacts, caplog):
    cache = CompileCache(tmp_path, {"model": "m"})
    cache.path.write_bytes(b"half a file")
    with caplog.at_level(logging.WARNING, logger="turbostream.engine"):
        assert not cache.load()
    assert "ignoring" in caplog.text
    artifacts.recorded = {"autotune": ["k"]}  # what loading --aot-format dynamo's artifacts recorded, say
    assert cache.refresh() == "miss" and CompileCache(tmp_path, {"model": "m"}).load()

    cache.path.write_bytes(b"half a file")
    artifacts.recorded = {}
    cache = CompileCache(tmp_path, {"model": "m"})
    assert not cache.load()
    # Nothing compiled (every artifact loaded, on the CPU nothing is recorded then): nothing to write in its place,
    # so it goes, and the next start does not warn of it again.
    assert cache.refresh() == "miss" and not cache.path.exists()


def test_a_file_another_process_wrote_since_is_not_removed(tmp_path, artifacts):
    cache = CompileCache(tmp_path, {"model": "m"})
    cache.path.write_bytes(b"half a file")
    assert not cache.load()
    artifacts.recorded = {"inductor": ["a"]}
    CompileCache(tmp_path, {"model": "m"}).refresh()  # another process, while this one compiled
    artifacts.recorded = {}
    assert cache.refresh() == "miss" and CompileCache(tmp_path, {"model": "m"}).load()


def test_the_file_gets_the_umasks_mode_so_another_user_can_read_it(tmp_path, artifacts):
    artifacts.recorded = {"inductor": ["a"]}
    old = os.umask(0o022)
    try:
        assert CompileCache(tmp_path, {"model": "m"}).refresh() == "miss"
    finally:
        os.umask(old)
    [entry] = tmp_path.glob("compile-*.bin")
    assert entry.stat().st_mode & 0o777 == 0o644


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path, artifacts, monkeypatch, caplog):
    artifacts.recorded = {"inductor": ["a"]}

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with caplog.at_level(logging.WARNING, logger="turbostream.engine"):
        CompileCache(tmp_path, {"model": "m"}).refresh()
    assert "No space left on device" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_a_write_killed_mid_way_is_swept_from_the_folder_once_a_day_old(tmp_path, artifacts):
    """A SIGKILL while the file was written left its temporary (hundreds of MB) for good; the next write sweeps it
    once it is a day old (a fresh one may be another process's write under way)."""
    import time

    from turbostream.engine.compile_cache import STALE_TEMPORARY_S

    killed, fresh = tmp_path / ".compile-4242-0badf00d.tmp", tmp_path / ".compile-4243-00c0ffee.tmp"
    for path in (killed, fresh):
        path.write_bytes(b"x" * 100)
    day_ago = time.time() - STALE_TEMPORARY_S - 60
    os.utime(killed, (day_ago, day_ago))
    artifacts.recorded = {"inductor": ["a"]}
    assert CompileCache(tmp_path, {"model": "m"}).refresh() == "miss"
    assert not killed.exists() and fresh.exists()


def test_the_key_names_everything_the_artifacts_depend_on(tmp_path):
    from turbostream.engine.compile_cache import CompileCache, default_folder

    a = CompileCache(tmp_path, {"gpu": "H100", "size": [512, 512], "buckets": [1, 2, 4, 8]})
    assert a.path == CompileCache(tmp_path, {"buckets": [1, 2, 4, 8], "size": [512, 512], "gpu": "H100"}).path
    assert a.path != CompileCache(tmp_path, {"gpu": "H200", "size": [512, 512], "buckets": [1, 2, 4, 8]}).path
    assert a.path != CompileCache(tmp_path, {"gpu": "H100", "size": [768, 512], "buckets": [1, 2, 4, 8]}).path
    assert a.key["torch"] and a.path.parent == tmp_path
    assert not a.load()  # nothing saved yet: a miss, not an error
    assert default_folder().parts[-2:] == ("turbostream", "compile")


def test_torch_compiles_artifacts_are_keyed_by_the_cuda_device_index_where_it_is_not_0(tmp_path):
    """inductor writes the GPU's index into its code: cuda:1 gets files of its own; cuda:0 and the CPU keep theirs."""
    from turbostream.engine.compile_cache import aot_folder, device_key

    key = {"gpu": "H100", "size": [512, 512]}
    assert device_key(key, torch.device("cpu")) == key
    assert device_key(key, torch.device("cuda:0")) == key
    assert device_key(key, torch.device("cuda:1")) == {**key, "device_index": 1}
    assert CompileCache(tmp_path, device_key(key, torch.device("cuda:1"))).path != CompileCache(tmp_path, key).path
    assert aot_folder(tmp_path, device_key(key, torch.device("cuda:1")))[0] != aot_folder(tmp_path, key)[0]


def test_the_cache_folder_expands_a_leading_tilde_wherever_it_comes_from(tmp_path, monkeypatch):
    from turbostream.engine.compile_cache import cache_folder

    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_folder(None) is None
    assert cache_folder("~/cc") == tmp_path / "cc"
    monkeypatch.setenv("TURBOSTREAM_CACHE", "~/tc")
    assert cache_folder("") == tmp_path / "tc" / "compile"


def test_a_read_only_aot_folder_that_holds_the_key_is_used_and_not_written(tmp_path, monkeypatch):
    from turbostream.engine.compile_cache import _can_write, aot_folder

    path, writable = aot_folder(tmp_path, {"model": "m"})
    assert writable and (path / "key.json").is_file() and _can_write(path)
    written_then = written(path / "key.json")
    monkeypatch.setattr(compile_cache, "_can_write", lambda folder: False)  # a read-only volume, as root sees it too
    assert aot_folder(tmp_path, {"model": "m"}) == (path, False)
    assert written(path / "key.json") == written_then
    # No folder for this key, and none can be made: built for this start only.
    (tmp_path / "file").write_text("")
    assert aot_folder(tmp_path / "file", {"model": "m"}) == (None, False)
    assert not _can_write(tmp_path / "missing")


def test_the_cli_turns_the_cache_off_or_points_it_elsewhere():
    from turbostream import cli
    from turbostream.cli.options import engine_config

    parse = cli.build_parser().parse_args
    assert engine_config(parse(["bench", "--device", "cpu"])).compile_cache == ""
    assert engine_config(parse(["bench", "--device", "cpu", "--no-compile-cache"])).compile_cache is None
    assert engine_config(parse(["bench", "--device", "cpu", "--compile-cache", "/tmp/x"])).compile_cache == "/tmp/x"
