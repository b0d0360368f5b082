"""--compile-aot (engine/aot.py): packages built once, loaded at later starts, checked against the eager networks.

AOTInductor compiles C++ on the CPU (a few seconds for the small modules here, about a minute for tiny-random's
networks), so the engine-level test builds its packages once per module and the others use small stand-ins.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from turbostream.config import EngineConfig, StreamParams
from turbostream.engine import aot
from turbostream.engine.aot import AotCall, AotPackages, DynamoArtifacts, Recorded, Runner, record_calls

# The two formats of --compile-aot: the small stand-in tests run against both.
FORMATS = pytest.mark.parametrize("kind", [AotPackages, DynamoArtifacts], ids=["aotinductor", "dynamo"])


class Net(torch.nn.Module):
    """A stand-in network: conv, ReLU, conv with a 4-element bias (the kind inductor would inline)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _record(net: torch.nn.Module, batches=(1,), layout=torch.contiguous_format) -> dict[int, Recorded]:
    out = {}
    for b in batches:
        x = torch.randn(b, 3, 16, 16).contiguous(memory_format=layout)
        with torch.no_grad(), record_calls({"net": net}) as calls:
            net(x)
        out[b] = calls["net"]
    return out


def _packages(folder, dynamic=False, kind=AotPackages) -> AotPackages:
    return kind(folder, device=torch.device("cpu"), dtype=torch.float32, dynamic=dynamic)


# ---------------------------------------------------------------- without compiling


def test_plan_is_one_package_per_bucket_or_batch_one_and_a_symbolic_batch():
    assert _packages(None).plan((1, 2, 4, 8)) == [("b1", 1, 1, 1), ("b2", 2, 2, 2), ("b4", 4, 4, 4), ("b8", 8, 8, 8)]
    assert _packages(None, dynamic=True).plan((1, 2, 4, 8)) == [("b1", 1, 1, 1), ("b2-8", 2, 8, 8)]
    assert _packages(None, dynamic=True).plan((2, 4)) == [("b2-4", 2, 4, 4)]
    assert _packages(None, dynamic=True).plan((1,)) == [("b1", 1, 1, 1)]


class FakePackage:
    def __init__(self) -> None:
        self.seen = []

    def __call__(self, *inputs):
        self.seen.append(inputs)
        return [inputs[0] * 2]


def test_aot_call_picks_the_package_of_the_batch_and_the_module_for_the_rest():
    small, large = FakePackage(), FakePackage()
    eager_calls = []
    call = AotCall("net", [Runner(small, 1, 1, (torch.contiguous_format,)),
                           Runner(large, 2, 4, (torch.contiguous_format,))],
                   lambda x: eager_calls.append(x) or x, "plain")
    x1, x3, x8 = torch.ones(1, 2), torch.ones(3, 2), torch.ones(8, 2)
    assert torch.equal(call(x1), x1 * 2) and len(small.seen) == 1
    assert torch.equal(call(x3), x3 * 2) and len(large.seen) == 1
    assert call(x8) is x8 and eager_calls == [x8]  # no package for batch 8


def test_aot_call_takes_the_unets_signature_and_returns_a_tuple():
    package = FakePackage()
    layouts = (torch.contiguous_format,) * 3
    call = AotCall("unet", [Runner(package, 1, 2, layouts)], None, "unet")
    x, t, emb = torch.ones(2, 4, 2, 2), torch.zeros(2), torch.zeros(2, 3, 5)
    out = call(x, t, encoder_hidden_states=emb, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], x * 2)
    assert package.seen[0][1] is t and package.seen[0][2] is emb


def test_aot_call_writes_reuses_deep_features_where_the_step_keeps_them_and_reads_them_from_deep_in():
    class Full:
        def __call__(self, x, t, emb):
            return x * 2, x + 100

    layouts = (torch.contiguous_format,) * 3
    full = AotCall("reuse_full", [Runner(Full(), 1, 1, layouts)], None, "full")
    x, deep_out = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    eps = full(x, torch.zeros(1), torch.zeros(1, 3, 5), deep_out=deep_out)
    assert torch.equal(eps, x * 2) and torch.equal(deep_out, x + 100)

    package = FakePackage()
    partial = AotCall("reuse_partial", [Runner(package, 1, 1, layouts + (torch.contiguous_format,))], None, "partial")
    assert torch.equal(partial(x, torch.zeros(1), torch.zeros(1, 3, 5), deep_in=deep_out), x * 2)
    assert package.seen[0][3] is deep_out


def test_runner_gives_each_input_the_layout_the_package_was_built_for():
    package = FakePackage()
    runner = Runner(package, 1, 1, (torch.channels_last,))
    plain = torch.randn(1, 3, 4, 4)
    runner(plain)
    assert package.seen[0][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(package.seen[0][0], plain)
    already = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    runner(already)
    assert package.seen[1][0] is already  # nothing copied when the layout is right


def test_record_calls_keeps_each_networks_first_call_and_the_unet_as_export_takes_it():
    net = Net()

    class UNetLike(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
            return (sample + timestep.view(-1, 1, 1, 1) + encoder_hidden_states.mean(),)

    unet = UNetLike()
    x = torch.randn(2, 3, 8, 8)
    with record_calls({"net": net, "unet": unet}) as calls:
        first = net(x)
        net(x + 1)
        unet(x, torch.ones(2), encoder_hidden_states=torch.ones(2, 4, 3), return_dict=False)
    assert set(calls) == {"net", "unet"}
    assert torch.equal(calls["net"].inputs[0], x) and torch.equal(calls["net"].outputs[0], first)
    assert [t.shape for t in calls["unet"].inputs] == [(2, 3, 8, 8), (2,), (2, 4, 3)]
    assert len(calls["unet"].outputs) == 1 and torch.allclose(calls["unet"].outputs[0], x + 2)
    net(x)  # the hooks are gone after the block
    assert len(calls) == 2


def test_compile_aot_refuses_fp8_and_without_compile_changes_nothing():
    import dataclasses

    ahead = EngineConfig(model="tiny-random", compile=True, compile_aot=True, feature_reuse=True)
    plain = dataclasses.replace(ahead, compile=False)  # what bench does for its rows without compile
    assert plain.compile_aot and not plain.compile
    with pytest.raises(ValueError, match="fp8"):
        EngineConfig(model="tiny-random", compile=True, compile_aot=True, fp8=True)


def test_cli_compile_aot_turns_compile_on_and_names_what_it_does_not_cover():
    import argparse

    from turbostream.cli.options import add_engine_options, engine_config
    from turbostream.errors import UserError

    parser = argparse.ArgumentParser()
    add_engine_options(parser, stream_options=True)
    cfg = engine_config(parser.parse_args(["--model", "tiny-random", "--device", "cpu", "--compile-aot", "--reuse",
                                           "2"]))
    assert cfg.compile and cfg.compile_aot and cfg.reuse_enabled and cfg.aot_format == "aotinductor"
    with pytest.raises(UserError, match="--compile-aot does not cover --fp8"):
        engine_config(parser.parse_args(["--model", "tiny-random", "--device", "cpu", "--compile-aot", "--fp8"]))
    cfg = engine_config(parser.parse_args(["--model", "tiny-random", "--device", "cpu", "--compile-aot",
                                           "--aot-format", "dynamo"]))
    assert cfg.compile and cfg.compile_aot and cfg.aot_format == "dynamo"
    with pytest.raises(UserError, match="--aot-format dynamo needs --compile-aot"):
        engine_config(parser.parse_args(["--model", "tiny-random", "--device", "cpu", "--aot-format", "dynamo"]))


def test_the_cache_key_tells_aot_packages_from_torch_compiles():
    from turbostream.engine.compile_cache import cache_key

    jit = EngineConfig(model="tiny-random", compile=True)
    ahead = EngineConfig(model="tiny-random", compile=True, compile_aot=True)
    assert "compile_aot" not in cache_key(jit, "gpu", torch.float16)
    assert cache_key(ahead, "gpu", torch.float16)["compile_aot"] is True
    assert "aot_format" not in cache_key(ahead, "gpu", torch.float16)  # the packages' folders keep their keys
    dynamo = EngineConfig(model="tiny-random", compile=True, compile_aot=True, aot_format="dynamo")
    assert cache_key(dynamo, "gpu", torch.float16)["aot_format"] == "dynamo"
    with pytest.raises(ValueError, match="aot_format must be one of aotinductor, dynamo"):
        EngineConfig(model="tiny-random", aot_format="export")


# ---------------------------------------------------------------- the engine's compile cache, packages stood in for


@pytest.fixture
def stand_in_packages(monkeypatch):
    """Packages that cost nothing: a file in the folder counts as a package loaded, else one is "built" (a file
    written where the engine builds) and the network runs eagerly; aot_check's child says packages work."""
    from turbostream.engine import aot_check

    def load_or_build(self, path, build, module, rec, lo, hi, what):
        if path.is_file():
            self.loaded += 1
        else:
            build.write_bytes(b"stand-in package")
            self.built += 1
        return Runner(module, lo, hi, tuple(aot._layout(x) for x in rec.inputs))

    monkeypatch.setattr(AotPackages, "_load_or_build", load_or_build)
    monkeypatch.setattr(aot_check, "_run_child",
                        lambda device, dtype, timeout: (aot_check.LoaderVerdict(True, "stand-in"), True))


def test_warmup_says_where_the_packages_are_a_read_only_folder_is_loaded_from_and_never_written(
        tmp_path, monkeypatch, capsys, stand_in_packages):
    from turbostream.cli import main
    from turbostream.engine import compile_cache

    argv = ["warmup", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--buckets", "1",
            "--compile-aot", "--compile-cache", str(tmp_path)]
    assert main(argv) == 0
    assert "3 AOTInductor packages built, 0 loaded, kept in the compile cache" in capsys.readouterr().out
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("aot-")]
    packages = sorted(folder.glob("*.pt2"))
    assert len(packages) == 3

    # The same folder, read-only (a volume `turbostream warmup` filled, mounted read-only): loaded from, not rebuilt.
    monkeypatch.setattr(compile_cache, "_can_write", lambda path: False)
    assert main(argv) == 0
    assert "0 AOTInductor packages built, 3 loaded from the read-only compile cache" in capsys.readouterr().out
    packages[0].unlink()  # one it lacks: built for this start only, somewhere else
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # so gettempdir() reads TMPDIR again
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 AOTInductor packages built for this start only, 2 loaded from the read-only compile cache" in out
    assert sorted(folder.glob("*.pt2")) == packages[1:] and not list((tmp_path / "tmp").iterdir())

    # No folder for this key, and none can be made.
    (tmp_path / "file").write_text("")
    assert main([*argv[:-1], str(tmp_path / "file")]) == 0
    assert ("3 AOTInductor packages built for this start only (the compile cache folder cannot be written)"
            in capsys.readouterr().out)


def test_a_missing_or_corrupt_dynamo_kernels_file_is_refreshed_when_every_artifact_loads(tmp_path, monkeypatch,
                                                                                         stand_in_packages):
    """--aot-format dynamo: the artifacts load, so nothing is built; the kernels file is still written anew from what
    the start recorded, or (nothing recorded) a corrupt one is removed instead of warned of at every start."""
    import dataclasses
    from types import SimpleNamespace

    from turbostream.engine import Engine
    from turbostream.engine.compile_cache import CompileCache, cache_key

    config = EngineConfig(model="tiny-random", device="cpu", width=64, height=64, buckets=(1,),
                          compile_cache=str(tmp_path), compile=True, compile_aot=True, aot_format="dynamo")
    first = Engine(config)
    first.warmup()
    assert first.stats.aot_packages_built == 3 and first.compile_cache_state == "miss"
    kernels = CompileCache(tmp_path, cache_key(dataclasses.replace(config, aot_format="dynamo"),
                                               aot.device_name(torch.device("cpu")), torch.float32))
    # What torch records while the artifacts load (autotuning results on a GPU, say), stood in for.
    recorded, record = {}, []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts",
                        lambda: (b"kernels", SimpleNamespace(artifacts=dict(recorded))) if recorded else None)
    load = AotPackages._load_or_build

    def load_and_record(self, *args):
        recorded.update(record)
        return load(self, *args)

    monkeypatch.setattr(DynamoArtifacts, "_load_or_build", load_and_record)
    kernels.path.write_bytes(b"half a file")
    record.append(("autotune", ["k"]))
    second = Engine(config, first.components)
    second.warmup()
    assert (second.stats.aot_packages_built, second.stats.aot_packages_loaded) == (0, 3)
    assert second.stats.compile_cache_hit and kernels.path.read_bytes() == b"kernels"

    kernels.path.write_bytes(b"half a file")
    recorded.clear()
    record.clear()
    Engine(config, first.components).warmup()
    assert not kernels.path.exists()


def test_compile_cache_with_a_tilde_is_the_home_folder_for_the_aotinductor_check_too(tmp_path, monkeypatch,
                                                                                     stand_in_packages):
    from turbostream.engine import Engine

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    engine = Engine(EngineConfig(model="tiny-random", device="cpu", width=64, height=64, buckets=(1,),
                                 compile=True, compile_aot=True, compile_cache="~/cc"))
    engine.warmup()
    assert engine.stats.aot_packages_built == 3
    assert list((tmp_path / "home" / "cc").glob("aotinductor-check-*.json"))
    assert list((tmp_path / "home" / "cc").glob("aot-*/*.pt2")) and not (tmp_path / "~").exists()


# ---------------------------------------------------------------- compiling small stand-ins


@FORMATS
def test_a_package_follows_the_weights_it_is_loaded_with_and_is_loaded_at_the_next_start(tmp_path, kind):
    net = Net()
    rec = _record(net, (1, 2))
    first = _packages(tmp_path, kind=kind)
    call = first.prepare("net", net, rec, (1, 2))
    assert (first.built, first.loaded) == (2, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"net-b1{kind.suffix}", f"net-b2{kind.suffix}"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(call(x), net(x), atol=1e-5)

    # Another net of the same shape with other weights (a model folder updated in place): the packages, which hold
    # no weights of their own (the small conv bias included), compute with the new ones.
    other = Net(seed=1)
    second = _packages(tmp_path, kind=kind)
    call = second.prepare("net", other, _record(other, (1, 2)), (1, 2))
    assert (second.built, second.loaded) == (0, 2)
    with torch.no_grad():
        assert torch.allclose(call(x), other(x), atol=1e-5)
        assert not torch.allclose(call(x), net(x), atol=1e-3)


def test_two_engines_preparing_one_package_at_once_build_it_once(tmp_path):
    """serve --device cuda:0,cuda:1 warms its engines up on two threads at once, with the same cache folder."""
    import threading

    net = Net()
    rec = _record(net)
    packages = [_packages(tmp_path), _packages(tmp_path)]
    calls, errors = [None, None], []

    def prepare(i: int) -> None:
        try:
            calls[i] = packages[i].prepare("net", net, rec, (1,))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=prepare, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert sorted((p.built, p.loaded) for p in packages) == [(0, 1), (1, 0)]
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert all(torch.allclose(c(x), net(x), atol=1e-5) for c in calls)


@FORMATS
def test_a_corrupt_or_foreign_package_is_rebuilt_with_a_warning(tmp_path, caplog, kind):
    net = Net()
    rec = _record(net)
    _packages(tmp_path, kind=kind).prepare("net", net, rec, (1,))
    path = tmp_path / f"net-b1{kind.suffix}"
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # a start cut short by a full disk, say
    with caplog.at_level(logging.WARNING, logger="turbostream.engine"):
        packages = _packages(tmp_path, kind=kind)
        call = packages.prepare("net", net, rec, (1,))
    assert packages.built == 1 and "ignoring" in caplog.text
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(call(x), net(x), atol=1e-5)

    # A package of another network under this name: its weights' names are not this module's.
    class Other(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.c(x)

    foreign = Other()
    _packages(tmp_path / "other", kind=kind).prepare("net", foreign, _record(foreign), (1,))
    path.write_bytes((tmp_path / "other" / f"net-b1{kind.suffix}").read_bytes())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="turbostream.engine"):
        packages = _packages(tmp_path, kind=kind)
        call = packages.prepare("net", net, rec, (1,))
    # A package knows its weights' names; an artifact finds out when it runs on this network's weights.
    assert packages.built == 1
    assert ("built for other weights" if kind is AotPackages else "does not run on the network's inputs") in caplog.text
    with torch.no_grad():
        assert torch.allclose(call(x), net(x), atol=1e-5)


@FORMATS
def test_a_package_that_does_not_match_its_own_network_is_an_error_not_a_silent_speed_up(tmp_path, kind):
    net = Net()
    rec = _record(net)
    wrong = {1: Recorded(rec[1].inputs, (rec[1].outputs[0] + 1.0,))}  # as if the compiled code computed something else
    with pytest.raises(RuntimeError, match="does not match the eager network.*--compile instead"):
        _packages(tmp_path, kind=kind).prepare("net", net, wrong, (1,))
    assert not (tmp_path / f"net-b1{kind.suffix}").exists()


def test_a_read_only_folder_is_loaded_from_and_what_it_lacks_is_built_for_this_start_only(tmp_path, monkeypatch,
                                                                                            caplog):
    net = Net()
    rec = _record(net, (1, 2))
    folder = tmp_path / "aot"
    _packages(folder).prepare("net", net, rec, (1, 2))
    (folder / "net-b1.pt2").write_bytes(b"half a package")
    (folder / "net-b2.pt2").unlink()
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # so gettempdir() reads TMPDIR again
    with caplog.at_level(logging.WARNING, logger="turbostream.engine"):
        packages = AotPackages(folder, device=torch.device("cpu"), dtype=torch.float32, dynamic=False, read_only=True)
        call = packages.prepare("net", net, rec, (1, 2))
    assert (packages.built, packages.loaded) == (2, 0) and "for this start only" in caplog.text
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before  # nothing written there
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("turbostream-aot-")]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(call(x), net(x), atol=1e-5)


@FORMATS
def test_packages_get_the_umasks_mode_so_a_server_running_as_another_user_can_read_them(tmp_path, kind):
    net = Net()
    old = os.umask(0o022)
    try:
        _packages(tmp_path, kind=kind).prepare("net", net, _record(net), (1,))
    finally:
        os.umask(old)
    assert (tmp_path / f"net-b1{kind.suffix}").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [f"net-b1{kind.suffix}"]  # nothing else left behind


def test_a_network_that_cannot_be_exported_is_a_clear_error_that_names_the_way_on(tmp_path, monkeypatch):
    net = Net()
    rec = _record(net)

    class Unsupported(Exception):  # what torch.export raises on Python it cannot trace, by name
        pass

    def refuse(*args, **kwargs):
        raise Unsupported("data-dependent control flow\nmore detail")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(RuntimeError, match=r"torch.export could not build net-b1 \(Unsupported: data-dependent "
                                           r"control flow\); start with --compile instead"):
        _packages(tmp_path).prepare("net", net, rec, (1,))
    assert not list(tmp_path.iterdir())  # no half-written package left behind


@FORMATS
def test_without_a_cache_folder_nothing_is_kept(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # so gettempdir() reads TMPDIR again
    net = Net()
    call = _packages(None, dynamic=True, kind=kind).prepare("net", net, _record(net, (1, 4), torch.channels_last),
                                                            (1, 2, 4))
    x = torch.randn(3, 3, 16, 16)  # batch 3: the symbolic package (2 to 4) serves it
    with torch.no_grad():
        assert torch.allclose(call(x), net(x), atol=1e-5)
    assert [r.layouts for r in call.runners] == [(torch.channels_last,)] * 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("turbostream-aot-")]


# ---------------------------------------------------------------- the engine, tiny-random


def _tiny_config(tmp_path, **kw) -> EngineConfig:
    """tiny-random at 64x64, batch 1, feature reuse on, its compile cache in tmp_path."""
    return EngineConfig(model="tiny-random", device="cpu", width=64, height=64, buckets=(1,),
                        compile_cache=str(tmp_path), feature_reuse=True, **kw)


def _tiny_outputs(engine) -> list[np.ndarray]:
    """Two plain frames in one batch, then a reuse stream's full, partial and partial frame."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    params = [StreamParams("a", seed=1), StreamParams("b", seed=2)]
    reusing = StreamParams("c", seed=3, reuse=3)
    return engine.run(frames[:2], params) + [engine.run([f], [reusing], streams=["s"])[0] for f in frames]


def _within_a_level(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for out, ref in zip(got, expected, strict=True):
        assert int(np.abs(out.astype(np.int16) - ref.astype(np.int16)).max()) <= 1


def test_engine_with_compile_aot_builds_then_loads_and_equals_the_eager_engine(tmp_path, monkeypatch):
    """Every network, feature reuse's full and partial forwards included, through packages: built at the first start,
    loaded at the second, frames within a level of the eager engine's (plain frames, then a reuse stream's full and
    partial ones)."""
    from turbostream.engine import Engine

    eager = Engine(_tiny_config(tmp_path))
    eager.warmup()
    expected = _tiny_outputs(eager)
    assert eager.stats.reuse_partial_batches == 2

    first = Engine(_tiny_config(tmp_path, compile=True, compile_aot=True), eager.components)
    first.warmup()
    assert (first.stats.aot_packages_built, first.stats.aot_packages_loaded) == (5, 0)
    assert not first.stats.compile_cache_hit and first.stats.aot_unavailable is None
    (verdict,) = tmp_path.glob("aotinductor-check-*.json")  # a child found that packages load here (aot_check.py)
    assert '"works": true' in verdict.read_text()
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("aot-")]
    assert sorted(p.name for p in folder.glob("*.pt2")) == [
        "decoder-b1.pt2", "encoder-b1.pt2", "reuse_full-b1.pt2", "reuse_partial-b1.pt2", "unet-b1.pt2"]
    assert '"compile_aot": true' in (folder / "key.json").read_text()

    # The second start traces nothing: export is not called.
    def no_export(*args, **kwargs):
        raise AssertionError("a start with every package cached must not export")

    monkeypatch.setattr(torch.export, "export", no_export)
    second = Engine(_tiny_config(tmp_path, compile=True, compile_aot=True), eager.components)
    second.warmup()
    assert (second.stats.aot_packages_built, second.stats.aot_packages_loaded) == (0, 5)
    assert second.stats.compile_cache_hit
    runs = []
    run = Runner.__call__
    monkeypatch.setattr(Runner, "__call__", lambda self, *inputs: runs.append(self) or run(self, *inputs))
    for engine in (first, second):
        assert isinstance(engine.math.unet_call, AotCall) and isinstance(engine.math.partial_call, AotCall)
        runs.clear()
        got = _tiny_outputs(engine)  # five batches of 1 (the largest bucket): encoder, one UNet evaluation, decoder
        assert len(runs) == 5 * 3
        assert engine.stats.reuse_partial_batches == 2
        _within_a_level(got, expected)


def test_device_name_says_what_compiled_code_depends_on():
    assert aot.device_name(torch.device("cpu")).startswith("cpu: ")


def test_turbostream_warmup_builds_the_packages_once_and_the_next_run_loads_them(tmp_path, capsys):
    from turbostream.cli import main

    argv = ["warmup", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--buckets", "1",
            "--compile-aot", "--compile-cache", str(tmp_path)]
    assert main(argv) == 0
    assert "3 AOTInductor packages built, 0 loaded, kept in the compile cache" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 AOTInductor packages built, 3 loaded" in capsys.readouterr().out
    assert main(argv[:-3]) == 0  # no compile: the engine warmed up, nothing built
    out = capsys.readouterr().out
    assert out.startswith("turbostream warmup: warm-up ") and "AOTInductor" not in out


def test_compile_aot_dynamo_builds_at_the_first_start_and_the_next_loads_without_tracing(tmp_path, monkeypatch,
                                                                                          capsys):
    """`--compile-aot --aot-format dynamo`: torch.compile's ahead-of-time artifacts of tiny-random's networks, feature
    reuse's full and partial forwards included (each traced whole), built by `turbostream warmup` into the compile
    cache with their kernels; an engine started after it loads them (dynamo traces nothing: building is refused) and
    its frames, plain and a reuse stream's full and partial ones, are within a level of the eager engine's."""
    from turbostream.cli import main
    from turbostream.engine import Engine

    argv = ["warmup", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--buckets", "1", "--reuse", "3",
            "--compile-aot", "--aot-format", "dynamo", "--compile-cache", str(tmp_path)]
    assert main(argv) == 0
    assert "5 torch.compile AOT artifacts built, 0 loaded, kept in the compile cache" in capsys.readouterr().out
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("aot-")]
    assert sorted(p.name for p in folder.glob("*.dynamo")) == [
        "decoder-b1.dynamo", "encoder-b1.dynamo", "reuse_full-b1.dynamo", "reuse_partial-b1.dynamo", "unet-b1.dynamo"]
    assert '"aot_format": "dynamo"' in (folder / "key.json").read_text()
    assert (tmp_path / f"compile-{folder.name[4:]}.bin").is_file()  # the kernels, under the same key

    def no_build(self, path, *args):
        raise AssertionError(f"a start with every artifact cached must not build {path.name}")

    monkeypatch.setattr(DynamoArtifacts, "_build", no_build)

    eager = Engine(_tiny_config(tmp_path))
    eager.warmup()
    expected = _tiny_outputs(eager)
    ahead = Engine(_tiny_config(tmp_path, compile=True, compile_aot=True, aot_format="dynamo"), eager.components)
    stats = ahead.warmup()
    assert (stats.aot_format, stats.aot_packages_built, stats.aot_packages_loaded) == ("dynamo", 0, 5)
    assert stats.compile_cache_hit and stats.aot_unavailable is None
    assert isinstance(ahead.math.unet_call, AotCall) and isinstance(ahead.math.partial_call, AotCall)
    got = _tiny_outputs(ahead)
    assert ahead.stats.reuse_partial_batches == 2
    _within_a_level(got, expected)


def test_an_artifact_dynamo_cannot_build_is_a_clear_error_that_names_the_way_on(tmp_path, monkeypatch):
    net = Net()
    rec = _record(net)

    class Unsupported(Exception):  # what dynamo raises on Python it cannot trace whole, by name
        pass

    class Refusing:
        def aot_compile(self, example_inputs):
            raise Unsupported("graph break in forward\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: Refusing())
    with pytest.raises(RuntimeError, match=r"torch.compile's ahead-of-time compile could not build net-b1 "
                                           r"\(Unsupported: graph break in forward\); start with --compile instead"):
        _packages(tmp_path, kind=DynamoArtifacts).prepare("net", net, rec, (1,))
    assert not list(tmp_path.iterdir())  # no half-written artifact left behind


def test_temporaries_of_builds_cut_short_are_swept_once_a_day_old(tmp_path):
    """A build killed mid-way (SIGTERM to `warmup`, which has no handler) left its temporary package, hundreds of MB,
    in the cache for good. A day-old one is removed; a fresh one may be another process's build under way."""
    import os
    import time

    from turbostream.engine.compile_cache import STALE_TEMPORARY_S, sweep_stale_temporaries

    old, fresh = tmp_path / ".unet-b1.4242.tmp.pt2", tmp_path / ".unet-b2.4243.tmp.pt2"
    package = tmp_path / "unet-b1.pt2"
    for path in (old, fresh, package):
        path.write_bytes(b"x")
    day_ago = time.time() - STALE_TEMPORARY_S - 60
    os.utime(old, (day_ago, day_ago))
    os.utime(package, (day_ago, day_ago))
    assert sweep_stale_temporaries(tmp_path) == 1
    assert not old.exists() and fresh.exists() and package.exists()
