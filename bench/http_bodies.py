#!/usr/bin/env python3
"""Large bodies through an unmodified HTTP library: aiohttp, plain and on aiocoloc.

An aiohttp server in another process answers ``GET /body/<size>`` with a body
of that size (made once); an aiohttp client in this process downloads it over
and over on one keep-alive connection, reading it as it streams in
(``resp.content.iter_any()``), and the bytes per second are measured:
  plain   both processes as they are (aiohttp over asyncio's TCP transport)
  shm     both processes call ``aiocoloc.install()`` with the upgrade policy
          "always": the same library code, its connection upgraded to shared
          memory (measured once upgraded both ways)
on asyncio's loop and on uvloop, for 1 MiB and 16 MiB bodies.  The two take
turns in blocks; the ratio (shm's rate to plain's on the same loop, higher is
better) is the median of the blocks' ratios, marked against its target
(bench/targets.py: at least twice plain's).

Usage: bench/http_bodies.py [--seconds 1.0] [--sizes 1048576,16777216]
                     [--loops asyncio,uvloop] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiocoloc
from bench._processes import LOOPS, stop
from bench.many import spawn
from bench.targets import mark, summary

KINDS = ["plain", "shm"]
#: Alternating blocks of each contender per cell.
BLOCKS = 4
#: How long a connection may take to reach shared memory both ways.
UPGRADE_DEADLINE = 10.0


# --- the server process ------------------------------------------------------------------


async def serve(kind: str) -> None:
    """Serve bodies until stdin closes (``bench.many.spawn`` reads the port)."""
    if kind == "shm":
        aiocoloc.install()
        aiocoloc.configure(upgrade="always")
    bodies: dict[int, bytes] = {}

    async def body(request: web.Request) -> web.Response:
        size = int(request.match_info["size"])
        if size not in bodies:
            bodies[size] = bytes(range(256)) * (size // 256) + bytes(size % 256)
        return web.Response(body=bodies[size], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/body/{size}", body)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(port, flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await runner.cleanup()


# --- the client side ---------------------------------------------------------------------


def _mode(response: aiohttp.ClientResponse) -> tuple[str, str] | None:
    transport = response.connection.transport if response.connection is not None else None
    info = transport.get_extra_info("aiocoloc") if transport is not None else None
    return None if info is None else (info["mode"], info["rx_mode"])


async def _download(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        response.raise_for_status()
        mode = _mode(response)
        got = 0
        async for chunk in response.content.iter_any():
            got += len(chunk)
        return got, mode


async def block(kind: str, port: int, size: int, seconds: float) -> float:
    """Bytes per second downloading ``size``-byte bodies for ``seconds``."""
    url = f"http://127.0.0.1:{port}/body/{size}"
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.monotonic() + UPGRADE_DEADLINE
        while True:  # warm: the connection is up (and upgraded, for shm)
            got, mode = await _download(session, url)
            if got != size:
                raise RuntimeError(f"{kind}: a body of {got} bytes, not {size}")
            if kind == "plain" or mode == ("shm", "shm"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the aiohttp connection did not upgrade: {mode}")
            await asyncio.sleep(0.01)
        moved, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            got, _ = await _download(session, url)
            moved += got
        return moved / (time.perf_counter() - start)


async def cell(ports: dict[str, int], size: int, seconds: float) -> dict[str, Any]:
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(BLOCKS):
        for kind in KINDS:
            if kind == "shm":
                aiocoloc.install()
                aiocoloc.configure(upgrade="always")
            try:
                rates[kind].append(await block(kind, ports[kind], size, seconds / BLOCKS))
            finally:
                if kind == "shm":
                    aiocoloc.uninstall()
    return {
        "size": size,
        "plain_bytes_per_s": statistics.median(rates["plain"]),
        "shm_bytes_per_s": statistics.median(rates["shm"]),
        "ratio": statistics.median(
            s / p for s, p in zip(rates["shm"], rates["plain"], strict=True)
        ),
    }


def run_loop(loop_name: str, sizes: list[int], seconds: float) -> list[dict[str, Any]]:
    children = {kind: spawn(kind, loop_name, script=__file__) for kind in KINDS}
    try:
        ports = {kind: port for kind, (_, port) in children.items()}
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            return [{"loop": loop_name, **runner.run(cell(ports, size, seconds))} for size in sizes]
    finally:
        for child, _ in children.values():
            stop(child)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="per cell and contender")
    parser.add_argument("--sizes", default=f"{1 << 20},{16 << 20}")
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

    sizes = [int(n) for n in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    console = Console(stderr=True)
    with console.status("measuring") as status:
        for loop_name in args.loops.split(","):
            status.update(f"measuring aiohttp downloads on {loop_name}")
            rows += run_loop(loop_name, sizes, args.seconds)
    table = Table(title="aiohttp downloads, server in another process (MB/s, median of blocks)")
    for column in ("loop", "body", "plain", "on aiocoloc", "ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["loop"],
            f"{row['size'] >> 10:,} KiB",
            f"{row['plain_bytes_per_s'] / 1e6:,.0f}",
            f"{row['shm_bytes_per_s'] / 1e6:,.0f}",
            f"{row['ratio']:.2f}x",
        )
    out = Console(width=max(Console().width, 100))
    out.print(table)
    marks = mark({f"{row['loop']}/http_body_{row['size']}": row["ratio"] for row in rows})
    broken, line = summary(marks)
    out.print(line)
    if args.json:
        print(json.dumps({"benchmark": "http", "rows": rows, "targets": marks, "broken": broken}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
