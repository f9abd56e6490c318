#!/usr/bin/env python3
"""aiocoloc demo: an asyncio streams server and client in two processes.

The server is ``aiocoloc.start_server``, the client ``aiocoloc.open_connection``
-- asyncio's stream API, nothing else changed.  Both find out they share the
host (the embedded registry, no daemon), the connection upgrades itself to
shared memory, and the client streams through it; then the same over plain
TCP (``upgrade="never"``, what ``AIOCOLOC_MODE=never`` does for a whole
process); then a connection to a plain asyncio server, which stays on TCP and
says why.

Run with ``make demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

import aiocoloc

CHUNK = 256 * 1024
#: The client sends this block over and over; the server checks every byte
#: against it (a memcmp, cheap enough not to hide the transport's speed).
BLOCK = random.Random(2026).randbytes(CHUNK)


# --- the server process ------------------------------------------------------------------


async def count_and_check(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read until EOF, checking every byte; answer with the count, whether all
    bytes were right, and the path they last came on."""
    doubled = BLOCK + BLOCK
    total, intact = 0, True
    while chunk := await reader.read(CHUNK):
        offset = total % CHUNK
        intact = intact and doubled[offset : offset + len(chunk)] == chunk
        total += len(chunk)
    mode = (writer.transport.get_extra_info("aiocoloc") or {"rx_mode": "tcp"})["rx_mode"]
    writer.write(f"{total} {'intact' if intact else 'CORRUPT'} {mode}\n".encode())
    await writer.drain()
    writer.close()


async def serve(plain: bool) -> None:
    if plain:
        server = await asyncio.start_server(count_and_check, "127.0.0.1", 0)
    else:
        server = await aiocoloc.start_server(count_and_check, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# --- the client --------------------------------------------------------------------------


async def stream(port: int, seconds: float, upgrade: str | None) -> dict[str, object]:
    """Stream for ``seconds``; with the default policy the connection starts on
    TCP and switches to shared memory mid-stream, after its first 64 KiB."""
    reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade=upgrade)
    sent = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(16):
            writer.write(BLOCK)
            await writer.drain()
        sent += 16 * CHUNK
    writer.write_eof()
    total, verdict, server_mode = (await reader.readline()).decode().split()
    elapsed = time.perf_counter() - start
    info = writer.transport.get_extra_info("aiocoloc")
    writer.close()
    await writer.wait_closed()
    if int(total) != sent or verdict != "intact":
        raise SystemExit(f"bytes lost or changed: sent {sent}, server got {total} ({verdict})")
    return {
        "mode": info["mode"],
        "server_mode": server_mode,
        "mb_s": sent / elapsed / 1e6,
        "reason": info["fallback_reason"] or "",
    }


def spawn(plain: bool) -> tuple[subprocess.Popen[str], int]:
    args = [sys.executable, __file__, "--serve"] + (["--plain"] if plain else [])
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    return child, int(child.stdout.readline())


def stop(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=10)


async def client(seconds: float) -> list[tuple[str, dict[str, object]]]:
    rows = []
    server, port = spawn(plain=False)
    try:
        rows.append(("aiocoloc server", await stream(port, seconds, None)))
        rows.append(
            ("aiocoloc server, client upgrade='never'", await stream(port, seconds, "never"))
        )
    finally:
        stop(server)
    plain, port = spawn(plain=True)
    try:
        rows.append(("plain asyncio server", await stream(port, seconds, None)))
    finally:
        stop(plain)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.plain))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(process)d %(name)s %(message)s")
    console = Console()
    console.print(
        "[bold]aiocoloc[/] demo: an asyncio streams client sends "
        f"{CHUNK // 1024} KiB writes to a server in another process for {args.seconds:.0f} s,\n"
        "and the server checks every byte.  Same code each time; only the path differs.\n"
    )
    rows = asyncio.run(client(args.seconds))
    table = Table(title="one connection, client -> server")
    for column in ("server", "client mode", "server saw", "MB/s", "why TCP"):
        table.add_column(column, justify="right" if column == "MB/s" else "left")
    for name, row in rows:
        table.add_row(
            name,
            str(row["mode"]),
            str(row["server_mode"]),
            f"{row['mb_s']:,.0f}",
            str(row["reason"]),
        )
    console.print(table)
    shm, tcp = rows[0][1], rows[1][1]
    if shm["mode"] != "shm":
        console.print("[red]the connection did not upgrade[/]: see the reason above.")
        return 1
    ratio = float(shm["mb_s"]) / float(tcp["mb_s"])  # type: ignore[arg-type]
    console.print(f"shared memory moved {ratio:.1f}x the bytes TCP did, through the same API.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
