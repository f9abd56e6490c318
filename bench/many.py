#!/usr/bin/env python3
"""Many busy connections in one process: time per round, aiocoloc vs TCP.

N connections (N = 1, 10, 100, 300 by default) to an echo server in another
process take part in rounds: each round writes a 64 B message on every
connection, then reads every echo back.  The time per round (median of the
rounds in --seconds of each) is measured over:
  tcp     asyncio streams over TCP loopback (asyncio.start_server/open_connection)
  shm     aiocoloc.start_server/open_connection(upgrade="always"), measured once
          every connection that can has upgraded to shared memory both ways.
          A server's pool holds 1024 upgraded connections, and it opens
          another when its pools are full; the table says how many upgraded.
on asyncio's loop and on uvloop (client and server alike), with the ratio of
shm's time per round to TCP's at the same N (lower is better; goal <= 1).
Both contenders' connections are open at once and take turns in blocks of
rounds; the ratio is the median of the blocks' ratios.

Every ratio is marked against its target (bench/targets.py: time per round
no more than TCP's, every connection upgraded).

Usage: bench/many.py [--seconds 1.0] [--counts 1,10,100,300]
                     [--loops asyncio,uvloop] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiocoloc
from bench import _processes as processes
from bench._processes import LOOPS, stop
from bench.targets import mark, summary

KINDS = ["tcp", "shm"]
MESSAGE = 64
#: How long the connections may take to upgrade (or fall back) in all.
UPGRADE_DEADLINE = 20.0
#: Connections opened at once (the listen backlog is 100).
OPEN_BATCH = 50
#: Seconds of rounds before measuring (connections warm, pipes at their share).
WARMUP = 0.3
#: Alternating blocks of rounds of each contender; the ratio is the median
#: of the blocks' ratios.
BLOCKS = 4
#: Seconds between two blocks.
PAUSE = 0.25
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# --- the server process ------------------------------------------------------------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                message = await reader.readexactly(MESSAGE)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(message)
            await writer.drain()
    finally:
        writer.close()


async def serve(kind: str) -> None:
    """Echo on every connection until stdin closes."""
    start = asyncio.start_server if kind == "tcp" else aiocoloc.start_server
    server = await start(echo, "127.0.0.1", 0, backlog=512)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def spawn(kind: str, loop_name: str, script: str = __file__) -> tuple[subprocess.Popen[str], int]:
    """Start ``script --serve kind`` on ``loop_name``; returns it and the port it printed."""
    child, port = processes.spawn(script, ["--serve", kind, "--loop", loop_name])
    return child, int(port)


# --- the client side ---------------------------------------------------------------------


async def open_all(kind: str, port: int, n: int) -> list[Streams]:
    streams: list[Streams] = []
    for first in range(0, n, OPEN_BATCH):
        batch = range(first, min(n, first + OPEN_BATCH))
        if kind == "tcp":
            opened = [asyncio.open_connection("127.0.0.1", port) for _ in batch]
        else:
            opened = [aiocoloc.open_connection("127.0.0.1", port, upgrade="always") for _ in batch]
        streams += await asyncio.gather(*opened)
    return streams


async def settle_upgrades(streams: list[Streams]) -> tuple[int, dict[str, int]]:
    """Wait until each connection is on shared memory both ways or fell back;
    returns how many upgraded and the fallback reasons counted."""
    deadline = time.monotonic() + UPGRADE_DEADLINE
    while True:
        upgraded, pending = 0, 0
        reasons: dict[str, int] = {}
        for _, writer in streams:
            info = writer.transport.get_extra_info("aiocoloc")
            if info["mode"] == "shm" and info["rx_mode"] == "shm":
                upgraded += 1
            elif info["fallback_reason"] is not None:
                reason = info["fallback_reason"]
                reasons[reason] = reasons.get(reason, 0) + 1
            else:
                pending += 1
        if not pending or time.monotonic() > deadline:
            if pending:
                reasons["still upgrading"] = pending
            return upgraded, reasons
        await asyncio.sleep(0.01)


async def rounds(streams: list[Streams], seconds: float) -> list[float]:
    """Seconds per round: a message on every connection, then every echo."""
    message = bytes(MESSAGE)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        began = time.perf_counter()
        if began - start >= seconds and len(times) >= 3:
            return times
        for _, writer in streams:
            writer.write(message)
        for reader, _ in streams:
            await reader.readexactly(MESSAGE)
        times.append(time.perf_counter() - began)


async def cell(ports: dict[str, int], n: int, seconds: float) -> dict[str, Any]:
    """Both contenders' connections open at once; blocks of rounds of each in
    turn (the machine's noise hits both alike)."""
    streams = {kind: await open_all(kind, port, n) for kind, port in ports.items()}
    try:
        upgraded, reasons = await settle_upgrades(streams["shm"])
        for kind in KINDS:  # warm: pipes grown to their share, caches hot
            await rounds(streams[kind], WARMUP)
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        ratios = []
        for _ in range(BLOCKS):
            block = {}
            for kind in KINDS:
                # The other contender's pipes go idle (their resizer stops)
                # before this block: its after-effects are not charged here.
                await asyncio.sleep(PAUSE)
                got = await rounds(streams[kind], seconds / BLOCKS)
                times[kind] += got
                block[kind] = statistics.median(got)
            ratios.append(block["shm"] / block["tcp"])
    finally:
        for kind_streams in streams.values():
            for _, writer in kind_streams:
                writer.close()
        for kind_streams in streams.values():
            for _, writer in kind_streams:
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    return {
        "connections": n,
        **{f"{kind}_round_us": statistics.median(times[kind]) * 1e6 for kind in KINDS},
        **{f"{kind}_rounds": len(times[kind]) for kind in KINDS},
        "ratio": statistics.median(ratios),
        "upgraded": upgraded,
        "fallbacks": reasons,
    }


def run_cell(loop_name: str, n: int, seconds: float) -> dict[str, Any]:
    children = {kind: spawn(kind, loop_name) for kind in KINDS}
    try:
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            ports = {kind: port for kind, (_, port) in children.items()}
            return {"loop": loop_name, **runner.run(cell(ports, n, seconds))}
    finally:
        for child, _ in children.values():
            stop(child)


def measure(
    loops: list[str], counts: list[int], seconds: float, note: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows = []
    for loop_name in loops:
        for n in counts:
            note(f"{loop_name}, {n} connections")
            rows.append(run_cell(loop_name, n, seconds))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--counts", default="1,10,100,300")
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        with asyncio.Runner(loop_factory=LOOPS[args.loop]) as runner:
            runner.run(serve(args.serve))
        return 0

    from rich.console import Console
    from rich.table import Table

    loops = args.loops.split(",")
    counts = [int(n) for n in args.counts.split(",")]
    console = Console(stderr=True)
    with console.status("measuring") as status:
        rows = measure(loops, counts, args.seconds, lambda what: status.update(f"measuring {what}"))
    table = Table(
        title=f"N connections, one {MESSAGE} B echo each per round, server in another "
        "process (time per round, median, us)"
    )
    for column in ("loop", "N", "tcp", "shm", "shm / tcp", "upgraded", "fallbacks"):
        table.add_column(column, justify="right")
    for row in rows:
        fallbacks = ", ".join(f"{k}: {v}" for k, v in row["fallbacks"].items())
        table.add_row(
            row["loop"],
            str(row["connections"]),
            f"{row['tcp_round_us']:,.0f}",
            f"{row['shm_round_us']:,.0f}",
            f"{row['ratio']:.2f}x",
            f"{row['upgraded']}/{row['connections']}",
            fallbacks or "-",
        )
    out = Console(width=max(Console().width, 120))
    out.print(table)
    cells = {}
    for row in rows:
        n = row["connections"]
        cells[f"{row['loop']}/per_round_{n}"] = row["ratio"]
        cells[f"{row['loop']}/upgraded_{n}"] = row["upgraded"] / n
    marks = mark(cells)
    broken, line = summary(marks)
    out.print(line)
    if args.json:
        print(json.dumps({"benchmark": "many", "rows": rows, "targets": marks, "broken": broken}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
