"""scripts/loadtest.py's numbers: percentiles, the server's /metrics (scraped and turned into a step's figures),
the soak verdict, and the tables printed or written for the README. Standard library and numpy only."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np

# Soak criteria that have no option: descriptors the server may hold beyond its count before the step (a scrape's
# own socket racing the count), and threads beyond its count after the warmup (a pool thread started late).
FD_MARGIN = 2
THREAD_MARGIN = 2

# ------------------------------------------------------------------------------------------------ statistics


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Milliseconds: p50, p95, p99, mean, max of latencies given in seconds (None when there are none)."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    arr = np.asarray(values) * 1e3
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
            "mean": round(float(arr.mean()), 2), "max": round(float(arr.max()), 2)}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


def scrape(http_base: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(http_base + "/metrics", timeout=10) as resp:
            return parse_metrics(resp.read().decode())
    except (OSError, urllib.error.URLError):
        return {}


# What a sample and the start / warm / end snapshots keep of a scrape: report key -> metric name.
RESOURCES = {
    "rss_bytes": "process_resident_memory_bytes",
    "open_fds": "process_open_fds",
    "threads": "turbostream_process_threads",
    "gpu_reserved_bytes": "turbostream_gpu_memory_reserved_bytes",
    "gpu_allocated_bytes": "turbostream_gpu_memory_allocated_bytes",
    "send_buffer_bytes": "turbostream_send_buffer_bytes",
    "clients": "turbostream_clients",
    "viewers": "turbostream_viewers",
}


def resources(scraped: dict[str, float]) -> dict[str, float | None]:
    return {key: scraped.get(name) for key, name in RESOURCES.items()}


def _total(scraped: dict[str, float], name: str, where: str = "") -> float | None:
    """The sum of a metric over its label sets (e.g. every device), optionally only those whose labels hold `where`;
    None when the server exported no such line."""
    values = [v for k, v in scraped.items() if k.partition("{")[0] == name and where in k.partition("{")[2]]
    return sum(values) if values else None


def device_numbers(start: dict[str, float], end: dict[str, float], seconds: float) -> dict:
    """The device's timeline over a measured window (scrapes at its start and end, `seconds` apart): utilization
    (busy seconds over wall seconds, the mean over devices), its time per call and its idle time before each call
    (CUDA events; see turbostream_device_busy_seconds), and the share of calls queued before it ran out of work.
    Every figure is None when the server did not export them (an older server). A call's busy time is counted when
    it ends, so a short window's utilization may pass 100 % by about one call's share of it."""
    busy = [_total(x, "turbostream_device_busy_seconds_total") for x in (start, end)]
    calls = [_total(x, "turbostream_device_engine_seconds_count") for x in (start, end)]
    gaps = [_total(x, "turbostream_device_gap_seconds_count") for x in (start, end)]
    gap_s = [_total(x, "turbostream_device_gap_seconds_sum") for x in (start, end)]
    in_time = [_total(x, "turbostream_device_gap_seconds_bucket", 'le="0.00025"') for x in (start, end)]
    devices = len({k for k in end if k.startswith("turbostream_device_busy_seconds_total{")})
    out = {"busy_pct": None, "call_ms_mean": None, "gap_ms_mean": None, "queued_in_time_share": None}
    if None in busy or seconds <= 0 or not devices:
        return out
    d_busy = busy[1] - busy[0]
    out["busy_pct"] = round(100 * d_busy / seconds / devices, 1)
    if None not in calls and calls[1] > calls[0]:
        out["call_ms_mean"] = round(d_busy / (calls[1] - calls[0]) * 1e3, 3)
    if None not in gaps and None not in gap_s and gaps[1] > gaps[0]:
        n = gaps[1] - gaps[0]
        out["gap_ms_mean"] = round((gap_s[1] - gap_s[0]) / n * 1e3, 3)
        if None not in in_time:
            out["queued_in_time_share"] = round((in_time[1] - in_time[0]) / n, 3)
    return out


def server_numbers(before: dict[str, float], after: dict[str, float], warm: dict[str, float] | None = None,
                   window_end: dict[str, float] | None = None) -> dict:
    """Memory, descriptors and threads at start, after the warmup and at the end of a step; the step's drops; engine
    calls, their time, batch sizes and codec times over the measured window (scrapes `warm` and `window_end`, the
    device figures' window: `timing_over` "window"), or over the whole step when either scrape is missing ("step")."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    timed = warm is not None and window_end is not None
    span_start, span_end = (warm, window_end) if timed else (before, after)

    def timed_delta(name: str) -> float:
        return span_end.get(name, 0.0) - span_start.get(name, 0.0)

    calls = timed_delta('turbostream_stage_seconds_count{stage="gpu"}')
    warm = warm or {}
    out = {
        "rss_bytes_start": before.get("process_resident_memory_bytes"),
        "rss_bytes_warm": warm.get("process_resident_memory_bytes"),
        "rss_bytes_end": after.get("process_resident_memory_bytes"),
        "gpu_reserved_bytes_start": before.get("turbostream_gpu_memory_reserved_bytes"),
        "gpu_reserved_bytes_warm": warm.get("turbostream_gpu_memory_reserved_bytes"),
        "gpu_reserved_bytes_end": after.get("turbostream_gpu_memory_reserved_bytes"),
        "gpu_allocated_bytes_start": before.get("turbostream_gpu_memory_allocated_bytes"),
        "gpu_allocated_bytes_end": after.get("turbostream_gpu_memory_allocated_bytes"),
        "open_fds_start": before.get("process_open_fds"),
        "open_fds_warm": warm.get("process_open_fds"),
        "open_fds_end": after.get("process_open_fds"),
        "threads_start": before.get("turbostream_process_threads"),
        "threads_warm": warm.get("turbostream_process_threads"),
        "threads_end": after.get("turbostream_process_threads"),
        "timing_over": "window" if timed else "step",
        "engine_calls": int(calls),
        "engine_call_ms_mean": round(timed_delta('turbostream_stage_seconds_sum{stage="gpu"}') / calls * 1e3, 3)
        if calls else None,
        "batch_size_mean": round(timed_delta("turbostream_batch_size_sum") / calls, 3) if calls else None,
        "frames_dropped": 0,
        "frames_dropped_by_stage": {},
    }
    prefix = 'turbostream_frames_dropped_total{stage="'
    for name in sorted(set(before) | set(after)):
        if name.startswith(prefix):
            n = int(delta(name))
            out["frames_dropped"] += n
            if n:
                out["frames_dropped_by_stage"][name[len(prefix) : -2]] = n
    for stage in ("decode", "encode", "end_to_end"):
        n = timed_delta(f'turbostream_stage_seconds_count{{stage="{stage}"}}')
        out[f"{stage}_ms_mean"] = (
            round(timed_delta(f'turbostream_stage_seconds_sum{{stage="{stage}"}}') / n * 1e3, 3) if n else None
        )
    return out


def count_by(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------------------ verdict


def _check(name: str, value, limit, ok: bool | None, unit: str = "") -> dict:
    """One soak criterion; ok None (no data: the server did not export the metric) counts as a failure."""
    return {"check": name, "value": value, "limit": limit, "unit": unit, "pass": bool(ok)}


def verdict(steps: list[dict], args, exit_status: int | None, spawned: bool) -> dict:
    """Pass/fail of the run against the soak criteria, check by check and step by step."""
    checks = []
    mib = 2**20
    for s in steps:
        n, srv, total = s["clients"], s["server"], s["total"]
        viewers = s.get("viewer_total") or {}  # reports from before viewers existed have none
        prefix = f"{n} clients, {viewers['count']} viewers: " if viewers.get("count") else f"{n} clients: "
        checks.append(_check(prefix + "errors", total["errors"], 0, total["errors"] == 0))
        silent = sum(1 for c in s["per_client"] if c["replies"] == 0)
        checks.append(_check(prefix + "clients never answered", silent, 0, silent == 0))
        if viewers.get("count"):
            checks.append(_check(prefix + "viewer errors", viewers["errors"], 0, viewers["errors"] == 0))
            checks.append(_check(prefix + "viewers that got no frame in the window", viewers["silent"], 0,
                                 viewers["silent"] == 0))
        warm, end = srv.get("rss_bytes_warm"), srv.get("rss_bytes_end")
        growth = None if warm is None or end is None else round((end - warm) / mib, 1)
        checks.append(_check(prefix + "RSS growth after the warmup", growth, args.max_rss_growth_mib,
                             growth is not None and growth < args.max_rss_growth_mib, "MiB"))
        warm, end = srv.get("gpu_reserved_bytes_warm"), srv.get("gpu_reserved_bytes_end")
        if warm is not None or end is not None:
            growth = None if warm is None or end is None else round((end - warm) / mib, 1)
            checks.append(_check(prefix + "CUDA memory (reserved) growth after the warmup", growth,
                                 args.max_gpu_growth_mib, growth is not None and growth < args.max_gpu_growth_mib,
                                 "MiB"))
        start, end = srv.get("open_fds_start"), srv.get("open_fds_end")
        growth = None if start is None or end is None else int(end - start)
        checks.append(_check(prefix + "open file descriptors after the clients left, over the count before",
                             growth, FD_MARGIN, growth is not None and growth <= FD_MARGIN))
        warm, end = srv.get("threads_warm"), srv.get("threads_end")
        growth = None if warm is None or end is None else int(end - warm)
        checks.append(_check(prefix + "threads at the end over the count after the warmup", growth, THREAD_MARGIN,
                             growth is not None and growth <= THREAD_MARGIN))
    if spawned:
        checks.append(_check("server exit status after SIGTERM", exit_status, 0, exit_status == 0))
    return {"pass": all(c["pass"] for c in checks), "checks": checks}


def table(steps: list[dict]) -> str:
    head = (f"{'clients':>7} {'viewers':>7} {'fps/client':>11} {'total fps':>9} {'p50 ms':>8} {'p95 ms':>8} "
            f"{'p99 ms':>8} {'dropped':>7} {'errors':>6} {'call ms':>8} {'batch':>6} {'busy %':>6} {'gap ms':>6} "
            f"{'RSS MiB':>13}")
    lines = [head, "-" * len(head)]
    for s in steps:
        t, srv, lat = s["total"], s["server"], s["total"]["latency_ms"]
        dev = s.get("device") or {}
        rss = "-"
        if srv["rss_bytes_start"] and srv["rss_bytes_end"]:
            rss = f"{srv['rss_bytes_start'] / 2**20:.0f}->{srv['rss_bytes_end'] / 2**20:.0f}"
        lines.append(
            f"{s['clients']:>7} {s.get('viewers', 0):>7} {_fmt(t['fps_per_client_min']):>5}-"
            f"{_fmt(t['fps_per_client_mean']):<5} {_fmt(t['fps']):>9} "
            f"{_fmt(lat['p50']):>8} {_fmt(lat['p95']):>8} {_fmt(lat['p99']):>8} {t['dropped']:>7} {t['errors']:>6} "
            f"{_fmt(srv['engine_call_ms_mean'], '.2f'):>8} {_fmt(srv['batch_size_mean'], '.2f'):>6} "
            f"{_fmt(dev.get('busy_pct')):>6} {_fmt(dev.get('gap_ms_mean'), '.2f'):>6} {rss:>13}"
        )
    return "\n".join(lines)


def viewer_line(step: dict) -> str:
    """One line on a step's viewers: frames/s (slowest / mean / fastest), gaps between frames, bytes, errors."""
    v, gap = step["viewer_total"], step["viewer_total"]["gap_ms"]
    return (f"{v['count']} viewers: frames/s {_fmt(v['fps_min'])} / {_fmt(v['fps_mean'])} / {_fmt(v['fps_max'])} "
            f"(slowest / mean / fastest), gap between frames p50 {_fmt(gap['p50'])} p99 {_fmt(gap['p99'])} "
            f"max {_fmt(gap['max'])} ms, {_fmt(v['mbytes_per_s'], '.2f')} MB/s sent, {v['errors']} errors, "
            f"{v['silent']} without a frame")


def markdown(report: dict) -> str:
    """A README table of a report: one row per step (of a `.partial` report too: the steps a run cut off finished)."""
    srv, st = report.get("server") or report.get("ready") or {}, report.get("settings")
    about = (f"{st['frame_size'][0]}x{st['frame_size'][1]} JPEGs (~{st['jpeg_bytes_mean'] // 1024} KiB), "
             f"{st['inflight']} in flight per client, {st['duration_s']:g} s per step, {report['started']}" if st else
             f"a run cut off after {len(report['steps'])} step(s) (its .partial report)")
    lines = [
        f"`{srv.get('model')}` at {srv.get('width')}x{srv.get('height')} on {srv.get('device')}; {about}",
        "",
        "| clients | frames/s per client (min / mean) | total frames/s | p50 ms | p95 ms | p99 ms | dropped | errors "
        "| engine call ms | mean batch | device busy % | device idle ms per call | server RSS MiB (start -> end) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    watched = [s for s in report["steps"] if (s.get("viewer_total") or {}).get("count")]
    if watched:  # a viewers column, so that steps of the same client count tell apart
        lines[-2] = lines[-2].replace("| clients |", "| clients | viewers |", 1)
        lines[-1] += " ---: |"
    for s in report["steps"]:
        t, sv, lat = s["total"], s["server"], s["total"]["latency_ms"]
        dev = s.get("device") or {}  # reports from before the device timeline existed have none
        rss = (f"{sv['rss_bytes_start'] / 2**20:.0f} -> {sv['rss_bytes_end'] / 2**20:.0f}"
               if sv.get("rss_bytes_start") and sv.get("rss_bytes_end") else "-")
        who = f"{s['clients']} | {s.get('viewers', 0)}" if watched else f"{s['clients']}"
        lines.append(
            f"| {who} | {_fmt(t['fps_per_client_min'])} / {_fmt(t['fps_per_client_mean'])} | {t['fps']:.1f} "
            f"| {lat['p50']} | {lat['p95']} | {lat['p99']} | {t['dropped']} | {t['errors']} "
            f"| {sv['engine_call_ms_mean']} | {sv['batch_size_mean']} | {_dash(dev.get('busy_pct'))} "
            f"| {_dash(dev.get('gap_ms_mean'))} | {rss} |"
        )
    if watched:
        lines += [
            "",
            "| clients | viewers | frames/s per viewer (min / mean / max) | gap between frames p50 / p99 / max ms "
            "| MB/s to viewers | viewer errors | viewers without a frame |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in watched:
            v, gap = s["viewer_total"], s["viewer_total"]["gap_ms"]
            lines.append(
                f"| {s['clients']} | {v['count']} | {_fmt(v['fps_min'])} / {_fmt(v['fps_mean'])} / "
                f"{_fmt(v['fps_max'])} | {_dash(gap['p50'])} / {_dash(gap['p99'])} / {_dash(gap['max'])} "
                f"| {_dash(v['mbytes_per_s'])} | {v['errors']} | {v['silent']} |"
            )
    if report.get("verdict"):  # reports from before the verdict existed have none
        lines += ["", verdict_text(report["verdict"], "- ")]
    return "\n".join(lines)


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _fmt(value, spec: str = ".1f") -> str:
    """A number for a table, formatted with spec; "-" when there is none."""
    return "-" if value is None else format(value, spec)


def verdict_text(v: dict, bullet: str = "  ") -> str:
    lines = [f"soak verdict: {'PASS' if v['pass'] else 'FAIL'}"]
    for c in v["checks"]:
        limit = "" if c["limit"] is None else f" (limit {c['limit']}{' ' + c['unit'] if c['unit'] else ''})"
        lines.append(f"{bullet}{'ok  ' if c['pass'] else 'FAIL'} {c['check']}: {c['value']}{limit}")
    return "\n".join(lines)
