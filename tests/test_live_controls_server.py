"""The live-video controls over real sockets: a real server on port 0, websockets clients, tiny-random on the CPU."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from test_server import http_get, next_of_type, next_result, open_client, run, serving

from turbostream.codec import encode_jpeg
from turbostream.config import MAX_CONSECUTIVE_SKIPS


def scene(rng=None, noise: float = 0.0, kind: int = 0) -> bytes:
    """A smooth 64x64 picture as a JPEG (kind 1: a different one), with Gaussian 'sensor' noise."""
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    img = np.stack([x * 3 % 256, y * 4, 128 + 60 * np.sin(x / 6)], -1)
    img[20:40, 10:30] = (200, 40, 90)
    if kind:
        img = 255 - img[::-1]
    if noise:
        img = img + rng.normal(0, noise, img.shape)
    return encode_jpeg(img.clip(0, 255).astype(np.uint8), 95)


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def flicker(outs) -> float:
    return float(np.mean([diff(a, b) for a, b in zip(outs, outs[1:])]))


async def configure(ws, **fields) -> dict:
    await ws.send(json.dumps({"type": "config", **fields}))
    return await next_of_type(ws, "config")


async def play(ws, frames) -> list[tuple[dict, np.ndarray]]:
    """Send frames one at a time, each after the answer to the one before: [(header, rgb), ...]."""
    got = []
    for data in frames:
        await ws.send(data)
        header, rgb, others = await next_result(ws)
        assert not [m for m in others if m["type"] == "error"], others
        got.append((header, rgb))
    return got


def metric(server, name: str) -> float:
    _, _, body = http_get(server, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_repeated_frames_are_skipped_marked_and_counted(engine):
    async def main():
        async with serving(engine) as server:
            ws, ready = await open_client(server)
            assert ready["params"]["similarity"] == 0 and ready["params"]["feedback"] == 0
            # Off by default: the same frame twice runs twice.
            got = await play(ws, [scene()] * 2)
            assert [h["skipped"] for h, _ in got] == [False, False]
            echo = await configure(ws, similarity=0.9)
            assert echo["similarity"] == 0.9
            n = MAX_CONSECUTIVE_SKIPS + 3
            got = await play(ws, [scene()] * n)
            marks = [h["skipped"] for h, _ in got]
            # The first frame after the change runs; then identical frames skip, at most MAX in a row.
            assert marks == [False] + [True] * MAX_CONSECUTIVE_SKIPS + [False, True], marks
            assert all(h["batch"] == 0 for h, _ in got if h["skipped"])
            assert all(np.array_equal(rgb, got[0][1]) for _, rgb in got)  # answered with the last output
            assert [h["seq"] for h, _ in got] == list(range(3, 3 + n))
            skipped = MAX_CONSECUTIVE_SKIPS + 1
            assert await asyncio.to_thread(metric, server, "turbostream_frames_skipped_total") == skipped
            assert server.batcher.frames == 2 + n - skipped  # the engine ran only for the others
            # A change of parameters runs the next frame even if it is the same picture.
            await configure(ws, seed=5)
            (header, _), = await play(ws, [scene()])
            assert not header["skipped"]

    run(main())


def test_changing_frames_are_never_skipped_past_the_maximum(engine):
    async def main():
        async with serving(engine) as server:
            ws, _ = await open_client(server)
            rng = np.random.default_rng(0)
            await configure(ws, similarity=0.5)  # low: slightly noisy frames of one scene are skipped most times
            marks = [h["skipped"] for h, _ in await play(ws, [scene(rng, 4) for _ in range(30)])]
            assert sum(marks) >= 15
            runs = "".join("s" if m else "r" for m in marks).split("r")
            assert max(len(r) for r in runs) <= MAX_CONSECUTIVE_SKIPS, marks
            # A different picture is never skipped at a high threshold.
            await configure(ws, similarity=0.98)
            got = await play(ws, [scene(kind=(k + 1) % 2) for k in range(6)])
            assert not any(h["skipped"] for h, _ in got)

    run(main())


def test_transition_moves_gradually_and_ends_at_the_new_prompt(engine):
    async def main():
        async with serving(engine) as server:
            ws, _ = await open_client(server)
            frame = scene()
            await configure(ws, prompt="a red fox", seed=1)
            (_, before), = await play(ws, [frame])
            await configure(ws, prompt="a neon city", seed=7)
            (_, target), = await play(ws, [frame])
            jump = diff(before, target)
            assert jump > 5
            await configure(ws, prompt="a red fox", seed=1)
            await play(ws, [frame])
            await configure(ws, prompt="a neon city", seed=7, transition_s=1.5)
            outs, t0 = [before], time.monotonic()
            while time.monotonic() - t0 < 2.0:
                outs += [rgb for _, rgb in await play(ws, [frame])]
            steps = [diff(a, b) for a, b in zip(outs, outs[1:])]
            assert len(outs) >= 6
            assert max(steps) < jump and sorted(steps)[len(steps) // 2] < 0.5 * jump, (steps, jump)
            assert len({o.tobytes() for o in outs}) >= 4  # really in between, not two pictures
            assert np.array_equal(outs[-1], target)  # ends exactly at the new prompt and seed

    run(main())


def test_feedback_lowers_still_scene_flicker(engine):
    async def main():
        async with serving(engine, jpeg_quality=100) as server:
            rng = np.random.default_rng(1)
            clip = [scene(rng, 6) for _ in range(20)]
            ws, _ = await open_client(server)
            plain = [rgb for _, rgb in await play(ws, clip)]
            await configure(ws, feedback=0.5)
            fed = [rgb for _, rgb in await play(ws, clip)]
            # Settled (random weights drift to the loop's fixed point for a few frames first): less flicker.
            assert flicker(fed[12:]) < 0.6 * flicker(plain[12:]), (flicker(fed[12:]), flicker(plain[12:]))

    run(main())


def test_two_streams_with_different_settings_in_one_batch(engine):
    async def main():
        async with serving(engine, jpeg_quality=100) as server:
            (a, _), (b, _) = await open_client(server), await open_client(server)
            await configure(a, feedback=0.6, prompt=[["a watercolor", 0.7], ["a pencil sketch", 0.3]])
            await configure(b, prompt="a watercolor")
            rng = np.random.default_rng(2)
            clip = [scene(rng, 6) for _ in range(16)]
            got_a, got_b = [], []
            for data in clip:  # in lockstep, so both frames wait for the same engine call
                await asyncio.gather(a.send(data), b.send(data))
                (ha, ra, _), (hb, rb, _) = await asyncio.gather(next_result(a), next_result(b))
                got_a.append((ha, ra))
                got_b.append((hb, rb))
            assert any(h["batch"] == 2 for h, _ in got_a + got_b)
            # b gets exactly what a default stream with its prompt gets alone; a its own blend and feedback.
            c, _ = await open_client(server)
            await configure(c, prompt="a watercolor")
            alone = [rgb for _, rgb in await play(c, clip)]
            assert max(diff(x, y) for (_, x), y in zip(got_b, alone)) < 0.5
            ab = [diff(x, y) for (_, x), (_, y) in zip(got_a, got_b)]
            assert ab[0] > 0.5 and min(ab[5:]) > 3, ab  # the blend from the first frame, feedback's drift after
            assert flicker([r for _, r in got_a][10:]) < flicker([r for _, r in got_b][10:])

    run(main())


@pytest.mark.parametrize("fields", [
    {"similarity": 1.0}, {"similarity": -0.5}, {"similarity": "0.9"}, {"similarity": None},
    {"transition_s": -1}, {"transition_s": 1e9}, {"feedback": 0.99}, {"feedback": True},
    {"prompt": []}, {"prompt": [["a", 1], ["b", 1], ["c", 1], ["d", 1], ["e", 1]]}, {"prompt": [["a", -1]]},
    {"prompt": [["a", 0]]}, {"prompt": [["a"]]}, {"prompt": [[1, 1]]}, {"prompt": [["x" * 1001, 1]]},
    {"prompt": {"a": 1}}, {"feedback": 0.5, "similarity": 2},
])
def test_bad_control_values_get_bad_config_and_change_nothing(engine, fields):
    async def main():
        async with serving(engine) as server:
            ws, _ = await open_client(server)
            before = await configure(ws, similarity=0.9, transition_s=2, feedback=0.3,
                                     prompt=[["a cat", 1], ["a dog", 2]])
            await ws.send(json.dumps({"type": "config", **fields}))
            error = await next_of_type(ws, "error")
            assert error["code"] == "bad_config", error
            assert await configure(ws) == before

    run(main())


def test_bad_nan_control_value(engine):
    async def main():
        async with serving(engine) as server:
            ws, _ = await open_client(server)
            await ws.send('{"type": "config", "feedback": NaN}')
            assert (await next_of_type(ws, "error"))["code"] == "bad_config"
            assert (await configure(ws))["feedback"] == 0

    run(main())
