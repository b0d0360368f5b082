#!/usr/bin/env python3
"""Write an HAProxy configuration for your replicas from deploy/haproxy.cfg (the template: everything in it stays,
only these lines change):

- the `bind` lines of `frontend turbostream` (--bind, repeatable) and of `frontend stats` (--stats-bind);
- the `server` lines between `# BEGIN replicas` and `# END replicas` of each backend: one per replica, in the form
  of the block's first line, with `maxconn` set to --max-clients where the template has one;
- `inter` of each `default-server` line (--check-interval), if given.

    python deploy/haproxy_cfg.py --bind :80 --max-clients 8 10.0.0.11:8000 10.0.0.12:8000 > haproxy.cfg
    python deploy/haproxy_cfg.py --bind 127.0.0.1:8080 a=127.0.0.1:8001 b=127.0.0.1:8002   # named replicas

Standard library only; prints to stdout (or --output).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("haproxy.cfg")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def replica(text: str) -> tuple[str | None, str]:
    """'10.0.0.11:8000' or 'name=10.0.0.11:8000' -> (name or None, address)."""
    name, _, address = text.rpartition("=")
    if not address.rpartition(":")[2].isdigit():
        raise argparse.ArgumentTypeError(f"replica {text!r}: give HOST:PORT or NAME=HOST:PORT")
    if name and not NAME.match(name):
        raise argparse.ArgumentTypeError(f"replica name {name!r}: letters, digits, '_', '.', '-' only")
    return name or None, address


def render(template: str, replicas: list[tuple[str | None, str]], *, binds: list[str] | None = None,
           stats_bind: str | None = None, max_clients: int | None = None, check_interval: str | None = None) -> str:
    out: list[str] = []
    section = ""
    block: list[str] | None = None  # template lines inside a BEGIN/END replicas block
    names = [name or f"ts{i + 1}" for i, (name, _) in enumerate(replicas)]
    for line in template.splitlines():
        stripped = line.strip()
        if line and not line[0].isspace() and not line.startswith("#"):
            section = stripped
        if stripped == "# BEGIN replicas":
            block = []
            out.append(line)
            continue
        if block is not None:
            if stripped != "# END replicas":
                block.append(line)
                continue
            pattern = next((t for t in block if t.strip().startswith("server ")), None)
            if pattern is None:
                raise ValueError("a replicas block of the template has no server line to follow")
            indent = pattern[: len(pattern) - len(pattern.lstrip())]
            rest = pattern.split()[3:]
            if max_clients is not None and "maxconn" in rest:
                rest[rest.index("maxconn") + 1] = str(max_clients)
            for name, (_, address) in zip(names, replicas):
                out.append(f"{indent}{' '.join(['server', name, address, *rest])}")
            block = None
            out.append(line)
            continue
        if stripped.startswith("bind ") and section == "frontend turbostream" and binds:
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(f"{indent}bind {b}" for b in binds)
            binds = []  # every template bind line is replaced by the given ones, once
            continue
        if stripped.startswith("bind ") and section == "frontend turbostream" and binds == []:
            continue
        if stripped.startswith("bind ") and section == "frontend stats" and stats_bind:
            line = line.replace(stripped, f"bind {stats_bind}")
        if stripped.startswith("default-server ") and check_interval:
            line = re.sub(r"\binter \S+", f"inter {check_interval}", line)
        out.append(line)
    if block is not None:
        raise ValueError("the template has a '# BEGIN replicas' without its '# END replicas'")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("replicas", nargs="+", type=replica, metavar="[NAME=]HOST:PORT", help="turbostream serve replicas")
    p.add_argument("--bind", action="append", dest="binds", metavar="ADDR",
                   help="address the balancer listens on (repeatable; default: the template's)")
    p.add_argument("--stats-bind", metavar="ADDR", help="address of the stats page and HAProxy's /metrics")
    p.add_argument("--max-clients", type=int, metavar="N", help="each replica's --max-clients (maxconn of /ws)")
    p.add_argument("--check-interval", metavar="T", help="health check interval, HAProxy time (1s, 500ms)")
    p.add_argument("--template", type=Path, default=TEMPLATE, help="default: %(default)s")
    p.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    args = p.parse_args(argv)
    if args.max_clients is not None and args.max_clients < 1:
        p.error("--max-clients must be at least 1")
    text = render(args.template.read_text(), args.replicas, binds=args.binds, stats_bind=args.stats_bind,
                  max_clients=args.max_clients, check_interval=args.check_interval)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
