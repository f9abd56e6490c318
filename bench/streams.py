#!/usr/bin/env python3
"""asyncio streams over aiocoloc shared memory vs TCP loopback and Unix sockets.

Every contender runs on asyncio's loop and on uvloop, with the server in a
separate process, in one run:
  tcp     asyncio streams over TCP loopback
  uds     asyncio streams over a Unix socket
  shm     asyncio streams over an aiocoloc SwitchableTransport in shared-memory
          mode (set up by hand until the connection API arrives)

Cells: one-way streams (write + await drain() per write) for 64 B .. 1 MiB
writes (MB/s); ping-pong for 64 B, 1 KiB, 64 KiB (round trips/s, p50, p99);
a low-rate ping (one 64 B message per ms: p50/p99 latency); idle CPU of a
connected pair over one second.  Ratios are against the best socket peer.

Usage: bench/streams.py [--seconds 0.5] [--loops asyncio,uvloop] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiocoloc.doorbell import new_eventfd
from aiocoloc.pool import PipeHandle, Pool, PoolConfig
from aiocoloc.segments import MemfdSegment
from aiocoloc.transport import attach_shared_memory, open_transport

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
KINDS = ["tcp", "uds", "shm"]
STREAM_SIZES = [64, 1024, 65536, 1 << 20]
RR_SIZES = [64, 1024, 65536]
POOL = PoolConfig(slice_size=65536, max_pipes=4, max_slices_per_pipe=64, lease=30)
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# --- the server process ------------------------------------------------------------------


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        header = await reader.readexactly(9)
        kind, size = header[:1], int.from_bytes(header[1:], "big")
        if kind == b"S":  # bulk: count until EOF, report
            n = 0
            while chunk := await reader.read(1 << 20):
                n += len(chunk)
            writer.write(n.to_bytes(8, "big"))
            await writer.drain()
        elif kind == b"I":  # idle: wait for EOF
            await reader.read()
        else:  # echo fixed-size messages until EOF
            while True:
                try:
                    message = await reader.readexactly(size)
                except asyncio.IncompleteReadError:
                    break
                writer.write(message)
                await writer.drain()
    finally:
        writer.close()


def streams_over(
    transport: Any, protocol: asyncio.StreamReaderProtocol, reader: asyncio.StreamReader
) -> Streams:
    return reader, asyncio.StreamWriter(transport, protocol, reader, asyncio.get_running_loop())


async def serve(kind: str, args: list[str]) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle(reader, writer)
        if not done.done():
            done.set_result(None)

    if kind == "tcp":
        server = await asyncio.start_server(one, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
    elif kind == "uds":
        server = await asyncio.start_unix_server(one, args[0])
        print(args[0], flush=True)
    else:
        tcp_fd, ctrl_fd, memfd, listen_fd, ring_fd = map(int, args)
        pool = Pool.attach(MemfdSegment.from_fd(memfd))
        print(pool.slot, flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        up_s, up_g, down_s, down_g = map(int, line.split())
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await open_transport(loop, lambda: protocol, socket.socket(fileno=tcp_fd))
        await attach_shared_memory(
            transport,
            pool,
            send=PipeHandle(down_s, down_g),
            receive=PipeHandle(up_s, up_g),
            listen_fd=listen_fd,
            ring_fd=ring_fd,
            control=socket.socket(fileno=ctrl_fd),
        )
        transport.switch_tx("shm")
        await asyncio.sleep(0)
        await one(*streams_over(transport, protocol, reader))
        await asyncio.sleep(0.05)
        pool.close()
        return
    await done


# --- the client side ---------------------------------------------------------------------------


class Connection:
    """A client connection to a fresh server process of one kind."""

    def __init__(self, kind: str, loop_name: str) -> None:
        self.kind, self.loop_name = kind, loop_name
        self.child: subprocess.Popen[str] | None = None
        self.pool: Pool | None = None
        self.path = ""

    def _spawn(self, args: list[str], pass_fds: tuple[int, ...] = ()) -> str:
        self.child = subprocess.Popen(
            [sys.executable, __file__, "--serve", self.kind, "--loop", self.loop_name, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
        )
        assert self.child.stdout is not None
        return self.child.stdout.readline().strip()

    async def open(self) -> Streams:
        if self.kind == "tcp":
            port = int(self._spawn([]))
            return await asyncio.open_connection("127.0.0.1", port)
        if self.kind == "uds":
            self.path = tempfile.mktemp(prefix="aiocoloc-bench-", suffix=".sock")
            await asyncio.get_running_loop().run_in_executor(None, self._spawn, [self.path])
            return await asyncio.open_unix_connection(self.path)
        loop = asyncio.get_running_loop()
        self.pool = pool = Pool.create(MemfdSegment.create(16 << 20), POOL)
        listener = socket.create_server(("127.0.0.1", 0))
        mine = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
        listener.close()
        ctrl_mine, ctrl_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        my_bell, their_bell = new_eventfd(), new_eventfd()
        fds = (theirs.fileno(), ctrl_theirs.fileno(), pool.segment.fd, their_bell, my_bell)
        peer = int(await loop.run_in_executor(None, self._spawn, list(map(str, fds)), fds))
        theirs.close()
        ctrl_theirs.close()
        up = pool.create_pipe(pool.slot, peer, initial=16)
        down = pool.create_pipe(peer, pool.slot, initial=16)
        assert self.child is not None and self.child.stdin is not None
        self.child.stdin.write(f"{up.slot} {up.generation} {down.slot} {down.generation}\n")
        self.child.stdin.flush()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await open_transport(loop, lambda: protocol, mine)
        await attach_shared_memory(
            transport,
            pool,
            send=up,
            receive=down,
            listen_fd=my_bell,
            ring_fd=os.dup(their_bell),
            control=ctrl_mine,
        )
        os.close(their_bell)
        transport.switch_tx("shm")
        await asyncio.sleep(0.02)
        assert transport.get_extra_info("aiocoloc")["mode"] == "shm"
        return streams_over(transport, protocol, reader)

    def close(self) -> None:
        if self.child is not None:
            try:
                self.child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        if self.pool is not None:
            self.pool.close()
        if self.path:
            Path(self.path).unlink(missing_ok=True)


async def stream_cell(conn: Connection, size: int, seconds: float) -> float:
    reader, writer = await conn.open()
    writer.write(b"S" + size.to_bytes(8, "big"))
    chunk = os.urandom(size)
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(32):
            writer.write(chunk)
            await writer.drain()
        sent += 32 * size
    writer.write_eof()
    got = int.from_bytes(await reader.readexactly(8), "big")
    elapsed = time.perf_counter() - start
    writer.close()
    assert got == sent, (got, sent)
    return sent / elapsed


async def rr_cell(
    conn: Connection, size: int, seconds: float, interval: float = 0.0
) -> dict[str, float]:
    reader, writer = await conn.open()
    writer.write(b"R" + size.to_bytes(8, "big"))
    message = os.urandom(size)
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        writer.write(message)
        await writer.drain()
        await reader.readexactly(size)
        latencies.append(time.perf_counter() - t0)
        if interval:
            await asyncio.sleep(interval)
    writer.write_eof()
    writer.close()
    latencies.sort()
    return {
        "rtt_per_s": len(latencies) / sum(latencies),
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def idle_cell(conn: Connection, seconds: float) -> float:
    _, writer = await conn.open()
    writer.write(b"I" + bytes(8))
    await asyncio.sleep(0.1)
    assert conn.child is not None
    before = _cpu(os.getpid()) + _cpu(conn.child.pid)
    await asyncio.sleep(seconds)
    used = _cpu(os.getpid()) + _cpu(conn.child.pid) - before
    writer.write_eof()
    writer.close()
    return used / seconds


def run_cell(kind: str, loop_name: str, make: Callable[[Connection], Any]) -> Any:
    conn = Connection(kind, loop_name)
    try:
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            return runner.run(asyncio.wait_for(make(conn), 120))
    finally:
        conn.close()


def measure(loops: list[str], seconds: float, progress: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for loop_name in loops:
        for kind in KINDS:
            key = f"{kind}/{loop_name}"
            row: dict[str, Any] = {}
            for size in STREAM_SIZES:
                progress(f"{key} stream {size} B")
                row[f"stream_{size}"] = run_cell(
                    kind, loop_name, lambda c, s=size: stream_cell(c, s, seconds)
                )
            for size in RR_SIZES:
                progress(f"{key} ping-pong {size} B")
                row[f"rr_{size}"] = run_cell(
                    kind, loop_name, lambda c, s=size: rr_cell(c, s, seconds)
                )
            progress(f"{key} low-rate ping")
            row["lowrate"] = run_cell(kind, loop_name, lambda c: rr_cell(c, 64, seconds, 0.001))
            progress(f"{key} idle")
            row["idle_cpu"] = run_cell(kind, loop_name, lambda c: idle_cell(c, 1.0))
            results[key] = row
    return results


def ratios(results: dict[str, Any], loops: list[str]) -> dict[str, Any]:
    """Each shm cell against the best socket peer (any kind, any loop)."""
    peers = [results[f"{k}/{lp}"] for k in ("tcp", "uds") for lp in loops]
    out: dict[str, Any] = {}
    for lp in loops:
        shm = results[f"shm/{lp}"]
        for size in STREAM_SIZES:
            best = max(p[f"stream_{size}"] for p in peers)
            out[f"{lp}/stream_{size}"] = shm[f"stream_{size}"] / best
        for size in RR_SIZES:
            best = min(p[f"rr_{size}"]["p50_us"] for p in peers)
            out[f"{lp}/rr_{size}_p50"] = shm[f"rr_{size}"]["p50_us"] / best
        best = min(p["lowrate"]["p50_us"] for p in peers)
        out[f"{lp}/lowrate_p50"] = shm["lowrate"]["p50_us"] / best
    return out


def _size(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K" if n >= 1024 else f"{n}B"


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
    from rich.table import Table

    loops = args.loops.split(",")
    console = Console(stderr=True)
    with console.status("measuring") as status:
        results = measure(loops, args.seconds, lambda what: status.update(f"measuring {what}"))
    rel = ratios(results, loops)
    out = Console(width=max(Console().width, 150))
    table = Table(title="asyncio streams, server in another process (MB/s; latency in us)")
    columns = (
        ["peer"]
        + [f"stream {_size(s)}" for s in STREAM_SIZES]
        + [f"rr {_size(s)} p50" for s in RR_SIZES]
        + ["1/ms ping p50", "idle CPU"]
    )
    for column in columns:
        table.add_column(column, justify="right")
    for key, row in results.items():
        table.add_row(
            key,
            *(f"{row[f'stream_{s}'] / 1e6:,.0f}" for s in STREAM_SIZES),
            *(f"{row[f'rr_{s}']['p50_us']:.0f}" for s in RR_SIZES),
            f"{row['lowrate']['p50_us']:.0f}",
            f"{row['idle_cpu']:.1%}",
        )
    out.print(table)
    table = Table(title="shm vs the best socket peer (stream: higher is better; latency: lower)")
    table.add_column("cell")
    table.add_column("ratio", justify="right")
    for key, value in rel.items():
        table.add_row(key, f"{value:.2f}x")
    out.print(table)
    if args.json:
        print(json.dumps({"benchmark": "streams", "results": results, "ratios": rel}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
