"""Many replicas behind a real HAProxy (Debian's package; this test installs nothing): three CPU replicas of
`turbostream serve`, HAProxy with a configuration generated from deploy/haproxy.cfg, scripts/loadtest.py through it,
all on loopback.

It shows: streams spread over the replicas by least connections, none refused while places remain, a replica that
is still warming up gets no stream, and a replica killed in the middle of a run loses only its own streams, whose
clients connect again and land on the others. The warming replica is a real `serve` whose model load is held until
the test releases it (exactly what a replica downloading weights or capturing graphs looks like from outside).

Set SCALING_JSON=path to keep the figures (the README's "Scaling" section quotes them).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

ROOT = Path(__file__).resolve().parents[1]
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
MAX_CLIENTS = 3  # per replica; the load test runs twice as many clients
CLIENTS = 6
# A replica whose model load waits for a file: `python -c HELD RELEASE_FILE serve ...`.
HELD = """
import os, sys, time
import turbostream.cli.serve as serve
real = serve.build_engine
def held(args):
    deadline = time.monotonic() + 300
    while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(args)
serve.build_engine = held
from turbostream.cli import main
sys.exit(main(sys.argv[2:]))
"""

pytestmark = [pytest.mark.slow, pytest.mark.skipif(HAPROXY is None, reason="needs HAProxy (apt-get install haproxy)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def wait_for(condition, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Replica:
    def __init__(self, name: str, tmp: Path, held: bool = False) -> None:
        self.name, self.port = name, free_port()
        self.release = tmp / f"release-{name}"
        self.log_path = tmp / f"replica-{name}.log"
        serve = ["serve", "--model", "tiny-random", "--device", "cpu", "--size", "64", "--max-clients",
                 str(MAX_CLIENTS), "--port", str(self.port), "--trusted-proxy", "127.0.0.1"]
        command = ([sys.executable, "-c", HELD, str(self.release), *serve] if held
                   else [sys.executable, "-m", "turbostream", *serve])
        self.proc = subprocess.Popen(command, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "COLUMNS": "200"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> int:
        assert self.proc.poll() is None, f"replica {self.name} exited:\n{self.log_path.read_text()[-3000:]}"
        return get(self.url + "/healthz")[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def haproxy_stats(port: int) -> dict[str, dict[str, str]]:
    """HAProxy's CSV stats: {'backend/server': row}."""
    status, text = get(f"http://127.0.0.1:{port}/stats;csv")
    if status != 200:
        return {}
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {f"{row['pxname']}/{row['svname']}": row for row in rows}


def states(port: int, backend: str = "streams") -> dict[str, str]:
    """The servers' states in one backend: streams (/ws, checked on /readyz) or web (the rest, on /healthz)."""
    return {key.split("/")[1]: row["status"] for key, row in haproxy_stats(port).items()
            if key.startswith(f"{backend}/") and not key.endswith(("FRONTEND", "BACKEND"))}


def handshake(port: int, origin: str | None) -> str | int:
    """A /ws handshake through the balancer with this Origin: the first message's type, or the HTTP status."""

    async def go():
        try:
            async with connect(f"ws://127.0.0.1:{port}/ws", origin=origin, open_timeout=20) as ws:
                return json.loads(await ws.recv())["type"]
        except InvalidStatus as exc:
            return exc.response.status_code

    return asyncio.run(go())


def clients_of(replica: Replica) -> int:
    for line in get(replica.url + "/metrics")[1].splitlines():
        if line.startswith("turbostream_clients "):
            return int(float(line.split()[1]))
    return 0


def loadtest(port: int, out: Path, duration: float) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", f"ws://127.0.0.1:{port}/ws",
            "--clients", str(CLIENTS), "--duration", str(duration), "--warmup", "1", "--rate", "10", "--reconnect",
            "--replica-header", "X-Served-By", "--json", str(out)]


def test_replicas_behind_haproxy(tmp_path):
    replicas = {name: Replica(name, tmp_path, held=(name == "r2")) for name in ("r0", "r1", "r2")}
    front, stats = free_port(), free_port()
    config = tmp_path / "haproxy.cfg"
    subprocess.run([sys.executable, str(ROOT / "deploy" / "haproxy_cfg.py"), "--bind", f"127.0.0.1:{front}",
                    "--stats-bind", f"127.0.0.1:{stats}", "--max-clients", str(MAX_CLIENTS), "--check-interval",
                    "300ms", "--output", str(config), *(f"{n}=127.0.0.1:{r.port}" for n, r in replicas.items())],
                   check=True, timeout=30)
    subprocess.run([HAPROXY, "-c", "-f", str(config)], check=True, capture_output=True, timeout=30)
    haproxy_log = tmp_path / "haproxy.log"
    haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=haproxy_log.open("w"),
                               stderr=subprocess.STDOUT)
    version = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    figures: dict = {"settings": {
        "replicas": 3, "max_clients_per_replica": MAX_CLIENTS, "clients": CLIENTS, "rate_per_client": 10,
        "duration_s": {"spread": 5, "kill": 10}, "replica": "serve --model tiny-random --device cpu --size 64",
        "haproxy": version, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}}
    try:
        r0, r1, r2 = replicas.values()
        wait_for(lambda: r0.health() == 200 and r1.health() == 200, 180, "r0 and r1 to warm up")
        assert r2.health() == 503 and get(r2.url + "/readyz") == (503, "warming up\n")
        wait_for(lambda: states(stats) == {"r0": "UP", "r1": "UP", "r2": "DOWN"}, 30, "HAProxy to see r2 down")
        # The pages go through the other backend, whose checks run on their own clock: it may see r0 and r1 up a
        # check interval later (a page asked for in between got HAProxy's 503 in one CI run).
        wait_for(lambda: states(stats, "web") == {"r0": "UP", "r1": "UP", "r2": "DOWN"}, 30,
                 "HAProxy's web backend to see r0 and r1 up")

        # 0. The pages and the Origin rule work through the balancer unchanged (HAProxy passes Host on as it came).
        status, page = get(f"http://127.0.0.1:{front}/")
        assert status == 200 and "/app.js" in page
        assert get(f"http://127.0.0.1:{front}/view")[0] == 200
        assert get(f"http://127.0.0.1:{front}/view?token=pagesecret&control=ctlsecret")[0] == 200
        assert handshake(front, f"http://127.0.0.1:{front}") == "ready"
        assert handshake(front, "http://evil.example") == 403
        wait_for(lambda: sum(clients_of(r) for r in (r0, r1)) == 0, 20, "the handshake's client to leave")

        # 1. Twice what one replica admits, with one replica still warming: spread over the two warm ones, none
        #    refused, none lost, nothing sent to the warming one.
        out1 = tmp_path / "spread.json"
        result = subprocess.run(loadtest(front, out1, 5), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        step = json.loads(out1.read_text())["steps"][0]
        total = step["total"]
        assert total["connections_by_replica"] == {"r0": MAX_CLIENTS, "r1": MAX_CLIENTS}, total
        assert total["refused"] == total["lost"] == total["errors"] == 0
        assert all(c["replies"] > 0 and len(c["connections"]) == 1 for c in step["per_client"])
        assert haproxy_stats(stats)["streams/r2"]["stot"] == "0"  # not even tried
        assert "refused a stream" not in r2.log_path.read_text()
        figures["spread"] = {k: total[k] for k in ("fps", "latency_ms", "connections_by_replica", "refused", "lost")}

        # 2. r2 finishes warming and joins; r0 is killed mid-run: only its streams are lost, and their clients
        #    connect again through HAProxy to the replicas that remain.
        r2.release.touch()
        wait_for(lambda: r2.health() == 200, 120, "r2 to warm up")
        wait_for(lambda: states(stats) == {"r0": "UP", "r1": "UP", "r2": "UP"}, 30, "HAProxy to see r2 up")
        out2 = tmp_path / "kill.json"
        run = subprocess.Popen(loadtest(front, out2, 10), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
        try:
            wait_for(lambda: sum(clients_of(r) for r in replicas.values()) == CLIENTS, 60, "every client to stream")
            time.sleep(2)
            n0 = clients_of(r0)
            r0.proc.kill()  # SIGKILL: no close frames, no goodbye
            output, _ = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
        assert run.returncode == 0, output
        step = json.loads(out2.read_text())["steps"][0]
        total, clients = step["total"], step["per_client"]
        on_r0 = [c for c in clients if c["connections"][0]["replica"] == "r0"]
        others = [c for c in clients if c["connections"][0]["replica"] != "r0"]
        assert n0 >= 1 and len(on_r0) == n0 and len(others) == CLIENTS - n0, total["connections_by_replica"]
        for c in others:  # untouched: one connection all along, no loss
            assert len(c["connections"]) == 1 and c["lost"] == 0 and c["connections"][0]["end"] == "step ended"
        gaps = []
        for c in on_r0:  # lost once, then served by another replica until the end
            first, second = c["connections"]
            assert c["lost"] == 1 and first["end"] == "closed 1006"
            assert second["replica"] in ("r1", "r2") and second["replies"] > 0 and second["end"] == "step ended"
            gaps.append(round(second["opened_s"] - first["closed_s"], 2))
        assert total["refused"] == 0 and total["errors"] == 0 and total["lost"] == n0
        assert all(c["replies"] > 0 for c in clients)
        wait_for(lambda: states(stats).get("r0") == "DOWN", 10, "HAProxy to mark r0 down")
        figures["kill"] = {k: total[k] for k in ("fps", "latency_ms", "connections_by_replica", "refused", "lost")}
        figures["kill"]["reconnect_gap_s"] = gaps
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        for replica in replicas.values():
            replica.stop()
    # HAProxy logs each request by its path: the secrets in a query string stay out of its log.
    logged = haproxy_log.read_text()
    assert "GET /view HTTP/1.1" in logged and "GET /ws HTTP/1.1" in logged, logged[-3000:]
    assert "pagesecret" not in logged and "ctlsecret" not in logged
    print(json.dumps(figures))
    if os.environ.get("SCALING_JSON"):
        Path(os.environ["SCALING_JSON"]).write_text(json.dumps(figures, indent=2) + "\n")
