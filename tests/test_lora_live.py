"""--lora-live: LoRA scales changed while the engine runs give the frames a fresh start at those scales would."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from turbostream.config import StreamParams, preset
from turbostream.engine import Engine
from turbostream.engine.cuda import refresh_derived_weights
from turbostream.engine.time_proj import set_fused_time_proj
from turbostream.models import load_components
from turbostream.parity import parity_stats

UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "time_emb_proj", "ff.net.2")
TEXT_LAYERS = ("q_proj", "v_proj", "fc1")
PARAMS = [StreamParams("a red fox", 0.5, 2, 3), StreamParams("a lighthouse", 0.7, 2, 11)]


def _frames(n: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def _lora(path, seed: int = 0, rank: int = 2) -> str:
    """A LoRA in the PEFT layout of the UNet's attention, feed-forward, 3x3 convs and time projections and the text
    encoder's attention and MLP, random matrices large enough to change the pictures."""
    comps = load_components("tiny-random", device="cpu")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for part, root, ends in (("unet", comps.unet, UNET_LAYERS), ("text_encoder", comps.text_encoder, TEXT_LAYERS)):
        for name, module in root.named_modules():
            if name.endswith(ends) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                w = module.weight
                state[f"{part}.{name}.lora_A.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
                state[f"{part}.{name}.lora_B.weight"] = torch.randn(w.shape[0], rank, *[1] * (w.ndim - 2),
                                                                    generator=g) * 0.3
    save_file(state, str(path))
    return str(path)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("live")
    return _lora(folder / "ink.safetensors", 0), _lora(folder / "chalk.safetensors", 1)


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_scales_changed_live_give_the_frames_of_a_fresh_start_at_those_scales(loras):
    """Back and forth, with the options that copy the weights (stacked time projections) or cache what is made of
    them (prompt embeddings through a text-encoder LoRA, prompt_kv's keys and values): bit for bit a fresh start."""
    ink, chalk = loras
    options = dict(prompt_kv=True, fused_time_proj=True)
    live = Engine(preset("test", loras=(f"{ink}:0.2", f"{chalk}:0"), lora_live=True, **options))
    before = live.run(_frames(), PARAMS)
    runs = live.stats.text_encoder_runs
    for scales in ([1.0, 0.0], [-0.5, 0.7], [0.9, 0.7]):
        assert [x["scale"] for x in live.set_lora_scales(scales)] == scales
    after = live.run(_frames(), PARAMS)
    assert live.stats.text_encoder_runs == runs + 2  # the prompts were encoded again, through the new weights
    fresh = Engine(preset("test", loras=(f"{ink}:0.9", f"{chalk}:0.7"), **options))  # merged at load, not live
    assert all(np.array_equal(x, y) for x, y in zip(after, fresh.run(_frames(), PARAMS)))
    assert _same_weights(live.unet, fresh.unet) and _same_weights(live.text_encoder, fresh.text_encoder)
    assert np.abs(np.stack(after).astype(int) - np.stack(before)).mean() > 5  # the change shows
    live.set_lora_scales([0.2, 0.0])
    assert all(np.array_equal(x, y) for x, y in zip(live.run(_frames(), PARAMS), before))  # and goes back exactly
    assert [(x["name"], x["scale"]) for x in live.loras] == [("ink", 0.2), ("chalk", 0.0)]


def test_half_precision_weights_do_not_drift_however_often_the_scale_moves(loras):
    """Each change recomputes a layer from its weights before the LoRAs: after a fader's worth of changes the fp16
    weights are those of a fresh load at the last scales (live or not: both round each layer's float32 sum once),
    where adding differences would round once per change."""
    ink, chalk = loras
    start = [f"{ink}:0.3", f"{chalk}:-0.6"]
    moved = load_components("tiny-random", device="cpu", dtype=torch.float16, loras=start, lora_live=True)
    rng = np.random.default_rng(0)
    for scales in rng.uniform(-2, 2, (200, 2)):
        moved.lora_live.set_scales(scales.tolist())
    moved.lora_live.set_scales([0.3, -0.6])
    fresh = load_components("tiny-random", device="cpu", dtype=torch.float16, loras=start)
    assert _same_weights(moved.unet, fresh.unet) and _same_weights(moved.text_encoder, fresh.text_encoder)
    plain = load_components("tiny-random", device="cpu", dtype=torch.float16)
    assert not _same_weights(moved.unet, plain.unet)


def test_fused_and_stacked_projections_follow_a_live_change(loras):
    """On CUDA the engine runs fused QKV projections (copies of to_q, to_k, to_v) and, with fused_time_proj, one
    stacked time projection: both are refreshed from the changed weights, in place (graphs read them there)."""
    ink, _ = loras
    comps = load_components("tiny-random", device="cpu", loras=[f"{ink}:0.5"], lora_live=True)
    comps.unet.fuse_qkv_projections()
    set_fused_time_proj(comps.unet, True)
    attn = comps.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    cross = comps.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    stacked = comps.unet.time_embedding.stacked_proj
    where = (attn.to_qkv.weight.data_ptr(), cross.to_kv.weight.data_ptr(), stacked.weight.data_ptr())
    old = attn.to_qkv.weight.clone()
    comps.lora_live.set_scales([-1.0])
    assert torch.equal(attn.to_qkv.weight, old)  # stale until refreshed
    assert refresh_derived_weights(comps.unet) > 0
    assert torch.equal(attn.to_qkv.weight, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    assert torch.equal(cross.to_kv.weight, torch.cat([cross.to_k.weight, cross.to_v.weight]))
    first = comps.unet.down_blocks[0].resnets[0].time_emb_proj
    assert torch.equal(stacked.weight[:first.out_features], first.weight)
    assert (attn.to_qkv.weight.data_ptr(), cross.to_kv.weight.data_ptr(), stacked.weight.data_ptr()) == where


def test_feature_reuse_runs_a_full_frame_after_a_change(loras):
    """Deep features kept from before a change were computed with the old weights: every stream recomputes them."""
    ink, _ = loras
    engine = Engine(preset("test", loras=(f"{ink}:0.5",), lora_live=True, feature_reuse=True))
    p = StreamParams("a red fox", 0.5, 2, 3, reuse=4)
    engine.run(_frames(1), [p], streams=["a"])
    engine.run(_frames(1, seed=1), [p], streams=["a"])
    partial = engine.stats.reuse_partial_batches
    assert partial == 1
    engine.set_lora_scales([1.0])
    engine.run(_frames(1, seed=2), [p], streams=["a"])
    assert engine.stats.reuse_partial_batches == partial  # a full frame, keeping new deep features
    engine.run(_frames(1, seed=3), [p], streams=["a"])
    assert engine.stats.reuse_partial_batches == partial + 1


def test_scales_that_cannot_apply_are_refused_and_change_nothing(loras, tiny_components):
    ink, chalk = loras
    with pytest.raises(ValueError, match="start it with lora_live"):
        Engine(preset("test")).set_lora_scales([])
    with pytest.raises(ValueError, match="name at least one"):
        preset("test", lora_live=True)
    with pytest.raises(ValueError, match="fp8"):
        preset("test", loras=(ink,), lora_live=True, fp8=True)
    with pytest.raises(ValueError, match="disagree on lora_live"):
        Engine(preset("test", loras=(ink,), lora_live=True), load_components("tiny-random", loras=[ink]))
    engine = Engine(preset("test", loras=(ink, f"{chalk}:0.5"), lora_live=True))
    weights = {k: v.clone() for k, v in engine.unet.state_dict().items()}
    for scales, words in (([1.0], "expected 2 LoRA scale"), ([1.0, 11.0], "between -10 and 10"),
                          ([1.0, float("nan")], "between"), ([True, 1.0], "must be a number"),
                          (["0.5", 1.0], "must be a number")):
        with pytest.raises(ValueError, match=words):
            engine.set_lora_scales(scales)
    assert [x["scale"] for x in engine.loras] == [1.0, 0.5]
    assert all(torch.equal(v, engine.unet.state_dict()[k]) for k, v in weights.items())
    errors = []
    thread = threading.Thread(target=lambda: _catch(errors, engine.set_lora_scales, [0.0, 0.0]))
    thread.start()
    thread.join()
    assert errors and "second thread" in errors[0]  # the engine's thread only: graphs may be replaying


def _catch(errors: list, call, *args) -> None:
    try:
        call(*args)
    except RuntimeError as exc:
        errors.append(str(exc))


# ------------------------------------------------------------------------------------------------ controls


def test_osc_lora_addresses_name_a_lora_by_number_or_name_and_are_checked():
    from turbostream.config import LoraSpec
    from turbostream.control import LoraTarget, OscServer

    applied = []
    target = LoraTarget((LoraSpec("/looks/ink.safetensors", 1.0), LoraSpec("/looks/chalk.safetensors", 0.0)),
                        applied.append, live=True)
    osc = OscServer("127.0.0.1", 0)
    try:
        osc.start(lambda fields: None, lora=target)
        results = [osc.handle_message(address, args) for address, args in (
            ("/turbostream/lora", [0.5]),  # two loaded: which?
            ("/turbostream/lora", [2, 0.5]),
            ("/turbostream/lora", ["ink", 0.25]),
            ("/turbostream/lora/2", [0.699999988079071]),  # a 32-bit float fader's 0.7
            ("/turbostream/lora/2", [0.7]),  # the same again: nothing to apply
            ("/turbostream/lora/3", [0.1]),  # no third LoRA
            ("/turbostream/lora/9", [0.1]),  # past MAX_LORAS: not an address
            ("/turbostream/lora", [1, 20.0]),  # out of range
            ("/turbostream/lora", ["oil", 0.5]),  # no such name
            ("/turbostream/lora", ["x"]),  # not a number
            ("/turbostream/lora", [1.5, 0.3]),  # not a LoRA number
            ("/turbostream/lora", [1, 0.3, 3]),
        )]
    finally:
        osc.stop()
    assert results == ["rejected", "applied", "applied", "applied", "applied", "rejected", "unknown_address",
                       "rejected", "rejected", "bad_arguments", "bad_arguments", "bad_arguments"]
    assert applied == [(1.0, 0.5), (0.25, 0.5), (0.25, 0.7)]
    fixed = LoraTarget((LoraSpec("ink.safetensors", 1.0),), applied.append, live=False)
    with pytest.raises(ValueError, match="--lora-live"):
        fixed(None, 0.5)
    with pytest.raises(ValueError, match="no LoRA is loaded"):
        LoraTarget((), applied.append, live=True)(None, 0.5)
    twins = LoraTarget((LoraSpec("a/ink.safetensors"), LoraSpec("b/ink.safetensors")), applied.append, live=True)
    with pytest.raises(ValueError, match="2 LoRAs are named 'ink': say which by number"):
        twins("ink", 0.5)
    assert len(applied) == 3


def test_the_batcher_applies_new_scales_between_calls_and_reruns_a_still_frame(loras):
    """A frame the similarity control marks as a repeat is answered from the stream's last output, which came from
    the old weights: after a change it runs again."""
    from turbostream.batcher import Batcher

    ink, _ = loras
    engine = Engine(preset("test", loras=(f"{ink}:0.2",), lora_live=True))
    fresh = Engine(preset("test", loras=(f"{ink}:0.9",))).run(_frames(1), PARAMS[:1])[0]
    results = []
    got = threading.Event()

    def on_result(result):
        results.append(result)
        got.set()

    batcher = Batcher(engine).start()
    try:
        assert batcher.ready.wait(30)
        stream = batcher.open_stream(on_result, dataclasses.replace(PARAMS[0], similarity=0.95))
        frame = _frames(1)[0]
        for scales, skip in ((None, False), ((0.9,), True), (None, True)):
            if scales is not None:
                batcher.set_lora_scales((0.5,))
                batcher.set_lora_scales(scales)  # the newest replaces one not applied yet
            got.clear()
            stream.submit(frame, skip=skip)
            assert got.wait(30)
    finally:
        batcher.stop()
    first, changed, still = results
    assert not changed.skipped and np.array_equal(changed.frame, fresh)
    assert still.skipped and np.array_equal(still.frame, fresh)  # a repeat after that: the new output
    assert not np.array_equal(first.frame, fresh)
    assert [x["scale"] for x in engine.loras] == [0.9]


def test_osc_changes_a_lora_of_a_running_server_and_every_client_and_viewer_is_told(loras):
    import asyncio
    import json

    from pythonosc.udp_client import SimpleUDPClient
    from test_server import FakeCapture
    from websockets.asyncio.client import connect

    from turbostream.config import ServerConfig
    from turbostream.control import Controls, OscServer
    from turbostream.serve import TurboServer
    from turbostream.serve.integrations import Integrations

    ink, chalk = loras
    engine = Engine(preset("test", loras=(f"{ink}:0", f"{chalk}:0.5"), lora_live=True))

    async def next_of(ws, kind):
        async with asyncio.timeout(20):
            while True:
                msg = await ws.recv()
                if isinstance(msg, str) and (obj := json.loads(msg))["type"] == kind:
                    return obj

    async def main():
        osc = OscServer("127.0.0.1", 0)
        server = TurboServer(engine, ServerConfig(port=0, source="fake:0", control_token="c"),
                             capture_factory=FakeCapture)
        extras = Integrations(server, Controls(osc), size=(64, 64))
        await server.start()
        extras.start(asyncio.get_running_loop())
        try:
            assert await server.wait_ready(30)
            viewer = await connect(f"ws://127.0.0.1:{server.port}/view/ws", max_size=2**23)
            client = await connect(f"ws://127.0.0.1:{server.port}/ws", max_size=2**23)
            for ws in (viewer, client):
                assert (await next_of(ws, "ready"))["loras"] == [{"name": "ink", "scale": 0.0},
                                                                {"name": "chalk", "scale": 0.5}]
            sender = SimpleUDPClient("127.0.0.1", osc.port)
            sender.send_message("/turbostream/lora/1", 0.75)
            expected = [{"name": "ink", "scale": 0.75}, {"name": "chalk", "scale": 0.5}]
            for ws in (viewer, client):
                assert (await next_of(ws, "loras"))["loras"] == expected
            later = await connect(f"ws://127.0.0.1:{server.port}/view/ws", max_size=2**23)
            assert (await next_of(later, "ready"))["loras"] == expected
            deadline = asyncio.get_running_loop().time() + 20  # the broadcast's next call applies it
            while [x["scale"] for x in engine.loras] != [0.75, 0.5]:
                assert asyncio.get_running_loop().time() < deadline, engine.loras
                await asyncio.sleep(0.05)
            text = await asyncio.to_thread(_metrics, server.port)
            assert 'turbostream_lora_scale{lora="ink"} 0.75' in text and 'lora_scale{lora="chalk"} 0.5' in text
            sender.send_message("/turbostream/lora", [3, 0.5])  # no third LoRA: refused, nothing sent
            await asyncio.to_thread(lambda: _wait(lambda: osc.counts["rejected"] == 1))
            assert osc.counts["applied"] == 1

            # A viewer with the control token changes it too (the /view page's sliders); without it, it cannot.
            await viewer.send(json.dumps({"type": "lora", "lora": "chalk", "scale": 0.1}))
            assert (await next_of(viewer, "error"))["code"] == "forbidden"
            operator = await connect(f"ws://127.0.0.1:{server.port}/view/ws?control=c", max_size=2**23)
            assert (await next_of(operator, "ready"))["lora_live"] is True
            for bad, words in (({"lora": 2, "scale": 50}, "between -10 and 10"), ({"scale": 0.1}, "say which"),
                               ({"lora": 1, "scale": "x"}, "must be a number"), ({"lora": [1], "scale": 0.1},
                                                                                "number (from 1) or name"),
                               ({"lora": 1, "scale": 0.1, "fade_s": 2}, "not fade_s")):
                await operator.send(json.dumps({"type": "lora", **bad}))
                error = await next_of(operator, "error")
                assert error["code"] == "bad_config" and words in error["message"], error
            await operator.send(json.dumps({"type": "lora", "lora": "chalk", "scale": 0.1}))
            expected = [{"name": "ink", "scale": 0.75}, {"name": "chalk", "scale": 0.1}]
            for ws in (viewer, client, later, operator):
                assert (await next_of(ws, "loras"))["loras"] == expected
            await client.send(json.dumps({"type": "lora", "scale": 0.3}))  # clients change their own stream only
            assert (await next_of(client, "error"))["code"] == "unknown_type"
            for ws in (viewer, client, later, operator):
                await ws.close()
        finally:
            await server.stop()
            extras.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_servers_playlist_sets_lora_scales_and_settings_for_the_broadcast(loras):
    """A look's LoRA scales reach the engine through the server (every client and viewer told), its settings the
    broadcast."""
    import asyncio
    import json

    from test_server import FakeCapture
    from websockets.asyncio.client import connect

    from turbostream.config import ServerConfig
    from turbostream.control import Controls, Look, Playlist
    from turbostream.serve import TurboServer
    from turbostream.serve.integrations import Integrations

    ink, chalk = loras
    engine = Engine(preset("test", loras=(f"{ink}:0", f"{chalk}:0.5"), lora_live=True))
    looks = [Look("a", 0.2, 1), Look("b", 60.0, 2, (("strength", 0.75),), (("chalk", 0.25), (1, 1.0)))]

    async def main():
        server = TurboServer(engine, ServerConfig(port=0, source="fake:0"), capture_factory=FakeCapture)
        extras = Integrations(server, Controls(None, Playlist(looks)), size=(64, 64))
        await server.start()
        extras.start(asyncio.get_running_loop())
        try:
            assert await server.wait_ready(30)
            viewer = await connect(f"ws://127.0.0.1:{server.port}/view/ws", max_size=2**23)  # the broadcast runs
            expected = [{"name": "ink", "scale": 1.0}, {"name": "chalk", "scale": 0.25}]
            async with asyncio.timeout(20):
                while True:  # for its viewers; told in `ready` (the look came first) or in `loras` (it came after)
                    msg = await viewer.recv()
                    if isinstance(msg, str) and json.loads(msg).get("loras") == expected:
                        break
            deadline = asyncio.get_running_loop().time() + 20  # the look after 0.2 s; the broadcast's next call
            while [x["scale"] for x in engine.loras] != [1.0, 0.25] or server.broadcast.stream.params.strength != 0.75:
                assert asyncio.get_running_loop().time() < deadline, (engine.loras, server.broadcast.stream.params)
                await asyncio.sleep(0.05)
            assert [x["scale"] for x in server.loras] == [1.0, 0.25] and server.broadcast.stream.params.prompt == "b"
            await viewer.close()
        finally:
            await server.stop()
            extras.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _wait(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_lora_live_without_an_osc_port_is_said_at_once(loras, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    ink, _ = loras
    (tmp_path / "in").mkdir()
    Image.fromarray(_frames(1)[0]).save(tmp_path / "in" / "a.png")
    result = subprocess.run([sys.executable, "-m", "turbostream", "run", "--model", "tiny-random", "--lora", ink,
                             "--lora-live", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--lora-live lets OSC change" in result.stderr and "add --osc-port" in \
        result.stderr and "its prompt line takes /lora" in result.stderr
    assert "Traceback" not in result.stderr


def test_osc_changes_a_lora_of_a_running_run(loras, tmp_path):
    from pythonosc.udp_client import SimpleUDPClient
    from test_control import _free_udp_port, _parse_run, _video

    from turbostream.cli import run as cli_run

    ink, _ = loras
    port = _free_udp_port()
    sender = SimpleUDPClient("127.0.0.1", port)

    class Hooked(Engine):
        def run(self, frames, params, **kw):
            self.seen.append(self.loras[0]["scale"])
            if len(self.seen) == 3:
                sender.send_message("/turbostream/lora", 0.8)
            return super().run(frames, params, **kw)

    engine = Hooked(preset("test", loras=(f"{ink}:0",), lora_live=True))
    engine.seen = []
    args = _parse_run("-i", _video(tmp_path / "in.avi"), "-o", str(tmp_path / "out.avi"), "--realtime",
                      "--max-frames", "40", "--osc-port", str(port), "--lora", f"{ink}:0", "--lora-live")
    assert cli_run.main(args, engine=engine) == 0
    assert engine.seen[0] == 0.0 and engine.seen[-1] == 0.8, engine.seen


@pytest.mark.slow
def test_torch_compile_code_follows_a_live_change(loras):
    """torch.compile (--compile) takes the UNet's weights as inputs of its graph, not as constants baked into it: a
    live change reaches the compiled code, and nothing compiles again. (The engine compiles on CUDA only; here the UNet
    is compiled by hand, with inductor for the CPU: which weights are inputs is dynamo's choice, the same for both.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    ink, _ = loras
    engine = Engine(preset("test", loras=(f"{ink}:0.2",), lora_live=True))
    counter = CompileCounterWithBackend("inductor")
    engine.math.unet_call = torch.compile(engine.unet, backend=counter, dynamic=False)
    before = engine.run(_frames(1), PARAMS[:1])
    compiled = counter.frame_count
    engine.set_lora_scales([0.9])
    after = engine.run(_frames(1), PARAMS[:1])
    assert counter.frame_count == compiled > 0  # no recompile
    expected = Engine(preset("test", loras=(f"{ink}:0.9",))).run(_frames(1), PARAMS[:1])
    assert parity_stats(after, expected)["max"] <= 1
    assert parity_stats(before, expected)["max"] > 5


@pytest.mark.slow
def test_compile_aot_artifacts_follow_a_live_change(loras, tmp_path):
    """--compile-aot's artifacts are handed the module's weights where they are (engine/aot.py): a live change
    reaches them."""
    ink, _ = loras
    engine = Engine(preset("test", loras=(f"{ink}:0.2",), lora_live=True, buckets=(1,), compile_cache=str(tmp_path),
                           compile=True, compile_aot=True, aot_format="dynamo"))
    assert engine.warmup().aot_packages_built == 3
    before = engine.run(_frames(1), PARAMS[:1])
    engine.set_lora_scales([0.9])
    after = engine.run(_frames(1), PARAMS[:1])
    expected = Engine(preset("test", loras=(f"{ink}:0.9",))).run(_frames(1), PARAMS[:1])
    assert parity_stats(after, expected)["max"] <= 1
    assert parity_stats(before, expected)["max"] > 5


def test_the_run_prompt_line_changes_a_lora_by_number_or_name():
    from turbostream.config import LoraSpec
    from turbostream.control import LoraTarget, RunTarget
    from turbostream.control.prompt_line import PromptLine

    class Run:
        params = StreamParams()

        def set_params(self, params):
            self.params = params

    applied = []
    target = LoraTarget((LoraSpec("ink.safetensors", 1.0), LoraSpec("chalk.safetensors", 0.0)), applied.append,
                        live=True)
    line = PromptLine(Run(), target=RunTarget(Run()), lora=target)
    assert line.apply("/lora 2 0.5") == "LoRA ink 1, chalk 0.5"
    assert line.apply("/lora ink -0.25") == "LoRA ink -0.25, chalk 0.5"
    for bad, words in (("/lora 0.5", "2 LoRAs are loaded"), ("/lora", "needs a scale"), ("/lora 1 x", "a number"),
                       ("/lora 3 0.5", "no LoRA number 3"), ("/lora 1 12", "between -10 and 10"),
                       ("/lora 1 2 3", "needs a scale")):
        with pytest.raises(ValueError, match=words):
            line.apply(bad)
    assert applied == [(1.0, 0.5), (-0.25, 0.5)]
    with pytest.raises(ValueError, match="--lora-live"):
        PromptLine(Run(), target=RunTarget(Run())).apply("/lora 0.5")


@pytest.mark.gpu
def test_a_live_change_reaches_the_cuda_graphs(loras):
    """On CUDA, fp16: the captured graphs read fused QKV projections (copies of to_q, to_k, to_v) and the stacked time
    projection; after a live change their replay gives a fresh engine's frames at the new scale."""
    ink, chalk = loras
    options = dict(device="cuda", dtype="float16", buckets=(1, 2), fused_time_proj=True, prompt_kv=True)
    live = Engine(preset("test", loras=(f"{ink}:0.2", f"{chalk}:0"), lora_live=True, **options))
    live.warmup()
    before = live.run(_frames(), PARAMS)
    live.set_lora_scales([0.9, 0.7])
    replays = live.stats.graph_replays
    after = live.run(_frames(), PARAMS)
    assert live.stats.graph_replays > replays
    fresh = Engine(preset("test", loras=(f"{ink}:0.9", f"{chalk}:0.7"), lora_live=True, **options))
    fresh.warmup()
    expected = fresh.run(_frames(), PARAMS)
    # The same weights, the same kernels (cuDNN's autotuning may pick another convolution for a second engine).
    assert parity_stats(after, expected)["max"] <= 1
    assert np.abs(np.stack(after).astype(int) - np.stack(before)).mean() > 5
