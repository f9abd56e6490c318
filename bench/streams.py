#!/usr/bin/env python3
"""asyncio streams over aiocoloc shared memory vs TCP loopback and Unix sockets.

Every contender runs on asyncio's loop and on uvloop, with the server in a
separate process, in one run:
  tcp     asyncio streams over TCP loopback (asyncio.start_server/open_connection)
  uds     asyncio streams over a Unix socket
  shm     aiocoloc.start_server/open_connection(upgrade="always"): measured once
          the connection has upgraded itself to shared memory both ways
  shm-as-run  (stream cells only) aiocoloc with the DEFAULT policy, timed from
          the moment it is connected, as a user's program runs: the first
          64 KiB go over TCP and the upgrade happens while the writer writes
          (write + drain, never yielding otherwise)

Cells: one-way streams (write + await drain() per write) for 64 B .. 1 MiB
writes (MB/s); ping-pong for 64 B, 1 KiB, 64 KiB (round trips/s, p50, p99);
a low-rate ping (one 64 B message per ms: p50/p99 latency); idle CPU of a
connected pair over one second.  Ratios are against the best socket peer.

Connection cells, against plain TCP (asyncio client, asyncio server) on the
same loop, in the same run:
  set-up  connect -> first 64 B echo round trip done (p50 over N connections);
          for shm the round trip goes over shared memory both ways, so the time
          includes the upgrade (registry lookup, handshake, pipes)
  short   connect, one 64 B request, a 1 KiB reply, close + wait_closed, one
          connection after the other: connections/s of aiocoloc's client and
          server with the DEFAULT policy ("auto": such a connection never
          upgrades) vs plain asyncio.  Blocks of the two alternate (4 x
          --seconds of each in all); the ratio is the median of the
          per-round ratios (target: >= 1.0, bench/targets.py).
  Set-up is measured warm (the client has the server's pool mapped: another
  connection used it within the last few seconds) and cold (the client
  maps the server's pool anew: ``close_idle()`` before each connection).

Usage: bench/streams.py [--seconds 0.5] [--loops asyncio,uvloop] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._streams_cells import (
    KINDS,
    STREAM_ONLY,
    NotUpgraded,
    idle_cell,
    rr_cell,
    run_cell,
    stream_cell,
)
from bench._streams_connections import run_connection_cells
from bench._streams_report import CPU_SIZES, RR_SIZES, STREAM_SIZES, print_report
from bench._streams_server import LOOPS, serve
from bench.targets import mark


def measure(
    loops: list[str], seconds: float, progress: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every cell of every kind on every loop, then the loop's connection
    cells: (kind/loop -> row, loop -> connection cells)."""
    results: dict[str, Any] = {}
    connections: dict[str, Any] = {}
    for loop_name in loops:
        for kind in KINDS:
            key = f"{kind}/{loop_name}"
            row: dict[str, Any] = {}
            for size in STREAM_SIZES:
                progress(f"{key} stream {size} B")
                cell = run_cell(kind, loop_name, partial(stream_cell, size=size, seconds=seconds))
                row[f"stream_{size}"] = cell["bytes_per_s"]
                row[f"cpu_per_gb_{size}"] = cell["cpu_s_per_gb"]
            if kind in STREAM_ONLY:
                results[key] = row
                continue
            for size in RR_SIZES:
                progress(f"{key} ping-pong {size} B")
                row[f"rr_{size}"] = run_cell(
                    kind, loop_name, partial(rr_cell, size=size, seconds=seconds)
                )
            progress(f"{key} low-rate ping")
            row["lowrate"] = run_cell(kind, loop_name, lambda c: rr_cell(c, 64, seconds, 0.001))
            progress(f"{key} idle")
            row["idle_cpu"] = run_cell(kind, loop_name, lambda c: idle_cell(c, 1.0))
            results[key] = row
        progress(f"connections/{loop_name}: set-up and short-lived")
        connections[loop_name] = run_connection_cells(loop_name, seconds)
    return results, connections


def ratios(
    results: dict[str, Any], connections: dict[str, Any], loops: list[str]
) -> dict[str, Any]:
    """Each shm cell against the best socket peer (any kind, any loop); the
    connection cells against plain TCP on the same loop."""
    peers = [results[f"{k}/{lp}"] for k in ("tcp", "uds") for lp in loops]
    out: dict[str, Any] = {}
    for lp in loops:
        shm, as_run = results[f"shm/{lp}"], results[f"shm-as-run/{lp}"]
        for size in STREAM_SIZES:
            best = max(p[f"stream_{size}"] for p in peers)
            out[f"{lp}/stream_{size}"] = shm[f"stream_{size}"] / best
            out[f"{lp}/stream_{size}_as_run"] = as_run[f"stream_{size}"] / best
        for size in RR_SIZES:
            best = min(p[f"rr_{size}"]["p50_us"] for p in peers)
            out[f"{lp}/rr_{size}_p50"] = shm[f"rr_{size}"]["p50_us"] / best
        best = min(p["lowrate"]["p50_us"] for p in peers)
        out[f"{lp}/lowrate_p50"] = shm["lowrate"]["p50_us"] / best
        tcp = results[f"tcp/{lp}"]
        for size in CPU_SIZES:  # CPU per GB moved against TCP's, on the same loop
            out[f"{lp}/cpu_per_gb_{size}"] = shm[f"cpu_per_gb_{size}"] / tcp[f"cpu_per_gb_{size}"]
        conn = connections[lp]
        out[f"{lp}/setup_p50"] = conn["shm_setup_p50_us"] / conn["tcp_setup_p50_us"]
        out[f"{lp}/setup_cold_p50"] = conn["shm_cold_setup_p50_us"] / conn["tcp_setup_p50_us"]
        out[f"{lp}/short_conn_per_s"] = conn["short_ratio"]
        out[f"{lp}/idle_conns_per_64mib_pool"] = conn["idle_conns_per_64mib_pool"]  # a count
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.serve:
        with asyncio.Runner(loop_factory=LOOPS[args.loop]) as runner:
            runner.run(serve(args.serve, rest))
        return 0

    from rich.console import Console

    loops = args.loops.split(",")
    console = Console(stderr=True)
    try:
        with console.status("measuring") as status:
            results, connections = measure(
                loops, args.seconds, lambda what: status.update(f"measuring {what}")
            )
    except NotUpgraded as exc:
        console.print(f"[bold red]the shm contender never upgraded to shared memory:[/] {exc}")
        return 1
    rel = ratios(results, connections, loops)
    marks = mark(rel)
    print_report(results, connections, rel, marks)
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "streams",
                    "results": results,
                    "connections": connections,
                    "ratios": rel,
                    "targets": marks,
                    "broken": sorted(cell for cell, m in marks.items() if not m["met"]),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
