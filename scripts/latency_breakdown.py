#!/usr/bin/env python3
"""Where one client's frame spends its time in `turbostream serve`: every stage from the message to the reply.

A real server runs in this process and scripts/loadtest.py drives it with one client (one frame in flight), so
frames pass one at a time. The server's methods are wrapped with time stamps (this script only; the server has no
such hooks), and each frame's time is cut into the stages below. Their medians add up to the frame's time in the
server; the last line is the client's side (the reply read, the next frame sent, loopback both ways).

    receive -> decode start      the event loop hands the JPEG to a codec worker
    decode (+ fit)               JPEG -> frame of the engine's size (the --jpeg codec)
    decode end -> in slot        back to the event loop, into the stream's batcher slot
    in slot -> engine submit     the inference thread wakes and gathers the batch
    engine submit                staging, caches, launches (the engine's host work)
    submit end -> collected      the device's work, the wait for it, copying the frames out
    collected -> encode start    the batcher's bookkeeping, the frame's way to a codec worker
    encode                       frame -> JPEG (the --jpeg codec)
    encode end -> sent           back to the event loop, the WebSocket send
    sent -> next receive         the client: reads the reply, sends its next frame

The engine's submit is cut further (`submit_parts`): the time spent in each of its inner steps (validate and fit,
the stream inputs, the schedule, the graph launches, the latents kept, the staging of the frames, and what the submit
spends outside all of them: the switch to the engine's stream, the timing events), at the median and averaged
over the slowest tenth of submits, so a tail in the submit shows where it lives: in one step (that step's work), or
spread over all of them (the thread waiting to run: the GIL, the scheduler).

--switch-interval-ms sets Python's thread switch interval (sys.setswitchinterval; 5 ms by default) for the run: a
thread that wants the GIL while another runs Python waits up to that long, so a submit tail spread over every step
that shrinks with the interval is that wait.

It also reports the garbage collector's pauses in the measured window (each holds the GIL, so every thread waits):
the server freezes the warm heap (heap.py) unless --no-freeze-heap.

    python scripts/latency_breakdown.py --model random --device cuda --size 512 [--jpeg gpu|hybrid] --json out.json
    python scripts/latency_breakdown.py --sim 2,5 --size 512       # a simulated device (serve_sim.py), any machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from turbostream.cli.options import add_engine_options, build_engine  # noqa: E402
from turbostream.config import Limits, ServerConfig  # noqa: E402

# (mark, stage ending at it): the marks in the order one frame passes them.
MARKS = [("receive", None), ("decode_start", "receive -> decode start"), ("decode_end", "decode (+ fit)"),
         ("in_slot", "decode end -> in slot"), ("submit_start", "in slot -> engine submit"),
         ("submit_end", "engine submit"), ("collected", "submit end -> collected"),
         ("encode_start", "collected -> encode start"),
         ("encode_end", "encode"), ("sent", "encode end -> sent")]


class Marks:
    """Time stamps by mark name, in the order they happened (one client, one frame in flight: one per frame).

    Whole frames only: start() takes effect at the next receive, stop() after the next send.
    """

    def __init__(self) -> None:
        self.at: dict[str, list[float]] = defaultdict(list)
        self.state = "off"  # armed -> on (at a receive) -> stopping -> off (after a send)

    def start(self) -> None:
        self.state = "armed"

    def stop(self) -> None:
        self.state = "stopping" if self.state == "on" else "off"

    def mark(self, name: str) -> None:
        if self.state == "armed" and name == "receive":
            self.state = "on"
        if self.state in ("on", "stopping"):
            self.at[name].append(time.perf_counter())
            if self.state == "stopping" and name == "sent":
                self.state = "off"

    def wrap(self, owner, name: str, before: str | None = None, after: str | None = None) -> None:
        """Replace owner.name (a class's or an object's) with a version that marks before and/or after it."""
        original = getattr(owner, name)

        def marked(*args, **kwargs):
            if before:
                self.mark(before)
            result = original(*args, **kwargs)
            if after:
                self.mark(after)
            return result

        setattr(owner, name, marked)


# The engine's inner steps timed within each submit (Engine methods, and the module function fit_frame), in order.
# _enqueue encloses the steps after fit: what it spends outside them is the staging (frames into pinned memory, the
# copies to the device, the events).
SUBMIT_PARTS = (("validate", "validate"), ("fit_frame", "fit"), ("_enqueue", "enqueue"),
                ("_load_stream_inputs", "stream inputs"), ("_stage_schedule", "schedule"),
                ("_reuse_mode", "reuse mode"), ("_replay", "graph launches"), ("_keep_latents", "latents kept"))
INSIDE_ENQUEUE = ("stream inputs", "schedule", "reuse mode", "graph launches", "latents kept")


class SubmitParts:
    """Seconds each of the engine's inner steps took within each submit, recorded while the marks are on."""

    def __init__(self, marks: Marks) -> None:
        self.marks = marks
        self.current: dict[str, float] = defaultdict(float)
        self.calls: list[dict[str, float]] = []

    def time(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[label] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def wrap_submit(self, owner) -> None:
        original = owner.submit

        def submit(*args, **kwargs):
            self.current.clear()
            t0 = time.perf_counter()
            result = original(*args, **kwargs)
            total = time.perf_counter() - t0
            if self.marks.state in ("on", "stopping"):
                parts = dict(self.current)
                enqueue = parts.pop("enqueue", 0.0)
                parts["staging"] = enqueue - sum(parts.get(k, 0.0) for k in INSIDE_ENQUEUE)
                parts["outside enqueue"] = total - enqueue - parts.get("validate", 0.0) - parts.get("fit", 0.0)
                parts["total"] = total
                self.calls.append(parts)
            return result

        owner.submit = submit

    def summary(self) -> dict:
        """Per part: median ms over the submits, and mean ms over the slowest tenth of them (by total)."""
        if not self.calls:
            return {}
        labels = [label for _, label in SUBMIT_PARTS if any(label in c for c in self.calls)]
        labels += ["staging", "outside enqueue", "total"]
        slow = sorted(self.calls, key=lambda c: c["total"])[int(0.9 * len(self.calls)):]
        return {label: {"p50_ms": round(statistics.median(c.get(label, 0.0) for c in self.calls) * 1e3, 3),
                        "slowest_tenth_mean_ms": round(statistics.mean(c.get(label, 0.0) for c in slow) * 1e3, 3)}
                for label in labels} | {"submits": len(self.calls), "slowest_tenth": len(slow)}


def instrument_submit(parts: SubmitParts, engine) -> None:
    """Time the inner steps of the real Engine inside engine (a simulated device wraps one) and its submits."""
    from turbostream.engine import Engine
    from turbostream.engine import engine as engine_module

    inner = engine
    while not isinstance(inner, Engine):
        inner = inner._engine
    for name, label in SUBMIT_PARTS:
        parts.time(engine_module if name == "fit_frame" else inner, name, label)
    if getattr(engine, "pipelined", False):
        parts.wrap_submit(engine)


def instrument(marks: Marks, engine) -> None:
    from turbostream import batcher
    from turbostream.serve import sessions

    for fn, (start, end) in (("timed_decode", ("decode_start", "decode_end")),
                             ("timed_encode", ("encode_start", "encode_end"))):
        marks.wrap(sessions, fn, start, end)
    sessions_cls = sessions.ClientSession
    for method, before in (("on_binary", "receive"), ("_sent", "sent")):
        original = getattr(sessions_cls, method)

        def marked(self, *args, _original=original, _mark=before, **kwargs):
            marks.mark(_mark)
            return _original(self, *args, **kwargs)

        setattr(sessions_cls, method, marked)
    original_submit = batcher.Stream.submit

    def submit(self, *args, **kwargs):
        result = original_submit(self, *args, **kwargs)
        marks.mark("in_slot")
        return result

    batcher.Stream.submit = submit
    pipelined = getattr(engine, "pipelined", False)
    if pipelined:
        marks.wrap(engine, "submit", "submit_start", "submit_end")
        marks.wrap(engine, "collect", None, "collected")
    else:  # run() is submit and collect in one
        marks.wrap(engine, "run", "submit_start", "collected")


def breakdown(marks: Marks) -> dict:
    """Per stage: median and p90 ms over the frames every mark saw, in order; frames at the edges are left out."""
    names = [m for m, _ in MARKS if marks.at.get(m)]
    counts = {m: len(marks.at[m]) for m in names}
    n = min(counts.values())
    if len(set(counts.values())) > 1:
        print(f"latency_breakdown: marks seen unequally often {counts}; pairing the first {n} of each",
              file=sys.stderr)
    rows = range(2, n - 2)  # the first and last frames straddle the start and the end
    stages = {}
    order = [m for m, _ in MARKS]
    previous = names[0]
    for name, stage in MARKS[1:]:
        if name not in names:
            continue
        ms = sorted((marks.at[name][i] - marks.at[previous][i]) * 1e3 for i in rows)
        # A stage whose start mark was not seen (an engine without submit) is named by the marks it spans.
        label = stage if order.index(previous) == order.index(name) - 1 else f"{previous} -> {name}"
        stages[label] = {"p50_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(0.9 * len(ms))], 3)}
        previous = name
    total = sorted((marks.at[names[-1]][i] - marks.at[names[0]][i]) * 1e3 for i in rows)
    client = sorted((marks.at["receive"][i + 1] - marks.at["sent"][i]) * 1e3 for i in rows)
    return {"frames": len(rows), "stages": stages,
            "server_p50_ms": round(statistics.median(total), 3),
            "stages_p50_sum_ms": round(sum(s["p50_ms"] for s in stages.values()), 3),
            "sent -> next receive (client)": {"p50_ms": round(statistics.median(client), 3)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_options(ap)
    ap.add_argument("--sim", metavar="FIXED,PER_FRAME", help="a simulated device (scripts/serve_sim.py) taking FIXED "
                    "+ PER_FRAME ms a call, with the real engine's host work, instead of running the model")
    ap.add_argument("--jpeg", choices=("cpu", "gpu", "hybrid"), default="cpu",
                    help="the server's JPEG codec (serve --jpeg)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default: %(default)s)")
    ap.add_argument("--no-freeze-heap", action="store_true",
                    help="leave the warm process's objects to the garbage collector (ServerConfig.freeze_heap off), "
                         "to see what its full collections cost")
    ap.add_argument("--switch-interval-ms", type=float, default=None, metavar="MS",
                    help="Python's thread switch interval for this run (default: Python's, 5 ms)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.switch_interval_ms is not None:
        if not 0 < args.switch_interval_ms <= 1000:
            ap.error("--switch-interval-ms takes a value above 0 and at most 1000")
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    from turbostream.heap import PauseLog
    from turbostream.serve.server import ServerThread, TurboServer

    if args.sim:
        import serve_sim

        from turbostream.models import load_components

        fixed_ms, per_frame_ms = (float(x) for x in args.sim.split(","))
        args.model, args.device, args.no_cuda_graphs = "tiny-random", "cpu", True
        from turbostream.cli.options import engine_config
        from turbostream.engine import Engine

        engine = Engine(engine_config(args), load_components("tiny-random", device="cpu", vae="tiny"))
        engine = serve_sim.SimulatedDevice(engine, fixed_ms, per_frame_ms, None)
    else:
        engine = build_engine(args)  # warmed up by the server's inference thread, where its graphs must replay
    jpeg = None
    if args.jpeg != "cpu":
        from turbostream.codec_cuda import CudaJpeg, HybridJpeg

        jpeg = CudaJpeg(str(engine.device))
        jpeg = HybridJpeg(jpeg) if args.jpeg == "hybrid" else jpeg
    marks = Marks()
    parts = SubmitParts(marks)
    instrument_submit(parts, engine)  # first: the marks' wrapper of submit then encloses this one
    instrument(marks, engine)
    config = ServerConfig(port=0, limits=Limits(max_clients=1), freeze_heap=not args.no_freeze_heap)
    server = TurboServer(engine, config, jpeg=jpeg)
    with ServerThread(server, ready_timeout=1800), tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        url = f"ws://127.0.0.1:{server.port}/ws"
        client = subprocess.Popen(
            [sys.executable, str(HERE / "loadtest.py"), "--url", url, "--clients", "1", "--inflight", "1",
             "--duration", str(args.duration + 1.0), "--warmup", str(args.warmup), "--json", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(args.warmup + 1.0)  # the client connects and warms up: not measured
        with PauseLog() as pauses:  # the garbage collector's pauses, any thread's (each holds the GIL)
            marks.start()
            time.sleep(args.duration)
            marks.stop()
        log, _ = client.communicate(timeout=args.duration + args.warmup + 120)
        if client.returncode not in (0, 1) or not out.exists():
            print(log[-3000:], file=sys.stderr)
            raise SystemExit(f"latency_breakdown: the load test failed (exit {client.returncode})")
        load = json.loads(out.read_text())["steps"][0]["total"]
    result = breakdown(marks)
    result["submit_parts"] = parts.summary()
    result.update({
        "command": "python scripts/latency_breakdown.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "engine": "simulated " + args.sim if args.sim else f"{engine.model_name} on {engine.device}",
        "size": f"{engine.width}x{engine.height}", "jpeg": args.jpeg,
        "switch_interval_ms": round(sys.getswitchinterval() * 1e3, 3),
        "client_p50_ms": load["latency_ms"]["p50"], "client_fps": load["fps"],
        "client_max_ms": load["latency_ms"]["max"], "heap_frozen": not args.no_freeze_heap, "gc": pauses.summary(),
    })
    if hasattr(jpeg, "decodes"):  # --jpeg hybrid: where the decodes ran (warm-up and edge frames included)
        result["decodes"] = dict(jpeg.decodes)
    width = max(len(k) for k in result["stages"])
    for stage, t in result["stages"].items():
        print(f"{stage:<{width}}  p50 {t['p50_ms']:7.3f} ms   p90 {t['p90_ms']:7.3f} ms")
    print(f"{'server: receive -> sent':<{width}}  p50 {result['server_p50_ms']:7.3f} ms "
          f"(stages' p50s add up to {result['stages_p50_sum_ms']:.3f})")
    print(f"{'sent -> next receive (client)':<{width}}  p50 "
          f"{result['sent -> next receive (client)']['p50_ms']:7.3f} ms")
    print(f"client: p50 {result['client_p50_ms']} ms, max {result['client_max_ms']} ms, {result['client_fps']} "
          f"frames/s ({result['frames']} frames)")
    if result["submit_parts"]:
        sub = result["submit_parts"]
        print(f"engine submit, by part ({sub['submits']} submits): p50 ms / mean ms of the slowest "
              f"{sub['slowest_tenth']}")
        for label, t in sub.items():
            if isinstance(t, dict):
                print(f"  {label:<16}  {t['p50_ms']:7.3f}  {t['slowest_tenth_mean_ms']:7.3f}")
    gc_ = result["gc"]
    print(f"garbage collections (generation 0/1/2): {'/'.join(map(str, gc_['collections']))}, longest pause "
          f"{gc_['max_pause_ms']} ms, {gc_['total_pause_ms']} ms in all (heap frozen: {result['heap_frozen']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
